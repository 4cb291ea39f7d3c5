"""The state of a rollout in progress (:class:`RolloutState`) and a finished one (:class:`Rollout`).

A :class:`RolloutState` is a KV-cached, left-padded batch of sequences that
:meth:`latentpatch.model.latent.LatentModel.advance` extends token by token; ``fork`` takes a prefix
of it so a sweep can restart many patched runs from one baseline (a plain fork without a copy).
The cache's tensors are read and rebuilt through :mod:`latentpatch.model.kv_cache` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from latentpatch.model.kv_cache import cache_from, layers_of
from latentpatch.model.sites import ActivationHooks
from latentpatch.model.streams import Streams, repeat_streams

if TYPE_CHECKING:
    from transformers import DynamicCache


def _gather_rows(parts: Sequence[tuple[torch.Tensor, int]], length: int) -> torch.Tensor:
    """One contiguous [sum B_i * r_i, heads, length, d_head] tensor: each part's x [B_i, heads,
    >= length, d_head] cut to ``length`` tokens, each row repeated ``r_i`` times (row b -> rows
    b*r_i .. b*r_i + r_i - 1), parts in order: one copy."""
    x0 = parts[0][0]
    out = x0.new_empty(sum(x.shape[0] * r for x, r in parts), x0.shape[1], length, x0.shape[3])
    i = 0
    for x, r in parts:
        n = x.shape[0] * r
        out[i : i + n].view(x.shape[0], r, *out.shape[1:]).copy_(x[:, None, :, :length].expand(-1, r, -1, -1, -1))
        i += n
    return out


def _gathered(
    states: Sequence[RolloutState], length: int, repeats: Sequence[int], rows: torch.Tensor | None = None
) -> RolloutState:
    """One state of each state's first ``length`` tokens (of a single state's rows ``rows``, when
    given), each row repeated ``repeats[i]`` times, states' rows in order: one copy per tensor."""
    layers = []
    for per_state in zip(*(layers_of(s.cache) for s in states)):
        kvs = list(per_state)
        if rows is not None:
            kvs = [(k[rows], v[rows]) for k, v in kvs]
        layers.append(
            (
                _gather_rows([(k, r) for (k, _), r in zip(kvs, repeats)], length),
                _gather_rows([(v, r) for (_, v), r in zip(kvs, repeats)], length),
            )
        )
    masks = [s.attention_mask[:, :length] for s in states]
    keys = [(s.streams, s.batch_size, r) for s, r in zip(states, repeats)]
    if rows is not None:
        masks = [masks[0][rows]]
        picked = states[0].streams
        picked = None if picked is None else tuple(picked[i] for i in rows.tolist())
        keys = [(picked, len(masks[0]), repeats[0])]
    mask = torch.cat([m.repeat_interleave(r, 0) for m, r in zip(masks, repeats)])
    # each row keeps its pair's draw stream (docs/method.md §21), whatever batch it is moved into
    streams = repeat_streams(keys)
    return RolloutState(cache_from(layers), mask, mask.sum(1), length, streams)


@dataclass
class RolloutState:
    """A KV-cached sequence in progress. ``length`` = tokens so far (incl. left padding).

    Shapes: ``attention_mask`` [B, length] long; ``next_position`` [B] long = position id of the
    next token of each row (padding is not counted). ``streams``: each row's draw-stream key for a
    random feedback (:mod:`latentpatch.model.streams`; None: the run's one stream), kept by every
    fork and stack.
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    length: int
    streams: Streams = None

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    def fork(self, length: int | None = None, repeats: int = 1, rows: torch.Tensor | None = None) -> RolloutState:
        """A state of the first ``length`` tokens (default: all), rows ``rows`` selected (default:
        all) then each repeated ``repeats`` times; the original stays usable (this is how a sweep
        reuses one baseline prefix for many patches).

        A plain fork (all rows, one repeat) shares the cache's tensors without a copy: a forward
        on either state concatenates its new tokens into new tensors and never writes into the
        shared ones. Any other fork copies the selected prefix once.
        """
        length = self.length if length is None else length
        if rows is None and repeats == 1:
            kvs = layers_of(self.cache)
            mask = self.attention_mask[:, :length]
            return RolloutState(
                cache=cache_from([(k[:, :, :length], v[:, :, :length]) for k, v in kvs]),
                attention_mask=mask,
                next_position=mask.sum(1),
                length=length,
                streams=self.streams,
            )
        return _gathered([self], length, [repeats], rows)


def stack_states(
    states: Sequence[RolloutState], length: int | None = None, repeats: Sequence[int] | None = None
) -> RolloutState:
    """One state whose rows are the rows of ``states`` in order, each state cut to its first
    ``length`` tokens (default: their common length) and each of its rows repeated ``repeats[i]``
    times (default 1): one copy. No padding is added, so each row attends over exactly the keys
    it had."""
    if length is None:
        if len({s.length for s in states}) != 1:
            raise ValueError(f"cannot stack states of lengths {sorted({s.length for s in states})}")
        length = states[0].length
    elif any(s.length < length for s in states):
        raise ValueError(f"cannot take {length} tokens of states of lengths {sorted({s.length for s in states})}")
    return _gathered(states, length, repeats or [1] * len(states))


@dataclass
class Rollout:
    """Result of ``LatentModel.rollout`` (:mod:`latentpatch.model.latent`) for a batch of B prompts.

    - ``prompt_len``: T_q, the padded prompt length (latent p is at index T_q + p)
    - ``prompt_lengths``: [B] real (unpadded) prompt lengths
    - ``thoughts``: [B, K, d] input embeddings fed at the latent positions
    - ``source_hidden``: [B, d] final hidden state (after the final norm) of the last prompt position
    - ``latent_hidden``: [B, K, d] final hidden states at the latent positions
    - ``next_thought``: [B, d] the thought produced by the last step (not fed)
    - ``answer_logits``: [B, V] fp32 logits at the last fed position ([EOT] or [EOS]): the
      distribution of the first answer token
    - ``state``: the KV-cached sequence after [EOT]; continue it with ``LatentModel.score`` /
      ``LatentModel.generate``
    - ``hooks``: the :class:`ActivationHooks` used (read recordings with ``hooks.recorded``)
    """

    prompt_len: int
    prompt_lengths: torch.Tensor
    thoughts: torch.Tensor
    source_hidden: torch.Tensor
    latent_hidden: torch.Tensor
    next_thought: torch.Tensor
    answer_logits: torch.Tensor
    state: RolloutState
    hooks: ActivationHooks | None = None

    @property
    def num_latent(self) -> int:
        return self.thoughts.shape[1]

    def latent_index(self, p: int) -> int:
        """Absolute sequence index of latent position ``p``."""
        return self.prompt_len + p

    def thought_source_hidden(self) -> torch.Tensor:
        """[B, K, d]: the final hidden state each thought was projected from (p=0: last prompt token)."""
        return torch.cat([self.source_hidden[:, None], self.latent_hidden[:, :-1]], dim=1)
