"""The repository holds source, not outputs: no run directory is committed (a ``manifest.json``
of a run, its ``results/``), and ``.gitignore`` keeps a run written inside the tree out of git."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"  # the only place a test may keep a run directory's files


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_run_directory_is_committed():
    files = tracked_files()
    runs = [
        f.relative_to(ROOT)
        for f in files
        if (f.name == "manifest.json" or "results" in f.relative_to(ROOT).parts[:-1]) and FIXTURES not in f.parents
    ]
    assert runs == [], f"run outputs committed (move them out of the tree or under tests/fixtures): {runs}"


def test_a_run_written_inside_the_tree_is_ignored(tmp_path):
    tracked_files()  # skips outside a git checkout
    names = ["ri/manifest.json", "ri/report.html", "ri/stats.json", "ri/results/pairs/00000.json", "ri/figures/a.png"]
    names += ["ri/results/cells.parquet", "ri/.lock"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT, capture_output=True, text=True)
    assert sorted(out.stdout.split()) == sorted(names)
