"""Pairs in worker processes (pipeline/workers.py): the same bytes as one process, errors surface."""

from __future__ import annotations

import os

import pytest

from latentpatch.data.pairs import save_pairs
from latentpatch.data.synthetic import generate_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.model.load import load_model
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.run import run_experiments
from latentpatch.pipeline.workers import run_items
from latentpatch.rundir import read_manifest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="worker processes need fork")


def test_run_items_returns_every_result_and_reports_every_item():
    seen: list[int] = []
    parent = os.getpid()
    out = run_items(list(range(7)), lambda i: (i * i, os.getpid()), 3, seen.append)
    assert [v[0] for v in out.values()] == [i * i for i in range(7)] and list(out) == list(range(7))
    assert sorted(seen) == list(range(7))
    pids = {v[1] for v in out.values()}
    assert parent in pids and len(pids) == 3  # this process and two children did the work


def test_a_failing_worker_is_raised_with_its_message():
    def work(i: int) -> int:
        if i == 5:  # odd items go to the child
            raise ValueError("pair 5 is broken")
        return i

    with pytest.raises(LatentPatchError, match="in a worker process: ValueError: pair 5 is broken"):
        run_items(list(range(6)), work, 2, lambda i: None)
    with pytest.raises(ValueError, match="pair 5"):  # in this process: the error itself
        run_items(list(range(6)), work, 1, lambda i: None)


def test_results_are_the_same_bytes_with_two_workers(tmp_path):
    """Baselines, the built-in checks, the layer sweep and the step-level experiments in two
    processes write exactly the files (and check values) one process writes (every pair and every
    check is computed alone, at the same thread count)."""
    pairs = tmp_path / "pairs.json"
    save_pairs(generate_pairs(6, seed=3, intermediates=True), pairs)
    model = load_model("default")
    runs = {}
    for workers in (1, 2):
        config = RunConfig(
            pairs=str(pairs),
            experiments=("layer", "thought", "intermediate"),
            out=str(tmp_path / f"w{workers}"),
            workers=workers,
            report=False,
            use_cache=False,
        )
        runs[workers] = run_experiments(config, model=model, progress=False, command="test")
    files = sorted(p.relative_to(runs[1]) for p in (runs[1] / "results").rglob("*") if p.is_file())
    assert any(str(f).startswith("results/steps") for f in files) and len(files) > 10
    for f in files:
        assert (runs[1] / f).read_bytes() == (runs[2] / f).read_bytes(), f
    one, two = read_manifest(runs[1]), read_manifest(runs[2])
    assert two["workers"] == {"count": 2, "reason": "--workers"}
    assert one["checks"] == two["checks"] and one["baselines"] == two["baselines"]


def test_checks_share_the_sweeps_pool_unless_strict(tmp_path, monkeypatch):
    """With workers the checks run in the sweep's pool (a failed one is reported after it, in the
    manifest); ``strict`` keeps them before the sweep, which then never starts."""
    import latentpatch.pipeline.sweep as sweep_module

    def failing_identity(*args, **kwargs) -> dict:
        during_sweep = any((tmp_path / out / "results" / "pairs").is_dir() for out in ("pooled", "strict"))
        return {"passed": False, "value": 1.0, "threshold": 0.0, "detail": f"made to fail, in the sweep {during_sweep}"}

    monkeypatch.setattr(sweep_module, "check_identity", failing_identity)
    pairs = tmp_path / "pairs.json"
    save_pairs(generate_pairs(4, seed=5), pairs)
    model = load_model("default")
    common = dict(pairs=str(pairs), experiments=("layer",), workers=2, report=False, use_cache=False)
    pooled = run_experiments(RunConfig(out=str(tmp_path / "pooled"), **common), model=model, progress=False)
    manifest = read_manifest(pooled)
    assert (
        manifest["checks"]["identity"]["detail"] == "made to fail, in the sweep True"
        and manifest["status"] == "complete"
    )
    assert manifest["checks"]["live_thoughts"]["passed"]  # the others ran in the pool too
    assert 0 < manifest["timings"]["checks_s"] and len(list((pooled / "results" / "pairs").glob("*.json"))) == 4
    with pytest.raises(LatentPatchError, match="built-in check failed \\(identity\\)"):
        run_experiments(RunConfig(out=str(tmp_path / "strict"), strict=True, **common), model=model, progress=False)
    assert not list((tmp_path / "strict" / "results" / "pairs").glob("*.json"))
