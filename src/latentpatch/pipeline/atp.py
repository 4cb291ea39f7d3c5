"""Attribution patching in a run (docs/method.md §15): ``--experiments atp``.

:func:`sweep_atp` runs after the other sweeps, only when ``atp`` is named: per pair, the estimate of
every site of the position sweep (the four block components × layer × latent position, plus every
head with ``--component head_out``) through both gradient paths
(:func:`~latentpatch.patching.atp.attribution_patching`), then the exact effects of the same sites
from the engine on the exact check's pairs (``--atp-exact-pairs``, default all) and, with
``--refine K``, of the top-K sites and a seeded control sample elsewhere. One committed file per pair
(``results/atp/NNNNN.json``; ``--resume`` skips it), assembled into ``results/atp.parquet``
(:data:`~latentpatch.names.ATP_COLUMNS`). A default run never calls it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from latentpatch.files import write_json, write_parquet
from latentpatch.model.heads import head_shape
from latentpatch.names import (
    ATP_COLUMNS,
    ATP_DIR,
    ATP_EXPERIMENT,
    ATP_FILE,
    ATP_FLOAT_COLUMNS,
    COMPONENTS,
    HEAD_COMPONENT,
    head_component,
)
from latentpatch.patching.atp import SiteKey, attribution_patching, exact_effects, refine_sites
from latentpatch.patching.baselines import ValueFn
from latentpatch.pipeline.manifest import RunContext
from latentpatch.rundir import RunPaths

#: The metric a run estimates (the answer logit difference, docs/method.md §6.3).
ATP_RUN_METRIC = "answer_logit_diff"


def atp_components(ctx: RunContext) -> list[str]:
    """The four block components, and every head with ``--component head_out``."""
    comps = list(COMPONENTS)
    if ctx.config.component == HEAD_COMPONENT:
        comps += [head_component(h) for h in range(head_shape(ctx.model.lm)[0])]
    return comps


def atp_entry(ctx: RunContext, i: int, values: ValueFn) -> dict[str, Any]:
    """Pair ``i``'s result file: a row per site (estimates, exact effects where patched). Timings of
    the estimate and of the exact patches are added to ``ctx.timings``."""
    model, config, base, k = ctx.model, ctx.config, ctx.bases[i], ctx.indices[i]
    t = time.perf_counter()
    res = attribution_patching(model, base, values, atp_components(ctx), graddrop=bool(config.graddrop))
    ctx.timings["atp_estimate_s"] = ctx.timings.get("atp_estimate_s", 0.0) + time.perf_counter() - t
    sites = list(res.sites())
    selected: dict[SiteKey, str] = {}
    if config.refine:
        score = res.graddrop or res.estimates["full"]  # GradDrop's score ranks when asked for
        ranking = {s: float(score[s[0]][s[1], s[2]]) for s in sites}
        top, control = refine_sites(ranking, config.refine, seed=f"{config.seed}:{k}")
        selected = {s: "top" for s in top} | {s: "control" for s in control}
    checked = config.atp_exact_pairs is None or i < config.atp_exact_pairs
    patched = sites if checked else [s for s in sites if s in selected]
    t = time.perf_counter()
    exact = dict(zip(patched, exact_effects(model, base, patched, values, ATP_RUN_METRIC, ctx.batch_size)))
    ctx.timings["atp_exact_s"] = ctx.timings.get("atp_exact_s", 0.0) + time.perf_counter() - t
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
    return {"pair_id": base.pair_id, "index": k, "rows": rows}


def sweep_atp(ctx: RunContext, values_for: Any) -> None:
    """Attribution patching of every pair not yet committed, then :func:`assemble_atp`."""
    if ATP_EXPERIMENT not in ctx.config.experiments:
        return
    t = time.perf_counter()
    folder = RunPaths(ctx.out).results / ATP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ctx.progress.stage("attribution patching", len(ctx.bases))
    for i, k in enumerate(ctx.indices):
        path = folder / f"{k:05d}.json"
        if not path.exists():
            write_json(path, atp_entry(ctx, i, values_for(i)))
        ctx.progress.advance()
    ctx.timings["atp_s"] = time.perf_counter() - t
    assemble_atp(ctx.out)


def assemble_atp(out: Path | str) -> None:
    """``results/atp/*.json`` (global pair order) -> ``results/atp.parquet``."""
    results = RunPaths(out).results
    rows: list[dict] = []
    for f in sorted((results / ATP_DIR).glob("*.json")):
        entry = json.loads(f.read_text())
        for row in entry["rows"]:
            row = {"pair_id": entry["pair_id"], **row}
            for c in ATP_FLOAT_COLUMNS:
                if row[c] is None:
                    row[c] = math.nan
            rows.append(row)
    write_parquet(results / ATP_FILE, rows, ATP_COLUMNS)
