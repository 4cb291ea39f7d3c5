"""The patching step of a run: the built-in checks, then every pair patched and committed.

:func:`checks_and_sweep` runs :func:`patching_stage` through the one stage runner
(:mod:`latentpatch.pipeline.stages`): the four built-in checks (docs/method.md §8), then each
pair's cells (one row per ``PatchSpec``: labels, metrics, ``answer_ids``, pair flags) become one
file ``results/pairs/{k:05d}.json``, written atomically, so an interrupted run resumes at the first
pair without one. Pairs run in groups that share the engine's batches where that keeps each pair's
bits (:func:`latentpatch.patching.engine.group_pairs`), over this process and the run's forked
workers (:mod:`latentpatch.pipeline.workers`); with workers, the checks share the same pool.
:func:`replacement_source` gives each pair its patched-in values (a shard's ``mean``/``resample``
pool is every shard's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from latentpatch.data.pairs import Pair
from latentpatch.model.latent import LatentModel
from latentpatch.model.streams import pair_stream
from latentpatch.names import STOPS_ELSEWHERE
from latentpatch.patching.baselines import PairBaseline
from latentpatch.patching.checks import (
    check_engine_reference,
    check_full_restoration,
    check_identity,
    check_live_thoughts,
)
from latentpatch.patching.engine import (
    EngineOptions,
    pairs_per_batch,
    rule_stopped_cells,
    sweep_pairs,
    sweep_reference,
)
from latentpatch.patching.specs import PatchSpec
from latentpatch.pipeline.latent_counts import at_count, count_groups, first_count_pairs, pair_count
from latentpatch.pipeline.manifest import RunContext
from latentpatch.pipeline.stages import Done, Plan, Stage, run_stage
from latentpatch.pipeline.values import run_value_pool
from latentpatch.rundir import PAIRS_DIR


def replacement_source(ctx: RunContext, all_pairs: Sequence[Pair]) -> Callable[[int], Callable]:
    """``i -> ValueFn``: the patched-in values of this process's pair ``i``, from the run's one value
    pool (a shard's ``mean``/``resample`` values use every shard's pairs)."""
    pool = run_value_pool(ctx, all_pairs)
    return lambda i: pool.values(i, ctx.bases[i])


def check_jobs(ctx: RunContext, values_for: Callable[[int], Callable]) -> dict[str, Callable[[], dict]]:
    """The built-in checks (docs/method.md §8) as independent jobs, each giving ``{passed, value,
    threshold, detail}``."""
    model, config = ctx.model, ctx.config
    k, same = first_count_pairs(ctx)  # per-pair latent counts (§22): the pairs of the first pair's count
    bases = [ctx.bases[i] for i in same]

    def values_of(j: int) -> Callable:
        return values_for(same[j])

    def at_k(check: Callable[[list[PatchSpec]], dict]) -> Callable[[], dict]:
        def job() -> dict:
            with at_count(ctx, k) as specs:
                return check(specs)

        return job

    return {
        "identity": at_k(lambda specs: check_identity(model, bases, specs, n_pairs=1)),
        "full_restoration": at_k(lambda specs: check_full_restoration(model, bases[: min(len(bases), 8)])),
        "live_thoughts": at_k(lambda specs: check_live_thoughts(model, bases, ctx.batch_size)),  # the sweep's rows
        "engine_reference": at_k(
            lambda specs: check_engine_reference(
                model, bases, specs, values_of, ctx.batch_size, config.check_cells, config.seed, ctx.shared_rows
            )
        ),
    }


def checks_and_sweep(ctx: RunContext, values_for: Callable[[int], Callable]) -> None:
    """The built-in checks, then the sweep, through :func:`~latentpatch.pipeline.stages.run_stage`.
    With worker processes (and without ``strict``, which must stop before the sweep) the checks
    go into the sweep's pool instead, so that no core waits at a barrier between the two;
    ``checks_s`` is then the checks' own time inside ``sweep_s``."""
    run_stage(ctx, patching_stage(ctx, values_for))


def patching_stage(ctx: RunContext, values_for: Callable[[int], Callable]) -> Stage:
    """The patching sweep as a stage: ``results/pairs/NNNNN.json``, pairs grouped to share the
    engine's batches, the four built-in checks."""

    def prepare() -> Plan:
        size = pairs_per_batch(ctx.specs, ctx.batch_size, ctx.shared_rows) if ctx.config.engine == "fast" else 1
        return Plan(
            work=lambda group: [Done(entry) for entry in patch_pairs(ctx, group, values_for)],
            units=len(ctx.specs),
            batch=lambda todo: count_groups(ctx, todo, size),  # one latent count per group (§22)
            checks=check_jobs(ctx, values_for),
        )

    return Stage("patching", PAIRS_DIR, "cells", "sweep_s", prepare, checks_timing="checks_s")


def _cell_row(spec: PatchSpec, metrics: dict, base: PairBaseline) -> dict:
    row = {
        "experiment": spec.experiment,
        "mode": spec.mode,
        "component": spec.component,
        "layer": spec.layer,
        "position": spec.index,
        "key": spec.key,
    }
    row.update(metrics)
    row.update(
        {
            "clean_correct": base.clean_correct,
            "corrupted_correct": base.corrupted_correct,
            "flagged": not (base.clean_correct and base.corrupted_correct),
        }
    )
    return row


@torch.no_grad()
def decoded_thoughts(model: LatentModel, pair: Pair, k: int = 5) -> dict[str, list[list[str]]]:
    """Top-k tokens of each thought of the clean and the corrupted run (the CODI probe)."""
    entry = {}
    for variant in ("clean", "corrupted"):
        r = model.rollout([model.prompt_ids(pair.variant(variant).question)], streams=[pair_stream(pair.pair_id)])
        entry[variant] = [[tok for tok, _ in top] for top in model.decode_thoughts(r, k)[0]]
    return entry


def patch_pairs(ctx: RunContext, group: Sequence[int], values_for: Callable[[int], Callable]) -> list[dict[str, Any]]:
    """Every cell of the pairs ``group`` (this process's numbering), sharing the engine's batches
    where that keeps each pair's bits (:func:`~latentpatch.patching.engine.sweep_pairs`): each
    pair's result file content."""
    model, config = ctx.model, ctx.config
    bases, values = [ctx.bases[i] for i in group], [values_for(i) for i in group]
    with at_count(ctx, pair_count(ctx, group[0])) as specs:  # a group shares one latent count (§22)
        if config.engine == "fast":
            cells = sweep_pairs(model, bases, specs, values, EngineOptions(ctx.batch_size, ctx.shared_rows))
        else:
            cells = [sweep_reference(model, base, specs, v) for base, v in zip(bases, values)]
        if config.patched_stop == "rule":
            cells = [stop_by_rule(model, b, specs, v, c) for b, v, c in zip(bases, values, cells)]
        entries = []
        for i, pair_cells in zip(group, cells):
            k = ctx.indices[i]
            entry: dict[str, Any] = {
                "pair_id": ctx.bases[i].pair_id,
                "index": k,
                "cells": [_cell_row(s, c, ctx.bases[i]) for s, c in zip(specs, pair_cells)],
            }
            if k < config.thoughts_pairs and model.tokenizer is not None:
                entry["thoughts"] = decoded_thoughts(model, ctx.pairs[i])
            entries.append(entry)
    return entries


def stop_by_rule(model: LatentModel, base: PairBaseline, specs: Sequence[PatchSpec], values: Any, cells: list) -> list:
    """``--patched-stop rule`` (docs/method.md §22): the cells whose rule fires elsewhere than the
    pair's latent count, computed again with the run stopped where the rule fires."""
    redo = [j for j, c in enumerate(cells) if c.get(STOPS_ELSEWHERE)]
    if not redo:
        return cells
    again = rule_stopped_cells(model, base, [specs[j] for j in redo], values, model.latent_cap)
    out = list(cells)
    for j, cell in zip(redo, again):
        out[j] = cell
    return out
