"""The results assembled and the report built in a process forked before torch
(analysis/report_process.py): same files as ``assemble`` and ``build_report`` here; a failure there
leaves the step to the caller."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from latentpatch.analysis.report import build_report
from latentpatch.analysis.report_process import ReportProcess
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.run import run_experiments
from latentpatch.rundir import read_manifest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked only on Linux")


def test_the_forked_report_is_the_report(tmp_path):
    config = RunConfig(limit=2, experiments=("layer",), out=str(tmp_path / "a" / "run"), report=False, use_cache=False)
    here = run_experiments(config, progress=False, command="test")
    there = tmp_path / "b" / "run"
    shutil.copytree(here, there)
    assembled = [f for f in (there / "results").iterdir() if f.is_file()]  # the run assembled them here
    assert {f.name for f in assembled} >= {"cells.parquet", "layer.json"}
    for f in assembled:
        f.unlink()
    process = ReportProcess.start()
    assert process is not None and process.assemble(there) is True and process.build(there) is True
    build_report(here)
    files = sorted(p.relative_to(here) for p in here.rglob("*") if p.is_file())
    assert any(f.name == "report.html" for f in files) and any(f.suffix == ".png" for f in files)
    finished = read_manifest(here)["finished"]  # the page states the run's date, not the build's
    assert f"run finished {finished}".encode() in (here / "report.html").read_bytes()
    for f in files:
        a, b = (here / f).read_bytes(), (there / f).read_bytes()
        if f.name == "report.html":  # names its own directory (and the manifest names the first)
            a, b = (x.replace(str(there).encode(), b"RUN").replace(str(here).encode(), b"RUN") for x in (a, b))
        assert a == b, f


def test_a_failed_build_is_left_to_the_caller_and_the_child_ends(tmp_path):
    process = ReportProcess.start()
    assert process is not None
    pid = process.pid
    assert process.build(tmp_path / "no-run-here") is False
    with pytest.raises(ChildProcessError):  # already reaped
        os.waitpid(pid, os.WNOHANG)
    failing = ReportProcess.start()  # a failed step: the caller does it and the rest itself
    assert failing is not None
    pid = failing.pid
    damaged = tmp_path / "damaged" / "results" / "pairs" / "00000.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"pair_id": "p0", "cells": [')  # assemble names it and refuses
    assert failing.assemble(tmp_path / "damaged") is False and failing.build(tmp_path / "damaged") is False
    with pytest.raises(ChildProcessError):  # already reaped
        os.waitpid(pid, os.WNOHANG)
    closed = ReportProcess.start()
    assert closed is not None
    closed.close()  # a run that ends without a report: the child exits on its own
    closed.close()
