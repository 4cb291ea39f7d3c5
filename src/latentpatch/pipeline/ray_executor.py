"""``--executor ray``: a stage's per-pair tasks on Ray actors, one per model replica (docs/scaling.md).

The driver (the ``latentpatch run`` process) keeps everything a run owns: the lock, the baselines,
the value pool, the progress bar, and every write (``run_stage`` commits each result atomically as
it arrives, exactly as with forked workers). Ray only runs the pure per-pair work:

- :class:`Replica` is an actor holding one model, loaded once from the run's options
  (``RunConfig.load``) at the driver's thread count. ``--workers N`` replicas (default: the
  cluster's CPUs / threads, or its GPUs / ``--gpus-per-worker``), at most one per pair.
- A stage's work (the closure ``run_stage`` hands its executor) is pickled once per stage with the
  model left out (a persistent id: each replica puts its own in its place, so a model crosses the
  network never; only if the replica's weights fingerprint differs from the driver's, e.g. a model
  passed in by a notebook, is the driver's model sent along) and fetched once per replica.
- Jobs (a pair group or a check) go to whichever replica is free (``ray.wait``), so a slow pair holds
  up nobody. A replica that dies (node lost, OOM, killed) is replaced and its job is run again
  elsewhere, at most :data:`MAX_TRIES` times, after which the run stops with one line naming the
  pair. Committed pairs stay, and ``--resume`` continues like any other run.

The work is the same code on the same weights at the same thread count, so the bytes equal a
one-process run on the same device type (tested on a local cluster).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from latentpatch.errors import LatentPatchError
from latentpatch.pipeline.config import ModelOptions
from latentpatch.pipeline.progress import RunProgress

if TYPE_CHECKING:
    from latentpatch.pipeline.manifest import RunContext

J = TypeVar("J")

#: How often one job may be started (the first try and the retries after its replica died).
MAX_TRIES = 3

#: The open executors (at most one per run in this process), so tests and notebooks can reach the replicas.
LIVE: list[RayExecutor] = []

#: Idle replicas kept for the next run of the same model in a Ray session this module did not start
#: (a notebook's, a test's): loading a model is most of a replica's start. :func:`release` stops them.
IDLE: dict[tuple, list[Any]] = {}


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LatentPatchError(
            "--executor ray: Ray is not installed; fix: pip install 'latentpatch[ray]' (or run without --executor ray)"
        ) from None
    return ray


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """One line (exit 2) if nothing listens at ``host:port`` (``ray://host:port`` too); ``auto`` is Ray's.

    >>> check_reachable("auto")
    >>> check_reachable("nonsense")
    Traceback (most recent call last):
    ...
    latentpatch.errors.LatentPatchError: --ray-address 'nonsense': use host:port (e.g. 10.0.0.5:6379) or auto
    """
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise LatentPatchError(f"--ray-address {address!r}: use host:port (e.g. 10.0.0.5:6379) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise LatentPatchError(
            f"--ray-address {address}: no Ray cluster answers there ({err.strerror or err}); fix: start one "
            "(ray start --head) and pass its address, or drop --ray-address for a local cluster"
        ) from None


def connect(address: str | None) -> bool:
    """Join ``address`` (or start a local cluster); True if this call started Ray (and so stops it).
    A Ray session already open in this process (a notebook's, a test's) is used as it is."""
    ray = _ray()
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"--ray-address {address}" if address else "a local Ray cluster"
        fix = "check the head's address (ray status on it)" if address else "check `ray start --head` runs here"
        reason = " ".join(str(err).split())[:200]
        message = f"{where}: Ray did not start ({reason}); fix: {fix}, or run without --executor ray"
        raise LatentPatchError(message) from None
    return True


# ---- the work shipped to replicas: pickled once per stage, the model left out --------------------


def _pickler_class() -> type:
    """Ray's cloudpickle (closures, local functions) with the run's unshippable objects as persistent ids."""
    from ray import cloudpickle

    class WorkPickler(cloudpickle.Pickler):
        """``model`` (by identity), the progress reporter and this module's executors are not sent."""

        def __init__(self, file: io.BytesIO, model: Any):
            super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
            self.model = model

        def persistent_id(self, obj: Any) -> str | None:
            if self.model is not None and obj is self.model:
                return "model"
            if isinstance(obj, RunProgress):
                return "progress"
            if isinstance(obj, RayExecutor):
                return "executor"
            return None

    return WorkPickler


class _WorkUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, model: Any):
        super().__init__(file)
        self.model = model

    def persistent_load(self, pid: str) -> Any:
        return {"model": self.model, "progress": RunProgress(), "executor": None}[pid]


def dumps_work(work: Callable[[Any], Any], model: Any) -> bytes:
    """``work`` as bytes, ``model`` (None: sent along) replaced by the replica's own."""
    buf = io.BytesIO()
    _pickler_class()(buf, model).dump(work)
    return buf.getvalue()


def loads_work(data: bytes, model: Any) -> Callable[[Any], Any]:
    """The inverse of :func:`dumps_work` in a replica holding ``model``."""
    return _WorkUnpickler(io.BytesIO(data), model).load()


class Replica:
    """One model replica (a Ray actor): loads the model once, runs jobs of the current stage's work."""

    def __init__(self, config: Any, threads: int):
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(config.seed)  # as prepare_run does before loading
        self.model = config.load()
        self.stage: tuple[str, Callable[[Any], Any]] | None = None

    def fingerprint(self) -> str:
        from latentpatch.pipeline.cache import model_key

        return model_key(self.model)

    def run(self, stage: str, work: list[Any], job: Any) -> Any:
        """``work[0]``: the stage's pickled work (an object ref in a list, so Ray fetches it only
        here, once per stage); the job's result."""
        if self.stage is None or self.stage[0] != stage:
            import ray

            self.stage = (stage, loads_work(ray.get(work[0]), self.model))
        return self.stage[1](job)


class RayExecutor:
    """Runs a stage's jobs on replicas, handing each result to ``done`` in the driver as it finishes
    (the :class:`~latentpatch.pipeline.stages.Executor` protocol)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.replicas: list[Any] = []  # started by the first stage with work (a resumed, finished run starts none)
        self.retried: list[str] = []  # "pair ..." of every job run again after its replica died
        self.started_ray = False
        LIVE.append(self)

    def _open(self) -> None:
        """Join or start the cluster and the replicas (kept ones first, see :data:`IDLE`)."""
        t = time.perf_counter()
        ctx, config = self.ctx, self.ctx.config
        self.started_ray = connect(config.ray_address)
        ray = _ray()
        from latentpatch.pipeline.cache import model_key

        threads = ctx.threads.count if ctx.threads else 1
        resources = ray.cluster_resources()
        gpus = config.gpus_per_worker or 0.0
        cpus = 1 if gpus else threads  # a GPU replica's CPU threads only feed the device
        room = int(resources.get("CPU", 0) // cpus)
        if gpus:
            room = min(room, int(resources.get("GPU", 0) // gpus))
        if room < 1:
            need = f"{gpus:g} GPU(s)" if gpus else f"{threads} CPU(s) (--threads)"
            raise LatentPatchError(
                f"--executor ray: the Ray cluster has no room for one replica of {need} (it has "
                f"{resources.get('GPU', 0):g} GPUs, {resources.get('CPU', 0):g} CPUs); fix: lower --gpus-per-worker "
                "or --threads, or join a bigger cluster with --ray-address"
            )
        if config.workers is not None and config.workers > room:  # more would wait forever for resources
            ctx.progress.warn(f"note: --workers {config.workers}: the Ray cluster has room for {room} replicas")
        count = min(config.workers or room, room)
        self.count = max(1, min(count, len(ctx.bases) or 1))
        self.actor = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(Replica)
        self.threads = threads
        self.kind = (tuple(getattr(config, f.name) for f in dataclasses.fields(ModelOptions)), threads, gpus)
        kept = IDLE.pop(self.kind, [])
        self.replicas = kept[: self.count] + [self._start() for _ in range(self.count - len(kept))]
        for replica in kept[self.count :]:
            ray.kill(replica)
        keys = ray.get([r.fingerprint.remote() for r in self.replicas])
        self.send_model = any(k != model_key(ctx.model) for k in keys)  # a model they cannot load: send it
        # what Ray costs besides the work (manifest timings, bench/bench_scale.py): joining or starting the
        # cluster and the replicas (model loads), pickling and putting each stage's work, the driver's loop
        self.add_time("ray_start_s", time.perf_counter() - t)

    def _start(self) -> Any:
        return self.actor.remote(self.ctx.config, self.threads)

    def _describe(self, job: Any) -> str:
        pairs = getattr(job, "pairs", ())
        if pairs:
            return "pair " + ", ".join(self.ctx.bases[i].pair_id for i in pairs)
        return f"check {getattr(job, 'check', job)}"

    def run(self, jobs: Sequence[J], work: Callable[[J], Any], done: Callable[[J, Any], None]) -> None:
        ray = _ray()
        from ray.exceptions import RayActorError, RayTaskError

        if not jobs:
            return
        if not self.replicas:
            self._open()
        stage = uuid.uuid4().hex  # a replica kept from an earlier run never mistakes its old work for this
        t = time.perf_counter()
        shipped = [ray.put(dumps_work(work, None if self.send_model else self.ctx.model))]
        self.add_time("ray_ship_s", time.perf_counter() - t)
        waited, t = 0.0, time.perf_counter()
        queue: deque[int] = deque(range(len(jobs)))
        tries = [0] * len(jobs)
        free = list(self.replicas)
        running: dict[Any, tuple[Any, int]] = {}
        while queue or running:
            while queue and free:
                replica, j = free.pop(0), queue.popleft()
                tries[j] += 1
                running[replica.run.remote(stage, shipped, jobs[j])] = (replica, j)
            tw = time.perf_counter()
            ready, _ = ray.wait(list(running), num_returns=1)
            waited += time.perf_counter() - tw
            replica, j = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayTaskError as err:  # the work itself failed: its own error, as with one process
                raise (err.cause if isinstance(err.cause, BaseException) else err) from None
            except RayActorError:  # the replica died: replace it, run the job again elsewhere
                what = self._describe(jobs[j])
                if tries[j] >= MAX_TRIES:
                    raise LatentPatchError(
                        f"--executor ray: {what} failed {tries[j]} times (its replica died each time); "
                        "fix: check the cluster's memory and nodes, then rerun with --resume"
                    ) from None
                self.ctx.progress.warn(f"note: a Ray replica died; {what} runs again on another one")
                self.retried.append(what)
                self.replicas.remove(replica)
                fresh = self._start()
                self.replicas.append(fresh)
                free.append(fresh)
                queue.appendleft(j)
                continue
            free.append(replica)
            done(jobs[j], result)
        self.add_time("ray_driver_s", time.perf_counter() - t - waited)  # scheduling, results, commits

    def add_time(self, key: str, seconds: float) -> None:
        self.ctx.timings[key] = self.ctx.timings.get(key, 0.0) + seconds

    def close(self) -> None:
        """Stop Ray if this executor started it; else keep the replicas for the next run (:data:`IDLE`)."""
        ray = _ray()
        if self in LIVE:
            LIVE.remove(self)
        if self.started_ray:
            ray.shutdown()
        elif self.replicas:
            IDLE.setdefault(self.kind, []).extend(self.replicas)
        self.replicas = []


def ray_executor(ctx: RunContext) -> RayExecutor:
    """The run's Ray executor, started at its first stage and kept for the next (:func:`close_executor`)."""
    for executor in LIVE:
        if executor.ctx is ctx:
            return executor
    return RayExecutor(ctx)


def close_executor(ctx: RunContext) -> None:
    """Stop the run's replicas, if it started any."""
    for executor in [e for e in LIVE if e.ctx is ctx]:
        executor.close()


def release() -> None:
    """Stop the idle replicas kept in this process's Ray session (:data:`IDLE`)."""
    ray = _ray()
    for replicas in IDLE.values():
        for replica in replicas:
            ray.kill(replica)
    IDLE.clear()
