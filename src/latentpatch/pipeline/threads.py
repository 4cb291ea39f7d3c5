"""How many CPU threads a run uses: from the model's size and the cores actually free.

Small models (many tiny matrix products) lose time to thread start-up, so they get one thread.
A larger model gains from more threads only on cores nobody else is using: on a 2-core machine
with the other core busy, two threads are several times *slower* than one (bench/RESULTS.md),
so the count is the cores this process may run on (``os.sched_getaffinity``) less the cores other
processes keep busy (:func:`busy_elsewhere`), at least one. ``--threads`` overrides the choice.

Imports no torch (the caller sets the count).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

#: ``d_model * n_layers`` at or below which a model is "small" and runs on one thread.
SMALL_MODEL = 4096


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen and why (the manifest's ``threads``, the run summary line)."""

    count: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "reason": self.reason}


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def recent_load() -> float:
    """Runnable processes over the last minute (``os.getloadavg()[0]``); 0 where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(busy, all, n_cpus) of the machine's CPU time counters (``/proc/stat``); None off Linux."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = [int(x) for x in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    n_cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks), n_cpus


@dataclass(frozen=True)
class CpuSample:
    """The machine's and this process's CPU time at one moment (:func:`busy_elsewhere`)."""

    wall: float
    ticks: tuple[int, int, int] | None
    own: float  # this process's CPU seconds

    @classmethod
    def now(cls) -> CpuSample:
        t = os.times()
        return cls(time.monotonic(), _cpu_ticks(), t.user + t.system)

    def others_busy(self) -> float | None:
        """Cores that other processes kept busy since this sample; None where unknown."""
        now = CpuSample.now()
        if self.ticks is None or now.ticks is None or now.ticks[1] <= self.ticks[1]:
            return None
        busy, total, n_cpus = (now.ticks[0] - self.ticks[0]), (now.ticks[1] - self.ticks[1]), now.ticks[2]
        own = (now.own - self.own) / max(now.wall - self.wall, 1e-9)
        return max(0.0, busy / total * n_cpus - own)


#: Taken when this module is first imported: at ``latentpatch run``'s start, so the seconds of its
#: imports are the window over which the other processes' use of the cores is measured.
_STARTUP = CpuSample.now()


def busy_elsewhere() -> float:
    """Cores that other processes keep busy now: measured over this process's start-up (from
    :data:`_STARTUP`), or over a fresh quarter second when that window is under 0.2 s or over a
    minute old; the 1-minute load average where ``/proc/stat`` is missing. Unlike the load
    average, a process that just ended does not count."""
    sample, age = _STARTUP, time.monotonic() - _STARTUP.wall
    if not 0.2 <= age <= 60:
        sample = CpuSample.now()
        time.sleep(0.25)
    measured = sample.others_busy()
    return recent_load() if measured is None else measured


def choose_threads(
    d_model: int,
    n_layers: int,
    override: int | None = None,
    cores: int | None = None,
    load: float | None = None,
) -> ThreadChoice:
    """The CPU thread count for a model of ``d_model`` x ``n_layers``.

    ``override`` (``--threads``) wins; a small model (``d_model * n_layers <= SMALL_MODEL``) gets
    1; else the free cores, ``cores - round(load)``, between 1 and ``cores``. ``cores`` and
    ``load`` (cores busy elsewhere) default to this machine's (:func:`usable_cores`,
    :func:`busy_elsewhere`); tests inject them.

    >>> choose_threads(128, 4, cores=16, load=0.0)
    ThreadChoice(count=1, reason='small model (d_model x n_layers 512 <= 4096)')
    >>> choose_threads(576, 30, cores=2, load=0.1).count, choose_threads(576, 30, cores=2, load=1.2).count
    (2, 1)
    """
    if override is not None:
        return ThreadChoice(override, "--threads")
    size = d_model * n_layers
    if size <= SMALL_MODEL:
        return ThreadChoice(1, f"small model (d_model x n_layers {size} <= {SMALL_MODEL})")
    cores = usable_cores() if cores is None else cores
    load = busy_elsewhere() if load is None else load
    # round(): a process that is running now counts (our own start-up adds well under one)
    free = min(cores, max(1, cores - round(load)))
    return ThreadChoice(free, f"{free} of {cores} cores free (load {load:.2f})")


#: Rows of one forward pass when several pairs share the engine's batches (a small model on the
#: CPU, where a forward costs its Python and module overhead more than its arithmetic). Measured
#: on the default model (bench/RESULTS.md): 128 rows take 0.85x the time per row of 64, 256 rows
#: 0.78x; beyond that the KV-cache copies grow faster than the overhead shrinks.
SHARED_ROWS = 256


def shared_rows(d_model: int, n_layers: int, on_cpu: bool) -> int | None:
    """Rows per forward when pairs share the engine's batches
    (:func:`~latentpatch.patching.engine.sweep_pairs`), or None: each pair alone.

    Only a small model on the CPU shares: there a row's numbers do not depend on the batch
    (docs/method.md §7.1), and the per-forward overhead is what sharing saves. A large model
    fills its batches alone, and an accelerator's kernels may sum in another order at another
    batch size.

    >>> shared_rows(128, 4, on_cpu=True), shared_rows(576, 30, on_cpu=True), shared_rows(128, 4, on_cpu=False)
    (256, None, None)
    """
    return SHARED_ROWS if on_cpu and d_model * n_layers <= SMALL_MODEL else None


#: Pairs each worker process should have at least before another one is started (forking and
#: the per-process start cost more than a few pairs' work).
PAIRS_PER_WORKER = 8


def choose_workers(
    d_model: int,
    n_layers: int,
    n_pairs: int,
    override: int | None = None,
    on_cpu: bool = True,
    cores: int | None = None,
    load: float | None = None,
) -> ThreadChoice:
    """Worker processes for the per-pair loops (``pipeline/workers.py``).

    ``override`` (``--workers``) wins; off the CPU, or for a model that is not small (it gets
    threads instead), 1; a small model gets one worker per free core, at most one per
    ``PAIRS_PER_WORKER`` pairs.

    >>> choose_workers(128, 4, 57, cores=2, load=0.1)
    ThreadChoice(count=2, reason='small model, 2 of 2 cores free (load 0.10), 57 pairs')
    >>> choose_workers(128, 4, 57, cores=2, load=1.2).count, choose_workers(128, 4, 5, cores=16, load=0.0).count
    (1, 1)
    >>> choose_workers(576, 30, 57, cores=16, load=0.0).reason
    'one process: the model gets the threads'
    """
    if override is not None:
        return ThreadChoice(override, "--workers")
    if not on_cpu:
        return ThreadChoice(1, "one process on the accelerator")
    if not sys.platform.startswith("linux"):  # fork after torch's start is unsafe on macOS
        return ThreadChoice(1, "one process (worker processes only on Linux)")
    if d_model * n_layers > SMALL_MODEL:
        return ThreadChoice(1, "one process: the model gets the threads")
    cores = usable_cores() if cores is None else cores
    load = busy_elsewhere() if load is None else load
    free = min(cores, max(1, cores - round(load)))
    count = max(1, min(free, n_pairs // PAIRS_PER_WORKER))
    return ThreadChoice(count, f"small model, {free} of {cores} cores free (load {load:.2f}), {n_pairs} pairs")
