"""Run directories: files and formats, determinism, resume after interruption, config guard."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import tiny_text_model

from latentpatch.data.pairs import load_pairs, save_pairs
from latentpatch.data.synthetic import generate_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.names import CELL_COLUMNS
from latentpatch.pipeline.progress import RunProgress
from latentpatch.pipeline.run import RunConfig, run_experiments
from latentpatch.rundir import Manifest, read_manifest

RESULT_FILES = ["results/layer.json", "results/position.json", "results/iterative.json", "results/thoughts.json"]


@pytest.fixture(scope="module")
def model():
    return tiny_text_model("llama", n_layers=2, num_latent=3)


@pytest.fixture(scope="module")
def pairs():
    return generate_pairs(5, seed=1)


def config(tmp_path, name, **kw):
    kw.setdefault("report", False)
    return RunConfig(out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), **kw)


def read_results(run: Path) -> dict[str, bytes]:
    return {f: (run / f).read_bytes() for f in RESULT_FILES}


def test_run_directory_contents(tmp_path, model, pairs):
    out = run_experiments(config(tmp_path, "a"), model=model, pairs=pairs, progress=False, command="test")
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["n_pairs"] == 5
    assert {"identity", "full_restoration", "live_thoughts", "engine_reference"} <= set(man["checks"])
    assert man["checks"]["identity"]["passed"] and man["checks"]["engine_reference"]["passed"]
    assert man["checks"]["full_restoration"]["passed"]
    assert set(man["baselines"]) >= {"clean_accuracy", "corrupted_accuracy", "flagged_pairs"}
    assert man["config"]["experiments"] == ["layer", "position", "iterative"] and man["seed"] == 0
    assert [p.pair_id for p in load_pairs(out / "pairs.json")] == [p.pair_id for p in pairs]
    assert Manifest.from_dict(read_manifest(out)).to_dict() == man  # the typed manifest, key for key
    absent = (
        "previous_timings",
        "replacement_pool",
        "tuned_lens",
        "merged_from",
        "probe_fit",
        "latent_stops",
    )  # resume, shards, --lens, merge, a family with a stop rule
    assert list(man) == [k for k in Manifest.__dataclass_fields__ if k not in absent]
    assert list(man["config"]) == DEFAULT_CONFIG_KEYS

    layer = json.loads((out / "results/layer.json").read_text())
    position = json.loads((out / "results/position.json").read_text())
    iterative = json.loads((out / "results/iterative.json").read_text())
    pid = pairs[0].pair_id
    assert set(layer[pid]) == {"0", "1"} and set(layer[pid]["1"]) == {"all"}
    assert set(position[pid]["0"]) == {"0", "1", "2"}
    assert set(iterative[pid]["0"]) == {"parallel", "cumulative_0", "cumulative_1", "cumulative_2", "chained", "frozen"}
    cell = position[pid]["1"]["2"]
    for k in (
        "kl",
        "logit_l2",
        "pred_change_rate",
        "answer_logit_diff",
        "answer_logprob_diff",
        "recovery",
        "pred_answer",
        "flagged",
    ):
        assert k in cell
    assert len(iterative[pid]["1"]["chained"]["act_cos_clean_by_position"]) == 2

    cells = pd.read_parquet(out / "results/cells.parquet")
    assert list(cells.columns) == CELL_COLUMNS
    assert len(cells) == 5 * (2 + 2 * 3 + 2 * (1 + 3 + 2))
    assert cells["flagged"].dtype == bool
    traj = pd.read_parquet(out / "results/trajectories.parquet")
    assert set(traj["mode"]) == {"chained", "frozen"} and set(traj["position"]) == {1, 2}
    # the parquet table and the nested JSON hold the same numbers
    row = cells[(cells.pair_id == pid) & (cells.experiment == "position") & (cells.layer == 1) & (cells.position == 2)]
    assert row["kl"].item() == pytest.approx(cell["kl"])


def test_same_seed_gives_byte_identical_results(tmp_path, model, pairs):
    a = run_experiments(config(tmp_path, "a"), model=model, pairs=pairs, progress=False)
    b = run_experiments(config(tmp_path, "b"), model=model, pairs=pairs, progress=False)  # from the activation cache
    assert read_results(a) == read_results(b)
    assert json.loads((b / "manifest.json").read_text())["activation_cache"]["hits"] == 10


class Interrupted(Exception):
    pass


class StopAfterPairs(RunProgress):
    """Interrupts a run (like a kill) once ``n`` pairs of the sweep are committed."""

    def __init__(self, n: int):
        self.n, self.stage_name, self.done = n, "", 0

    def stage(self, name: str, total: int) -> None:
        self.stage_name = name

    def advance(self, steps: int = 1) -> None:
        if self.stage_name == "patching":
            self.done += 1
            if self.done >= self.n:
                raise Interrupted


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, model, pairs):
    full = run_experiments(config(tmp_path, "full"), model=model, pairs=pairs, progress=False)
    with pytest.raises(Interrupted):
        run_experiments(config(tmp_path, "part"), model=model, pairs=pairs, progress=StopAfterPairs(2))
    part = tmp_path / "part"
    assert len(list((part / "results/pairs").glob("*.json"))) == 2 and not (part / "results/layer.json").exists()
    (part / "results/pairs/.00002.json.crash.tmp").write_text('{"torn')  # what a kill mid-write leaves
    with pytest.raises(LatentPatchError, match="--resume"):
        run_experiments(config(tmp_path, "part"), model=model, pairs=pairs, progress=False)
    resumed = run_experiments(config(tmp_path, "part"), model=model, pairs=pairs, progress=False, resume=True)
    assert read_results(resumed) == read_results(full)
    pd.testing.assert_frame_equal(
        pd.read_parquet(resumed / "results/cells.parquet"), pd.read_parquet(full / "results/cells.parquet")
    )


def test_different_config_is_refused(tmp_path, model, pairs):
    run_experiments(config(tmp_path, "a", experiments=("layer",)), model=model, pairs=pairs, progress=False)
    with pytest.raises(LatentPatchError, match="component"):
        run_experiments(
            config(tmp_path, "a", experiments=("layer",), component="mlp_out"),
            model=model,
            pairs=pairs,
            progress=False,
            resume=True,
        )


def test_damaged_manifest_is_refused_in_one_line(tmp_path, model, pairs):
    out = tmp_path / "damaged"
    out.mkdir()
    (out / "manifest.json").write_text('{"torn')
    with pytest.raises(LatentPatchError, match="not valid JSON") as err:
        run_experiments(config(tmp_path, "damaged"), model=model, pairs=pairs, progress=False, resume=True)
    assert "\n" not in str(err.value) and "manifest.json" in str(err.value)


def test_noise_direction_and_replacements(tmp_path, model, pairs):
    def layer_table(**kw):
        out = run_experiments(
            config(tmp_path, "-".join(f"{k}{v}" for k, v in kw.items()), experiments=("layer",), **kw),
            model=model,
            pairs=pairs,
            progress=False,
        )
        return pd.read_parquet(out / "results/cells.parquet")

    base = layer_table()
    for kw in ({"direction": "noise"}, {"replacement": "zero"}, {"replacement": "mean"}, {"replacement": "resample"}):
        other = layer_table(**kw)
        assert other.shape == base.shape
        assert not (other["answer_logit_diff"].to_numpy() == base["answer_logit_diff"].to_numpy()).all(), kw


def test_bad_options_are_user_errors(tmp_path, model, pairs):
    for kw, needle in (
        ({"experiments": ("layers",)}, "--experiments"),
        ({"component": "resid"}, "--component"),
        ({"shard": "3/3"}, "--shard"),
        ({"batch_size": 0}, "--batch-size"),
    ):
        with pytest.raises(LatentPatchError, match=needle):
            run_experiments(config(tmp_path, "bad", **kw), model=model, pairs=pairs, progress=False)
    with pytest.raises(LatentPatchError, match="only-correct"):  # a random model gets nothing right
        run_experiments(config(tmp_path, "oc", only_correct=True), model=model, pairs=pairs, progress=False)


def test_config_file_keys(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"experiments": "layer,position", "batch-size": 8, "seed": 3}))
    cfg = RunConfig.from_file(f, seed=4)
    assert cfg.experiments == ("layer", "position") and cfg.batch_size == 8 and cfg.seed == 4
    f.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(LatentPatchError, match="bogus"):
        RunConfig.from_file(f)


#: The manifest's ``config`` keys of a default run, in the order run directories have always had.
DEFAULT_CONFIG_KEYS = [
    "model",
    "base",
    "preset",
    "pairs",
    "experiments",
    "component",
    "direction",
    "replacement",
    "out",
    "limit",
    "shard",
    "device",
    "dtype",
    "batch_size",
    "threads",
    "seed",
    "only_correct",
    "keep_same_answer",
    "engine",
    "strict",
    "check_cells",
    "cache_dir",
    "use_cache",
    "report",
    "wandb",
    "wandb_project",
    "thoughts_pairs",
]


def test_default_config_hash_is_unchanged():
    """New model options are left out of the manifest's config (and its hash) while unset, so run
    directories written before they existed still resume."""
    d = RunConfig().to_dict()
    assert list(sorted(d)) == sorted(DEFAULT_CONFIG_KEYS)
    assert list(d) == DEFAULT_CONFIG_KEYS  # the key order too (model options after preset when set)
    set_keys = list(RunConfig(lora_r=4, prj_ln=False).to_dict())
    assert set_keys == DEFAULT_CONFIG_KEYS[:3] + ["lora_r", "prj_ln"] + DEFAULT_CONFIG_KEYS[3:]
    # the version-2 recipe's hash of the defaults (version 1, before 2026-12-07: "c818346e7149abc4"); it
    # stays fixed while new options are added unset
    assert RunConfig().result_hash() == "2-19c42b965cdccf2b"
    assert RunConfig(lora_alpha=8.0).result_hash() != RunConfig().result_hash()
    assert RunConfig(lora_alpha=8.0).to_dict()["lora_alpha"] == 8.0


def test_run_options_come_from_run_config():
    """Every RunConfig field is a `latentpatch run` option with help; inspect, eval and run share the model options."""
    import dataclasses

    import typer

    from latentpatch.cli import app
    from latentpatch.pipeline.config import ModelOptions

    commands = typer.main.get_command(app).commands
    options = {
        name: {o: p.help for p in commands[name].params for o in p.opts + p.secondary_opts}
        for name in ("run", "inspect", "eval")
    }
    for f in dataclasses.fields(RunConfig):
        assert options["run"].get("--" + f.name.replace("_", "-")), f.name
    for f in dataclasses.fields(ModelOptions):
        assert all(options[c].get("--" + f.name.replace("_", "-")) for c in ("inspect", "eval")), f.name
    assert {"--no-report", "--all-pairs", "--config", "--resume", "--quiet", "--lora-alpha"} <= set(options["run"])


def test_cli_flags_and_config_file(tmp_path, monkeypatch):
    """Flags become a RunConfig (parsed once); flags win over a --config file."""
    from latentpatch import cli
    from latentpatch.pipeline import run

    seen = []

    def fake_run(cfg, **kw):
        seen.append(cfg)
        raise LatentPatchError("stop")  # the command ends here, with exit code 2

    monkeypatch.setattr(run, "run_experiments", fake_run)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"batch_size": "auto", "seed": 3, "limit": 2}))
    for args in (
        ["--experiments", "layer,position", "--batch-size", "8", "--no-report", "--all-pairs", "--lora-alpha", "8"],
        ["--config", str(f), "--seed", "4"],
    ):
        with pytest.raises(SystemExit):
            cli.main(["run", *args])
    a, b = seen
    assert a.experiments == ("layer", "position") and a.batch_size == 8 and a.report is False
    assert a.only_correct is False and a.lora_alpha == 8.0 and a.seed == 0
    assert b.batch_size == "auto" and b.seed == 4 and b.limit == 2


def _cli(args, **kw):
    env = dict(os.environ, LATENTPATCH_CACHE=kw.pop("cache"), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "latentpatch.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_cli_run(tmp_path):
    pair_file = tmp_path / "pairs.json"
    save_pairs(generate_pairs(12, seed=2), pair_file)
    common = [
        "run",
        "--model",
        "config:llama",
        "--pairs",
        str(pair_file),
        "--no-report",
        "--quiet",
        "--batch-size",
        "4",
    ]
    cache = str(tmp_path / "cache")
    full = _cli(common + ["--out", str(tmp_path / "full")], cache=cache)
    assert full.wait(timeout=300) == 0, full.stderr.read()

    victim = _cli(common + ["--out", str(tmp_path / "killed")], cache=str(tmp_path / "cache2"))
    pair_dir = tmp_path / "killed/results/pairs"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(pair_dir.glob("0*.json"))) < 2:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done = len(list(pair_dir.glob("0*.json")))
    assert 2 <= done < 12, done
    resumed = _cli(common + ["--out", str(tmp_path / "killed"), "--resume"], cache=str(tmp_path / "cache2"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert read_results(tmp_path / "killed") == read_results(tmp_path / "full")
    # a third run into the same directory without --resume is refused with one line, exit 2
    again = _cli(common + ["--out", str(tmp_path / "full")], cache=cache)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 2 and "--resume" in err and "Traceback" not in err


def test_options_are_grouped_by_concern_and_the_hash_is_versioned(tmp_path):
    """Every run option belongs to one concern; the config hash covers exactly the options that
    change numbers, carries its recipe's version, and a directory of another version is refused."""
    from latentpatch.pipeline.options import CONCERNS

    names = [f.name for f in dataclasses.fields(RunConfig)]
    grouped = [n for c in CONCERNS for n in RunConfig.options_of(c)]
    assert sorted(grouped) == sorted(names)  # each option in exactly one concern
    free = {"out", "strict", "report", "figure_formats", "wandb", "wandb_project", "cache_dir", "use_cache", "workers"}
    free |= {"executor", "ray_address", "gpus_per_worker"}  # where the work runs, not what it computes
    assert set(names) - set(RunConfig.result_keys()) == free
    base = RunConfig(limit=2)
    assert base.result_hash().startswith(f"{RunConfig.CONFIG_HASH_VERSION}-")
    assert all(base.result_hash() == dataclasses.replace(base, **{k: v}).result_hash() for k, v in
               {"out": "x", "strict": True, "workers": 3, "report": False, "executor": "ray"}.items())  # fmt: skip
    assert base.result_hash() != dataclasses.replace(base, seed=1).result_hash()

    out = tmp_path / "old"
    config = RunConfig(limit=1, experiments=("layer",), out=str(out), report=False, use_cache=False)
    run_experiments(config, progress=False, command="test")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config_hash"] = "0123456789abcdef"  # a version-1 hash: no version prefix
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentPatchError, match="another version of latentpatch"):
        run_experiments(config, resume=True, progress=False, command="test")
