"""The step-level experiments of a run (docs/method.md §13): ``--experiments thought,early,influence,intermediate``.

:func:`sweep_steps` runs after the layer/position/iterative sweep (and only when a step-level
experiment is named) :func:`steps_stage` through the one stage runner
(:mod:`latentpatch.pipeline.stages`): it records the chain of every pair of the pool
(:class:`~latentpatch.patching.steps.StepRecord`; a shard's pool is every shard's pairs, so its
values equal the unsharded run's), runs the step-level specs through the same engine, commits one
file per pair (``results/steps/NNNNN.json``, so ``--resume`` skips finished pairs); ``rundir`` assembles
``results/steps.parquet`` and ``results/influence.parquet`` (columns: :data:`~latentpatch.names.STEP_COLUMNS`,
:data:`~latentpatch.names.INFLUENCE_COLUMNS`; docs/ARCHITECTURE.md). A default run never calls it,
so its files stay as they were.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from latentpatch.data.pairs import Pair
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
from latentpatch.pipeline.selection import pairs_to_run
from latentpatch.pipeline.stages import Done, Plan, Stage, run_stage
from latentpatch.pipeline.values import global_pool


def requested(experiments: tuple[str, ...]) -> list[str]:
    """The step-level experiments among ``experiments``, in :data:`STEP_EXPERIMENTS` order."""
    return [e for e in STEP_EXPERIMENTS if e in experiments]


def step_specs(model: LatentModel, names: list[str], n_intermediates: int = 0) -> list[PatchSpec]:
    """The spec list of the named step-level experiments for ``model`` (the registry's generators)."""
    shape = SpecShape(
        model.n_layers, model.num_latent, thought_sites=thought_sites(model), n_intermediates=n_intermediates
    )
    return [s for name in stage_experiments(names, "steps") for s in experiment_specs(name, shape)]


@dataclass
class StepPoolRuns:
    """The runs the step-level values are pooled over: every used pair of the run (all shards', in
    global order), two records each (pair j's clean at 2j, corrupted at 2j+1), their
    ``intermediates``, and ``position[i]``: this process's pair i's place in the pool."""

    runs: list[StepRecord]
    intermediates: list[list[float] | None]
    position: list[int]


def _intermediates(pairs: Sequence[Pair]) -> list[list[float] | None]:
    """Per run of the donor pool (pair i's clean at 2i, corrupted at 2i+1): its ``intermediates``."""
    out: list[list[float] | None] = []
    for pair in pairs:
        for name in ("clean", "corrupted"):
            vals = pair.variant(name).extra.get("intermediates")
            out.append([float(v) for v in vals] if isinstance(vals, list) else None)
    return out


def step_pool_runs(ctx: RunContext, all_pairs: Sequence[Pair]) -> StepPoolRuns:
    """The step-level pool: this process's pairs, or for a shard every shard's used pairs (as
    :func:`~latentpatch.pipeline.values.global_pool` does for the sites' values), so a shard's
    mean, step_mean, resample and donor values equal the unsharded run's."""
    model, config = ctx.model, ctx.config
    if config.shard is None:
        bases, pairs, position = list(ctx.bases), list(ctx.pairs), list(range(len(ctx.bases)))
    else:
        unsharded, _ = pairs_to_run(all_pairs, dataclasses.replace(config, shard=None))
        bases, position = global_pool(model, ctx.cache, config, unsharded, ctx.indices)
        by_id = {p.pair_id: p for _, p in unsharded}
        pairs = [by_id[b.pair_id] for b in bases]
    # thought and thought_pre were recorded with the baselines (record_run): no second rollout
    runs = [recorded_chain(rec) for b in bases for rec in (b.clean, b.corrupted)]
    return StepPoolRuns(runs, _intermediates(pairs), position)


def _pair_inputs(
    ctx: RunContext, pooled: StepPoolRuns, specs: list[PatchSpec], n_inter: int
) -> Callable[[int], tuple[ValueFn, list[PatchSpec]]]:
    """``i -> (values, specs)`` of pair ``ctx.bases[i]``: its replacement values (pooled over the run's
    pairs, donors for the intermediate contrast) and the specs it runs (intermediate specs need a donor)."""
    config, runs, inter = ctx.config, pooled.runs, pooled.intermediates
    # runs: 2j = clean, 2j+1 = corrupted; target/source follow the direction
    tgt_off, src_off = (1, 0) if config.direction == "denoise" else (0, 1)
    n_pool = len(runs) // 2
    pool = step_pool([runs[2 * j + src_off] for j in range(n_pool)])
    partner = resample_partner(n_pool, config.seed)

    def inputs(i: int) -> tuple[ValueFn, list[PatchSpec]]:
        j = pooled.position[i]
        donors = pick_donors(inter, 2 * j + tgt_off, n_inter, config.seed)
        values = step_values(
            runs[2 * j + tgt_off],
            runs[2 * j + src_off],
            pool,
            partner=runs[2 * partner[j] + src_off],
            donors={rep: runs[d] for rep, d in donors.items()},
            seed=config.seed,
            pair_index=ctx.indices[i],
        )
        return values, [s for s in specs if s.experiment != "intermediate" or s.replacement in donors]

    return inputs


def steps_stage(ctx: RunContext, all_pairs: Sequence[Pair]) -> Stage:
    """The requested step-level experiments as a stage (``results/steps/NNNNN.json``), checked
    first: fast engine vs one rollout per spec on a seeded sample of the first pair's specs (a
    failure is fatal with ``--strict``, docs/method.md §8)."""
    model, config = ctx.model, ctx.config

    def prepare() -> Plan:
        pooled = step_pool_runs(ctx, all_pairs)
        n_inter = max((len(v) for v in pooled.intermediates if v is not None), default=0)
        specs = step_specs(model, requested(config.experiments), n_inter)
        inputs = _pair_inputs(ctx, pooled, specs, n_inter)

        def check() -> dict:
            values, mine = inputs(0)
            return check_steps_engine_reference(
                model, ctx.bases[0], mine, values, ctx.batch_size, config.check_cells, config.seed
            )

        return Plan(
            work=lambda group: [Done(_patch_steps(ctx, i, *inputs(i))) for i in group],
            units=len(specs),
            checks={"steps_engine_reference": check},
        )

    return Stage("step-level", STEPS_DIR, "rows", "steps_s", prepare)


def sweep_steps(ctx: RunContext, all_pairs: Sequence[Pair] | None = None) -> None:
    """Run the requested step-level experiments on every pair not yet committed (``all_pairs``:
    the run's pair file, needed by a shard for the pool)."""
    if requested(ctx.config.experiments):
        run_stage(ctx, steps_stage(ctx, ctx.pairs if all_pairs is None else all_pairs))


def _patch_steps(ctx: RunContext, i: int, values: ValueFn, specs: list[PatchSpec]) -> dict[str, Any]:
    """Pair ``i``'s step-level cells: its file ``results/steps/{k:05d}.json``."""
    base = ctx.bases[i]
    if ctx.config.engine == "fast":
        cells = sweep_fast(ctx.model, base, specs, values, EngineOptions(ctx.batch_size))
    else:
        cells = sweep_reference(ctx.model, base, specs, values)
    rows, influence = step_rows(base, specs, cells)
    return {"pair_id": base.pair_id, "index": ctx.indices[i], "rows": rows, "influence": influence}
