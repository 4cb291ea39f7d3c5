"""Layering and the run-directory contract that the layers share.

``names``, ``rundir`` and ``analysis/`` import no torch (so ``report``/``compare`` stay light and
work without a model); the manifest keeps its keys and key order; writes are atomic; readers
fail with one line naming the file.
"""

from __future__ import annotations

import json
import math
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import latentpatch.analysis
from latentpatch.errors import LatentPatchError
from latentpatch.files import atomic_path, atomic_write_text, json_safe, write_json
from latentpatch.names import CELL_COLUMNS, METRIC_LABELS, all_positions_cell, primary_component
from latentpatch.rundir import Manifest, RunPaths, read_manifest, read_pairs_json, read_stats

#: Modules that must import without torch.
LIGHT_MODULES = [
    "latentpatch.names",
    "latentpatch.rundir",
    "latentpatch.assembly",
    "latentpatch.pipeline.options",
    "latentpatch.pipeline.selection",
    "latentpatch.files",
    "latentpatch.pipeline.config",
    "latentpatch.pipeline.manifest",
    "latentpatch.pipeline.merge",
    "latentpatch.cli_options",
] + sorted(f"latentpatch.analysis.{m.name}" for m in pkgutil.iter_modules(latentpatch.analysis.__path__))


def test_light_modules_import_no_torch():
    code = (
        "import importlib, sys\n"
        f"for name in {LIGHT_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'torch' not in sys.modules, name + ' imports torch'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    assert "latentpatch.analysis.report" in LIGHT_MODULES and "latentpatch.analysis.wandb_log" in LIGHT_MODULES


# ---- names -----------------------------------------------------------------------------------------


def test_rules():
    assert all_positions_cell({("layer", "all"), ("iterative", "parallel")}) == ("layer", "all")
    both = {("layer", "all"), ("iterative", "parallel")}
    assert all_positions_cell(both, prefer="iterative") == ("iterative", "parallel")
    assert all_positions_cell({("layer", "all")}, prefer="iterative") == ("layer", "all")
    with pytest.raises(ValueError):
        all_positions_cell([], prefer="position")
    assert primary_component(["resid_out"] * 2) == "resid_out"
    assert primary_component(["mlp_out", "resid_pre", "mlp_out"]) == "mlp_out"
    assert primary_component(["mlp_out", "resid_pre"]) == "resid_pre"  # tie: COMPONENTS order
    assert METRIC_LABELS["recovery"] == "recovery [fraction; 1 = clean restored]"
    assert len(set(CELL_COLUMNS)) == len(CELL_COLUMNS)


# ---- manifest --------------------------------------------------------------------------------------


def _run_manifest_stages() -> list[dict]:
    """The manifest as ``run_experiments`` writes it after baselines, after checks and at the end."""
    first = {
        "format": "latentpatch-run/1",
        "status": "running",
        "config": {"model": "default", "seed": 0},
        "config_hash": "ab12",
        "command": "latentpatch run --out x",
        "versions": {"python": "3.11"},
        "git_commit": None,
        "seed": 0,
        "device": "cpu",
        "dtype": "float32",
        "batch_size": 64,
        "model": {"name": "m", "family": "gpt2", "n_layers": 2, "num_latent": 3, "d_model": 8, "config": {}},
        "pairs_removed": [{"pair_id": "7", "reason": "same answer"}],
        "previous_timings": {"total_s": 1.0},
        "n_pairs": 2,
        "baselines": {"n_pairs": 2, "clean_accuracy": 1.0},
    }
    checks = {**first, "replacement_pool": "all shards", "checks": {"identity": {"passed": True}}}
    done = {
        **checks,
        "status": "complete",
        "timings": {"sweep_s": 2.0},
        "finished": "2026-12-03 02:00",
        "cells_per_second": None,
        "activation_cache": None,
        "answers_cut": {"max_positions": 512, "baselines": 0, "patched": 0},
    }
    return [first, checks, done]


def test_manifest_round_trips_every_stage_byte_for_byte():
    for stage in _run_manifest_stages():
        typed = Manifest.from_dict(stage)
        assert json.dumps(typed.to_dict(), indent=1) == json.dumps(stage, indent=1)
    merged = {**_run_manifest_stages()[-1], "merged_from": [{"run_dir": "a", "shard": "0/2"}]}
    del merged["previous_timings"]
    assert list(Manifest.from_dict(merged).to_dict()) == list(merged)


def test_manifest_missing_or_unknown_keys_one_line():
    stage = dict(_run_manifest_stages()[0])
    del stage["seed"]
    stage["colour"] = "red"
    with pytest.raises(LatentPatchError) as err:
        Manifest.from_dict(stage, "run/manifest.json")
    msg = str(err.value)
    assert "\n" not in msg and "run/manifest.json" in msg and "'seed'" in msg and "'colour'" in msg


@pytest.mark.parametrize(
    "content, expected", [(None, "is missing"), ("{oops", "is not valid JSON"), ("[1]", "JSON object")]
)
def test_read_manifest_errors(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(LatentPatchError, match=expected) as err:
        read_manifest(tmp_path)
    assert "\n" not in str(err.value) and "manifest.json" in str(err.value)
    with pytest.raises(LatentPatchError, match="not a directory"):
        read_manifest(tmp_path / "nope")


# ---- writes and readers ------------------------------------------------------------------------------


def test_json_safe_and_atomic_writes(tmp_path):
    data = {
        "a": np.float32(0.5),
        "b": np.arange(3),
        "c": (math.nan, np.inf, np.bool_(True)),
        4: pd.NA,
        "d": np.int64(7),
    }
    assert json_safe(data) == {"a": 0.5, "b": [0, 1, 2], "c": [None, None, True], "4": None, "d": 7}
    path = tmp_path / "deep" / "x.json"
    write_json(path, data)
    assert path.read_text() == json.dumps(json_safe(data), indent=1) + "\n"
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    with pytest.raises(ZeroDivisionError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise ZeroDivisionError("interrupted")
    assert path.read_text() == "second" and sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_readers(tmp_path):
    paths = RunPaths(tmp_path)
    assert read_stats(tmp_path) is None and read_pairs_json(tmp_path) == {}
    paths.pairs.write_text(json.dumps([{"pair_id": 3, "variant": "clean", "question": "q"}, {"nope": 1}]))
    assert read_pairs_json(tmp_path) == {"3": {"clean": {"pair_id": 3, "variant": "clean", "question": "q"}}}
    paths.stats.write_text("{")
    with pytest.raises(LatentPatchError, match="stats.json is not valid JSON"):
        read_stats(tmp_path)
    assert paths.pair_result(12) == Path(tmp_path) / "results" / "pairs" / "00012.json"


# ---- code structure: what a maintainer can rely on ---------------------------------------------
SRC = Path(latentpatch.analysis.__file__).resolve().parents[1]


def _parsed_modules():
    import ast

    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def test_no_private_name_is_imported_across_modules():
    """A name starting with ``_`` is private to its module: sharing it means making it public."""
    import ast

    offenders = []
    for path, tree in _parsed_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("latentpatch"):
                offenders += [
                    f"{path.relative_to(SRC)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert offenders == []


def test_pipeline_and_patching_functions_stay_short():
    """The run's steps and the engine read as named steps: no function over 60 lines there."""
    import ast

    long = []
    for path, tree in _parsed_modules():
        if path.parent.name not in ("pipeline", "patching"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n_lines = node.end_lineno - node.lineno + 1
                if n_lines > 60:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n_lines} lines)")
    assert long == []
