"""Every experiment shards: ``--shard 0/2`` + ``--shard 1/2`` + ``merge`` == the unsharded run, byte for
byte (every file under ``results/``, ``stats.json`` and ``stats/*.csv``), on one run of every
experiment at once (a tiny model, 4 pairs). The experiments come from the registry, so a new one is
covered without touching this file; pooled values (mean replacements, resample partners, step means,
donors, steering directions) are each shard's pool over all pairs, and the probes are fitted by
``merge`` from every shard's activation files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import tiny_text_model

from latentpatch.analysis.stats import compute_stats
from latentpatch.data.synthetic import generate_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.names import ALL_EXPERIMENTS
from latentpatch.pipeline import probing
from latentpatch.pipeline.merge import merge_runs
from latentpatch.pipeline.run import RunConfig, run_experiments

#: every experiment but das, which needs problems the model answers right (this tiny model answers none):
#: its sites are split across shards, tested in tests/test_das.py on the shipped model
SHARDED = tuple(e for e in ALL_EXPERIMENTS if e != "das")


def files(run: Path) -> dict[str, bytes]:
    """Every result and statistics file by its relative path."""
    found = [f for d in ("results", "stats") for f in sorted((run / d).rglob("*")) if f.is_file()]
    return {str(f.relative_to(run)): f.read_bytes() for f in [*found, run / "stats.json"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The unsharded run of every experiment and its two shards merged (statistics computed on both)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("shard_all")
    model, pairs = tiny_text_model("llama"), generate_pairs(4, seed=3)

    def run(out, shard=None):
        cfg = RunConfig(
            out=str(root / out),
            shard=shard,
            experiments=SHARDED,
            replacement="mean",  # a pooled value: every shard's pool is all pairs'
            report=False,
            cache_dir=str(root / "cache"),
            check_cells=2,
            workers=1,
            probe_min_count=2,
            steer_alphas="1",
            steer_controls=1,
        )
        return run_experiments(cfg, model=model, pairs=pairs, progress=False)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probing, "ACTIVATION_SHARD", 3)  # 8 questions in 3 activation files: both shards record some
        try:
            full = run("full")
            shards = [run(f"shard{i}", f"{i}/2") for i in range(2)]
            merged = merge_runs(shards, root / "merged", report=False)
        finally:
            torch.set_num_threads(threads)
    for d in (full, merged):
        compute_stats(d, n_resamples=200)
    yield full, shards, merged


def test_merged_shards_equal_the_unsharded_run(runs):
    """Every file of the merged shards equals the unsharded run's, and the run holds every experiment."""
    full, shards, merged = runs
    assert tuple(json.loads((shards[0] / "manifest.json").read_text())["config"]["experiments"]) == SHARDED
    stats = json.loads((full / "stats.json").read_text())
    assert {"steps", "lens", "attention", "atp", "steer"} <= set(stats)
    assert len(pd.read_parquet(full / "results" / "probes.parquet")) > 0
    want, got = files(full), files(merged)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []


def test_probe_shards_record_their_part_and_merge_fits(runs, tmp_path):
    full, shards, _ = runs
    parts = [sorted(f.name for f in (s / "results" / "activations").glob("*.safetensors")) for s in shards]
    assert parts == [["00000.safetensors", "00002.safetensors"], ["00001.safetensors"]]
    assert all(not (s / "results" / "probes.parquet").exists() for s in shards)
    assert json.loads((shards[1] / "manifest.json").read_text())["probe_fit"] == "merge"
    assert "probe_fit" not in json.loads((full / "manifest.json").read_text())
    with pytest.raises(LatentPatchError, match="--shard with --steer-direction"):
        RunConfig(experiments=("probe", "steer"), steer_direction="label:correct=True,False", shard="0/2").validate()
