"""PCCoT's parallel-slots rollout (github whyNLP/PCCoT at 2e32e3e, ``models/modeling_gpt2.py``
``PCCoTGPT2LMHeadModel.forward``; docs/method.md "SIM-CoT and PCCoT").

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

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from latentpatch.errors import LatentPatchError
from latentpatch.model.answering import label_prompt
from latentpatch.model.config import LatentConfig
from latentpatch.model.heads import QueryRecorder, attention_weights
from latentpatch.model.latent import LatentModel, StepHook, override_hook
from latentpatch.model.sites import ActivationHooks, Edit, Write
from latentpatch.model.state import Rollout, RolloutState, stack_states

#: what the engine's loop cannot do on PCCoT's rounds (a stop inside the loop, a per-step attention
#: mask, gradients from a fed first thought; the experiments needing them refuse up front)
UNSUPPORTED = (
    "PCCoT: a stop after fewer slots, per-step attention masks (edges), gradients from the first "
    "thought (atp) and training are not defined on the parallel rounds; fix: leave out edges and atp "
    "(early answers on PCCoT are over the rounds)"
)
#: the experiments ``latentpatch run`` runs on a PCCoT model (sites of the chosen round;
#: early over the rounds 0..T)
PCCOT_EXPERIMENTS = (
    "layer",
    "position",
    "iterative",
    "thought",
    "early",
    "influence",
    "intermediate",
    "lens",
    "attention",
    "probe",
    "steer",
    "das",
)
#: the experiments refused on PCCoT, with the reason (docs/method.md "SIM-CoT and PCCoT")
PCCOT_REFUSED = {
    "atp": "its one backward reads the gradient at the sequential loop's K one-token steps and cuts the "
    "recurrence between them, while a PCCoT round is one N-slot pass (not implemented)",
    "edges": "its knockouts mask one query step's attention in the sequential loop, while a PCCoT round "
    "runs its N slots in one pass (a per-slot 4-D mask there is not implemented)",
}


@contextmanager
def _paused(hooks: ActivationHooks | None) -> Iterator[ActivationHooks | None]:
    """The caller's entered ``hooks`` taken off the model meanwhile (a round that is not the site
    round: nothing written there, nothing recorded), then put back."""
    if hooks is None:
        yield None
        return
    hooks.__exit__()
    try:
        yield None
    finally:
        hooks.__enter__()


@contextmanager
def _recording(recorder: QueryRecorder, on: bool) -> Iterator[None]:
    """A round's hooks scope that records its attention inputs (``on``) and writes nothing."""
    with recorder if on else nullcontext():
        yield None


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

    :meth:`parallel_rollout` runs PCCoT with writes and records for any round. What the patching
    engine and :meth:`rollout` run is :meth:`run_thoughts`: the same rounds, whose sites are those
    of round ``site_round`` (default T, ``--pccot-round``); with ``rounds >= num_latent``
    (:attr:`equals_sequential`) the result equals the sequential loop.
    """

    #: no iterative ``frozen`` control: a site round's later slots come from the round before, so
    #: holding them changes nothing (frozen would equal chained); holding later rounds cuts every path
    frozen_path = False

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
        site_round: int | None = None,
    ) -> None:
        super().__init__(lm, prj, config, tokenizer, name)
        if rounds < 1:
            raise LatentPatchError(f"PCCoT rounds {rounds}: must be at least 1 (num_iterations in config.json)")
        self.rounds = int(rounds)
        self.site_round = self.rounds if site_round is None else int(site_round)
        if not 1 <= self.site_round <= self.rounds:
            raise LatentPatchError(
                f"--pccot-round {self.site_round}: the model runs rounds 1..{self.rounds}; fix: choose one of them"
            )
        self.latent_id = int(latent_id)
        self.answer_prompt_ids = [int(i) for i in answer_prompt_ids]

    @property
    def cache_identity(self) -> str:
        """What the activation cache's model key adds for PCCoT (``pipeline/cache.py``): the rounds,
        the site round, the placeholder and the answer prompt change every recorded run."""
        return f"pccot|{self.rounds}|{self.site_round}|{self.latent_id}|{self.answer_prompt_ids}"

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
        hooks = {r: ActivationHooks(self.lm, writes=writes.get(r, ()), record=record) for r in range(T + 2)}
        with torch.no_grad():
            base, _ = self.prefill(prompt_ids)  # question + [BOT]: the cache every round starts from
            state, guesses, thoughts, hidden = self._rounds(base, T, hooks.__getitem__, round_hook)
            with hooks[T + 1] as hk:
                end = self.advance(
                    state, inputs_embeds=self.embed_ids(self.answer_start_ids(), len(prompt_ids)), hooks=hk
                )
            answer_logits = self.logits(end[:, -1])
        return ParallelRollout(
            prompt_len=base.length,
            guesses=guesses,
            thoughts=torch.stack(thoughts, 1),
            hidden=torch.stack(hidden, 1),
            answer_logits=answer_logits,
            state=state,
            hooks=hooks,
        )

    def _rounds(
        self,
        prompt: RolloutState,
        T: int,
        scope: Callable[[int], AbstractContextManager[ActivationHooks | None]],
        round_hook: RoundHook | None = None,
        site: int = 0,
        start: int = 0,
        keep: list[RolloutState] | None = None,
    ) -> tuple[RolloutState, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The one PCCoT loop on ``prompt`` (question + [BOT], not modified): round 0, then T rounds.

        ``scope(r)``: the hooks context of round r's forward (``-1``: round ``site``'s slots before
        ``start``, which the engine's continuation leaves unhooked). Round 0 runs [BOT] and the N
        placeholders in one pass on the question's cache (so h at [BOT] comes from the same pass
        for every caller). ``keep``: the state after each round 0..T is appended to it (each of
        length ``T_q + N``). Returns the state after round T's run (its slots in the cache; T = 0:
        round 0's, the placeholders, as the official code with ``num_iterations`` 0), the guesses
        [B, N, d], the slots fed per round and their final hidden states ([B, N, d] each).
        """
        B, N, T_q = prompt.batch_size, self.num_latent, prompt.length
        ids = torch.full((B, N + 1), self.latent_id, dtype=torch.long, device=self.device)
        ids[:, 0] = self.config.bot_id
        state = prompt.fork(length=T_q - 1)
        with scope(0) as hk:
            h0 = self.advance(state, input_ids=ids, hooks=hk)  # [B, N + 1, d]
        slots = self.feedback(h0[:, :-1])  # slot 0 = f(h at [BOT]), slot i = f(h at [LATENT] i-1)
        guesses, thoughts, hidden = slots, [], []
        if keep is not None:
            keep.append(state)
        for r in range(1, T + 1):
            if round_hook is not None:
                slots = round_hook(r, slots)
            thoughts.append(slots)
            state = prompt.fork()
            parts = []
            if r == site and start:
                with scope(-1) as hk:
                    parts.append(self.advance(state, inputs_embeds=slots[:, :start], hooks=hk))
            with scope(r) as hk:
                parts.append(self.advance(state, inputs_embeds=slots[:, start if r == site else 0 :], hooks=hk))
            h = torch.cat(parts, 1)  # [B, N, d]
            hidden.append(h)
            if keep is not None:
                keep.append(state)
            # the update: slot 0 kept, slot i = f(h of slot i - 1); round T's is discarded
            slots = torch.cat([slots[:, :1], self.feedback(h[:, :-1])], 1)
        return state, guesses, thoughts, hidden

    def run_thoughts(
        self,
        state: RolloutState,
        first_thought: torch.Tensor,
        start: int = 0,
        *,
        hooks: ActivationHooks | None = None,
        step_hook: StepHook | None = None,
        thought_override: torch.Tensor | None = None,
        override_mask: torch.Tensor | None = None,
        cut_recurrence: bool = False,
        stop: int | None = None,
        latent_hide: torch.Tensor | None = None,
        next_thought: bool = True,
        **extra: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The latent phase as the engine and :meth:`rollout` run it: PCCoT's rounds, whose sites
        are those of round :attr:`site_round` (slot p at ``T_q + p``, as latent p of the sequential
        loop). ``hooks`` act in that round only (and in what the caller runs after: the answer);
        the step hooks and overrides replace that round's slots. ``state`` (question + [BOT], plus
        ``start`` slots of a baseline for the engine's continuation, which are recomputed) ends as
        round T's sequence. ``first_thought`` [B, d] is fed as the site round's slot ``start`` (as
        latent ``start`` of the sequential loop; unpatched it equals the computed slot), so a
        caller that edits it (DAS) edits that slot, with gradients through the later rounds.
        A stop before N slots, per-step masks, a cut recurrence and training refuse (one line).
        Returns the site round's slots from ``start`` on [B, N - start, d], their final hidden
        states, and the feedback of the last one.
        """
        N = self.num_latent
        given = sorted(k for k, v in extra.items() if v is not None)
        if given:  # an argument the sequential loop gained later: not defined here until written for the rounds
            raise LatentPatchError(f"PCCoT: {', '.join(given)} not defined on the parallel rounds; fix: leave it unset")
        if (stop is not None and stop != N) or cut_recurrence or latent_hide is not None or not next_thought:
            raise LatentPatchError(UNSUPPORTED)
        fns: list[StepHook] = []
        if thought_override is not None and override_mask is not None:
            fns.append(override_hook(thought_override, override_mask))
        if step_hook is not None:
            fns.append(step_hook)

        def site_hook(r: int, slots: torch.Tensor) -> torch.Tensor:
            if r != self.site_round:
                return slots
            cols = []
            for p in range(N):
                col = first_thought.to(slots.dtype) if p == start else slots[:, p]
                for fn in fns:
                    col = fn(p, col)
                cols.append(col)
            return torch.stack(cols, 1)

        def scope(r: int) -> AbstractContextManager[ActivationHooks | None]:
            return nullcontext(hooks) if r == self.site_round else _paused(hooks)

        prompt = state.fork(length=state.length - start)
        final, _, thoughts, hidden = self._rounds(prompt, self.rounds, scope, site_hook, self.site_round, start)
        state.cache, state.attention_mask = final.cache, final.attention_mask
        state.next_position, state.length = final.next_position, final.length
        fed, h = thoughts[self.site_round - 1], hidden[self.site_round - 1]
        return fed[:, start:], h[:, start:], self.feedback(h[:, -1])

    # -- the step-level experiments on the rounds (docs/method.md "SIM-CoT and PCCoT") --------------
    @property
    def early_exits(self) -> int:
        """PCCoT's early answers are over the rounds: S(r), r = 0..T."""
        return self.rounds

    def early_answer(
        self,
        prompts: Sequence[Sequence[int]],
        k: int,
        hooks: ActivationHooks | None = None,
        streams: Sequence[int | None] | None = None,
    ) -> tuple[RolloutState, torch.Tensor]:
        """The plain early answer S(k) on PCCoT: the answer after round k, i.e. the official procedure
        with ``num_iterations`` = k (k = 0: read the placeholders' pass). Returns the state and
        [B, V] answer logits. ``streams`` (draw-stream keys): PCCoT draws nothing, so unused."""
        if not 0 <= k <= self.rounds:
            raise LatentPatchError(f"PCCoT early answer after round {k}: the model runs rounds 0..{self.rounds}")
        state, _ = self.prefill(prompts, hooks=hooks)
        state, *_ = self._rounds(state, k, lambda r: nullcontext(hooks))
        end = self.advance(state, inputs_embeds=self.embed_ids(self.answer_start_ids(), len(prompts)), hooks=hooks)
        return state, self.logits(end[:, -1])

    def early_states(self, prompt: Sequence[int], target: Rollout, ks: Sequence[int]) -> RolloutState:
        """Row b: the state after round ``ks[b]`` of ``prompt``'s rollout (one run of the rounds up
        to the largest k, every round's state kept; ``target`` is not needed)."""
        keep: list[RolloutState] = []
        state, _ = self.prefill([list(prompt)])
        self._rounds(state, max(ks), lambda r: nullcontext(None), keep=keep)
        return stack_states([keep[k] for k in ks])

    def thought_chain(self, thoughts: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """What each slot of the site round hands on, f(h of slot j) (slot j+1's next input; the
        last slot's is discarded), ``[..., n, d]``: a patch of slot i in that round changes it for
        every j >= i through the round's attention. (The round's fed slots j != i cannot change:
        they come from the round before.)"""
        return self.feedback(hidden)

    def round_attention(self, prompt: Sequence[int]) -> tuple[torch.Tensor, int]:
        """``([L, H, N + 1, T] fp32 weights, T_q)``: the queries of slot 0..N-1 in the pass of round
        :attr:`site_round` over its keys (question, [BOT], that round's slots; zero on the rest),
        then the first answer position over round T's (what the answer reads). T: the finished
        rollout's length; weights from recorded queries and cached keys
        (:func:`~latentpatch.model.heads.attention_weights`)."""
        N, T_q = self.num_latent, len(prompt)
        rows = []
        for rounds, answer in ((self.site_round, False), (self.rounds, True)):
            recorder, state = self._recorded_rounds(prompt, rounds, answer)
            at = [state.length - 1] if answer else [T_q + p for p in range(N)]
            rows.append([attention_weights(self.lm, recorder, state, layer, at)[0] for layer in range(self.n_layers)])
        length = rows[1][0].shape[-1]
        slots = [torch.nn.functional.pad(w, (0, length - w.shape[-1])) for w in rows[0]]
        return torch.stack([torch.cat([s, a], 1) for s, a in zip(slots, rows[1])]), T_q

    @torch.no_grad()
    def _recorded_rounds(self, prompt: Sequence[int], rounds: int, answer: bool) -> tuple[QueryRecorder, RolloutState]:
        """``prompt``'s rollout up to round ``rounds`` (and the answer start with ``answer``), the
        attention inputs of the prompt, that round's slots (and the answer start) recorded: they
        line up with the absolute indices of the returned state."""
        recorder = QueryRecorder(self.lm)
        with recorder:
            state, _ = self.prefill([list(prompt)])

        def scope(r: int) -> AbstractContextManager[None]:
            return _recording(recorder, r == rounds)

        state, *_ = self._rounds(state, rounds, scope)
        if answer:
            with recorder:
                self.advance(state, inputs_embeds=self.embed_ids(self.answer_start_ids(), 1))
        return recorder, state

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
