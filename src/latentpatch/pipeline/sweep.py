"""The patching step of a run: the built-in checks, then every pair patched and committed.

:func:`checks_and_sweep` runs the four built-in checks (docs/method.md §8) and :func:`sweep`: each
pair's cells (one row per ``PatchSpec``: labels, metrics, ``answer_ids``, pair flags) become one
file ``results/pairs/{k:05d}.json``, written atomically, so an interrupted run resumes at the first
pair without one. Pairs run in groups that share the engine's batches where that keeps each pair's
bits (:func:`latentpatch.patching.engine.group_pairs`), over this process and the run's forked
workers (:mod:`latentpatch.pipeline.workers`); with workers, the checks share the same pool.
:func:`replacement_source` gives each pair its patched-in values (a shard's ``mean``/``resample``
pool is every shard's).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from latentpatch.data.pairs import Pair
from latentpatch.errors import LatentPatchError
from latentpatch.files import write_json
from latentpatch.model.latent import LatentModel
from latentpatch.names import GLOBAL_REPLACEMENTS
from latentpatch.patching.baselines import PairBaseline
from latentpatch.patching.checks import (
    check_engine_reference,
    check_full_restoration,
    check_identity,
    check_live_thoughts,
)
from latentpatch.patching.engine import EngineOptions, group_pairs, pairs_per_batch, sweep_pairs, sweep_reference
from latentpatch.patching.specs import PatchSpec
from latentpatch.pipeline.manifest import RunContext, write_manifest
from latentpatch.pipeline.selection import pairs_to_run
from latentpatch.pipeline.values import global_pool, value_factory
from latentpatch.pipeline.workers import run_items
from latentpatch.rundir import read_pair_result


def replacement_source(ctx: RunContext, all_pairs: Sequence[Pair]) -> Callable[[int], Callable]:
    """The patched-in values of each pair; a shard's ``mean``/``resample`` values use every shard's pairs."""
    config = ctx.config
    if config.replacement in GLOBAL_REPLACEMENTS and config.shard is not None:
        ctx.replacement_pool = "all shards"
        unsharded, _ = pairs_to_run(all_pairs, dataclasses.replace(config, shard=None))
        return value_factory(ctx.bases, config, *global_pool(ctx.model, ctx.cache, config, unsharded, ctx.indices))
    return value_factory(ctx.bases, config)


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


def run_checks(ctx: RunContext, values_for: Callable[[int], Callable]) -> dict[str, dict]:
    """The built-in checks, side by side like pairs (over the run's worker processes)."""
    jobs = check_jobs(ctx, values_for)
    names = list(jobs)
    workers = ctx.workers.count if ctx.workers else 1
    done = run_items(
        list(range(len(names))), lambda i: jobs[names[i]](), workers, lambda i: None, torch.get_num_threads()
    )
    return {name: done[i] for i, name in enumerate(names)}


def checks_and_sweep(ctx: RunContext, values_for: Callable[[int], Callable]) -> None:
    """The built-in checks, then the sweep. With worker processes (and without ``strict``, which
    must stop before the sweep) the checks go into the sweep's pool instead, so that no core waits
    at a barrier between the two; ``checks_s`` is then the checks' own time inside ``sweep_s``."""
    t = time.perf_counter()
    pooled = ctx.workers is not None and ctx.workers.count > 1 and not ctx.config.strict
    if not pooled:
        ctx.checks = run_checks(ctx, values_for)
        ctx.timings["checks_s"] = time.perf_counter() - t
        write_manifest(ctx)
        report_failed_checks(ctx)
    timed = sweep(ctx, values_for, check_jobs(ctx, values_for) if pooled else None)
    if pooled:
        ctx.checks = {name: result for name, (result, _) in timed.items()}
        ctx.timings["checks_s"] = sum(seconds for _, seconds in timed.values())
        write_manifest(ctx)
        report_failed_checks(ctx)


def report_failed_checks(ctx: RunContext, only: Sequence[str] | None = None) -> None:
    """Warn (through ``ctx.progress``) about every failed built-in check (of ``only``, when given);
    fatal with ``strict``."""
    checks = ctx.checks or {}
    failed = [k for k, c in checks.items() if not c["passed"] and (only is None or k in only)]
    if not failed:
        return
    ctx.progress.warn(
        "CHECK FAILED: "
        + "; ".join(
            f"{k} (value {checks[k]['value']:.3g}, threshold {checks[k]['threshold']:.3g}): {checks[k]['detail']}"
            for k in failed
        )
    )
    if ctx.config.strict:
        raise LatentPatchError(
            f"built-in check failed ({', '.join(failed)}); see {ctx.paths.manifest}; --strict makes this fatal"
        )


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
        r = model.rollout([model.prompt_ids(pair.variant(variant).question)])
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


def sweep(
    ctx: RunContext, values_for: Callable[[int], Callable], jobs: dict[str, Callable[[], dict]] | None = None
) -> dict[str, tuple[dict, float]]:
    """Patch every pair not yet committed; a pair's cells are committed as one file
    ``results/pairs/{k:05d}.json`` (k: its global index), so an interrupted run resumes there.

    ``jobs`` (the built-in checks) run first in the same pool as the pairs; returns each one's
    ``{name: (result, seconds)}``."""
    ctx.paths.pair_results.mkdir(parents=True, exist_ok=True)
    ctx.progress.stage("patching", len(ctx.bases) * len(ctx.specs))
    t = time.perf_counter()
    todo = []
    for i, k in enumerate(ctx.indices):
        path = ctx.paths.pair_result(k)
        if not path.exists() or read_pair_result(path) is None:
            if path.exists():  # a file damaged outside the run (writes are atomic): recompute it
                ctx.progress.warn(f"note: {path} is damaged (truncated?); recomputing pair {ctx.bases[i].pair_id}")
            todo.append(i)
        else:
            ctx.progress.advance(len(ctx.specs))
    names = list(jobs or {})  # job j is item -1 - j, group g of pairs is item g
    size = pairs_per_batch(ctx.specs, ctx.batch_size, ctx.shared_rows) if ctx.config.engine == "fast" else 1
    groups = group_pairs(ctx.bases, todo, size, ctx.model.config.eos_id)

    def work(g: int) -> tuple[dict, float] | None:
        if g < 0:
            start = time.perf_counter()
            return (jobs or {})[names[-1 - g]](), time.perf_counter() - start
        for i, entry in zip(groups[g], patch_pairs(ctx, groups[g], values_for)):
            write_json(ctx.paths.pair_result(ctx.indices[i]), entry)
        return None

    done = run_items(
        [-1 - j for j in range(len(names))] + list(range(len(groups))),
        work,
        ctx.workers.count if ctx.workers else 1,
        lambda g: ctx.progress.advance(len(groups[g]) * len(ctx.specs)) if g >= 0 else None,
        threads=torch.get_num_threads(),
    )
    ctx.timings["sweep_s"] = time.perf_counter() - t
    return {name: done[-1 - j] for j, name in enumerate(names)}
