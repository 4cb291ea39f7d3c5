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

from collections.abc import Callable, Sequence
from typing import Any

from latentpatch.data.pairs import Pair
from latentpatch.model.latent import LatentModel
from latentpatch.names import (
    STEP_EXPERIMENTS,
    STEPS_DIR,
)
from latentpatch.patching.baselines import PairBaseline, ValueFn
from latentpatch.patching.checks import check_steps_engine_reference
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference
from latentpatch.patching.experiments import SpecShape, experiment_specs, stage_experiments
from latentpatch.patching.specs import PatchSpec
from latentpatch.patching.steps import (
    pick_donors,
    step_rows,
    thought_sites,
)
from latentpatch.patching.values import ValuePool
from latentpatch.patching.vocab import Vocabulary, is_vocab, runs_for
from latentpatch.pipeline.manifest import RunContext
from latentpatch.pipeline.stages import Done, Plan, Stage, run_stage
from latentpatch.pipeline.values import run_value_pool


def requested(experiments: tuple[str, ...]) -> list[str]:
    """The step-level experiments among ``experiments``, in :data:`STEP_EXPERIMENTS` order."""
    return [e for e in STEP_EXPERIMENTS if e in experiments]


def step_specs(model: LatentModel, names: list[str], n_intermediates: int = 0) -> list[PatchSpec]:
    """The spec list of the named step-level experiments for ``model`` (the registry's generators)."""
    shape = SpecShape(
        model.n_layers,
        model.num_latent,
        thought_sites=thought_sites(model),
        n_intermediates=n_intermediates,
        early_exits=model.early_exits,
    )
    return [s for name in stage_experiments(names, "steps") for s in experiment_specs(name, shape)]


def _pair_inputs(
    ctx: RunContext, pool: ValuePool, specs: list[PatchSpec], n_inter: int
) -> Callable[[int], tuple[ValueFn, list[PatchSpec]]]:
    """``i -> (values, specs)`` of pair ``ctx.bases[i]``: its values from the run's pool (donors for
    the intermediate contrast picked among the pool's runs) and the specs it runs (intermediate
    specs need a donor; ``number:s`` specs the target's intermediate s)."""
    config = ctx.config
    inter = pool.intermediates  # pool run 2j = pair j's clean, 2j+1 its corrupted

    def inputs(i: int) -> tuple[ValueFn, list[PatchSpec]]:
        target = pool.target_run(i)
        donors = pick_donors(inter, target, n_inter, config.seed)
        values = pool.values(i, ctx.bases[i], donors)
        runs = [s for s in specs if s.experiment != "intermediate" or s.replacement in donors]
        return values, [s for s in runs if runs_for(s, inter[target], pool.vocab)]

    return inputs


def steps_stage(ctx: RunContext, all_pairs: Sequence[Pair]) -> Stage:
    """The requested step-level experiments as a stage (``results/steps/NNNNN.json``), checked
    first: fast engine vs one rollout per spec on a seeded sample of the first pair's specs (a
    failure is fatal with ``--strict``, docs/method.md §8)."""
    model, config = ctx.model, ctx.config

    def prepare() -> Plan:
        pool = run_value_pool(ctx, all_pairs)
        n_inter = max((len(v) for v in pool.intermediates if v is not None), default=0)
        specs = step_specs(model, requested(config.experiments), n_inter)
        if pool.vocab is None and any(is_vocab(s.replacement_value) for s in specs):
            pool.vocab = Vocabulary.of(model)  # once per run: E's unit rows (float32)
        inputs = _pair_inputs(ctx, pool, specs, n_inter)

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
    # The vocabulary-space specs are a sweep of their own: the other specs are cut into the chunks a
    # run without them has, so their rows keep their bits (a chunk's shared prefix sets the float sums).
    vocab = [is_vocab(s.replacement_value) for s in specs]
    parts = [[s for s, v in zip(specs, vocab) if v == flag] for flag in (False, True)]
    swept = [iter(_sweep(ctx, base, part, values)) for part in parts]
    cells = [next(swept[v]) for v in vocab]
    rows, influence = step_rows(base, specs, cells)
    return {"pair_id": base.pair_id, "index": ctx.indices[i], "rows": rows, "influence": influence}


def _sweep(ctx: RunContext, base: PairBaseline, specs: list[PatchSpec], values: ValueFn) -> list[dict]:
    """The cells of ``specs`` on one pair, by the run's engine (none for no specs)."""
    if not specs:
        return []
    if ctx.config.engine == "fast":
        return sweep_fast(ctx.model, base, specs, values, EngineOptions(ctx.batch_size))
    return sweep_reference(ctx.model, base, specs, values)
