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
from latentpatch.patching.baselines import PairBaseline
from latentpatch.patching.checks import (
    check_engine_reference,
    check_full_restoration,
    check_identity,
    check_live_thoughts,
)
from latentpatch.patching.engine import EngineOptions, group_pairs, pairs_per_batch, sweep_pairs, sweep_reference
from latentpatch.patching.specs import PatchSpec
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
    model, bases, config = ctx.model, ctx.bases, ctx.config
    return {
        "identity": lambda: check_identity(model, bases, ctx.specs, n_pairs=1),
        "full_restoration": lambda: check_full_restoration(model, bases[: min(len(bases), 8)]),
        "live_thoughts": lambda: check_live_thoughts(model, bases, ctx.batch_size),  # rows of the sweep's size
        "engine_reference": lambda: check_engine_reference(
            model, bases, ctx.specs, values_for, ctx.batch_size, config.check_cells, config.seed, ctx.shared_rows
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
            batch=lambda todo: group_pairs(ctx.bases, todo, size, ctx.model.config.eos_id),
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
    if config.engine == "fast":
        cells = sweep_pairs(model, bases, ctx.specs, values, EngineOptions(ctx.batch_size, ctx.shared_rows))
    else:
        cells = [sweep_reference(model, base, ctx.specs, v) for base, v in zip(bases, values)]
    entries = []
    for i, pair_cells in zip(group, cells):
        k = ctx.indices[i]
        entry: dict[str, Any] = {
            "pair_id": ctx.bases[i].pair_id,
            "index": k,
            "cells": [_cell_row(s, c, ctx.bases[i]) for s, c in zip(ctx.specs, pair_cells)],
        }
        if k < config.thoughts_pairs and model.tokenizer is not None:
            entry["thoughts"] = decoded_thoughts(model, ctx.pairs[i])
        entries.append(entry)
    return entries
