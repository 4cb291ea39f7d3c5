"""``--seeds N``'s summary (analysis/seeds.py) on hand-made run directories, against a plain
computation of each cell's spread; and ``--seeds 0`` refused as bad input."""

from __future__ import annotations

import json
import statistics

import pytest

from latentpatch.analysis.seeds import write_seeds
from latentpatch.errors import LatentPatchError
from latentpatch.pipeline.config import RunConfig


def _run(root, name, means, acc, results=b"x"):
    d = root / name
    (d / "results").mkdir(parents=True)
    (d / "results" / "cells.parquet").write_bytes(results)
    cells = [
        {
            "experiment": "position",
            "mode": "single",
            "component": "resid_out",
            "layer": layer,
            "position": 0,
            "metric": "kl",
            "mean": m,
        }
        for layer, m in enumerate(means)
    ]
    (d / "stats.json").write_text(json.dumps({"cells": cells}))
    (d / "manifest.json").write_text(json.dumps({"baselines": {"clean_accuracy": acc, "corrupted_accuracy": acc / 2}}))
    return d


def test_spread_over_seeds_equals_a_plain_computation(tmp_path):
    table = {0: [0.5, 0.25], 1: [1.0, 4.0], 2: [2.0, 2.0]}  # seed -> per-layer cell means
    runs = [_run(tmp_path, f"seed-{s}", [table[s][0], table[s][1]], 0.5 + s / 10, results=bytes([s])) for s in table]
    page = write_seeds(tmp_path, runs, list(table))
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert page.is_file() and summary["seeds"] == [0, 1, 2] and summary["identical"] is False
    for layer in (0, 1):
        values = [table[s][layer] for s in table]
        cell = next(c for c in summary["cells"] if c["layer"] == layer)
        assert cell["means"] == values
        assert cell["range"] == max(values) - min(values)
        assert cell["sd"] == pytest.approx(statistics.stdev(values))
    assert [c["layer"] for c in summary["cells"]] == [1, 0]  # largest range first
    assert [b["clean_accuracy"] for b in summary["baselines"]] == [0.5, 0.6, 0.7]
    same = [_run(tmp_path / "b", f"seed-{s}", [1.0], 0.5) for s in (0, 1)]
    write_seeds(tmp_path / "b", same, [0, 1])
    assert json.loads((tmp_path / "b" / "seeds.json").read_text())["identical"] is True


def test_seeds_must_be_positive():
    with pytest.raises(LatentPatchError, match="--seeds 0"):
        RunConfig(seeds=0).validate()
