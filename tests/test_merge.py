"""Sharded runs merged (latentpatch.pipeline.merge) == one unsharded run, and bad shard sets are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import tiny_text_model

from latentpatch.data.synthetic import generate_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.pipeline.merge import merge_runs
from latentpatch.pipeline.run import RunConfig, run_experiments


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One unsharded run and its 3 shards, on a tiny model and 4 synthetic pairs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("merge")
    model, pairs = tiny_text_model("llama"), generate_pairs(4, seed=3)

    def run(out, shard=None):
        cfg = RunConfig(out=str(root / out), shard=shard, report=False, cache_dir=str(root / "cache"), check_cells=2)
        return run_experiments(cfg, model=model, pairs=pairs, progress=False)

    full = run("full")
    shards = [run(f"shard{i}", f"{i}/3") for i in range(3)]
    yield root, full, shards
    torch.set_num_threads(threads)


def test_merged_shards_equal_the_unsharded_run(runs):
    root, full, shards = runs
    merged = merge_runs(shards[::-1], root / "merged", report=False)  # any order
    for name in ["pairs.json"] + [f"results/{f}.json" for f in ("layer", "position", "iterative", "thoughts")]:
        assert (merged / name).read_bytes() == (full / name).read_bytes(), name
    for f in sorted((full / "results" / "pairs").iterdir()):
        assert (merged / "results" / "pairs" / f.name).read_bytes() == f.read_bytes()
    for name in ("cells", "trajectories"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(merged / f"results/{name}.parquet"), pd.read_parquet(full / f"results/{name}.parquet")
        )
    m, f = (json.loads((d / "manifest.json").read_text()) for d in (merged, full))
    assert m["config_hash"] == f["config_hash"] and m["config"]["shard"] is None
    assert m["baselines"] == f["baselines"]
    assert [s["shard"] for s in m["merged_from"]] == ["0/3", "1/3", "2/3"]
    assert list(m) == [*f, "merged_from"] and list(m["config"]) == list(f["config"])  # key order of a run
    assert set(m["checks"]) == set(f["checks"]) and set(m["checks"]["identity"]["shards"]) == {"0/3", "1/3", "2/3"}
    assert m["timings"]["sweep_s"] == pytest.approx(
        sum(json.loads((s / "manifest.json").read_text())["timings"]["sweep_s"] for s in shards)
    )
    assert m["finished"] == max(json.loads((s / "manifest.json").read_text())["finished"] for s in shards)


def test_merge_refuses_bad_shard_sets(runs, tmp_path):
    root, full, shards = runs
    with pytest.raises(LatentPatchError, match="2/3 missing"):
        merge_runs(shards[:2], tmp_path / "a", report=False)
    with pytest.raises(LatentPatchError, match="both shard 0/3"):
        merge_runs([shards[0], shards[0], shards[1], shards[2]], tmp_path / "b", report=False)
    with pytest.raises(LatentPatchError, match="number of shards"):
        merge_runs([shards[0], full], tmp_path / "c", report=False)
    other = tmp_path / "other"
    shutil.copytree(shards[1], other)
    m = json.loads((other / "manifest.json").read_text())
    m["config"]["seed"] = 7
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LatentPatchError, match="differ in: seed"):
        merge_runs([shards[0], other, shards[2]], tmp_path / "d", report=False)
    with pytest.raises(LatentPatchError, match="not empty"):
        merge_runs(shards, root / "full", report=False)
    running = tmp_path / "running"
    shutil.copytree(shards[2], running)
    m["status"] = "running"
    (running / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LatentPatchError, match="not complete"):
        merge_runs([shards[0], shards[1], running], tmp_path / "e", report=False)
    (running / "manifest.json").unlink()
    with pytest.raises(LatentPatchError, match="manifest.json is missing"):
        merge_runs([shards[0], shards[1], running], tmp_path / "f", report=False)


def test_merge_command(runs, tmp_path, capsys):
    from latentpatch.cli import main

    _, _, shards = runs
    main(["merge", *map(str, shards), "--out", str(tmp_path / "m"), "--no-report"])
    assert (tmp_path / "m" / "results" / "cells.parquet").is_file() and not (tmp_path / "m" / "report.html").exists()
    with pytest.raises(SystemExit) as err:
        main(["merge", str(shards[0]), "--out", str(tmp_path / "n")])
    assert err.value.code == 2 and "1/3, 2/3 missing" in capsys.readouterr().err


@pytest.mark.parametrize("replacement", ["mean", "resample"])
def test_sharded_dataset_replacements_use_every_shards_pairs(replacement, tmp_path):
    """Mean and resample values depend on all pairs: each shard computes them over every shard's
    pairs, so the merged shards equal the unsharded run byte for byte (and the values are not
    those of the shard's own pairs, which would differ)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, pairs = tiny_text_model("llama"), generate_pairs(5, seed=4)

    def run(out, shard=None):
        cfg = RunConfig(
            out=str(tmp_path / out),
            shard=shard,
            report=False,
            cache_dir=str(tmp_path / "cache"),
            check_cells=2,
            experiments=["position"],
            replacement=replacement,
        )
        return run_experiments(cfg, model=model, pairs=pairs, progress=False)

    try:
        full = run("full")
        shards = [run(f"shard{i}", f"{i}/2") for i in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert json.loads((shards[0] / "manifest.json").read_text())["replacement_pool"] == "all shards"
    merged = merge_runs(shards, tmp_path / "merged", report=False)
    files = sorted((full / "results" / "pairs").iterdir())
    assert len(files) == 5
    for f in files:
        assert (merged / "results" / "pairs" / f.name).read_bytes() == f.read_bytes(), f.name
    assert (merged / "results" / "position.json").read_bytes() == (full / "results" / "position.json").read_bytes()

    # a shard written without the all-shards pool (older versions) is refused
    old = tmp_path / "old"
    shutil.copytree(shards[1], old)
    m = json.loads((old / "manifest.json").read_text())
    del m["replacement_pool"]
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LatentPatchError, match="computed them over their own pairs"):
        merge_runs([shards[0], old], tmp_path / "m2", report=False)


def test_merge_and_config_import_no_torch():
    """Merging needs no model: latentpatch.pipeline.merge and .config stay free of torch."""
    code = (
        "import sys, latentpatch.pipeline.merge, latentpatch.pipeline.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    import latentpatch

    src = str(Path(latentpatch.__file__).resolve().parents[1])  # the code under test, not another install
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_sharded_step_level_and_reading_runs_merge_into_the_unsharded_bytes(tmp_path):
    """``--experiments thought,early,lens`` on the shipped model: the shards' step-level values are
    pooled over every shard's pairs, and ``merge`` copies and assembles every stage folder, so the
    merged ``results/`` are the unsharded run's bytes."""
    from latentpatch.model.load import load_model

    model = load_model("default")

    def run(out, shard=None):
        cfg = RunConfig(
            out=str(tmp_path / out),
            experiments=("thought", "early", "lens"),
            limit=5,
            shard=shard,
            report=False,
            cache_dir=str(tmp_path / "cache"),
        )
        return run_experiments(cfg, model=model, progress=False)

    full = run("full")
    merged = merge_runs([run("s1", "1/2"), run("s0", "0/2")], tmp_path / "merged", report=False)
    files = sorted(p.relative_to(full) for p in (full / "results").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"results/steps.parquet", "results/lens.parquet", "results/steps/00004.json"}
    assert files == sorted(p.relative_to(merged) for p in (merged / "results").rglob("*") if p.is_file())
    for f in files:
        assert (merged / f).read_bytes() == (full / f).read_bytes(), f
    m, f = (json.loads((d / "manifest.json").read_text()) for d in (merged, full))
    assert m["baselines"] == f["baselines"]  # accuracies from the unpatched predictions: no cells here
