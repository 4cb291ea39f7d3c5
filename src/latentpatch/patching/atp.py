"""Attribution patching through the latent loop (docs/method.md §15).

The first-order estimate of every site's patching effect from one forward and one backward pass:

    effect(site) ≈ (v − a) · ∂M/∂a

``a`` = the target run's activation at the site, ``v`` = the value exact patching writes there (the
run's ``--replacement``: the source run's value by default), ``∂M/∂a`` = the gradient of the answer
metric ``M`` (``answer_logit_diff``, or ``answer_logprob_diff``) at the unpatched target run. The
forward is the model's own latent rollout (:meth:`LatentModel.rollout` with ``grad=True``), so the
gradient flows through both routes by which a latent site reaches the answer (docs/method.md §1):
the KV cache (later positions attend to it) and the recurrence (its position's last hidden state
becomes the next thought through ``prj``).

Contract:

- :func:`site_gradients`: ``∂M/∂a`` for every (component, layer, latent position) of the target run,
  ``[L, K, d]`` per component; ``cut_recurrence=True`` stops the gradient at each fed thought
  (the attention path alone, the gradient counterpart of the ``frozen`` control); ``graddrop=True``
  also returns the L gradients with block ℓ's residual contribution dropped (AtP*'s GradDrop).
- :func:`attribution_patching`: the estimates of a pair (:class:`AtPResult`), every path asked for.
- :func:`exact_effects`: the same sites patched exactly with :func:`~latentpatch.patching.engine.sweep_fast`.
- :func:`refine_sites`: the top-K sites by |estimate| and a seeded control sample of the rest.

KL(patched ‖ target) has its minimum at the target run, so its gradient there is zero and its
first-order estimate is identically 0: it is not estimated (docs/method.md §15).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from latentpatch.model.latent import LatentModel, Rollout
from latentpatch.model.sites import hooked_module
from latentpatch.names import (
    ALL_POSITIONS,
    ATP_EXPERIMENT,
    ATP_METRICS,
    ATP_PATHS,
    COMPONENTS,
    HEAD_COMPONENT,
    POSITION_MODE,
    parse_head,
)
from latentpatch.patching.baselines import PairBaseline, ValueFn
from latentpatch.patching.engine import EngineOptions, sweep_fast
from latentpatch.patching.metrics import (
    AnswerLogits,
    answer_logit_diff_tensor,
    answer_logprob_diff,
    answer_logprob_diff_tensor,
)
from latentpatch.patching.specs import PatchSpec

#: A site of the position sweep: (component, layer, latent position).
SiteKey = tuple[str, int, int]


# ---- GradDrop --------------------------------------------------------------------------------------
class _Gate(torch.autograd.Function):
    """Identity forward; backward zeroes the gradient when ``switch.drop == layer``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: int, switch: GradDrop) -> torch.Tensor:
        ctx.layer, ctx.switch = layer, switch
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return (torch.zeros_like(grad) if ctx.switch.drop == ctx.layer else grad), None, None


class GradDrop:
    """Context manager: a gate on the attention and MLP output of every block (block ℓ's residual
    contribution). Values pass unchanged; in a backward pass the gradient into block ``drop``'s
    contribution is zeroed (``drop = None``: nothing dropped), so one forward serves L + 1 backward
    passes. Enter it *before* the rollout's recording hooks, so recordings see the gated tensors
    (a site's own gradient is then what flows into it from downstream)."""

    def __init__(self, model: LatentModel) -> None:
        self.model = model
        self.drop: int | None = None
        self._handles: list[RemovableHandle] = []

    def _hook(self, layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, tuple):
                return (_Gate.apply(output[0], layer, self),) + tuple(output[1:])
            return _Gate.apply(output, layer, self)

        return hook

    def __enter__(self) -> GradDrop:
        for layer in range(self.model.n_layers):
            for component in ("attn_out", "mlp_out"):
                module, _ = hooked_module(self.model.lm, component, layer)
                self._handles.append(module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ---- gradients ---------------------------------------------------------------------------------------
def metric_tensor(model: LatentModel, base: PairBaseline, r: Rollout, metric: str) -> torch.Tensor:
    """The answer metric of a rollout made with ``grad=True``, as a differentiable 0-dim tensor:
    ``A_clean`` and ``A_corr`` teacher-forced through the rollout's cache (docs/method.md §6.3)."""
    if metric not in ATP_METRICS:
        raise ValueError(f"metric must be one of {ATP_METRICS}, got {metric!r}")
    (clean_ids, clean_start), (corr_ids, corr_start) = base.answers["clean"], base.answers["corr"]
    clean, corr = model.score(r.state, r.answer_logits, [[clean_ids, corr_ids]], grad=True)[0]
    a = AnswerLogits(clean, clean, corr, clean_ids, clean_ids, corr_ids, clean_start, clean_start, corr_start, None)
    with model.grad_mode(True):
        return answer_logit_diff_tensor(a) if metric == "answer_logit_diff" else answer_logprob_diff_tensor(a)


def recorded_keys(model: LatentModel, components: Sequence[str]) -> list[tuple[str, int]]:
    """``(component, layer)`` recordings that give the gradients of ``components`` (per-head sites
    ``head_out.<h>`` read slices of the whole projection input ``head_out``)."""
    names = sorted({HEAD_COMPONENT if parse_head(c) is not None else c for c in components}, key=_component_order)
    return [(c, layer) for c in names for layer in range(model.n_layers)]


def _component_order(c: str) -> tuple[int, str]:
    return (COMPONENTS.index(c) if c in COMPONENTS else len(COMPONENTS), c)


def site_gradients(
    model: LatentModel,
    base: PairBaseline,
    components: Sequence[str] = COMPONENTS,
    *,
    metric: str = "answer_logit_diff",
    cut_recurrence: bool = False,
    graddrop: bool = False,
) -> tuple[float, list[dict[str, torch.Tensor]]]:
    """``(M at the target, grads)``: one forward of the target's rollout with gradients, then one
    backward per entry of ``grads``: ``grads[0]`` = ``{component: [L, K, d]}`` (``∂M/∂a``, fp32), and
    with ``graddrop`` ``grads[1 + ℓ]`` the same with block ℓ's contribution dropped (:class:`GradDrop`).
    Components as recorded (:func:`recorded_keys`; ``head_out`` = every head's slice)."""
    keys = recorded_keys(model, components)
    K = model.num_latent
    with GradDrop(model) if graddrop else nullcontext() as gate:
        r = model.rollout(
            [base.target.prompt], record=keys, grad=True, cut_recurrence=cut_recurrence, streams=[base.stream]
        )
        m = metric_tensor(model, base, r, metric)
    assert r.hooks is not None  # rollout always returns its hooks
    # parts[0] is the prompt pass, parts[1..K] the latent steps (one forward each), then [EOT]
    flat = [t for key in keys for t in r.hooks.recorded_parts(*key)[1 : 1 + K]]
    drops: list[int | None] = [None, *(range(model.n_layers) if graddrop else ())]
    out = []
    for i, drop in enumerate(drops):
        if isinstance(gate, GradDrop):
            gate.drop = drop
        raw = torch.autograd.grad(m, flat, retain_graph=i < len(drops) - 1, allow_unused=True)
        g = [torch.zeros_like(t) if x is None else x for t, x in zip(flat, raw)]
        by_key = [torch.cat(g[j * K : (j + 1) * K], dim=1)[0].float() for j in range(len(keys))]  # [K, d] each
        grads: dict[str, list[torch.Tensor]] = {}
        for (c, _), x in zip(keys, by_key):
            grads.setdefault(c, []).append(x)
        out.append({c: torch.stack(xs) for c, xs in grads.items()})  # [L, K, d]
    return float(m.detach()), out


# ---- estimates --------------------------------------------------------------------------------------
@dataclass
class AtPResult:
    """Attribution patching of one pair. ``estimates[path][component]``: [L, K] estimated change of
    ``metric`` (``path``: ``full`` = both routes, ``attention`` = recurrence cut); ``graddrop``:
    ``{component: [L, K]}`` the GradDrop score (or empty); ``metric_value``: M at the target run."""

    metric: str
    metric_value: float
    estimates: dict[str, dict[str, torch.Tensor]]
    graddrop: dict[str, torch.Tensor] = field(default_factory=dict)

    def sites(self) -> Iterator[SiteKey]:
        """Every site, components in estimate order, then layer, then position."""
        first = next(iter(self.estimates.values()))
        for c, est in first.items():
            for layer in range(est.shape[0]):
                for p in range(est.shape[1]):
                    yield (c, layer, p)

    def value(self, path: str, site: SiteKey) -> float:
        c, layer, p = site
        return float(self.estimates[path][c][layer, p])


def delta_dot(
    grads: dict[str, torch.Tensor], base: PairBaseline, values: ValueFn, components: Sequence[str], L: int, K: int
) -> dict[str, torch.Tensor]:
    """``{component: [L, K]}``: ``(v − a) · g`` per site, ``v`` from ``values`` (the patched-in value),
    ``a`` the target's activation, ``g`` from :func:`site_gradients` (fp32)."""
    out = {}
    for c in components:
        head = parse_head(c)
        g = grads[HEAD_COMPONENT if head is not None else c]  # [L, K, d or H*d_head]
        rows = []
        for layer in range(L):
            spec = PatchSpec(ATP_EXPERIMENT, POSITION_MODE, c, layer, tuple(range(K)), ALL_POSITIONS)
            delta = values(spec).float() - base.target.acts[c][layer].float()  # [K, d]
            gl = g[layer]
            if head is not None:
                width = delta.shape[-1]
                gl = gl[:, head * width : (head + 1) * width]
            rows.append((delta.to(gl.device) * gl).sum(-1))
        out[c] = torch.stack(rows)  # [L, K]
    return out


def attribution_patching(
    model: LatentModel,
    base: PairBaseline,
    values: ValueFn,
    components: Sequence[str] = COMPONENTS,
    *,
    metric: str = "answer_logit_diff",
    paths: Sequence[str] = ATP_PATHS,
    graddrop: bool = False,
) -> AtPResult:
    """Estimated effect on ``metric`` of patching each site (``components`` × layer × latent
    position) with ``values``, per path (``full``; ``attention`` = recurrence cut), one forward and
    one backward each (GradDrop: L more backward passes of the full path).

    >>> from latentpatch.data.synthetic import generate_pairs
    >>> from latentpatch.model.load import load_model
    >>> from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
    >>> from latentpatch.patching.specs import EngineConfig
    >>> model = load_model("default")
    >>> pair = generate_pairs(1, seed=0)[0]
    >>> clean, corrupted = (record_run(model, model.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
    >>> base = prepare_pair(model, pair.pair_id, clean, corrupted, pair.clean.answer, pair.corrupted.answer)
    >>> res = attribution_patching(model, base, replacement_values(base, EngineConfig()))
    >>> tuple(res.estimates["full"]["resid_out"].shape)  # [L, K]
    (4, 6)
    >>> abs(res.metric_value - base.ld_target) < 1e-4  # M at the target run = its logit difference
    True
    >>> float(res.estimates["attention"]["resid_out"][-1].abs().max())  # last block: recurrence only
    0.0
    """
    bad = [p for p in paths if p not in ATP_PATHS]
    if bad:
        raise ValueError(f"unknown path(s) {bad}; expected some of {ATP_PATHS}")
    L, K = model.n_layers, model.num_latent
    estimates: dict[str, dict[str, torch.Tensor]] = {}
    drop_score: dict[str, torch.Tensor] = {}
    m_value = math.nan
    for path in paths:
        with_drop = graddrop and path == "full"
        m_value, grads = site_gradients(
            model, base, components, metric=metric, cut_recurrence=path == "attention", graddrop=with_drop
        )
        estimates[path] = delta_dot(grads[0], base, values, components, L, K)
        if with_drop:
            dropped = [delta_dot(g, base, values, components, L, K) for g in grads[1:]]
            # AtP*: the mean absolute estimate over the L dropped layers, normalised by L − 1
            drop_score = {c: torch.stack([d[c].abs() for d in dropped]).sum(0) / max(L - 1, 1) for c in components}
    return AtPResult(metric, m_value, estimates, drop_score)


# ---- exact effects and refinement -------------------------------------------------------------------
def site_specs(sites: Sequence[SiteKey]) -> list[PatchSpec]:
    """One position-sweep spec per site (labelled with the ``atp`` experiment)."""
    return [PatchSpec(ATP_EXPERIMENT, POSITION_MODE, c, layer, (p,), p) for c, layer, p in sites]


def exact_effects(
    model: LatentModel,
    base: PairBaseline,
    sites: Sequence[SiteKey],
    values: ValueFn,
    metric: str = "answer_logit_diff",
    batch_size: int = 64,
) -> list[float]:
    """The exact change of ``metric`` when each site is patched with ``values`` (the engine's
    patched value minus the target's), in ``sites`` order."""
    if not sites:
        return []
    cells = sweep_fast(model, base, site_specs(sites), values, EngineOptions(batch_size))
    if base.target_logits is None:
        raise ValueError(f"pair {base.pair_id}: baselines not prepared (call prepare_pair first)")
    at_target = base.ld_target if metric == "answer_logit_diff" else answer_logprob_diff(base.target_logits)
    return [float(c[metric]) - at_target for c in cells]


def refine_sites(ranking: dict[SiteKey, float], k: int, seed: int | str) -> tuple[list[SiteKey], list[SiteKey]]:
    """``(top, control)``: the ``k`` sites with the largest |score| (ties: site order) and ``k``
    sites drawn at random (``random.Random(seed)``) from the rest."""
    order = sorted(ranking, key=lambda s: -abs(ranking[s]))
    top, rest = order[:k], sorted(order[k:])
    control = sorted(random.Random(seed).sample(rest, min(k, len(rest))))
    return top, control
