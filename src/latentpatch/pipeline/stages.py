"""One stage runner for every per-pair stage of a run (the patching sweep, the step-level sweep,
the reading sweeps, attribution patching).

A :class:`Stage` declares its results folder (``results/<folder>/NNNNN.json``, one committed file
per pair, NNNNN its global index), the list key a whole file holds, its progress label and timing
key, and ``prepare``: what it needs before starting (records, pools, specs), run once in the
driver, which returns the stage's :class:`Plan`: its per-pair work (a pure task from this process's
pair numbers to the entries the driver commits), how pairs share one task, and the stage's checks.

:func:`run_stage` is the one loop: committed pairs are skipped (a damaged file, e.g. truncated
outside the run, is recomputed with a note), the checks run first (fatal with ``--strict``: the
pairs never start) or, with worker processes and without ``--strict``, as extra jobs of the same
pool, the tasks run on an :class:`Executor` (serial, or forked workers: today's
:func:`~latentpatch.pipeline.workers.stream_items`; the scale-out issue adds Ray), and the driver
alone commits each result atomically as it arrives, moves the progress bar and adds timings to
``ctx.timings`` (never inside forked work). The tables of each folder are written by one model-free
assembler (:data:`latentpatch.assembly.ASSEMBLERS`), which ``merge`` runs too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from latentpatch.errors import LatentPatchError
from latentpatch.files import write_json
from latentpatch.pipeline.manifest import RunContext, write_manifest
from latentpatch.pipeline.workers import stream_items
from latentpatch.rundir import read_stage_entry

J = TypeVar("J")


@dataclass(frozen=True)
class Done:
    """One pair's finished work: the file content the driver commits, and seconds to add to
    ``ctx.timings`` (measured inside the task, added by the driver)."""

    entry: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def singles(todo: list[int]) -> list[list[int]]:
    """One task per pair (the default grouping)."""
    return [[i] for i in todo]


@dataclass
class Plan:
    """What a prepared stage runs: ``work(group) -> [Done per pair of group]`` (a pure task of this
    process's pair numbers), ``units`` of progress per pair, ``batch`` (the pairs still to do -> the
    groups that share a task) and ``checks`` (name -> job giving ``{passed, value, threshold, detail}``)."""

    work: Callable[[Sequence[int]], list[Done]]
    units: int = 1
    batch: Callable[[list[int]], list[list[int]]] = singles
    checks: dict[str, Callable[[], dict]] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A per-pair stage: ``results/<folder>/NNNNN.json`` holding ``{pair_id, index, <key>: [...], ...}``."""

    name: str  # the progress bar's label
    folder: str  # under results/
    key: str  # the list every whole file holds (a file without it is damaged)
    timing: str  # ctx.timings key of the stage's time
    prepare: Callable[[], Plan]  # what it needs before starting; run once, in the driver
    checks_timing: str | None = None  # ctx.timings key of its checks' time, if recorded
    pool_checks: bool = True  # with workers and not --strict: checks as jobs of the pairs' pool


class Executor(Protocol):
    """Runs tasks and hands each result to ``done`` in this process as it finishes."""

    def run(self, jobs: Sequence[J], work: Callable[[J], Any], done: Callable[[J, Any], None]) -> None: ...


class SerialExecutor:
    """Every task in this process, in order."""

    def run(self, jobs: Sequence[J], work: Callable[[J], Any], done: Callable[[J, Any], None]) -> None:
        for job in jobs:
            done(job, work(job))


@dataclass
class ForkExecutor:
    """Tasks split round-robin over this process and ``workers - 1`` forked children
    (:func:`~latentpatch.pipeline.workers.stream_items`); the same results as one process."""

    workers: int
    threads: int | None = None

    def run(self, jobs: Sequence[J], work: Callable[[J], Any], done: Callable[[J, Any], None]) -> None:
        stream_items(
            list(range(len(jobs))), lambda j: work(jobs[j]), self.workers, lambda j, r: done(jobs[j], r), self.threads
        )


def run_executor(ctx: RunContext) -> Executor:
    """The run's executor: Ray replicas with ``--executor ray``; else forked workers when it has more
    than one, else serial."""
    import torch

    if ctx.config.executor == "ray":
        from latentpatch.pipeline.ray_executor import ray_executor

        return ray_executor(ctx)

    workers = ctx.workers.count if ctx.workers else 1
    return ForkExecutor(workers, torch.get_num_threads()) if workers > 1 else SerialExecutor()


@contextmanager
def executor_scope(ctx: RunContext) -> Iterator[None]:
    """The run's steps inside: an executor that holds resources across stages (Ray's replicas) is
    closed when they end, normally or not."""
    try:
        yield
    finally:
        if ctx.config.executor == "ray":
            from latentpatch.pipeline.ray_executor import close_executor

            close_executor(ctx)


@dataclass(frozen=True)
class Job:
    """One task of a stage's pool: a check (``check`` names it) or a group of pairs."""

    check: str | None = None
    pairs: tuple[int, ...] = ()


def run_checks(ctx: RunContext, checks: dict[str, Callable[[], dict]], executor: Executor) -> dict[str, dict]:
    """The checks side by side like pairs; ``{name: result}`` in declaration order."""
    done: dict[str, dict] = {}
    executor.run(list(checks), lambda name: checks[name](), lambda name, result: done.__setitem__(name, result))
    return {name: done[name] for name in checks}


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


def _record_checks(ctx: RunContext, results: dict[str, dict]) -> None:
    ctx.checks = {**(ctx.checks or {}), **results}
    write_manifest(ctx)
    report_failed_checks(ctx, only=list(results))


def pending(ctx: RunContext, stage: Stage) -> list[int]:
    """This process's pairs (numbers into ``ctx.bases``) without a whole committed file of ``stage``;
    a damaged one is noted and recomputed."""
    folder = ctx.paths.results / stage.folder
    todo = []
    for i, k in enumerate(ctx.indices):
        path = folder / f"{k:05d}.json"
        if path.exists() and read_stage_entry(path, stage.key) is not None:
            continue
        if path.exists():  # a file damaged outside the run (writes are atomic): recompute it
            ctx.progress.warn(f"note: {path} is damaged (truncated?); recomputing pair {ctx.bases[i].pair_id}")
        todo.append(i)
    return todo


def run_stage(ctx: RunContext, stage: Stage, executor: Executor | None = None) -> None:
    """Prepare ``stage``, run its checks, then its work on every pair not yet committed, committing
    each pair's file from this process as its result arrives (see the module docstring)."""
    t = time.perf_counter()
    executor = executor or run_executor(ctx)
    plan = stage.prepare()
    workers = ctx.workers.count if ctx.workers else 1
    pooled = bool(plan.checks) and stage.pool_checks and workers > 1 and not ctx.config.strict
    checks_s = 0.0
    if plan.checks and not pooled:
        tc = time.perf_counter()
        results = run_checks(ctx, plan.checks, executor)
        checks_s = time.perf_counter() - tc
        if stage.checks_timing:
            ctx.timings[stage.checks_timing] = checks_s
        _record_checks(ctx, results)  # fatal with --strict: no pair starts
    folder = ctx.paths.results / stage.folder
    folder.mkdir(parents=True, exist_ok=True)
    ctx.progress.stage(stage.name, len(ctx.bases) * plan.units)
    todo = pending(ctx, stage)
    if len(todo) < len(ctx.bases):  # the committed ones
        ctx.progress.advance(plan.units * (len(ctx.bases) - len(todo)))
    jobs = [Job(check=name) for name in plan.checks] if pooled else []
    jobs += [Job(pairs=tuple(group)) for group in plan.batch(todo)]
    pooled_checks: dict[str, tuple[dict, float]] = {}

    def work(job: Job) -> Any:
        if job.check is not None:
            start = time.perf_counter()
            return plan.checks[job.check](), time.perf_counter() - start
        return plan.work(job.pairs)

    def done(job: Job, result: Any) -> None:
        if job.check is not None:
            pooled_checks[job.check] = result
            return
        for i, finished in zip(job.pairs, result):
            write_json(folder / f"{ctx.indices[i]:05d}.json", finished.entry)
            for key, seconds in finished.timings.items():
                ctx.timings[key] = ctx.timings.get(key, 0.0) + seconds
        ctx.progress.advance(plan.units * len(job.pairs))

    executor.run(jobs, work, done)
    ctx.timings[stage.timing] = ctx.timings.get(stage.timing, 0.0) + time.perf_counter() - t - checks_s
    if pooled:
        if stage.checks_timing:  # the checks' own time inside the stage's
            ctx.timings[stage.checks_timing] = sum(seconds for _, seconds in pooled_checks.values())
        _record_checks(ctx, {name: pooled_checks[name][0] for name in plan.checks})
