"""Bad inputs and faults as a user meets them: each gives one line, the right exit code (2; 130 for
Ctrl-C), no traceback, and leaves the run directory usable.

Pair files, model specs, flags, run directories and faults. Most cases stop before a model is
loaded; those that need one use the small random ``config:llama`` model.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentpatch import cli
from latentpatch.data.pairs import load_pairs, save_pairs
from latentpatch.data.synthetic import generate_pairs

FAST = ["--model", "config:llama", "--experiments", "layer", "--no-report", "--quiet", "--batch-size", "8"]
RESULT_FILES = ["results/layer.json", "results/cells.parquet", "results/thoughts.json"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``latentpatch ARGS`` in this process: (exit code, stdout, stderr); an uncaught exception fails the test."""
    capsys.readouterr()
    try:
        cli.main(args)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(args: list[str], capsys, *message: str, code: int = 2) -> str:
    rc, out, err = run_cli(args, capsys)
    assert rc == code, (rc, out, err)
    assert "Traceback" not in out + err
    for m in message:
        assert m in err, (m, err)
    return err


@pytest.fixture
def pair_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.json"
    save_pairs(generate_pairs(3, seed=2), path)
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTPATCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-pair run (layer experiment, random model)."""
    base = tmp_path_factory.mktemp("done")
    save_pairs(generate_pairs(2, seed=2), base / "pairs.json")
    cli_args = ["run", *FAST, "--pairs", str(base / "pairs.json"), "--out", str(base / "run")]
    cli.main(cli_args)  # returns on success
    return base / "run"


# ---- pair files ------------------------------------------------------------------------------------
def _entries(q1="What is 2 + 3?", a1=5, q2="What is 2 + 4?", a2=6, pid=0):
    return [
        {"pair_id": pid, "variant": "clean", "question": q1, "answer": a1},
        {"pair_id": pid, "variant": "corrupted", "question": q2, "answer": a2},
    ]


BAD_PAIR_FILES = {
    "not_json": ("{not json", "not valid JSON"),
    "empty_list": ([], "the list has no entries"),
    "a_number": (42, "pair"),
    "missing_question": ([{"pair_id": 0, "variant": "clean", "answer": 5}, _entries()[1]], "missing field 'question'"),
    "null_answer": (_entries(a1=None), "answer"),
    "text_answer": (_entries(a1="five"), "five"),
    "empty_question": (_entries(q1="  "), "empty"),
    "unknown_variant": ([{**_entries()[0], "variant": "dirty"}, _entries()[1]], "unknown variant 'dirty'"),
    "one_variant": (_entries()[:1], "corrupted"),
    "duplicate_id": (_entries() + _entries(), "already has a 'clean' entry"),
    "nested_pair_level_question": (
        [
            {
                "pair_id": 0,
                "question": "shared?",
                "clean": {"question": "What is 2 + 3?", "answer": 5},
                "corrupted": {"question": "What is 2 + 4?", "answer": 6},
            }
        ],
        "pair-level field(s) 'question'",
    ),
    "nested_variant_not_object": (
        [{"pair_id": 0, "clean": "text", "corrupted": {"question": "q", "answer": 1}}],
        "not an object",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_PAIR_FILES))
def test_bad_pair_file_is_refused_before_the_model_loads(name, tmp_path, capsys):
    content, message = BAD_PAIR_FILES[name]
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert_refused(["run", *FAST, "--pairs", str(path), "--out", str(tmp_path / "r")], capsys, message)
    assert not (tmp_path / "r").exists()  # nothing left behind


def test_nested_pair_level_key_is_an_issue_not_a_crash(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BAD_PAIR_FILES["nested_pair_level_question"][0]))
    err = assert_refused(["pairs", "validate", str(path)], capsys, "pair-level field(s) 'question'")
    assert "ValueError" not in err


def test_missing_pair_file(tmp_path, capsys):
    assert_refused(
        ["run", *FAST, "--pairs", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r")], capsys, "nope.json"
    )


def test_pair_file_is_a_directory(tmp_path, capsys):
    assert_refused(["run", *FAST, "--pairs", str(tmp_path), "--out", str(tmp_path / "r")], capsys, str(tmp_path))


def test_all_same_answer_pairs_say_so(tmp_path, capsys):
    path = tmp_path / "same.json"
    path.write_text(json.dumps(_entries(a2=5) + _entries(a1=7, a2=7, pid=1)))
    assert_refused(
        ["run", *FAST, "--pairs", str(path), "--out", str(tmp_path / "r")],
        capsys,
        "all 2 pairs have the same clean and corrupted answer",
        "--keep-same-answer",
    )


def test_question_longer_than_the_context_is_refused(tmp_path, capsys):
    path = tmp_path / "long.json"
    path.write_text(json.dumps(_entries(q1="What is " + "2 + " * 2000 + "3?")))
    assert_refused(
        ["run", *FAST, "--pairs", str(path), "--out", str(tmp_path / "r")],
        capsys,
        "question of pair 0 (clean): its prompt is",
        "but the model takes 512",
    )


def test_dropped_same_answer_pair_is_listed_on_the_console(tmp_path, capsys):
    path = tmp_path / "mixed.json"
    pairs = generate_pairs(2, seed=2)
    save_pairs(pairs, path)
    entries = json.loads(path.read_text()) + _entries(a2=5, pid="same-1")
    path.write_text(json.dumps(entries))
    rc, _, err = run_cli(["run", *FAST, "--pairs", str(path), "--out", str(tmp_path / "r")], capsys)
    assert rc == 0 and "dropped 1 pair(s) whose clean and corrupted answers are equal: same-1" in err


# ---- model specs -----------------------------------------------------------------------------------
MODEL_SPECS = {
    "nosuch": "no such file or directory",
    "codi:/nonexistent": "--base",
    "config:foo": "unknown family",
    "gguf:/nonexistent": "no such GGUF file",
    "coconut:/nonexistent": "no such file",
}


@pytest.mark.parametrize("spec", sorted(MODEL_SPECS))
def test_bad_model_spec(spec, tmp_path, capsys, pair_file):
    args = ["run", "--model", spec, "--pairs", str(pair_file), "--out", str(tmp_path / "r"), "--quiet"]
    assert_refused(args, capsys, MODEL_SPECS[spec])
    assert not (tmp_path / "r").exists()


def test_model_dir_without_latentpatch_json(tmp_path, capsys, pair_file):
    (tmp_path / "m").mkdir()
    args = ["run", "--model", f"dir:{tmp_path / 'm'}", "--pairs", str(pair_file), "--out", str(tmp_path / "r")]
    assert_refused(args, capsys, "not a latentpatch model directory")


def test_missing_device(tmp_path, capsys, pair_file):
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    args = ["run", *FAST, "--device", "cuda:7", "--pairs", str(pair_file), "--out", str(tmp_path / "r")]
    assert_refused(args, capsys, "--device cuda:7")


def test_dtype_help_and_validation_agree(tmp_path, capsys):
    """float16 is in the help and accepted; an unknown dtype is refused naming the same list."""
    from latentpatch.pipeline.config import DTYPES, RunConfig

    help_text = next(f.metadata["help"] for f in RunConfig.__dataclass_fields__.values() if f.name == "dtype")
    assert all(d in help_text for d in DTYPES) and "float16" in DTYPES
    RunConfig(dtype="float16").validate()
    assert_refused(
        ["run", *FAST, "--dtype", "float64", "--out", str(tmp_path / "r")], capsys, "float32, bfloat16, float16"
    )


# ---- flags -----------------------------------------------------------------------------------------
BAD_FLAGS = {
    "experiments": (["--experiments", "layers"], "--experiments: unknown layers"),
    "experiments_empty": (["--experiments", ","], "--experiments: unknown (empty)"),
    "component": (["--component", "mlp"], "--component 'mlp'"),
    "direction": (["--direction", "sideways"], "--direction 'sideways'"),
    "replacement": (["--replacement", "noise"], "--replacement 'noise'"),
    "engine": (["--engine", "turbo"], "--engine 'turbo'"),
    "threads": (["--threads", "0"], "--threads must be >= 1"),
    "limit": (["--limit", "0"], "--limit must be >= 1"),
    "batch_size_zero": (["--batch-size", "0"], "--batch-size 0"),
    "batch_size_text": (["--batch-size", "big"], "--batch-size 'big'"),
    "shard_order": (["--shard", "3/2"], "--shard '3/2'"),
    "shard_text": (["--shard", "x"], "--shard 'x'"),
    "out_empty": (["--out", ""], "--out is empty"),
    "limit_not_int": (["--limit", "five"], "Invalid value for '--limit'"),
    "unknown_flag": (["--bogus"], "--bogus"),
}


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_flag(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags, message = BAD_FLAGS[name]
    args = ["run", "--quiet", *(["--out", str(tmp_path / "r")] if "--out" not in flags else []), *flags]
    assert_refused(args, capsys, message)
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


def test_config_file_missing(tmp_path, capsys):
    assert_refused(["run", "--config", str(tmp_path / "c.toml")], capsys, "does not exist")


def test_config_file_unknown_key(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"batchsize": 3}')
    assert_refused(["run", "--config", str(tmp_path / "c.json")], capsys, "unknown key(s) batchsize")


def test_config_file_unparseable(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("limit = = 3")
    assert_refused(["run", "--config", str(tmp_path / "c.toml")], capsys, "cannot be parsed")


def test_report_ci_method(tmp_path, capsys):
    assert_refused(["report", str(tmp_path), "--ci-method", "magic"], capsys, "--ci-method 'magic'")


def test_inspect_needs_one_question(capsys):
    assert_refused(["inspect", "--model", "config:llama"], capsys, "exactly one of --question")


def test_pairs_generate_zero(tmp_path, capsys):
    assert_refused(["pairs", "generate", "--n", "0", "--out", str(tmp_path / "p.json")], capsys, "--n 0")


# ---- run directories -------------------------------------------------------------------------------
def test_out_is_an_existing_file(tmp_path, capsys, pair_file):
    assert_refused(["run", *FAST, "--pairs", str(pair_file), "--out", str(pair_file)], capsys, "is an existing file")


def test_out_parent_is_a_file(tmp_path, capsys, pair_file):
    out = pair_file / "run"
    assert_refused(["run", *FAST, "--pairs", str(pair_file), "--out", str(out)], capsys, "is a file, not a directory")


def test_out_cannot_be_written(tmp_path, capsys, pair_file):
    # /proc refuses new entries even to root (a chmod-ed folder would not stop root)
    assert_refused(
        ["run", *FAST, "--pairs", str(pair_file), "--out", "/proc/latentpatch-run"], capsys, "cannot be written"
    )


def test_second_run_without_resume(finished_run, capsys):
    config = json.loads((finished_run / "manifest.json").read_text())["config"]
    args = ["run", *FAST, "--pairs", config["pairs"], "--out", str(finished_run)]
    assert_refused(args, capsys, "already holds a run", "--resume")


def test_resume_with_other_options(finished_run, capsys):
    config = json.loads((finished_run / "manifest.json").read_text())["config"]
    args = ["run", *FAST, "--pairs", config["pairs"], "--out", str(finished_run), "--seed", "9", "--resume"]
    assert_refused(args, capsys, "different config", "seed")


def test_report_on_a_file(pair_file, capsys):
    assert_refused(["report", str(pair_file)], capsys, "is not a directory")


def test_report_without_manifest(tmp_path, capsys):
    assert_refused(["report", str(tmp_path)], capsys, "manifest.json is missing")


def test_report_with_damaged_manifest(finished_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "manifest.json").write_text('{"status": "compl')
    assert_refused(["report", str(copy)], capsys, "is not valid JSON")


def test_compare_runs_differing_only_in_component(finished_run, tmp_path, capsys):
    import pandas as pd

    other = tmp_path / "other"
    import shutil

    shutil.copytree(finished_run, other)
    cells = pd.read_parquet(other / "results/cells.parquet")
    cells["component"] = "attn"
    cells.to_parquet(other / "results/cells.parquet", index=False)
    assert_refused(
        ["compare", str(finished_run), str(other), "--out", str(tmp_path / "cmp")],
        capsys,
        "differ only in component",
        "--component",
    )


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_lock_held_by_a_live_process(tmp_path, capsys, pair_file):
    out = tmp_path / "r"
    out.mkdir()
    holder = _sleeper()
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "T0"}))
        args = ["run", *FAST, "--pairs", str(pair_file), "--out", str(out)]
        assert_refused(args, capsys, f"in use by process {holder.pid}", "started T0")
        assert (out / ".lock").exists() and not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_a_note(tmp_path, capsys, pair_file):
    out = tmp_path / "r"
    out.mkdir()
    dead = _sleeper()
    dead.kill()
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "T0"}))
    rc, _, err = run_cli(["run", *FAST, "--pairs", str(pair_file), "--out", str(out)], capsys)
    assert rc == 0 and f"taking over the lock of {out} left by process {dead.pid}" in err
    assert not (out / ".lock").exists() and json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_truncated_pair_result_is_recomputed_on_resume(finished_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    victim = copy / "results/pairs/00001.json"
    victim.write_bytes(victim.read_bytes()[:100])
    config = json.loads((copy / "manifest.json").read_text())["config"]
    rc, _, err = run_cli(["run", *FAST, "--pairs", config["pairs"], "--out", str(copy), "--resume"], capsys)
    assert rc == 0, err
    assert "00001.json is damaged (truncated?); recomputing pair" in err and "Traceback" not in err
    for f in RESULT_FILES:
        assert (copy / f).read_bytes() == (finished_run / f).read_bytes(), f


def test_files_follow_the_umask(tmp_path, capsys, pair_file):
    old = os.umask(0o027)
    try:
        rc, _, err = run_cli(["run", *FAST, "--pairs", str(pair_file), "--out", str(tmp_path / "r")], capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in (tmp_path / "r").rglob("*")}
    assert modes and all(m == (0o750 if (tmp_path / p).is_dir() else 0o640) for p, m in modes.items()), modes


def test_manifest_command_reproduces_the_run(finished_run):
    command = json.loads((finished_run / "manifest.json").read_text())["command"]
    assert command.startswith("latentpatch run --model config:llama --pairs ") and " run run " not in command
    assert "--experiments layer" in command and "--batch-size 8" in command and "--no-report" in command
    per_pair = json.loads((finished_run / "manifest.json").read_text())["baselines"]["per_pair"]
    cos = next(iter(per_pair.values()))["cos_clean_corrupted"]  # the cosine plots' unpatched reference
    assert len(cos) >= 1 and all(-1.0 <= v <= 1.0 + 1e-6 for row in cos for v in row)


# ---- faults: real processes ------------------------------------------------------------------------
def _cli_process(args: list[str], cache: Path) -> subprocess.Popen:
    env = dict(os.environ, LATENTPATCH_CACHE=str(cache), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cli.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "latentpatch.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell that starts the suite in the background makes it ignore SIGINT, and an ignored
        # signal stays ignored across exec: give the run the default handler (Ctrl-C) back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(predicate, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_then_resume(tmp_path):
    """SIGINT: one line with the resume command, manifest ``interrupted``, exit 130; the command it
    names finishes the run with the bytes of an uninterrupted one; a second process is refused by the lock."""
    path = tmp_path / "pairs.json"
    save_pairs(generate_pairs(120, seed=2), path)  # enough pairs that the victim still runs when the second starts
    n_pairs = len(load_pairs(path))
    # one worker process, so that the victim is still running when the second process starts
    common = ["run", "--model", "config:llama", "--pairs", str(path), "--no-report", "--quiet", "--batch-size", "8"]
    common += ["--workers", "1"]
    full = _cli_process(common + ["--out", str(tmp_path / "full")], tmp_path / "c1")
    victim = _cli_process(common + ["--out", str(tmp_path / "cut")], tmp_path / "c2")
    pair_dir = tmp_path / "cut/results/pairs"
    _wait_for(lambda: len(list(pair_dir.glob("0*.json"))) >= 2)
    assert victim.poll() is None, "the run finished before it could be interrupted"
    second = _cli_process(common + ["--out", str(tmp_path / "cut"), "--resume"], tmp_path / "c2")
    _, err2 = second.communicate(timeout=120)
    assert second.returncode == 2 and f"in use by process {victim.pid}" in err2 and "Traceback" not in err2
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert full.wait(timeout=300) == 0
    done = len(list(pair_dir.glob("0*.json")))
    lines = [line for line in err.splitlines() if line.strip()]
    assert victim.returncode == 130 and "Traceback" not in err, err
    assert lines[-1].startswith(f"error: interrupted after {done} of {n_pairs} pairs; continue with: latentpatch run ")
    assert json.loads((tmp_path / "cut/manifest.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "cut/.lock").exists()
    command = shlex.split(lines[-1].split("continue with: ", 1)[1])
    assert command[-1] == "--resume"
    resumed = _cli_process(command[1:] + ["--quiet"], tmp_path / "c2")
    _, err3 = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err3
    for f in RESULT_FILES:
        assert (tmp_path / "cut" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f


@pytest.mark.slow
def test_ctrl_c_with_worker_processes(tmp_path):
    """SIGINT to a run whose pairs are split over two processes: exit 130, manifest ``interrupted``,
    no worker left writing, and ``--resume`` completes every pair."""
    path = tmp_path / "pairs.json"
    save_pairs(generate_pairs(120, seed=2), path)
    args = ["run", "--model", "config:llama", "--pairs", str(path), "--no-report", "--quiet", "--batch-size", "8"]
    args += ["--workers", "2", "--out", str(tmp_path / "cut")]
    victim = _cli_process(args, tmp_path / "c")
    pair_dir = tmp_path / "cut/results/pairs"
    _wait_for(lambda: len(list(pair_dir.glob("0*.json"))) >= 4)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130 and "Traceback" not in err, err
    assert json.loads((tmp_path / "cut/manifest.json").read_text())["status"] == "interrupted"
    done = len(list(pair_dir.glob("0*.json")))
    time.sleep(1.0)
    assert len(list(pair_dir.glob("0*.json"))) == done < 120  # the children stopped with the run
    resumed = _cli_process(args + ["--resume"], tmp_path / "c")
    _, err2 = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err2
    assert len(list(pair_dir.glob("0*.json"))) == 120


def test_damaged_lock_is_taken_over(tmp_path, capsys, pair_file):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text("{not json")
    rc, _, err = run_cli(["run", *FAST, "--pairs", str(pair_file), "--out", str(out)], capsys)
    assert rc == 0 and "taking over the lock" in err and not (out / ".lock").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--d-model", "130", "--heads", "4"], "--d-model 130 must be divisible by --heads 4"),
        (["--number-init", "gauss"], "--number-init 'gauss': use random or fourier"),
        (["--thought-swap-rate", "1.5"], "--thought-swap-rate 1.5: use a value in [0, 1]"),
        (["--swap-positions", "0,7"], "--swap-positions '0,7': use a comma list of 1,2,3,4,5"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
    ],
)
def test_bad_train_options_are_refused_before_training(args, message, tmp_path, capsys):
    """`train`'s options come from TrainConfig; a value that cannot train is one line, nothing written."""
    assert_refused(["train", "--out", str(tmp_path / "m"), *args], capsys, message)
    assert not (tmp_path / "m").exists()
