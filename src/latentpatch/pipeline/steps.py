"""The step-level experiments of a run (docs/method.md §13): ``--experiments thought,early,influence,intermediate``.

:func:`sweep_steps` runs after the layer/position/iterative sweep (and only when a step-level
experiment is named): it records each pair's chain (:class:`~latentpatch.patching.steps.StepRecord`),
runs the step-level specs through the same engine, commits one file per pair
(``results/steps/NNNNN.json``, so ``--resume`` skips finished pairs) and assembles
``results/steps.parquet`` and ``results/influence.parquet`` (columns: :data:`~latentpatch.names.STEP_COLUMNS`,
:data:`~latentpatch.names.INFLUENCE_COLUMNS`; docs/ARCHITECTURE.md). A default run never calls it,
so its files stay as they were.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from latentpatch.files import write_json
from latentpatch.model.latent import LatentModel
from latentpatch.names import (
    STEP_EXPERIMENTS,
    STEPS_DIR,
)
from latentpatch.patching.baselines import ValueFn, resample_partner
from latentpatch.patching.checks import check_steps_engine_reference
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference
from latentpatch.patching.experiments import SpecShape, experiment_specs, stage_experiments
from latentpatch.patching.specs import PatchSpec
from latentpatch.patching.steps import (
    StepRecord,
    pick_donors,
    recorded_chain,
    step_pool,
    step_rows,
    step_values,
    thought_sites,
)
from latentpatch.pipeline.manifest import RunContext
from latentpatch.pipeline.sweep import report_failed_checks
from latentpatch.pipeline.workers import run_items
from latentpatch.rundir import RunPaths


def requested(experiments: tuple[str, ...]) -> list[str]:
    """The step-level experiments among ``experiments``, in :data:`STEP_EXPERIMENTS` order."""
    return [e for e in STEP_EXPERIMENTS if e in experiments]


def step_specs(model: LatentModel, names: list[str], n_intermediates: int = 0) -> list[PatchSpec]:
    """The spec list of the named step-level experiments for ``model`` (the registry's generators)."""
    shape = SpecShape(
        model.n_layers, model.num_latent, thought_sites=thought_sites(model), n_intermediates=n_intermediates
    )
    return [s for name in stage_experiments(names, "steps") for s in experiment_specs(name, shape)]


def _intermediates(ctx: RunContext) -> list[list[float] | None]:
    """Per run of the donor pool (pair i's clean at 2i, corrupted at 2i+1): its ``intermediates``."""
    out: list[list[float] | None] = []
    for pair in ctx.pairs:
        for name in ("clean", "corrupted"):
            vals = pair.variant(name).extra.get("intermediates")
            out.append([float(v) for v in vals] if isinstance(vals, list) else None)
    return out


def _pair_inputs(
    ctx: RunContext, runs: list[StepRecord], specs: list[PatchSpec], inter: list[list[float] | None], n_inter: int
) -> Callable[[int], tuple[ValueFn, list[PatchSpec]]]:
    """``i -> (values, specs)`` of pair ``ctx.bases[i]``: its replacement values (pooled over the run's
    pairs, donors for the intermediate contrast) and the specs it runs (intermediate specs need a donor)."""
    config = ctx.config
    # runs: 2i = clean, 2i+1 = corrupted; target/source follow the direction
    tgt_off, src_off = (1, 0) if config.direction == "denoise" else (0, 1)
    pool = step_pool([runs[2 * i + src_off] for i in range(len(ctx.bases))])
    partner = resample_partner(len(ctx.bases), config.seed)

    def inputs(i: int) -> tuple[ValueFn, list[PatchSpec]]:
        donors = pick_donors(inter, 2 * i + tgt_off, n_inter, config.seed)
        values = step_values(
            runs[2 * i + tgt_off],
            runs[2 * i + src_off],
            pool,
            partner=runs[2 * partner[i] + src_off],
            donors={rep: runs[j] for rep, j in donors.items()},
            seed=config.seed,
            pair_index=ctx.indices[i],
        )
        return values, [s for s in specs if s.experiment != "intermediate" or s.replacement in donors]

    return inputs


def sweep_steps(ctx: RunContext) -> None:
    """Run the requested step-level experiments on every pair not yet committed (checked first:
    fast engine vs one rollout per spec on a seeded sample of the first pair's specs)."""
    names = requested(ctx.config.experiments)
    if not names:
        return
    model, config = ctx.model, ctx.config
    t = time.perf_counter()
    runs = [recorded_chain(rec) for b in ctx.bases for rec in (b.clean, b.corrupted)]  # recorded with the baselines
    inter = _intermediates(ctx)
    n_inter = max((len(v) for v in inter if v is not None), default=0)
    specs = step_specs(model, names, n_inter)
    inputs = _pair_inputs(ctx, runs, specs, inter, n_inter)
    values, mine = inputs(0)
    check = check_steps_engine_reference(
        model, ctx.bases[0], mine, values, ctx.batch_size, config.check_cells, config.seed
    )
    ctx.checks = {**(ctx.checks or {}), "steps_engine_reference": check}
    report_failed_checks(ctx, only=["steps_engine_reference"])  # fatal with --strict (docs/method.md §8)
    paths = RunPaths(ctx.out)
    (paths.results / STEPS_DIR).mkdir(parents=True, exist_ok=True)
    ctx.progress.stage("step-level", len(ctx.bases) * len(specs))
    todo = [i for i in range(len(ctx.bases)) if not _step_path(ctx, i).exists()]
    ctx.progress.advance(len(specs) * (len(ctx.bases) - len(todo)))
    run_items(
        todo,
        lambda i: _patch_steps(ctx, i, *inputs(i)),
        ctx.workers.count if ctx.workers else 1,
        lambda i: ctx.progress.advance(len(specs)),
        threads=torch.get_num_threads(),
    )
    ctx.timings["steps_s"] = time.perf_counter() - t  # assembled with the rest by rundir.assemble


def _step_path(ctx: RunContext, i: int) -> Path:
    return RunPaths(ctx.out).results / STEPS_DIR / f"{ctx.indices[i]:05d}.json"


def _patch_steps(ctx: RunContext, i: int, values: ValueFn, specs: list[PatchSpec]) -> None:
    """Pair ``i``'s step-level cells, committed as one file (``results/steps/{k:05d}.json``)."""
    base = ctx.bases[i]
    if ctx.config.engine == "fast":
        cells = sweep_fast(ctx.model, base, specs, values, EngineOptions(ctx.batch_size))
    else:
        cells = sweep_reference(ctx.model, base, specs, values)
    rows, influence = step_rows(base, specs, cells)
    write_json(
        _step_path(ctx, i), {"pair_id": base.pair_id, "index": ctx.indices[i], "rows": rows, "influence": influence}
    )
