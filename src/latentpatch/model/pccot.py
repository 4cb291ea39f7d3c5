"""PCCoT's parallel-slots rollout (github whyNLP/PCCoT at 2e32e3e, ``models/modeling_gpt2.py``
``PCCoTGPT2LMHeadModel.forward``; docs/method.md §24).

PCCoT feeds N latent *slots* at once and refines them by Jacobi iteration instead of one thought
per step::

    question + [BOT] + [LATENT] x N     round 0: one pass; the initial guesses are
                                        slot 0 = f(h at [BOT]), slot i = f(h at [LATENT] i-1)
    round t = 1..T                      all N slots at once on the question+[BOT] cache (slots
                                        attend causally to each other); then slot 0 is kept and
                                        slot i = f(h of slot i-1) (the update)
    [EOT] + "The answer is:"            read the KV of round T's run: its inputs carry T-1
                                        updates (round T's own update is discarded)

``f`` is the model's feedback (``model.feedback``; PCCoT's released model: identity). After u
updates slots 0..u are exactly the sequential loop's thoughts, so with T >= N the answer equals
the sequential loop (:meth:`~latentpatch.model.latent.LatentModel.rollout`) with the same ``f``.

This is a mode of the one model stack, not a second loop: every pass is
:meth:`~latentpatch.model.latent.LatentModel.prefill` / ``advance`` on forks of one
:class:`~latentpatch.model.state.RolloutState`, and the feedback is ``model.feedback``.

Sites are indexed by (round, slot, component, layer): slot j of every round sits at absolute index
``prompt_len + j`` (each round forks the question+[BOT] prefix), so an ordinary
:class:`~latentpatch.model.sites.Write` at that index, given for round r, writes round r only.
Round 0's slots are the ``[LATENT]`` token positions.

Batches: the official rounds pass no attention mask, so with left padding a question's slots
attend to the pad tokens of the batch and its numbers depend on the batch. Here every pass keeps
the mask, so each row gets the numbers the official code gives that question *alone* (the only
ones that do not depend on the batch); position ids come from the mask as in the official code
(slot j at position ``len(question) + 1 + j``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from latentpatch.errors import LatentPatchError
from latentpatch.model.answering import label_prompt
from latentpatch.model.config import LatentConfig
from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import ActivationHooks, Edit, Write
from latentpatch.model.state import RolloutState

#: ``(round, slots [B, N, d]) -> slots [B, N, d]``: the inputs fed in round ``round`` (1..T)
#: replaced (a thought-level patch of that round)
RoundHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class ParallelRollout:
    """Result of :meth:`PCCoTModel.parallel_rollout` for B prompts, N slots, T rounds.

    - ``prompt_len``: the padded length of question + [BOT]; slot j is at ``prompt_len + j``
    - ``guesses``: [B, N, d] round 0's initial guesses
    - ``thoughts``: [B, T, N, d] the slots fed in round t (index t - 1), after any round hook
    - ``hidden``: [B, T, N, d] final hidden states of each round's run
    - ``answer_logits``: [B, V] fp32 logits at the last answer-start token
    - ``state``: the KV-cached sequence after the answer start (round T's slots in the cache);
      continue it with ``score`` / ``generate``
    - ``hooks``: round -> the :class:`ActivationHooks` of that round (0..T; ``T + 1``: the answer start)
    """

    prompt_len: int
    guesses: torch.Tensor
    thoughts: torch.Tensor
    hidden: torch.Tensor
    answer_logits: torch.Tensor
    state: RolloutState
    hooks: dict[int, ActivationHooks] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return self.thoughts.shape[1]


class PCCoTModel(LatentModel):
    """A :class:`LatentModel` whose latent phase is PCCoT's parallel slots: ``num_latent`` = N slots,
    ``rounds`` = T Jacobi rounds (PCCoT's ``num_iterations``), ``latent_id`` the placeholder token of
    round 0, ``answer_prompt_ids`` the tokens fed after ``[EOT]`` (PCCoT's ``answer_prompt``,
    "The answer is:"), so answers are read after them.

    :meth:`rollout` (what the patching engine runs) is the sequential loop; it equals PCCoT when
    ``rounds >= num_latent`` (:attr:`equals_sequential`). :meth:`parallel_rollout` is PCCoT's own.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        prj: torch.nn.Module,
        config: LatentConfig,
        tokenizer: Any = None,
        name: str = "",
        *,
        rounds: int,
        latent_id: int,
        answer_prompt_ids: Sequence[int] = (),
    ) -> None:
        super().__init__(lm, prj, config, tokenizer, name)
        if rounds < 1:
            raise LatentPatchError(f"PCCoT rounds {rounds}: must be at least 1 (num_iterations in config.json)")
        self.rounds = int(rounds)
        self.latent_id = int(latent_id)
        self.answer_prompt_ids = [int(i) for i in answer_prompt_ids]

    @property
    def equals_sequential(self) -> bool:
        """Does the parallel rollout equal the sequential loop (T >= N: every slot converged)?"""
        return self.rounds >= self.num_latent

    def answer_start_ids(self) -> list[int]:
        """``[EOT]`` then PCCoT's answer prompt (``[EOS]`` too when ``remove_eos`` is False)."""
        return super().answer_start_ids() + self.answer_prompt_ids

    def parallel_rollout(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        rounds: int | None = None,
        writes: Mapping[int, Sequence[Write | Edit]] | None = None,
        record: Sequence[tuple[str, int]] = (),
        round_hook: RoundHook | None = None,
    ) -> ParallelRollout:
        """PCCoT's rollout of a batch of questions (text) or prompt ids (question + [BOT]).

        ``rounds``: T (default :attr:`rounds`). ``writes``: round -> the writes of that round
        (absolute index ``prompt_len + slot``; round 0 = the ``[LATENT]`` pass, ``T + 1`` = the
        answer start). ``record``: ``(component, layer)`` recorded in every round (read
        ``result.hooks[r].recorded(...)``: [B, N, d] for a round, the prompt's too for round 0).
        ``round_hook(r, slots)``: replaces the slots fed in round r (a thought-level patch).

        >>> from latentpatch.model.loaders import random_model
        >>> base = random_model("gpt2", num_latent=3)
        >>> m = PCCoTModel(base.lm, base.prj, base.config, base.tokenizer, rounds=3, latent_id=65)
        >>> r = m.parallel_rollout([[72, 105, base.config.bot_id]])
        >>> tuple(r.thoughts.shape), m.equals_sequential  # [B, T, N, d]
        ((1, 3, 3, 64), True)
        >>> bool((r.answer_logits - m.rollout([[72, 105, base.config.bot_id]]).answer_logits).abs().max() < 1e-5)
        True
        """
        T = self.rounds if rounds is None else int(rounds)
        if T < 1:
            raise LatentPatchError(f"PCCoT rounds {T}: must be at least 1")
        writes = dict(writes or {})
        bad = [r for r in writes if not 0 <= r <= T + 1]
        if bad:
            raise LatentPatchError(
                f"PCCoT writes for round(s) {bad}: rounds run 0..{T} (and {T + 1}: the answer start)"
            )
        prompt_ids = [self.prompt_ids(p) if isinstance(p, str) else list(p) for p in prompts]
        self.check_fits(prompt_ids, [label_prompt(p) for p in prompts])
        B, N = len(prompt_ids), self.num_latent
        hooks = {r: ActivationHooks(self.lm, writes=writes.get(r, ()), record=record) for r in range(T + 2)}
        with torch.no_grad():
            base, h_bot = self.prefill(prompt_ids)  # question + [BOT]: the cache every round starts from
            prompt_len = base.length
            with hooks[0]:  # round 0: the [LATENT] placeholders after [BOT] (the official first pass)
                placeholders = torch.full((B, N), self.latent_id, dtype=torch.long, device=self.device)
                h0 = self.advance(base.fork(), input_ids=placeholders, hooks=hooks[0])  # [B, N, d]
            slots = self.feedback(torch.cat([h_bot[:, None], h0[:, :-1]], 1))  # [B, N, d]
            guesses = slots
            thoughts, hidden = [], []
            state = base
            for r in range(1, T + 1):
                if round_hook is not None:
                    slots = round_hook(r, slots)
                thoughts.append(slots)
                state = base.fork()
                with hooks[r]:
                    h = self.advance(state, inputs_embeds=slots, hooks=hooks[r])  # [B, N, d]
                hidden.append(h)
                # the update: slot 0 kept, slot i = f(h of slot i - 1); round T's is discarded
                slots = torch.cat([slots[:, :1], self.feedback(h[:, :-1])], 1)
            with hooks[T + 1]:
                end = self.advance(state, inputs_embeds=self.embed_ids(self.answer_start_ids(), B), hooks=hooks[T + 1])
            answer_logits = self.logits(end[:, -1])
        return ParallelRollout(
            prompt_len=prompt_len,
            guesses=guesses,
            thoughts=torch.stack(thoughts, 1),
            hidden=torch.stack(hidden, 1),
            answer_logits=answer_logits,
            state=state,
            hooks=hooks,
        )

    @torch.no_grad()
    def parallel_answer(self, prompts: Sequence[str] | Sequence[Sequence[int]], **kwargs: Any) -> list[list[int]]:
        """Greedy answer ids of :meth:`parallel_rollout` (the family's decoding rule)."""
        r = self.parallel_rollout(prompts, **kwargs)
        return self.generate(r.state, r.answer_logits)


def slot_writes(
    index_base: int, slot: int, component: str, layer: int, values: torch.Tensor, rows: torch.Tensor | None = None
) -> Write:
    """The :class:`Write` of site (slot, component, layer) in a round: absolute index
    ``index_base + slot`` (``index_base`` = the rollout's ``prompt_len``), ``values`` [B, d].

    >>> w = slot_writes(7, 2, "resid_out", 1, torch.zeros(2, 4))
    >>> w.index.tolist(), w.rows.tolist()
    ([9, 9], [True, True])
    """
    B = values.shape[0]
    rows = torch.ones(B, dtype=torch.bool) if rows is None else rows
    return Write(component, layer, torch.full((B,), index_base + slot, dtype=torch.long), rows, values)


def check_sequential(model: LatentModel) -> None:
    """Refuse, in one line, a run of the patching engine on a PCCoT model whose parallel rollout
    differs from the sequential loop the engine patches (T rounds < N slots). Other models pass.
    """
    if isinstance(model, PCCoTModel) and not model.equals_sequential:
        raise LatentPatchError(
            f"--model {model.name}: PCCoT with {model.rounds} Jacobi rounds < {model.num_latent} slots; the "
            "experiments patch the sequential loop, which equals PCCoT only when rounds >= slots; fix: pass "
            f"--num-latent {model.rounds} or fewer, or patch rounds from Python with "
            "latentpatch.model.pccot.PCCoTModel.parallel_rollout (docs/method.md §24)"
        )
