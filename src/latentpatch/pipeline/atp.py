"""Attribution patching in a run (docs/method.md §15): ``--experiments atp``.

:func:`sweep_atp` runs after the other sweeps, only when ``atp`` is named: per pair, the estimate of
every site of the position sweep (the four block components × layer × latent position, plus every
head with ``--component head_out``) through both gradient paths
(:func:`~latentpatch.patching.atp.attribution_patching`), then the exact effects of the same sites
from the engine on the exact check's pairs (``--atp-exact-pairs``, default all) and, with
``--refine K``, of the top-K sites and a seeded control sample elsewhere. One committed file per pair
(``results/atp/NNNNN.json``; ``--resume`` skips it; a stage of :mod:`latentpatch.pipeline.stages`),
assembled by ``assembly.assemble_atp`` into ``results/atp.parquet``
(:data:`~latentpatch.names.ATP_COLUMNS`). A default run never calls it.
"""

from __future__ import annotations

import math
import time
from typing import Any

from latentpatch.model.heads import head_shape
from latentpatch.names import ATP_DIR, ATP_EXPERIMENT, COMPONENTS, HEAD_COMPONENT, head_component
from latentpatch.patching.atp import SiteKey, attribution_patching, exact_effects, refine_sites
from latentpatch.patching.baselines import ValueFn
from latentpatch.pipeline.manifest import RunContext
from latentpatch.pipeline.stages import Done, Plan, Stage, run_stage

#: The metric a run estimates (the answer logit difference, docs/method.md §6.3).
ATP_RUN_METRIC = "answer_logit_diff"


def atp_components(ctx: RunContext) -> list[str]:
    """The four block components, and every head with ``--component head_out``."""
    comps = list(COMPONENTS)
    if ctx.config.component == HEAD_COMPONENT:
        comps += [head_component(h) for h in range(head_shape(ctx.model.lm)[0])]
    return comps


def atp_entry(ctx: RunContext, i: int, values: ValueFn) -> Done:
    """Pair ``i``'s result file: a row per site (estimates, exact effects where patched), with the
    seconds of the estimate and of the exact patches (the driver adds them to ``ctx.timings``)."""
    model, config, base, k = ctx.model, ctx.config, ctx.bases[i], ctx.indices[i]
    t = time.perf_counter()
    res = attribution_patching(model, base, values, atp_components(ctx), graddrop=bool(config.graddrop))
    timings = {"atp_estimate_s": time.perf_counter() - t}
    sites = list(res.sites())
    selected: dict[SiteKey, str] = {}
    if config.refine:
        score = res.graddrop or res.estimates["full"]  # GradDrop's score ranks when asked for
        ranking = {s: float(score[s[0]][s[1], s[2]]) for s in sites}
        top, control = refine_sites(ranking, config.refine, seed=f"{config.seed}:{k}")
        selected = {s: "top" for s in top} | {s: "control" for s in control}
    checked = config.atp_exact_pairs is None or k < config.atp_exact_pairs  # the global index: shards agree
    patched = sites if checked else [s for s in sites if s in selected]
    t = time.perf_counter()
    exact = dict(zip(patched, exact_effects(model, base, patched, values, ATP_RUN_METRIC, ctx.batch_size)))
    timings["atp_exact_s"] = time.perf_counter() - t
    flagged = not (base.clean_correct and base.corrupted_correct)
    rows = [
        {
            "metric": res.metric,
            "component": c,
            "layer": layer,
            "position": p,
            "atp": res.value("full", (c, layer, p)),
            "atp_attention": res.value("attention", (c, layer, p)),
            "atp_graddrop": float(res.graddrop[c][layer, p]) if res.graddrop else math.nan,
            "exact": exact.get((c, layer, p), math.nan),
            "checked": checked,
            "selected": selected.get((c, layer, p), ""),
            "flagged": flagged,
        }
        for c, layer, p in sites
    ]
    return Done({"pair_id": base.pair_id, "index": k, "rows": rows}, timings)


def atp_stage(ctx: RunContext, values_for: Any) -> Stage:
    """Attribution patching as a stage: one file per pair under ``results/atp/``."""

    def prepare() -> Plan:
        return Plan(work=lambda group: [atp_entry(ctx, i, values_for(i)) for i in group])

    return Stage("attribution patching", ATP_DIR, "rows", "atp_s", prepare)


def sweep_atp(ctx: RunContext, values_for: Any) -> None:
    """Attribution patching of every pair not yet committed (``assembly.assemble_atp`` assembles it)."""
    if ATP_EXPERIMENT in ctx.config.experiments:
        run_stage(ctx, atp_stage(ctx, values_for))
