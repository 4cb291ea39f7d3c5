"""Soft Thinking's and Multiplex's stops and Soft Thinking's noise (docs/method.md §21).

**Stops** (a :class:`~latentpatch.model.stops.StopRule`, ``model.feedback.stop_rule``; asked after
latent step ``p`` with the logits [B, V] of that step's final hidden state, firing means ``p + 1``
latents):

- ``think_stop="official"`` (eric-ai-lab/Soft-Thinking ``managers/schedule_batch.py``
  ``update_topk_info``): thinking ends when the step's output id, ``topk_indices[:, 0]`` of the
  sampler (the top-1 of the filtered, and noised, distribution), equals the *last* id of
  ``encode("</think>")``. The official code then feeds that one id (one-hot), so the answer phase
  feeds the last id only (``answer_start``).
- ``think_stop="j1ml1"`` (J1mL1/causal-latent-cot ``softthinking_model.py`` ``rollout_from_step``;
  the default, today's rule): the argmax of ``softmax(logits / T)`` is ``</think>``'s id if it is
  one token; a ``</think>`` of several ids never stops. Every id of ``</think>`` is fed after.
- ``think_stop="none"``: no ``</think>`` stop.
- The cold stop (``cold_stop_threshold`` > 0): the entropy ``H`` of ``softmax(logits / T)``
  (unfiltered: Soft Thinking's sampler; the filtered ``p`` for Multiplex, J1mL1's
  ``multiplex_model.py``) below the threshold for ``cold_stop_steps`` consecutive steps (the count
  reset by a step at or above it). The rules combine: any of them fires.

**Noise** (``noise``, Soft Thinking only, off by default; ``sampler.py``, the soft-thinking branch):
``dirichlet``: ``p <- Gamma(p * dirichlet_alpha, 1)`` normalised, after min-p and before the
``max_topk`` cut; ``gumbel``: on the ``max_topk`` weights ``w``, ``softmax((log w + g) / tau)`` with
``g = -log(Exp(1))``, the ids re-sorted by the new weights. The draws of step ``s`` come from the
feedback's :class:`~latentpatch.model.mixture.DrawStream` (plan: :func:`noise_plan`).

>>> parse_mixture_kind("soft,think_stop=official,cold_stop_threshold=0.01")[1].think_stop
'official'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from latentpatch.errors import LatentPatchError
from latentpatch.model.stops import StopRule
from latentpatch.model.streams import row_streams

if TYPE_CHECKING:
    from latentpatch.model.mixture import MixtureFeedback, MixtureSettings

#: ``think_stop`` values: Soft-Thinking's last-id rule, J1mL1's one-token rule, none
THINK_STOPS = ("j1ml1", "official", "none")
#: ``noise`` values (Soft Thinking's sampler; both at once as the official flags allow)
NOISES = ("none", "dirichlet", "gumbel", "dirichlet+gumbel")
#: candidates per vocabulary entry of the Dirichlet's Gamma draws (Marsaglia-Tsang accepts each with
#: probability >= 0.95, so all GAMMA_TRIES fail with probability < 0.05 ** 8 = 4e-11)
GAMMA_TRIES = 8


def think_stop_id(think_ids: Sequence[int], think_stop: str) -> int | None:
    """The id whose top-1 ends thinking, None when the rule cannot fire.

    >>> think_stop_id([2, 3, 4], "official"), think_stop_id([2, 3, 4], "j1ml1"), think_stop_id([9], "j1ml1")
    (4, None, 9)
    """
    if think_stop == "official":
        return int(think_ids[-1])
    if think_stop == "j1ml1" and len(think_ids) == 1:
        return int(think_ids[0])
    return None


def answer_start_ids(think_ids: Sequence[int], think_stop: str) -> tuple[int, ...]:
    """The ids fed after the thoughts: the official rule's one id (its one-hot replaces the
    step's mixture), else every id of ``</think>`` (J1mL1's loop)."""
    return (int(think_ids[-1]),) if think_stop == "official" else tuple(int(i) for i in think_ids)


class MixtureStop(StopRule):
    """The ``</think>`` rule and the cold stop of a mixture feedback (either may be off).

    Memory: ``low`` [B], each row's count of consecutive low-entropy steps so far (a run restarted
    at step p must be given the count its prefix reached).
    """

    name: ClassVar[str] = "mixture_stop"

    def __init__(self, feedback: MixtureFeedback, think_id: int | None, threshold: float, steps: int) -> None:
        self.feedback, self.think_id = feedback, think_id
        self.threshold, self.steps = float(threshold), int(steps)
        # the official loop reads its stops from the prompt's last position on (its first output token),
        # J1mL1's from the first latent's (docs/method.md §21.1, §22)
        self.checks_prompt = feedback.settings.think_stop == "official"

    def begin(self, batch: int) -> dict[str, Any]:
        return {"low": torch.zeros(batch, dtype=torch.long)}

    def fires(
        self, logits: torch.Tensor, step: int, memory: dict[str, Any], streams: Sequence[int] | None = None
    ) -> torch.Tensor:
        from latentpatch.model.mixture import MultiplexFeedback, filtered_probs

        fb, s = self.feedback, self.feedback.settings
        logits = logits.float()[..., : fb.vocab]  # the released vocabulary (not the appended pad/bot/eot)
        fired = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        multiplex = isinstance(fb, MultiplexFeedback)
        p = filtered_probs(logits, s)
        if self.think_id is not None:
            # the official output id is the top-1 of the step's mixture: the one fed at step + 1,
            # with that step's noise; J1mL1's (and Multiplex's) is the argmax of the filtered p
            top = p.argmax(-1) if multiplex or s.noise == "none" else fb.pick(p, [step + 1] * len(p), streams)[1][:, 0]
            fired |= top == self.think_id
        if self.threshold > 0:
            if multiplex:  # J1mL1's _entropy on the filtered p (clamped)
                q = p.clamp(min=1e-12)
                ent = -(q * q.log()).sum(-1)
            else:  # Soft-Thinking's sampler: the unfiltered p at the temperature
                q = torch.softmax(logits / s.temperature, -1)
                ent = -(q * q.clamp(min=1e-12).log()).sum(-1)
            low = memory["low"].to(logits.device)
            low = torch.where(ent < self.threshold, low + 1, torch.zeros_like(low))
            memory["low"] = low
            fired |= low >= self.steps
        return fired

    def describe(self) -> str:
        parts = [] if self.think_id is None else [f"top-1 id {self.think_id}"]
        if self.threshold > 0:
            parts.append(f"entropy < {self.threshold:g} for {self.steps} steps")
        return f"{self.name}({' or '.join(parts)})"


def mixture_stop(feedback: MixtureFeedback, think_ids: Sequence[int]) -> MixtureStop | None:
    """The feedback's stop rule from its settings and ``</think>``'s ids; None (a fixed count) when
    no part of it can fire (J1mL1's rule on a ``</think>`` of several ids, no cold stop)."""
    s = feedback.settings
    think_id = think_stop_id(think_ids, s.think_stop)
    if think_id is None and s.cold_stop_threshold <= 0:
        return None
    return MixtureStop(feedback, think_id, s.cold_stop_threshold, s.cold_stop_steps)


def noise_plan(settings: MixtureSettings, vocab: int) -> list[tuple[str, int]] | None:
    """The draws of one step in stream order (None: no noise, the stream's default plan): for
    ``dirichlet``, GAMMA_TRIES x ``vocab`` normals and as many exponentials (Marsaglia-Tsang's
    candidates and their acceptance uniforms ``exp(-e)``), ``vocab`` exponentials (the ``U^(1/a)``
    boost of shapes < 1); then for ``gumbel`` ``max_topk`` exponentials (the official
    ``-empty_like(topk_logits).exponential_().log()``)."""
    if settings.noise == "none":
        return None
    plan: list[tuple[str, int]] = []
    if "dirichlet" in settings.noise:
        plan += [("normal", GAMMA_TRIES * vocab), ("exponential", GAMMA_TRIES * vocab), ("exponential", vocab)]
    if "gumbel" in settings.noise:
        plan.append(("exponential", max(settings.max_topk, 1)))
    return plan


def gamma_from_draws(
    shape: torch.Tensor, normals: torch.Tensor, exps: torch.Tensor, boost: torch.Tensor
) -> torch.Tensor:
    """Gamma(``shape``, 1) samples [B, V] from fixed-size draws (Marsaglia & Tsang 2000): for
    ``a = shape + 1`` if shape < 1 else shape, ``d = a - 1/3``, ``c = 1/sqrt(9d)``, the first try
    ``r`` with ``v = (1 + c x_r)^3 > 0`` and ``log u_r < x_r^2/2 + d - d v + d log v`` gives ``d v``
    (``x_r`` = ``normals`` [R, V], ``u_r = exp(-exps)`` [R, V]); a shape < 1 is boosted by
    ``u^(1/shape)`` (``u = exp(-boost)`` [V]). Shape 0 gives 0 (the degenerate Gamma).

    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.full((1, 20000), 0.3)
    >>> x = gamma_from_draws(a, torch.randn(8, 20000, generator=g),
    ...     torch.empty(8, 20000).exponential_(generator=g), torch.empty(20000).exponential_(generator=g))
    >>> round(float(x.mean()), 1), round(float(x.var()), 1)
    (0.3, 0.3)
    """
    a = torch.where(shape < 1, shape + 1, shape).double()
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.zeros_like(a)
    done = torch.zeros_like(a, dtype=torch.bool)
    for r in range(normals.shape[0]):  # a fixed number of candidates: the same draws whatever the shape
        x = normals[r].double()
        v = (1 + c * x) ** 3
        ok = (v > 0) & (-exps[r].double() < 0.5 * x * x + d - d * v + d * torch.log(v.clamp(min=1e-300)))
        take = ok & ~done
        out = torch.where(take, d * v, out)
        done |= take
    out = torch.where(done, out, d)  # all candidates rejected (p < 4e-11): the mode-ish value d
    small = shape < 1
    boosted = out * torch.exp(-boost.double() / shape.double().clamp(min=1e-300))
    out = torch.where(small, boosted, out)
    return torch.where(shape > 0, out, torch.zeros_like(out)).float()


def noisy_pick(
    fb: MixtureFeedback, p: torch.Tensor, steps: list[int], streams: Sequence[int | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Thinking's pick with the official noise: (weights [B, n], ids [B, n]) from the
    filtered ``p`` [B, V], each row with its step's draws (:func:`noise_plan` order) from its
    stream ``streams[b]`` (its pair's, docs/method.md §21; None: the run's)."""
    s = fb.settings
    draws = [fb.stream.draws(step, key) for step, key in zip(steps, row_streams(streams, len(steps)))]
    at = 0
    if "dirichlet" in s.noise:
        # only the entries the filters kept (Gamma(0) = 0): [B, m] instead of [B, V] per candidate,
        # each entry with its own vocabulary position's draws (the same values as the full [B, V])
        m = int((p > 0).sum(-1).max())
        kept, ids = p.topk(m, dim=-1)  # [B, m]
        at_ids = ids.cpu()
        normals = torch.stack([d[0].view(GAMMA_TRIES, -1)[:, i] for d, i in zip(draws, at_ids, strict=True)], 1)
        exps = torch.stack([d[1].view(GAMMA_TRIES, -1)[:, i] for d, i in zip(draws, at_ids, strict=True)], 1)
        boost = torch.stack([d[2][i] for d, i in zip(draws, at_ids, strict=True)])
        g = gamma_from_draws(kept * s.dirichlet_alpha, normals.to(p.device), exps.to(p.device), boost.to(p.device))
        p = torch.zeros_like(p).scatter(-1, ids, g)
        p = p / p.sum(-1, keepdim=True)
        at = 3
    n = min(max(s.max_topk, 1), p.shape[-1])
    w, idx = p.topk(n, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    if "gumbel" in s.noise:
        q = torch.stack([d[at][:n] for d in draws]).to(p.device)  # [B, n]
        y = (w.log() - q.log()) / s.gumbel_temperature  # -log(Exp(1)) ~ Gumbel(0, 1)
        w, order = y.softmax(-1).sort(-1, descending=True)
        idx = idx.gather(-1, order)
    return w, idx


def parse_mixture_kind(text: str, spec: str | None = None) -> tuple[str, MixtureSettings | None]:
    """``KIND[,key=value...]`` (the part of ``--model`` before the first ``:``) -> (kind,
    settings: the kind's defaults with those fields replaced; None without any). Keys are the
    fields of :class:`~latentpatch.model.mixture.MixtureSettings`.

    >>> parse_mixture_kind("multiplex")
    ('multiplex', None)
    >>> parse_mixture_kind("soft,cold_stop_threshold=0.01,cold_stop_steps=4")[1].cold_stop_steps
    4
    """
    from latentpatch.model.mixture import MIXTURE_KINDS, MULTIPLEX_DEFAULT, SOFT_THINKING_PAPER, MixtureSettings

    kind, *items = text.split(",")
    where = f"--model {spec or text}"
    if kind not in MIXTURE_KINDS:
        raise LatentPatchError(f"{where}: unknown mixture kind {kind!r}; fix: use {' or '.join(MIXTURE_KINDS)}")
    if not items:
        return kind, None
    if kind == "multiplex" and any(i.partition("=")[0].strip() == "noise" for i in items):
        raise LatentPatchError(f"{where}: noise is Soft Thinking's (its sampler's); fix: use soft,noise=... or drop it")
    types = {f.name: type(getattr(SOFT_THINKING_PAPER, f.name)) for f in fields(MixtureSettings)}
    values: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in types:
            raise LatentPatchError(
                f"{where}: setting {item!r} is not KEY=VALUE with a known key; fix: use {', '.join(types)}"
            )
        try:
            value = types[key](raw.strip())
        except ValueError:
            raise LatentPatchError(f"{where}: {key}={raw!r} is not a {types[key].__name__}; fix: give one") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise LatentPatchError(f"{where}: {key}={raw!r} is not finite; fix: give a finite number")
        values[key] = value
    try:
        return kind, replace(SOFT_THINKING_PAPER if kind == "soft" else MULTIPLEX_DEFAULT, **values)
    except ValueError as err:
        raise LatentPatchError(f"{where}: {err}; fix: use one of the values named") from None


def settings_suffix(settings: MixtureSettings, default: MixtureSettings) -> str:
    """``,key=value`` for each field that differs from ``default`` ("" for the defaults): the
    model name's record of the settings, parsed back by :func:`parse_mixture_kind`.

    >>> from latentpatch.model.mixture import SOFT_THINKING_PAPER
    >>> settings_suffix(replace(SOFT_THINKING_PAPER, think_stop="official"), SOFT_THINKING_PAPER)
    ',think_stop=official'
    """
    return "".join(
        f",{f.name}={getattr(settings, f.name)}"
        for f in fields(settings)
        if getattr(settings, f.name) != getattr(default, f.name)
    )
