"""The one stage runner (pipeline/stages.py): resume skips committed pairs in every stage folder, a
damaged file is recomputed with a note, ``--strict`` stops a stage on its failed check before any
pair, and the same bytes with one and two worker processes."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import latentpatch.pipeline.steps as steps_module
from latentpatch.data.pairs import save_pairs
from latentpatch.data.synthetic import generate_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.model.load import load_model
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.progress import RunProgress
from latentpatch.pipeline.run import run_experiments
from latentpatch.pipeline.stages import ForkExecutor, SerialExecutor
from latentpatch.rundir import read_manifest

#: Stage folders of a run of ``EXPERIMENTS`` (one file per pair each).
FOLDERS = ("pairs", "steps", "lens", "attention")
EXPERIMENTS = ("layer", "thought", "lens", "attention")


class Notes(RunProgress):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def warn(self, message: str) -> None:
        self.notes.append(message)


@pytest.fixture(scope="module")
def model():
    return load_model("default")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stages") / "pairs.json"
    save_pairs(generate_pairs(3, seed=4), path)
    return path


def run(model, pairs_file, out, **kw):
    kw.setdefault("experiments", EXPERIMENTS)
    config = RunConfig(pairs=str(pairs_file), out=str(out), report=False, use_cache=False, **kw)
    return config


def results_bytes(run_dir):
    return {
        str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "results").rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("executor", [SerialExecutor(), ForkExecutor(2), ForkExecutor(3)])
def test_executors_hand_every_result_to_the_driver(executor):
    if isinstance(executor, ForkExecutor) and not hasattr(os, "fork"):
        pytest.skip("fork")
    got: dict[str, tuple[int, int]] = {}
    jobs = [f"job{j}" for j in range(7)]
    executor.run(jobs, lambda job: (int(job[3:]) ** 2, os.getpid()), lambda job, r: got.__setitem__(job, r))
    assert sorted(got) == sorted(jobs) and all(got[j][0] == int(j[3:]) ** 2 for j in jobs)
    workers = getattr(executor, "workers", 1)
    assert len({pid for _, pid in got.values()}) == workers  # the driver got them all, from each worker


def test_resume_skips_committed_pairs_and_recomputes_damaged_ones(tmp_path, model, pairs_file):
    full = run_experiments(run(model, pairs_file, tmp_path / "full"), model=model, progress=False)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for folder in FOLDERS:
        d = part / "results" / folder
        kept = json.loads((d / "00000.json").read_text())
        (d / "00000.json").write_text(json.dumps({**kept, "marker": True}))  # committed: must stay as it is
        (d / "00001.json").write_text((d / "00001.json").read_text()[:50])  # damaged outside the run
        (d / "00002.json").unlink()  # never committed
    notes = Notes()
    run_experiments(run(model, pairs_file, part), model=model, progress=notes, resume=True)
    for folder in FOLDERS:
        d = part / "results" / folder
        assert json.loads((d / "00000.json").read_text())["marker"] is True, folder
        for name in ("00001.json", "00002.json"):
            assert (d / name).read_bytes() == (full / "results" / folder / name).read_bytes(), (folder, name)
        assert any(f"{d / '00001.json'} is damaged (truncated?); recomputing pair" in n for n in notes.notes), folder
    assert not any("00000.json" in n or "00002.json" in n for n in notes.notes)


def test_strict_stops_a_stage_on_its_failed_check(tmp_path, model, pairs_file, monkeypatch):
    def failing(*args, **kwargs) -> dict:
        return {"passed": False, "value": 1.0, "threshold": 0.0, "detail": "made to fail"}

    monkeypatch.setattr(steps_module, "check_steps_engine_reference", failing)
    for workers in (1, 2):
        out = tmp_path / f"strict{workers}"
        with pytest.raises(LatentPatchError, match="steps_engine_reference.*--strict makes this fatal"):
            run_experiments(
                run(model, pairs_file, out, strict=True, workers=workers, experiments=("layer", "thought")),
                model=model,
                progress=False,
            )
        assert len(list((out / "results" / "pairs").glob("*.json"))) == 3  # the stage before it finished
        assert not list((out / "results" / "steps").glob("*.json"))  # its pairs never started
        assert read_manifest(out)["checks"]["steps_engine_reference"]["passed"] is False
    notes = Notes()  # without --strict: reported (in the pool with workers), the run completes
    out = run_experiments(
        run(model, pairs_file, tmp_path / "lenient", workers=2, experiments=("layer", "thought")),
        model=model,
        progress=notes,
    )
    assert any("CHECK FAILED: steps_engine_reference" in n for n in notes.notes)
    assert len(list((out / "results" / "steps").glob("*.json"))) == 3 and read_manifest(out)["status"] == "complete"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="worker processes need fork")
def test_every_stage_gives_the_same_bytes_with_one_and_two_workers(tmp_path, model, pairs_file):
    experiments = (*EXPERIMENTS, "atp")
    one, two = (
        run_experiments(
            run(model, pairs_file, tmp_path / f"w{w}", workers=w, experiments=experiments), model=model, progress=False
        )
        for w in (1, 2)
    )
    a, b = results_bytes(one), results_bytes(two)
    assert {f.split("/")[1] for f in a} >= {*FOLDERS, "atp", "atp.parquet", "lens.parquet", "steps.parquet"}
    assert a.keys() == b.keys()
    for f in a:
        assert a[f] == b[f], f
    timings = read_manifest(two)["timings"]
    assert timings["atp_estimate_s"] > 0 and timings["atp_exact_s"] > 0  # added up by the driver from the workers
