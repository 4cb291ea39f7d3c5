"""``latentpatch launch slurm`` through submitit's local executor (the same jobs as subprocesses): a
two-shard array and the merge job give the bytes of an unsharded run; bad input is one line, exit 2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from latentpatch.cli import main  # noqa: E402
from latentpatch.pipeline.run import RunConfig, run_experiments  # noqa: E402

OPTIONS = ["--limit", "4", "--experiments", "position", "--no-report", "--threads", "1"]


def files(run: Path) -> dict[str, bytes]:
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted((run / "results").rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """An unsharded run here and the same run launched as a local two-shard array plus merge."""
    root = tmp_path_factory.mktemp("slurm")
    cache = ["--cache-dir", str(root / "cache")]
    config = RunConfig(
        limit=4, experiments=("position",), report=False, threads=1, out=str(root / "one"), cache_dir=cache[1]
    )
    one = run_experiments(config, progress=False)
    main(["launch", "slurm", "--cluster", "local", "--shards", "2", "--out", str(root / "big"), *OPTIONS, *cache])
    return root, one


def test_local_array_and_merge_equal_an_unsharded_run(launched, capsys):
    root, one = launched
    big = root / "big"
    assert sorted(p.name for p in big.iterdir()) == ["merged", "shard0", "shard1", "slurm"]
    assert [json.loads((big / f"shard{i}" / "manifest.json").read_text())["config"]["shard"] for i in (0, 1)] == [
        "0/2",
        "1/2",
    ]
    assert files(big / "merged") == files(one)
    merged = json.loads((big / "merged" / "manifest.json").read_text())
    assert [s["shard"] for s in merged["merged_from"]] == ["0/2", "1/2"]


def one_line_exit_2(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as err:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_bad_launch_and_merge_input_is_one_line(launched, tmp_path, monkeypatch, capsys):
    root, one = launched
    out = ["--out", str(tmp_path / "x")]
    assert "--shards must be >= 1" in one_line_exit_2(["launch", "slurm", "--shards", "0", *out], capsys)
    assert "--shard: launch slurm makes the shards" in one_line_exit_2(
        ["launch", "slurm", "--shard", "0/2", *out], capsys
    )
    assert "--slurm-arg 'qos'" in one_line_exit_2(["launch", "slurm", "--slurm-arg", "qos", *out], capsys)
    # a shard of a different config is refused by the merge
    other = tmp_path / "other"
    shutil.copytree(root / "big" / "shard1", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["config"]["seed"] = 7
    (other / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_exit_2(["merge", str(root / "big" / "shard0"), str(other), "--out", str(tmp_path / "m")], capsys)
    assert "differ in: seed" in line
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if submitit were not installed
    assert "pip install 'latentpatch[slurm]'" in one_line_exit_2(["launch", "slurm", *out], capsys)
