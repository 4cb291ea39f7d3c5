"""After the thoughts: the position limit, teacher forcing and greedy decoding (docs/method.md §6-§7).

:class:`AnswerPhase` is the part of :class:`~latentpatch.model.latent.LatentModel` that works on a
rollout's state once ``[EOT]`` (+ ``[EOS]``) is fed (``RolloutState``, left-padded, KV-cached):

- the model's position limit (:attr:`~AnswerPhase.max_positions`): a prompt whose thoughts do not
  fit is refused (:meth:`~AnswerPhase.check_fits`), and an answer may hold only the tokens that
  still have a position (:meth:`~AnswerPhase.answer_room`), so no forward indexes past the table;
- :meth:`~AnswerPhase.score`: teacher forcing of answer strings, ``[len, V]`` fp32 logits per row
  and string (the engine's metrics read these);
- :meth:`~AnswerPhase.generate`: greedy decoding by the family's rule.

It needs from the class it is mixed into: ``lm``, ``config``, ``num_latent``, ``device``,
``answer_start_ids``, ``advance``, ``logits`` and ``grad_mode`` (declared below for type checking).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from latentpatch.errors import LatentPatchError
from latentpatch.model.state import RolloutState

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from latentpatch.model.config import LatentConfig
    from latentpatch.model.sites import ActivationHooks


def shared_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens that every sequence starts with and that each feeds while teacher-forced (at most
    ``len - 1``: the last token of a sequence is only predicted).

    >>> shared_prefix_length([[5, 6, 7, 1], [5, 6, 7, 2, 3], [5, 6, 9]])
    2
    """
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    for i in range(max(n, 0)):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return max(n, 0)


def label_prompt(prompt: str | Sequence[int]) -> str:
    """A prompt as an error message names it: a question's first words, or its first ids."""
    if isinstance(prompt, str):
        return repr(prompt if len(prompt) <= 60 else prompt[:57] + "...")
    return f"with ids {list(prompt[:8])}{'...' if len(prompt) > 8 else ''}"


class AnswerPhase:
    """Position limit, teacher forcing and greedy decoding of a rollout after its thoughts (mixed
    into :class:`~latentpatch.model.latent.LatentModel`; see the module docstring)."""

    if TYPE_CHECKING:  # provided by LatentModel
        lm: PreTrainedModel
        config: LatentConfig

        @property
        def num_latent(self) -> int: ...
        @property
        def device(self) -> torch.device: ...
        def answer_start_ids(self) -> list[int]: ...
        def advance(
            self,
            state: RolloutState,
            *,
            input_ids: torch.Tensor | None = None,
            inputs_embeds: torch.Tensor | None = None,
            hooks: ActivationHooks | None = None,
        ) -> torch.Tensor: ...
        def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
        def grad_mode(self, grad: bool) -> AbstractContextManager[None]: ...

    # -- the position limit ----------------------------------------------------------------------
    @property
    def max_positions(self) -> int | None:
        """Position ids the LM takes (GPT-2 ``n_positions``, LLaMA ``max_position_embeddings``); None
        when its config names no limit. No forward of this class indexes past it: a prompt whose
        thoughts do not fit is refused (:meth:`check_fits`) and greedy decoding stops there
        (:meth:`answer_room`)."""
        cfg = getattr(self.lm, "config", None)
        for key in ("n_positions", "max_position_embeddings"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def positions_before_answer(self, prompt_len: int) -> int:
        """Positions a prompt of ``prompt_len`` tokens takes up to its first answer token: the
        prompt, the K thoughts and ``[EOT]`` (+ ``[EOS]``)."""
        return prompt_len + self.num_latent + len(self.answer_start_ids())

    def check_fits(self, prompts: Sequence[Sequence[int]], names: Sequence[str] | None = None) -> None:
        """Raise :class:`LatentPatchError` (one line: the question, its length, the limit) for the
        first prompt whose thoughts and ``[EOT]`` do not fit the model's positions (it would index
        past the position embedding). ``names[b]`` labels prompt b (default: its first ids).

        >>> from latentpatch.model.load import load_model
        >>> model = load_model("default")
        >>> model.check_fits([[5] * (model.max_positions - 7)], names=["q1"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        latentpatch.errors.LatentPatchError: question q1: its prompt is 505 tokens (with [BOT]); ... takes 512; ...
        """
        limit = self.max_positions
        if limit is None:
            return
        for b, prompt in enumerate(prompts):
            need = self.positions_before_answer(len(prompt))
            if need >= limit:  # the first answer token needs a position too
                name = names[b] if names is not None else label_prompt(prompt)
                raise LatentPatchError(
                    f"question {name}: its prompt is {len(prompt)} tokens (with [BOT]); with "
                    f"{self.num_latent} thoughts and {'[EOT]' if self.config.remove_eos else '[EOT] [EOS]'} "
                    f"it needs {need + 1} positions up to its first answer token, but the model takes "
                    f"{limit}; fix: shorten the question or leave it out"
                )

    def answer_room(self, state: RolloutState) -> list[int]:
        """Answer tokens each row of ``state`` (which ends just before its first answer token) may
        hold: ``max_answer_tokens``, or fewer where the model's positions end first (every answer
        token must have a position of its own, so the whole answer can be fed back to score it).
        Greedy decoding stops there (:meth:`generate`); an answer of that length was cut.

        >>> from latentpatch.model.load import load_model
        >>> model = load_model("default")
        >>> r = model.rollout([[5, 6, 7]])
        >>> model.answer_room(r.state), model.config.max_answer_tokens
        ([16], 16)
        """
        return self._decoding_room(state, self.config.max_answer_tokens)

    # -- teacher forcing and greedy decoding ----------------------------------------------------
    def score(
        self,
        state: RolloutState,
        answer_logits: torch.Tensor,
        continuations: Sequence[Sequence[Sequence[int]]],
        shared_prefix: bool = False,
        grad: bool = False,
    ) -> list[list[torch.Tensor]]:
        """Teacher forcing: logits predicting each token of each continuation, per row.

        ``continuations[b]`` is a list of token-id lists for row b (all rows must have the same
        number C of continuations). Returns ``out[b][c]`` = [len, V] fp32 logits where row j
        predicts token j (row 0 is ``answer_logits[b]``). ``state`` is not modified.

        ``shared_prefix``: feed the tokens every continuation of a row starts with ("The answer
        is: ") once and branch from a fork after them (docs/method.md §7.2; the engine's default;
        rows may hold different tokens there, the batch feeds the shortest such prefix). The
        same computation; a branch of a single token may differ in the last bits from the same
        token inside a longer forward. ``grad``: with gradients (:meth:`grad_mode`), through the
        cache of a rollout made with ``grad=True``.
        """
        with self.grad_mode(grad):
            return self._score(state, answer_logits, continuations, shared_prefix)

    def _score(
        self,
        state: RolloutState,
        answer_logits: torch.Tensor,
        continuations: Sequence[Sequence[Sequence[int]]],
        shared_prefix: bool,
    ) -> list[list[torch.Tensor]]:
        B = state.batch_size
        C = len(continuations[0])
        if any(len(c) != C for c in continuations):
            raise ValueError("every row needs the same number of continuations")
        seqs = [[list(continuations[b][c]) for b in range(B)] for c in range(C)]  # [C][B]
        room = self._decoding_room(state, 1 << 30)  # [B] positions left after the thoughts
        for b in range(B):
            longest = max(len(c) for c in continuations[b]) - 1  # tokens fed: the last is only predicted
            if longest > room[b]:
                raise LatentPatchError(
                    f"an answer string of {longest + 1} tokens does not fit after the thoughts: the model's "
                    f"positions end {room[b]} tokens later ({self.max_positions}); fix: shorten the question"
                )
        # Each row's own common prefix (rows of different pairs may hold different tokens there);
        # the batch feeds the shortest, so rows alike split as they would alone (§7.1).
        n = min(shared_prefix_length([seqs[c][b] for c in range(C)]) for b in range(B)) if shared_prefix else 0
        first, start = answer_logits[:, None], state  # first: [B, 1 + n, V] logits before the branches
        if n:
            start = state.fork()
            prefix = torch.tensor([seqs[0][b][:n] for b in range(B)], device=self.device)  # [B, n]
            first = torch.cat([first, self.logits(self.advance(start, input_ids=prefix))], 1)
        out: list[list] = [[None] * C for _ in range(B)]
        # One forward per continuation index, each right-padded only to its own longest string
        # (A_base is often much longer than A_clean/A_corr). Padding after the real tokens is
        # harmless: causal attention keeps the earlier positions' logits exact. Two strings that
        # feed the same tokens on every row (A_clean = 32, A_corr = 31 without an answer prefix
        # both feed "3") share one forward: the same computation, so the same bits.
        fed: dict[tuple, torch.Tensor] = {}
        for c in range(C):
            width = max(len(seq) for seq in seqs[c]) - 1 - n
            key = tuple(tuple(seq[n:-1]) for seq in seqs[c])
            if width > 0 and key not in fed:
                ids = torch.full((B, width), self.config.pad_id, dtype=torch.long, device=self.device)
                for b, seq in enumerate(seqs[c]):
                    if len(seq) > n + 1:
                        ids[b, : len(seq) - 1 - n] = torch.tensor(seq[n:-1])
                fed[key] = self.logits(self.advance(start.fork(), input_ids=ids))
            if width > 0:
                logits = fed[key]
            for b, seq in enumerate(seqs[c]):
                rest = logits[b, : len(seq) - 1 - n] if width > 0 else answer_logits[:0]
                out[b][c] = torch.cat([first[b], rest], 0)[: len(seq)]
        return out

    @torch.no_grad()
    def generate(
        self, state: RolloutState, answer_logits: torch.Tensor, max_new_tokens: int | None = None
    ) -> list[list[int]]:
        """Greedy decoding after the thoughts by the family's rule (:meth:`LatentConfig.banned_ids`,
        :meth:`LatentConfig.eos_stops`) until ``[EOS]``, ``max_new_tokens`` (default
        ``max_answer_tokens``) or the model's last position (:meth:`answer_room`: never an index
        past the position embedding). Returns each row's ids without the stopping ``[EOS]``.
        ``state`` is not modified."""
        cfg = self.config
        n = max_new_tokens or cfg.max_answer_tokens
        room = self._decoding_room(state, n)
        banned = torch.tensor(cfg.banned_ids(answer_logits.shape[-1]), dtype=torch.long, device=self.device)
        state = state.fork()
        logits = answer_logits.clone()
        B = logits.shape[0]
        done = torch.tensor([r <= 0 for r in room], dtype=torch.bool, device=self.device)
        out: list[list[int]] = [[] for _ in range(B)]
        last = (self.max_positions or 0) - 1
        for step in range(max(room, default=0)):
            logits[:, banned] = float("-inf")
            nxt = logits.argmax(-1)
            stop = (nxt == cfg.eos_id) & cfg.eos_stops(step)
            for b in range(B):
                if not done[b] and not stop[b]:
                    out[b].append(int(nxt[b]))
            done |= stop | torch.tensor([step + 1 >= r for r in room], dtype=torch.bool, device=self.device)
            if bool(done.all()):
                break
            if last >= 0:
                # Rows already done are still fed (the batch keeps its shape and the live rows their
                # bits); their position ids are held at the last one so none indexes past the table.
                state.next_position = state.next_position.clamp(max=last)
            logits = self.logits(self.advance(state, input_ids=nxt[:, None])[:, -1])
        return out

    def _decoding_room(self, state: RolloutState, n: int) -> list[int]:
        """Tokens each row of ``state`` may decode: ``n``, or fewer where the positions end first."""
        return [self.room_at(int(p), n) for p in state.next_position.tolist()]

    def room_at(self, next_position: int, n: int | None = None) -> int:
        """Answer tokens a row may hold whose next position id is ``next_position`` (for a prompt of
        length T: :meth:`positions_before_answer` (T)): ``n`` (default ``max_answer_tokens``), or
        fewer where the model's positions end first. The one rule :meth:`answer_room` applies."""
        n = self.config.max_answer_tokens if n is None else n
        limit = self.max_positions
        return n if limit is None else max(0, min(n, limit - next_position))
