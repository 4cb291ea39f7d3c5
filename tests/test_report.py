"""Figures, report.html, the report/compare CLI, the screenshot script and W&B logging on fake runs."""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_run import write_fake_run

from latentpatch.analysis.report import SECTIONS, build_report
from latentpatch.cli import main
from latentpatch.errors import LatentPatchError

ROOT = Path(__file__).resolve().parents[1]
FIGURES = [
    "layer_bars",
    "pairs_layers",
    "cumulative_trajectories",
    "chained_similarity",
    "modes_comparison",
    *[f"position_heatmap_{m}" for m in ("kl", "recovery", "answer_logit_diff")],
    *[f"position_heatmap_pairs_{m}" for m in ("kl", "recovery", "answer_logit_diff")],
]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Run ``latentpatch.cli.main(args)``; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as ex:
            code = ex.code if isinstance(ex.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small complete run with one failing check, reported through the CLI."""
    run = write_fake_run(
        tmp_path_factory.mktemp("report") / "run",
        n_pairs=4,
        n_layers=3,
        K=3,
        seed=1,
        flagged=(1,),
        failing_check="identity",
        command="latentpatch run --pairs my_pairs.json --out RUN --seed 1",
    )
    code, out, err = run_cli(["report", str(run), "--n-resamples", "300"])
    assert code == 0, err
    assert out.strip() == str(run / "report.html")
    return run


def test_every_figure_written_png_and_svg(built, tmp_path):
    # default: PNG only (issue 16: SVG on request); with the run's figure_formats "svg", both formats
    for name in FIGURES:
        path = built / "figures" / f"{name}.png"
        assert path.is_file() and path.stat().st_size > 1000, path
        assert not (built / "figures" / f"{name}.svg").exists()
    run = write_fake_run(tmp_path / "run", n_pairs=4, n_layers=3, K=3, seed=1, flagged=(1,))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["figure_formats"] = "svg"
    (run / "manifest.json").write_text(json.dumps(manifest))
    build_report(run, n_resamples=100)
    for name in FIGURES:
        for ext in ("png", "svg"):
            path = run / "figures" / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path
    assert (built / "stats.json").is_file()
    assert {p.name for p in (built / "stats").iterdir()} >= {"cells.csv", "comparisons.csv", "additivity.csv"}


def test_figures_drawn_in_child_processes_equal_serial_ones(tmp_path, monkeypatch):
    """The report draws some figures in forked children where two cores are free: the same bytes
    (PNG and SVG) as drawing them all in one process."""
    import latentpatch.analysis.figure_set as figure_set

    runs = {}
    for cores in (2, 1):
        monkeypatch.setattr(figure_set, "_free_cores", lambda cores=cores: cores)
        runs[cores] = write_fake_run(tmp_path / f"cores{cores}", n_pairs=4, n_layers=3, K=3, seed=1, flagged=(1,))
        build_report(runs[cores], n_resamples=100, formats=("svg",))
    files = sorted(p.name for p in (runs[1] / "figures").iterdir())
    assert len(files) >= 2 * len(FIGURES) and files == sorted(p.name for p in (runs[2] / "figures").iterdir())
    for name in files:
        assert (runs[2] / "figures" / name).read_bytes() == (runs[1] / "figures" / name).read_bytes(), name


def test_report_svg_flag_writes_svg_beside_png(tmp_path):
    """`latentpatch report --svg` adds SVG files to a run made with the default (PNG only)."""
    run = write_fake_run(tmp_path / "run", n_pairs=3, n_layers=2, K=2, seed=2)
    code, _, err = run_cli(["report", str(run), "--n-resamples", "100"])
    assert code == 0, err
    assert not list((run / "figures").glob("*.svg"))
    code, _, err = run_cli(["report", str(run), "--n-resamples", "100", "--svg"])
    assert code == 0, err
    pngs = {p.stem for p in (run / "figures").glob("*.png")}
    assert pngs and {p.stem for p in (run / "figures").glob("*.svg")} == pngs


def test_report_sections_self_contained(built):
    page = (built / "report.html").read_text()
    # every section of a run of the sweeps, flagged pairs and decoded thoughts; none for what did not run
    ran = {"layer", "position", "iterative"}
    never = {"thought", "early", "influence", "intermediate", "lens", "attention", "heads", "atp", "probe", "steer"}
    never |= {"edges"}
    never |= {"das"}
    never |= {"stops"}  # a family with a stop rule only (docs/method.md §22)
    for sid, heading in SECTIONS:
        assert (f'<section id="{sid}"><h2>' in page) == (sid not in never), sid
        assert (heading in page) == (sid not in never) or sid in ran
    # nothing fetched from the network: no http(s) in src/href/url(), no @import
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "url(" not in page and "@import" not in page
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    # the failing check is highlighted, with its number
    assert re.search(r'<tr class="fail"><td class="l">identity</td><td class="l"><span class="badge failb">FAIL', page)
    assert "check(s) failed" in page
    # reproduce command, baselines, flagged pair, decoded thoughts, corrected p-values
    assert "latentpatch run --pairs my_pairs.json --out RUN --seed 1" in page
    assert "clean accuracy" in page and "p001" in page
    assert "Tom has" in page and "p Holm" in page and "p BH" in page


def test_report_on_partial_run(tmp_path):
    run = write_fake_run(tmp_path / "run", n_pairs=3, n_layers=2, K=2, experiments=("layer",), flagged=())
    (run / "results" / "thoughts.json").unlink()
    from latentpatch.analysis.report import build_report

    page = build_report(run, n_resamples=200, formats=("png",)).read_text()
    # only what ran has a section (and a link); the rest is named once at the end
    ids = re.findall(r'<section id="([^"]+)"', page)
    assert ids == ["findings", "checks", "baselines", "layer", "statistics", "summary", "config", "reproduce"]
    assert re.findall(r'<a href="#([^"]+)"', page[page.index("<nav>") : page.index("</nav>")]) == ids
    assert "no pair is flagged" in page and "This run has no" not in page
    closing = page[page.index('<p class="note closing">') :]
    assert "position (<code>--experiments position</code>)" in closing and "layer (" not in closing
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["layer_bars.png", "pairs_layers.png"]


def _missing_cells(run: Path) -> None:
    (run / "results" / "cells.parquet").unlink()


def _corrupt_cells(run: Path) -> None:
    (run / "results" / "cells.parquet").write_bytes(b"not parquet at all")


def _corrupt_layer_json(run: Path) -> None:
    (run / "results" / "layer.json").write_text('{"p000": {"0": ')


def _missing_manifest(run: Path) -> None:
    (run / "manifest.json").unlink()


def _corrupt_manifest(run: Path) -> None:
    (run / "manifest.json").write_text("{oops")


@pytest.mark.parametrize(
    "damage, named",
    [
        (_missing_cells, "cells.parquet"),
        (_corrupt_cells, "cells.parquet"),
        (_corrupt_layer_json, "layer.json"),
        (_missing_manifest, "manifest.json"),
        (_corrupt_manifest, "manifest.json"),
    ],
)
def test_report_damaged_run_exits_2_one_line(tmp_path, damage, named):
    run = write_fake_run(tmp_path / "run", n_pairs=2, n_layers=2, K=2)
    damage(run)
    code, out, err = run_cli(["report", str(run)])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err
    assert "Traceback" not in err
    assert not (run / "report.html").exists()


def test_compare_cli(tmp_path):
    a = write_fake_run(tmp_path / "a", n_pairs=3, n_layers=2, K=2, seed=1, experiments=("layer", "position"))
    b = write_fake_run(tmp_path / "b", n_pairs=3, n_layers=2, K=2, seed=2, experiments=("layer", "position"))
    code, out, err = run_cli(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert code == 0, err
    cmp = tmp_path / "cmp"
    assert out.strip() == str(cmp / "compare.html")
    names = {p.name for p in (cmp / "figures").iterdir()}
    assert {
        "compare_layer.png",
        "compare_layer.svg",
        "compare_position_recovery.png",
        "compare_position_kl.svg",
    } <= names
    data = json.loads((cmp / "compare.json").read_text())
    cell = next(
        c
        for c in data["cells"]
        if c["experiment"] == "position" and c["layer"] == 1 and c["position"] == 0 and c["metric"] == "recovery"
    )
    ca, cb = (pd.read_parquet(r / "results" / "cells.parquet") for r in (a, b))
    sel = lambda c: c[(c["experiment"] == "position") & (c["layer"] == 1) & (c["position"] == 0)]["recovery"].mean()  # noqa: E731
    assert cell["diff"] == pytest.approx(sel(ca) - sel(cb))
    html = (cmp / "compare.html").read_text()
    assert 'src="data:image/png;base64,' in html and not re.search(r"""(?:src|href)=["']?https?:""", html)

    c = write_fake_run(tmp_path / "c", n_pairs=3, n_layers=3, K=2, seed=2, experiments=("layer",))
    code, _, err = run_cli(["compare", str(a), str(c), "--out", str(tmp_path / "cmp2")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "grids differ" in err


@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(), reason="chromium not installed (apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(built, tmp_path):
    from PIL import Image

    png = tmp_path / "shot.png"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "screenshot_report.sh"), str(built), str(png), "1200,1600"],
        check=True,
        timeout=120,
        capture_output=True,
    )
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (1600, 1200)
    colours = np.unique(img.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 50  # text, tables, figures: not a blank page
    assert img[:80].mean() < 120  # the dark page header rendered at the top


# ---- Weights & Biases -----------------------------------------------------------------------


def _wandb_records(path: Path):
    """Records of a .wandb transaction log (W&B header, then LevelDB-log framed protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            buf = chunk
        elif kind == 2:
            buf = chunk
            continue
        elif kind == 3:
            buf += chunk
            continue
        else:
            buf += chunk
        rec = pb.Record()
        rec.ParseFromString(buf)
        yield rec


def test_wandb_offline_log_run(built, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from latentpatch.analysis.wandb_log import log_run

    for k, v in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_X_DISABLE_STATS": "true",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # an empty key here delays the offline log's writing
    local = log_run(built, project="latentpatch-test")
    assert local.is_dir() and local.name.startswith("offline-run-") and local.parent == tmp_path / "wandb"
    # wandb-core writes the offline log asynchronously: wait for the run's exit record
    log = next(local.glob("run-*.wandb"))
    deadline = time.monotonic() + 30
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(log)):
        assert time.monotonic() < deadline, f"{log} has no exit record ({log.stat().st_size} bytes)"
        time.sleep(0.2)
    history, summary, config = set(), set(), set()
    for rec in _wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
        elif kind == "summary":
            summary |= {i.key or "/".join(i.nested_key) for i in rec.summary.update}
        elif kind == "run":
            config |= {i.key for i in rec.run.config.update}
        elif kind == "config":
            config |= {i.key for i in rec.config.update}
    assert {"model", "model_info", "seed", "command", "experiments"} <= config
    assert {
        "cells/_type",
        "cell_stats/_type",
        "layer",
        "layer_sweep/recovery",
        "layer_sweep/kl",
        "figures/layer_bars/_type",
    } <= history
    assert {"checks/identity/passed", "baselines/clean_accuracy", "best_layer/recovery"} <= summary
    tables = {p.name.split("_")[0] for p in (local / "files" / "media" / "table").iterdir()}
    assert tables == {"cells", "cell"}


def test_wandb_missing_is_a_user_error(built, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    from latentpatch.analysis.wandb_log import log_run

    with pytest.raises(LatentPatchError, match=r"wandb is not installed: pip install 'latentpatch\[wandb\]'"):
        log_run(built)
