"""``latentpatch launch slurm``: a run as a SLURM job array of shards plus a merge job, through submitit
(``pip install 'latentpatch[slurm]'``; docs/scaling.md).

``--out DIR`` holds the shards (``DIR/shard0`` ... ``DIR/shard{N-1}``, each ``latentpatch run --shard
i/N``, no report), the merged run (``DIR/merged``, by :func:`~latentpatch.pipeline.merge.merge_runs`,
which refuses anything incomplete) and submitit's logs (``DIR/slurm/``). On SLURM the merge job
depends on the array (``afterok``): it starts only if every shard finished. With ``--cluster local``
(submitit's local executor: the same jobs as subprocesses of this machine, for trying a launch and
for the tests) there is no scheduler to hold the merge, so the launcher waits for the array and
then runs the merge job. A shard that failed stops the launch with one line naming it; rerunning
the same ``launch`` continues every shard with ``--resume`` (finished pairs are kept).

The partition, GPUs, CPUs, memory and time limit pass through to submitit (``slurm_partition``,
``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``timeout_min``); ``--slurm-arg key=value`` adds any
other ``#SBATCH`` setting (``slurm_additional_parameters``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentpatch.errors import LatentPatchError
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.options import option

#: The values of ``--cluster``: submitit's ``slurm`` and ``local`` executors.
CLUSTERS = ("slurm", "local")


@dataclass
class LaunchConfig(RunConfig):
    """The options of ``latentpatch launch slurm``: every run option (``--out`` is the launch's folder)
    plus the array's size and the scheduler's settings."""

    shards: int = option(2, "Number of shards: the array's size (one job per shard).", concern="execution")
    partition: str | None = option(None, "SLURM partition of every job.", concern="execution")
    gpus_per_node: int | None = option(None, "GPUs per shard job (submitit gpus_per_node).", concern="execution")
    cpus_per_task: int | None = option(None, "CPUs per shard job.", concern="execution")
    mem_gb: float | None = option(None, "Memory per shard job in GB.", concern="execution")
    time: int = option(60, "Time limit of each job in minutes.", concern="execution")
    parallel: int | None = option(None, "At most this many shards at once (--array=...%N).", concern="execution")
    slurm_arg: str | None = option(
        None, "Other #SBATCH settings: comma list of key=value (e.g. account=lab,qos=high).", concern="execution"
    )
    cluster: str = option(
        "slurm", "slurm, or local: the jobs as subprocesses here (try a launch).", concern="execution"
    )

    def run_config(self, shard: int | None) -> RunConfig:
        """The run options of shard ``shard`` (None: the merged run's)."""
        names = {f.name for f in dataclasses.fields(RunConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        if shard is None:
            return RunConfig(**{**values, "out": str(Path(self.out) / "merged")})
        return RunConfig(
            **{**values, "shard": f"{shard}/{self.shards}", "out": str(self.shard_dir(shard)), "report": False}
        )

    def shard_dir(self, shard: int) -> Path:
        return Path(self.out) / f"shard{shard}"

    def extra(self) -> dict[str, str]:
        """``--slurm-arg`` as a mapping."""
        pairs = [p.strip() for p in (self.slurm_arg or "").split(",") if p.strip()]
        bad = [p for p in pairs if "=" not in p]
        if bad:
            raise LatentPatchError(f"--slurm-arg {bad[0]!r}: use key=value (e.g. account=lab)")
        return dict(p.split("=", 1) for p in pairs)

    def validate(self) -> None:
        if self.shards < 1:
            raise LatentPatchError(f"--shards must be >= 1 (got {self.shards})")
        if self.cluster not in CLUSTERS:
            raise LatentPatchError(f"--cluster {self.cluster!r}: use {' or '.join(CLUSTERS)}")
        if self.shard is not None:
            raise LatentPatchError("--shard: launch slurm makes the shards itself; fix: drop --shard, set --shards N")
        if self.time < 1:
            raise LatentPatchError(f"--time must be >= 1 minute (got {self.time})")
        self.extra()
        self.run_config(0).validate()


def run_shard(config: RunConfig) -> str:
    """One array task: the shard's run (``--resume`` when it already started); its run directory."""
    from latentpatch.pipeline.run import run_experiments
    from latentpatch.rundir import RunPaths

    resume = RunPaths(config.out).manifest.exists()
    return str(run_experiments(config, resume=resume, progress=False))


def merge_shards(dirs: list[str], out: str, report: bool) -> str:
    """The merge job (after every shard): the merged run directory."""
    from latentpatch.pipeline.merge import merge_runs

    return str(merge_runs(dirs, out, report=report))


@dataclass(frozen=True)
class Launched:
    """What was submitted: the array's job ids, the merge job's id, and the folders."""

    shard_jobs: list[str]
    merge_job: str
    shards: list[Path]
    merged: Path
    logs: Path


def _executor(cfg: LaunchConfig, logs: Path) -> Any:
    try:
        import submitit
    except ImportError:
        raise LatentPatchError("launch slurm needs submitit; fix: pip install 'latentpatch[slurm]'") from None
    executor = submitit.AutoExecutor(folder=logs, cluster=cfg.cluster)
    params: dict[str, Any] = {"timeout_min": cfg.time, "name": "latentpatch"}
    for key, value in (
        ("gpus_per_node", cfg.gpus_per_node),
        ("cpus_per_task", cfg.cpus_per_task),
        ("mem_gb", cfg.mem_gb),
    ):
        if value is not None:
            params[key] = value
    if cfg.cluster == "slurm":
        params["slurm_partition"] = cfg.partition
        params["slurm_additional_parameters"] = cfg.extra()
        if cfg.parallel:
            params["slurm_array_parallelism"] = cfg.parallel
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def launch_slurm(cfg: LaunchConfig) -> Launched:
    """Submit the shards as a job array and the merge as a job after it (see the module docstring)."""
    cfg.validate()
    merged = Path(cfg.out) / "merged"
    if merged.exists() and any(merged.iterdir()):
        raise LatentPatchError(f"{merged} already holds a merged run; fix: choose a new --out")
    logs = Path(cfg.out) / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    executor = _executor(cfg, logs)
    configs = [cfg.run_config(i) for i in range(cfg.shards)]
    jobs = executor.map_array(run_shard, configs)
    dirs = [str(cfg.shard_dir(i)) for i in range(cfg.shards)]
    if cfg.cluster == "local":  # no scheduler holds the merge: wait for the array here
        for i, job in enumerate(jobs):
            _wait(job, f"shard {i}/{cfg.shards}", logs)
    else:
        array = str(jobs[0].job_id).split("_")[0]
        executor.update_parameters(slurm_additional_parameters={**cfg.extra(), "dependency": f"afterok:{array}"})
    merge_job = executor.submit(merge_shards, dirs, str(merged), bool(cfg.report))
    if cfg.cluster == "local":
        _wait(merge_job, "the merge", logs)
    return Launched([str(j.job_id) for j in jobs], str(merge_job.job_id), [Path(d) for d in dirs], merged, logs)


def _wait(job: Any, what: str, logs: Path) -> None:
    """Wait for a local job; its failure is one line (the job's last error line and where its log is)."""
    try:
        job.result()
    except Exception as err:  # noqa: BLE001 - submitit re-raises the job's failure with its traceback
        last = [line for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
        raise LatentPatchError(
            f"{what} (job {job.job_id}) failed: {last[0].strip()[:300]}; fix: see the logs in {logs}, then rerun "
            "the same launch (finished pairs are kept)"
        ) from None
