"""The continuous-thought model and its real latent rollout (docs/method.md §1).

A :class:`LatentModel` is an ordinary Hugging Face causal LM (LLaMA or GPT-2 family) plus a
feedback object (``model.feedback``, :mod:`latentpatch.model.feedback`; CODI's projection ``prj``)
and a few special token ids. Its rollout::

    question tokens + [BOT]      one prompt pass, KV cache, last hidden state h
    thought 0 = prj(h)           fed as an input *embedding*, not a token
    thought p = prj(h_{p-1})     K = num_latent steps, each one cached forward of one embedding
    [EOT] (+[EOS])               then ordinary decoding: "The answer is: 18"

Nothing is sampled in the latent phase. The hidden state fed back is the last block's output
after the final norm (``hidden_states[-1]`` in transformers). Coconut is the same with ``prj`` =
identity (:class:`~latentpatch.model.feedback.IdentityFeedback`). :meth:`LatentModel.run_thoughts`
is the one latent loop: the rollout, the patching engine (overrides, early answers) and training
all go through it.

Layout of a batch: prompts are left-padded to a common length ``T_q``, so latent position ``p``
is at absolute index ``T_q + p`` in every row and ``[EOT]`` at ``T_q + K``. Attention masks and
position ids skip the padding, so a row's numbers do not depend on the rest of the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypedDict

import torch
from torch import nn
from transformers import PreTrainedModel

from latentpatch.model.answering import AnswerPhase, label_prompt
from latentpatch.model.config import LatentConfig, extract_number
from latentpatch.model.feedback import Feedback, as_feedback
from latentpatch.model.sites import (
    ActivationHooks,
    Edit,
    Write,
    backbone_of,
    cache_keyword,
    embedding_matrix,
    model_family,
    transformer_blocks,
)
from latentpatch.model.state import Rollout, RolloutState
from latentpatch.model.streams import StreamKeys, as_streams
from latentpatch.model.text_ids import TextIds

#: a step hook of :meth:`LatentModel.run_thoughts`: ``(step, thought [B, d]) -> thought [B, d]``,
#: the input embedding fed at latent ``step`` (overrides, ablations, interchange swaps)
StepHook = Callable[[int, torch.Tensor], torch.Tensor]


def override_hook(thought_override: torch.Tensor, override_mask: torch.Tensor) -> StepHook:
    """The step hook of ``thought_override`` [B, K, d] / ``override_mask`` [B, K]: row b is fed
    ``thought_override[b, p]`` at latent p where ``override_mask[b, p]`` is set."""

    def hook(step: int, thought: torch.Tensor) -> torch.Tensor:
        return torch.where(override_mask[:, step, None], thought_override[:, step].to(thought.dtype), thought)

    return hook


class ThoughtOverride(TypedDict):
    """Keyword arguments of :meth:`LatentModel.rollout` that replace thoughts: ``thought_override``
    [B, K, d] is fed at the latent positions where ``override_mask`` [B, K] is True."""

    thought_override: torch.Tensor
    override_mask: torch.Tensor


class LatentModel(TextIds, AnswerPhase, nn.Module):
    """A causal LM + a feedback object + special ids: runs the continuous-thought rollout
    (docs/method.md §1).

    ``lm`` is a transformers ``LlamaForCausalLM``-like or ``GPT2LMHeadModel``-like model with any
    LoRA already merged. ``prj``: what is fed back after each latent step, a
    :class:`~latentpatch.model.feedback.Feedback` or what :func:`~latentpatch.model.config.build_prj`
    returns (turned into one by :func:`~latentpatch.model.feedback.as_feedback`); it is
    ``model.feedback``, and ``model.prj`` is the same module (assigning either sets both).
    ``tokenizer`` is optional (a base without one can be driven by token ids).
    What happens after the thoughts (the position limit, :meth:`score`, :meth:`generate`) is
    :class:`~latentpatch.model.answering.AnswerPhase`.
    """

    def __init__(
        self, lm: PreTrainedModel, prj: nn.Module, config: LatentConfig, tokenizer: Any = None, name: str = ""
    ) -> None:
        super().__init__()
        self.lm = lm
        self.feedback = as_feedback(prj)
        self.config = config
        self.tokenizer = tokenizer
        self.name = name
        self.family = model_family(lm)
        self.blocks = transformer_blocks(lm)
        self.backbone = backbone_of(lm)
        self.cache_keyword = cache_keyword(self.backbone)
        self.lm.eval()
        self.feedback.eval()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("prj", "feedback"):  # one module under one name: model.prj is model.feedback
            name, value = "feedback", as_feedback(value)
        super().__setattr__(name, value)

    @property
    def prj(self) -> Feedback:
        """The feedback object under CODI's name (the same module as :attr:`feedback`)."""
        return self.feedback

    # -- shape facts -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return embedding_matrix(self.lm).shape[1]

    @property
    def vocab_size(self) -> int:
        return int(self.lm.get_output_embeddings().weight.shape[0])

    @property
    def num_latent(self) -> int:
        return self.config.num_latent

    #: Does holding the thoughts after a patched one at the target's values leave the attention path
    #: alone (the iterative experiment's ``frozen`` control)? True for the sequential loop.
    frozen_path: bool = True

    @contextmanager
    def latent_count(self, k: int) -> Iterator[None]:
        """Run with ``k`` latents inside the block (a pair's own count by its family's stop rule,
        :mod:`latentpatch.model.stops`); every loop, site list and answer position reads
        :attr:`num_latent`, so nothing else changes.

        >>> from latentpatch.model.loaders import random_model
        >>> m = random_model("gpt2", num_latent=4)
        >>> with m.latent_count(2):
        ...     m.num_latent
        2
        >>> m.num_latent
        4
        """
        old, cap = self.config, self.__dict__.get("_latent_cap")
        self.config = dataclasses.replace(old, num_latent=int(k))
        self._latent_cap = cap if cap is not None else old.num_latent
        try:
            yield
        finally:
            self.config, self._latent_cap = old, cap

    @property
    def latent_cap(self) -> int:
        """The most latents a run of this model takes: its configured :attr:`num_latent`, also
        inside :meth:`latent_count` (where a family's stop rule is cut off)."""
        cap = self.__dict__.get("_latent_cap")
        return int(cap) if cap is not None else self.num_latent

    @property
    def device(self) -> torch.device:
        return embedding_matrix(self.lm).device

    @property
    def dtype(self) -> torch.dtype:
        return embedding_matrix(self.lm).dtype

    # -- the forward primitive -------------------------------------------------------------------
    def advance(
        self,
        state: RolloutState,
        *,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        hooks: ActivationHooks | None = None,
        hide: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run T new tokens (ids [B, T] or embeddings [B, T, d]) on ``state``; returns the
        final hidden states [B, T, d] (after the final norm) and advances ``state`` in place.

        The one cached forward step every phase uses (thoughts, [EOT], scoring, decoding); the
        engine calls it to continue a forked state. ``hooks.offset`` is set to the absolute index
        of the first new token so writes land at the right positions. ``hide`` [B, >= length + T]
        bool: columns the new tokens do not attend to in this call only (``state`` keeps the full
        mask; :meth:`run_thoughts`' ``latent_hide``)."""
        if inputs_embeds is None:
            inputs_embeds = self.lm.get_input_embeddings()(input_ids)
        B, T = inputs_embeds.shape[:2]
        ones = torch.ones(B, T, dtype=state.attention_mask.dtype, device=state.attention_mask.device)
        mask = torch.cat([state.attention_mask, ones], dim=1)
        position_ids = state.next_position[:, None] + torch.arange(T, device=mask.device)[None]
        if hooks is not None:
            hooks.offset = state.length
        cache = {self.cache_keyword: state.cache}
        step_mask = mask if hide is None else mask.masked_fill(hide[:, : mask.size(1)].to(mask.device), 0)
        out = self.backbone(
            inputs_embeds=inputs_embeds, attention_mask=step_mask, position_ids=position_ids, use_cache=True, **cache
        )
        state.cache = getattr(out, self.cache_keyword)
        state.attention_mask = mask
        state.next_position = state.next_position + T
        state.length += T
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on final hidden states, in fp32."""
        return self.lm.get_output_embeddings()(hidden).float()

    def embed_ids(self, ids: Sequence[int], batch: int) -> torch.Tensor:
        """[batch, len(ids), d] token embeddings of the same ids for every row."""
        t = torch.tensor([list(ids)] * batch, device=self.device)
        return self.lm.get_input_embeddings()(t)

    # -- rollout ---------------------------------------------------------------------------------
    def prefill(
        self, prompts: Sequence[Sequence[int]], hooks: ActivationHooks | None = None, streams: StreamKeys = None
    ) -> tuple[RolloutState, torch.Tensor]:
        """Left-pad and run the prompts. Returns the state and [B, d] last-position final hidden.
        ``streams``: each row's draw-stream key (a random feedback's; docs/method.md §21), kept on the state."""
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), self.config.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), T), dtype=torch.long)
        for b, p in enumerate(prompts):
            if len(p):
                ids[b, T - len(p) :] = torch.tensor(list(p))
                mask[b, T - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        if hooks is not None:
            hooks.offset = 0
        out = self.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
        cache = getattr(out, self.cache_keyword)
        state = RolloutState(cache, mask, mask.sum(1), T, as_streams(streams, len(prompts)))
        return state, out.last_hidden_state[:, -1]

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
        observe: Callable[[int, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The latent loop: steps ``start..stop-1`` on ``state`` (which must end just before latent
        ``start``); ``stop`` defaults to K = ``num_latent`` (fewer: an early answer, §13).

        ``first_thought`` [B, d] is the input embedding of latent ``start``. Each later input is
        the feedback (``model.feedback``, CODI's ``prj``) of the previous final hidden state.
        ``step_hook(step, thought [B, d]) -> thought [B, d]`` replaces the input fed at latent
        ``step`` (every step, ``start`` included). ``thought_override``/``override_mask`` are such a
        hook (:func:`override_hook`, applied before ``step_hook``): row b is fed
        ``thought_override[b, p]`` where ``override_mask[b, p]`` is set (used to freeze the
        recurrent path). ``cut_recurrence`` (with gradients on): each feedback output is fed as a
        new leaf tensor, the same values with the gradient stopped there, so gradients reach
        earlier positions only through the KV cache (the attention path; docs/method.md §15).
        ``latent_hide`` [B, K, >= T + K] bool (training's thought isolation): the columns latent
        step p does not attend to (that step only; the cache keeps the full mask).
        Returns ``thoughts`` [B, stop-start, d] (inputs fed), ``hidden`` [B, stop-start, d] (final
        hidden states) and the next thought [B, d] (produced by the last step, not fed); with
        ``next_thought`` False the last hidden state is not fed back and None takes its place
        (training: CODI's loop calls ``prj`` once per fed thought, so a projection with dropout
        draws the same random numbers). ``observe(step, h [B, d])`` is called with each step's final
        hidden state (a family's stop rule reads it there: :class:`~latentpatch.model.stops.StopObserver`).
        """
        hook_fns: list[StepHook] = []
        if thought_override is not None and override_mask is not None:
            hook_fns.append(override_hook(thought_override, override_mask))
        if step_hook is not None:
            hook_fns.append(step_hook)
        thought = first_thought
        thoughts, hidden = [], []
        end = self.num_latent if stop is None else stop
        for p in range(start, end):
            for fn in hook_fns:
                thought = fn(p, thought)
            thoughts.append(thought)
            hide = None if latent_hide is None else latent_hide[:, p]
            h = self.advance(state, inputs_embeds=thought[:, None], hooks=hooks, hide=hide)[:, -1]
            hidden.append(h)
            if observe is not None:
                observe(p, h)
            if p == end - 1 and not next_thought:
                break
            thought = self.feedback.feed(h, p + 1, state.streams)  # the rows' own draw streams (§21)
            if cut_recurrence and torch.is_grad_enabled():
                thought = thought.detach().requires_grad_(True)
        if not thoughts:  # no step (an early answer after 0 thoughts)
            empty = first_thought.new_zeros(first_thought.shape[0], 0, first_thought.shape[-1])
            return empty, empty, thought if next_thought else None
        return torch.stack(thoughts, 1), torch.stack(hidden, 1), thought if next_thought else None

    def early_answer(
        self, prompts: Sequence[Sequence[int]], k: int, hooks: ActivationHooks | None = None, streams: StreamKeys = None
    ) -> tuple[RolloutState, torch.Tensor]:
        """The plain early answer S(k) (docs/method.md §13): prompt, k thoughts of the one latent
        loop (:meth:`run_thoughts` with ``stop=k``), [EOT]. Returns the state and [B, V] answer
        logits."""
        state, h = self.prefill(prompts, hooks=hooks, streams=streams)
        self.run_thoughts(state, self.feedback.feed(h, 0, state.streams), 0, hooks=hooks, stop=k)
        end = self.advance(state, inputs_embeds=self.embed_ids(self.answer_start_ids(), len(prompts)), hooks=hooks)
        return state, self.logits(end[:, -1])

    # The three hooks below are what the step-level experiments ask of a family whose latent phase is
    # not the sequential loop (PCCoT's rounds override them; docs/method.md "SIM-CoT and PCCoT").
    @property
    def early_exits(self) -> int:
        """The last k of the early answers S(k), k = 0..``early_exits``: K thoughts here."""
        return self.num_latent

    def early_states(self, prompt: Sequence[int], target: Rollout, ks: Sequence[int]) -> RolloutState:
        """The caches the early answers S(k) read before [EOT], one row per k of ``ks``, on the
        ``target`` rollout of ``prompt`` (the engine's batched early answers, docs/method.md §13):
        row b keeps the cache of all K thoughts but masks thoughts k..K-1 out of attention (as left
        padding is), so its [EOT] sits right after thought k-1 with position id ``T_q + k``."""
        T_q, K = target.prompt_len, self.num_latent
        state = target.state.fork(length=T_q + K, repeats=len(ks))
        mask = state.attention_mask.clone()  # [B, T_q + K]
        for row, k in enumerate(ks):
            mask[row, T_q + k : T_q + K] = 0
        state.attention_mask, state.next_position = mask, mask.sum(1)
        return state

    def thought_chain(self, thoughts: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., n, d]``: the chain the influence experiment compares with the target's, from a run's
        fed thoughts and their final hidden states (both ``[..., n, d]``): here the thoughts fed."""
        return thoughts

    def thought_ablation(self, values: torch.Tensor, batch: int) -> ThoughtOverride:
        """Keyword arguments for :meth:`rollout` / :meth:`answer` that feed ``values`` at every latent
        position of every row instead of the feedback's (``prj``'s) outputs (thought ablation: zeros, a dataset mean).

        ``values``: [1, K, d] (the same for every row) or [batch, K, d].
        """
        K = self.num_latent
        override = values.to(device=self.device, dtype=self.dtype).expand(batch, K, -1)
        every = torch.ones(batch, K, dtype=torch.bool, device=self.device)
        return ThoughtOverride(thought_override=override, override_mask=every)

    @contextmanager
    def grad_mode(self, grad: bool) -> Iterator[None]:
        """``grad`` False: no autograd graph (every run but attribution patching). True: gradients
        on, with every parameter's ``requires_grad`` off meanwhile, so the graph holds only what
        flows from the inputs that ask for gradients (the latent positions; docs/method.md §15)."""
        if not grad:
            with torch.no_grad():
                yield
            return
        flags = [(p, p.requires_grad) for p in self.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.enable_grad():
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def rollout(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        writes: Sequence[Write | Edit] = (),
        record: Sequence[tuple[str, int]] = (),
        thought_override: torch.Tensor | None = None,
        override_mask: torch.Tensor | None = None,
        grad: bool = False,
        cut_recurrence: bool = False,
        streams: StreamKeys = None,
    ) -> Rollout:
        """The real latent rollout of a batch of questions (text) or prompt ids (with separators).

        ``writes`` overwrite sites on the way (see :mod:`latentpatch.model.sites`); ``record`` keeps
        ``(component, layer)`` activations for every position.

        ``grad``: run the latent steps and ``[EOT]`` with gradients (:meth:`grad_mode`): thought 0 is
        a leaf that asks for gradients (the prompt pass has no graph: no site lies there), every
        later thought is ``prj`` of the previous step inside the graph, and recordings stay in the
        graph (:meth:`ActivationHooks.recorded_parts`). ``cut_recurrence``: stop the gradient at each
        fed thought (:meth:`run_thoughts`). Attribution patching (docs/method.md §15) uses both.
        ``streams``: each row's draw-stream key (:mod:`latentpatch.model.streams`; None: the run's stream).

        >>> from latentpatch.model.load import load_model
        >>> model = load_model("default")
        >>> q = ("A farmer plants 2 rows with 3 trees in each row. 1 of the trees die, "
        ...      "and the farmer plants 3 new trees. How many trees does the farmer have now?")
        >>> r = model.rollout([q], record=[("resid_out", 2)])
        >>> tuple(r.thoughts.shape)  # [B, K, d]
        (1, 6, 128)
        >>> tuple(r.hooks.recorded("resid_out", 2).shape) == (1, r.prompt_len + model.num_latent + 1, 128)
        True
        >>> model.decode(model.generate(r.state, r.answer_logits)[0])
        'The answer is: 8'
        """
        prompt_ids = [self.prompt_ids(p) if isinstance(p, str) else list(p) for p in prompts]
        self.check_fits(prompt_ids, [label_prompt(p) for p in prompts])
        hooks = ActivationHooks(self.lm, writes=writes, record=record, keep_graph=grad)
        with hooks, self.grad_mode(grad):
            with torch.no_grad():
                state, h = self.prefill(prompt_ids, hooks=hooks, streams=streams)
            prompt_len = state.length
            first = self.feedback.feed(h, 0, state.streams)
            if grad:
                first = first.detach().requires_grad_(True)
            thoughts, hidden, next_thought = self.run_thoughts(
                state,
                first,
                0,
                hooks=hooks,
                thought_override=thought_override,
                override_mask=override_mask,
                cut_recurrence=cut_recurrence,
            )
            assert next_thought is not None
            answer_start = self.embed_ids(self.answer_start_ids(), len(prompt_ids))  # [B, 1 or 2, d]
            end = self.advance(state, inputs_embeds=answer_start, hooks=hooks)
            answer_logits = self.logits(end[:, -1])
        return Rollout(
            prompt_len=prompt_len,
            prompt_lengths=torch.tensor([len(p) for p in prompt_ids]),
            thoughts=thoughts,
            source_hidden=h,
            latent_hidden=hidden,
            next_thought=next_thought,
            answer_logits=answer_logits,
            state=state,
            hooks=hooks,
        )

    @torch.no_grad()
    def answer(self, questions: Sequence[str] | Sequence[Sequence[int]], **rollout_kwargs) -> list[float | None]:
        """Greedy answers (numbers) for a batch of questions, with the full rollout."""
        r = self.rollout(questions, **rollout_kwargs)
        return [extract_number(self.decode(ids)) for ids in self.generate(r.state, r.answer_logits)]
