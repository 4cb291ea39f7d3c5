"""The state of a rollout in progress (:class:`RolloutState`) and a finished one (:class:`Rollout`).

A :class:`RolloutState` is a KV-cached, left-padded batch of sequences that
:meth:`latentpatch.model.latent.LatentModel.advance` extends token by token; ``fork`` copies a prefix
of it so a sweep can restart many patched runs from one baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin

from latentpatch.model.sites import ActivationHooks


def layer_keys_values(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values), each [B, heads, T, d_head], of one filled attention layer of a KV cache."""
    if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
        raise TypeError(f"cannot fork a {type(layer).__name__} cache layer: only filled attention layers are supported")
    return layer.keys, layer.values


def _repeat_rows(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """``x`` [B, ...] with each row repeated ``repeats`` times. No copy for one repeat or one row
    (expanded): the next forward's cache update concatenates it into new storage anyway."""
    if repeats == 1:
        return x
    if x.shape[0] == 1:
        return x.expand(repeats, *x.shape[1:])
    return x.repeat_interleave(repeats, 0)


@dataclass
class RolloutState:
    """A KV-cached sequence in progress. ``length`` = tokens so far (incl. left padding).

    Shapes: ``attention_mask`` [B, length] long; ``next_position`` [B] long = position id of the
    next token of each row (padding is not counted).
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    length: int

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    def fork(self, length: int | None = None, repeats: int = 1, rows: torch.Tensor | None = None) -> RolloutState:
        """A copy truncated to the first ``length`` tokens, rows selected then repeated ``repeats`` times.

        The copy shares no storage that a later forward would append to, so the original stays
        usable (this is how a sweep reuses one baseline prefix for many patches).
        """
        length = self.length if length is None else length
        mask = self.attention_mask[:, :length]
        layers = []
        for layer in self.cache.layers:
            k, v = layer_keys_values(layer)
            k, v = k[:, :, :length], v[:, :, :length]
            if rows is not None:
                k, v = k[rows], v[rows]
            layers.append((_repeat_rows(k, repeats), _repeat_rows(v, repeats)))
        if rows is not None:
            mask = mask[rows]
        mask = mask.repeat_interleave(repeats, 0)
        return RolloutState(
            cache=DynamicCache(ddp_cache_data=layers),
            attention_mask=mask,
            next_position=mask.sum(1) if length else torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device),
            length=length,
        )


def stack_states(states: Sequence[RolloutState]) -> RolloutState:
    """One state whose rows are the rows of ``states`` in order (all of the same ``length``: no
    padding is added, so each row attends over exactly the keys it had)."""
    if len(states) == 1:
        return states[0]
    if len({s.length for s in states}) != 1:
        raise ValueError(f"cannot stack states of lengths {sorted({s.length for s in states})}")
    layers = []
    for per_state in zip(*(s.cache.layers for s in states)):
        kvs = [layer_keys_values(layer) for layer in per_state]
        layers.append((torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs])))
    return RolloutState(
        cache=DynamicCache(ddp_cache_data=layers),
        attention_mask=torch.cat([s.attention_mask for s in states]),
        next_position=torch.cat([s.next_position for s in states]),
        length=states[0].length,
    )


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
