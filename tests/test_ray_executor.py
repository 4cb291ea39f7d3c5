"""``--executor ray`` (pipeline/ray_executor.py) on a local Ray cluster: the bytes of a one-process run,
a replica killed mid-run (its pair retried), ``--resume`` of an interrupted Ray run, and bad input.

One Ray session (``ray.init(num_cpus=2)``) is shared by the module, and its runs reuse the replicas
the first one started (``ray_executor.IDLE``): Ray's and a replica's start-up are the slow parts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from latentpatch.errors import LatentPatchError, RunInterrupted  # noqa: E402
from latentpatch.pipeline import ray_executor  # noqa: E402
from latentpatch.pipeline.progress import RunProgress  # noqa: E402
from latentpatch.pipeline.run import RunConfig, run_experiments  # noqa: E402

EXPERIMENTS = ("position", "thought")  # the patching sweep (with its checks) and a step-level stage


def files(run: Path) -> dict[str, bytes]:
    """Every file under ``results/`` by its relative path."""
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted((run / "results").rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A local two-CPU Ray cluster and the one-process reference run (default model, 4 pairs)."""
    root = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ref = run_experiments(config(root, "one", workers=1, executor=None), progress=False)
    yield root, files(ref)
    ray_executor.release()  # the replicas kept between the module's runs
    ray.shutdown()


def config(root: Path, out: str, **kw) -> RunConfig:
    options = dict(experiments=EXPERIMENTS, limit=4, report=False, cache_dir=str(root / "cache"), executor="ray")
    return RunConfig(out=str(root / out), **{**options, **kw})


class Hook(RunProgress):
    """Calls ``act`` at the first committed pair of a stage run on Ray replicas."""

    def __init__(self, act):
        self.act, self.fired = act, False

    def advance(self, steps: int = 1) -> None:
        if ray_executor.LIVE and not self.fired:
            self.fired = True
            self.act(ray_executor.LIVE[0])

    def warn(self, message: str) -> None:
        self.warnings = [*getattr(self, "warnings", []), message]


def test_ray_replicas_write_the_bytes_of_one_process(session):
    root, reference = session
    run = run_experiments(config(root, "ray", workers=2), progress=False)
    assert files(run) == reference
    assert not ray_executor.LIVE  # the replicas are stopped with the run


def test_a_killed_replica_is_replaced_and_its_pair_retried(session):
    root, reference = session
    hook = Hook(lambda ex: ray.kill(ex.replicas[0]))
    run = run_experiments(config(root, "killed", workers=2), progress=hook)
    assert hook.fired and any("replica died" in w for w in hook.warnings)
    assert files(run) == reference


def test_an_interrupted_ray_run_resumes_to_the_same_bytes(session):
    root, reference = session

    def interrupt(_):
        raise KeyboardInterrupt

    with pytest.raises(RunInterrupted, match="--resume"):
        run_experiments(config(root, "resumed", workers=2), progress=Hook(interrupt))
    done = files(root / "resumed")
    assert 0 < sum(k.startswith("results/pairs/") for k in done) < 4  # some pairs committed, not all
    run = run_experiments(config(root, "resumed", workers=2), progress=False, resume=True)
    assert files(run) == reference


def test_bad_ray_input_is_one_line(session, tmp_path, monkeypatch, capsys):
    from latentpatch.cli import main

    with pytest.raises(LatentPatchError, match="--ray-address 127.0.0.1:9: no Ray cluster answers there"):
        RunConfig(executor="ray", ray_address="127.0.0.1:9").validate()
    with pytest.raises(LatentPatchError, match="applies to --executor ray only"):
        RunConfig(ray_address="auto").validate()
    with pytest.raises(SystemExit) as err:  # refused before the model loads
        main(["run", "--executor", "ray", "--ray-address", "127.0.0.1:9", "--out", str(tmp_path / "a")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and "no Ray cluster answers there" in lines[0]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(SystemExit) as err:
        main(["run", "--executor", "ray", "--limit", "1", "--out", str(tmp_path / "r"), "--no-report"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and "pip install 'latentpatch[ray]'" in lines[0]


def test_a_pair_whose_replica_keeps_dying_stops_the_run_with_one_line(session):
    """Bounded retries: a job that kills its replica each time is tried MAX_TRIES times, on a fresh
    replica each time, then the run stops naming the pair (light replicas here: no model)."""
    from types import SimpleNamespace

    class Light(ray_executor.Replica):
        def __init__(self, config, threads):
            self.model, self.stage = None, None

    def work(job):
        if job == "bad":
            import os

            os._exit(1)  # the replica's process dies, as on a lost node or an out-of-memory kill
        return job

    ctx = SimpleNamespace(
        config=RunConfig(executor="ray"), model=object(), progress=Hook(lambda ex: None), timings={},
        bases=[SimpleNamespace(pair_id="p0"), SimpleNamespace(pair_id="p7")],
    )  # fmt: skip
    ex = ray_executor.RayExecutor(ctx)
    ex.actor, ex.threads, ex.send_model = ray.remote(num_cpus=0)(Light), 1, False
    ex.replicas, ex.kind = [ex._start()], ("light",)
    got = []
    with pytest.raises(LatentPatchError, match=r"pair p7 failed 3 times \(its replica died each time\)"):
        ex.run(
            [SimpleNamespace(pairs=(0,)), SimpleNamespace(pairs=(1,))],
            lambda job: work("bad" if job.pairs == (1,) else "ok"),
            lambda job, result: got.append(result),
        )
    assert got == ["ok"] and ex.retried == ["pair p7", "pair p7"]
    ray_executor.LIVE.remove(ex)
    for replica in ex.replicas:
        ray.kill(replica)
