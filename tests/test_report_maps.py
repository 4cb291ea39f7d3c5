"""Tables as maps: the step-level heatmaps (thought flip rate, influence) and their hover grids. Each
hover box must lie over its own cell in the saved PNG, for both image origins, and the old layer x
position hover must give the same spans as before."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from latentpatch.analysis.figures import DPI, position_heatmaps
from latentpatch.analysis.hover import cell_box, grid_hover_figure, hover_figure, read_grid_layout
from latentpatch.analysis.html import escape, fmt
from latentpatch.analysis.step_stats import STEP_SUMMARY_KEYS, summarize
from latentpatch.analysis.steps_figures import (
    influence_figures,
    influence_tips,
    save_map,
    thought_grid,
    thought_heatmap,
    thought_tips,
)

SPAN = re.compile(
    r'<span class="cell" title="([^"]*)" style="left:([\d.-]+)%;top:([\d.-]+)%;width:([\d.]+)%;height:([\d.]+)%">'
)
SITES, REPS, POSITIONS = ("thought", "input"), ("zero", "mean"), (-1, 0, 1, 2)
MISSING = ("input", "mean", 1)  # a (site, replacement, position) group the steps table lacks


def spans(html: str) -> dict[str, tuple[float, float, float, float]]:
    """{title: (left, top, width, height) in percent} of the hover spans of ``html``."""
    return {t: tuple(float(v) for v in box) for t, *box in SPAN.findall(html)}  # type: ignore[misc]


def pixel_at(png: Path, box: tuple[float, float, float, float]) -> np.ndarray:
    """RGB (0..255) of the saved PNG at the centre of a hover box."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    left, top, width, height = box
    x, y = (left + width / 2) / 100 * img.shape[1], (top + height / 2) / 100 * img.shape[0]
    return img[int(y), int(x)]


def colour(cmap: str, norm: Normalize, value: float) -> np.ndarray:
    return np.round(np.array(colormaps[cmap](norm(value))[:3]) * 255).astype(int)


@pytest.fixture(scope="module")
def summary() -> pd.DataFrame:
    """The thought experiment's summary from a hand-made steps table: 4 pairs per group, flip rate
    ((row + col) % 5) / 4 for row (site, replacement) and col position (-1 counted as col 3)."""
    rows = []
    for r, (site, rep) in enumerate((s, p) for s in SITES for p in REPS):
        for pos in POSITIONS:
            if (site, rep, pos) == MISSING:
                continue
            flips = (r + (3 if pos == -1 else pos)) % 5
            rows += [
                dict(site=site, replacement=rep, position=pos, pair_id=i, flipped=i < flips, kl=0.1 * i)
                for i in range(4)
            ]
    return summarize(pd.DataFrame(rows), list(STEP_SUMMARY_KEYS["thought"]), ["flipped", "kl"], seed=0, n_resamples=200)


@pytest.fixture(scope="module")
def thought_dir(tmp_path_factory, summary) -> Path:
    out = tmp_path_factory.mktemp("maps")
    paths = thought_heatmap(summary, out, ("png", "svg"), annotate=False)
    assert paths == [out / "thought_flips.png", out / "thought_flips.svg"]
    return out


def test_thought_map_layout_labels(thought_dir, summary):
    layout = json.loads((thought_dir / "thought_flips.cells.json").read_text())
    # summarize sorts the groups: rows in that order of appearance, "all" last
    assert layout["rows"] == ["input · mean", "input · zero", "thought · mean", "thought · zero"]
    assert layout["cols"] == ["0", "1", "2", "all"]
    assert layout["origin"] == "upper" and len(layout["axes"]) == 4
    assert all(v == round(v, 6) for v in layout["axes"])
    tips = thought_tips(summary)
    assert set(tips) == {(r, c) for r in layout["rows"] for c in layout["cols"]} - {("input · mean", "1")}


def test_thought_tips_text(summary):
    row = summary[(summary["metric"] == "flipped") & (summary["site"] == "thought")]
    row = row[(row["replacement"] == "zero") & (row["position"] == -1)].iloc[0]
    assert thought_tips(summary)[("thought · zero", "all")] == (
        f"site thought, replacement zero, thought all: flip rate {fmt(row['mean'])}, "
        f"95% CI [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}], n 4"
    )


def test_thought_boxes_lie_over_their_cells(thought_dir, summary):
    tips = thought_tips(summary)
    html = grid_hover_figure(thought_dir, "thought_flips", "flip rate", tips)
    boxes = spans(html)
    assert len(boxes) == len(tips) == html.count('class="cell"') == 15
    grid, rows, cols = thought_grid(summary)
    checked = 0
    for (row, col), tip in tips.items():
        value = grid[rows.index(row), cols.index(col)]
        got = pixel_at(thought_dir / "thought_flips.png", boxes[escape(tip)])
        assert np.abs(got - colour("viridis", Normalize(0, 1), value)).max() <= 3, (row, col, value, got)
        checked += 1
    assert checked == 15
    # the missing cell: no span, drawn in the "no data" grey
    layout = read_grid_layout(thought_dir / "thought_flips.cells.json")
    assert layout is not None
    r, k = layout["rows"].index("input · mean"), layout["cols"].index("1")
    assert np.abs(pixel_at(thought_dir / "thought_flips.png", cell_box(layout, r, k)) - 0xEE).max() <= 3


def test_influence_boxes_lie_over_their_cells(tmp_path):
    mat = np.array([[0.0, 0.2, 0.9], [0.1, 0.0, 0.5], [0.3, 0.7, 0.0]])
    later = pd.DataFrame(
        [
            dict(replacement="zero", step=i, later=j, metric=m, n=6, mean=v, ci_low=v - 0.05, ci_high=v + 0.05)
            for i in range(3)
            for j in range(i + 1, 3)
            for m, v in (("thought_rel_l2", mat[i, j]), ("thought_cos", 1 - mat[i, j]))
        ]
    )
    assert influence_figures({"zero": mat}, tmp_path, ("png",)) == [tmp_path / "influence_zero.png"]
    layout = json.loads((tmp_path / "influence_zero.cells.json").read_text())
    assert (layout["rows"], layout["cols"], layout["origin"]) == (["0", "1", "2"], ["0", "1", "2"], "upper")
    tips = influence_tips(later, "zero")
    assert tips[("0", "2")] == "step 0 → thought 2: relative L2 0.9, 95% CI [0.85, 0.95], n 6; cos 0.1"
    assert set(tips) == {("0", "1"), ("0", "2"), ("1", "2")} and influence_tips(later, "mean") == {}
    boxes = spans(grid_hover_figure(tmp_path, "influence_zero", "influence", tips))
    for (i, j), tip in tips.items():
        got = pixel_at(tmp_path / "influence_zero.png", boxes[escape(tip)])
        want = colour("viridis", Normalize(0, mat.max()), mat[int(i), int(j)])
        assert np.abs(got - want).max() <= 3, (i, j, got, want)


@pytest.mark.parametrize("origin", ["lower", "upper"])
def test_grid_layout_follows_the_origin(tmp_path, origin):
    grid = np.arange(12.0).reshape(4, 3) / 11  # every cell its own colour
    fig = Figure(figsize=(4, 3), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(grid, origin=origin, aspect="auto", cmap="viridis", norm=Normalize(0, 1), interpolation="nearest")
    ax.set_yticks(range(4), ["a long row label"] * 4)
    fig.colorbar(im, ax=ax)
    rows, cols = ["r0", "r1", "r2", "r3"], ["c0", "c1", "c2"]
    save_map(fig, ax, tmp_path, "m", ("png", "svg"), rows, cols, origin)
    tips = {(r, c): f"{r}/{c}" for r in rows for c in cols}
    boxes = spans(grid_hover_figure(tmp_path, "m", "map", tips))
    for (r, c), tip in tips.items():
        want = colour("viridis", Normalize(0, 1), grid[rows.index(r), cols.index(c)])
        assert np.abs(pixel_at(tmp_path / "m.png", boxes[tip]) - want).max() <= 3, (origin, r, c)


def test_old_position_heatmap_boxes_lie_over_their_cells(tmp_path):
    layers, positions = [0, 2, 4], [0, 1, 2, 3]
    cells = [
        dict(experiment="position", mode="single", component="resid_out", metric="kl", layer=la, position=p, n=5)
        | dict(mean=1.0 + 3 * i + k, ci_low=0.5, ci_high=2.0)
        for i, la in enumerate(layers)
        for k, p in enumerate(positions)
    ]
    position_heatmaps(pd.DataFrame(cells), tmp_path, ("png",), top=0)
    layout = read_grid_layout(tmp_path / "position_heatmap_kl.cells.json")
    assert layout is not None and layout["origin"] == "lower" and layout["rows"] == ["0", "2", "4"]
    boxes = spans(hover_figure(tmp_path, "position_heatmap_kl", "kl", cells))
    assert len(boxes) == 12
    for c in cells:
        tip = f"layer {c['layer']}, thought {c['position']}: mean {fmt(c['mean'])}, 95% CI [0.5, 2], n 5"
        want = colour("viridis", Normalize(0, 10.0), c["mean"])  # colour_norm: 0 .. the largest mean
        assert np.abs(pixel_at(tmp_path / "position_heatmap_kl.png", boxes[tip]) - want).max() <= 3, c


def test_hover_figure_output_for_the_layer_position_layout(tmp_path):
    Image.new("RGB", (40, 30), "white").save(tmp_path / "h.png")
    layout = {"axes": [0.1, 0.2, 0.6, 0.5], "layers": [0, 2, 4, 6], "positions": [-1, 0, 1]}
    (tmp_path / "h.cells.json").write_text(json.dumps(layout))
    cells = [
        dict(layer=2, position=1, mean=0.1234, ci_low=0.1, ci_high=0.2, n=5),
        dict(layer=0, position=-1, mean=-1.5, ci_low=-2, ci_high=-1, n=7),
        dict(layer=9, position=0, mean=0.0, ci_low=0, ci_high=0, n=1),  # not in the layout: no span
    ]
    html = hover_figure(tmp_path, "h", "caption", cells)
    # layer 2 is row 1 from the bottom (origin lower), position 1 is column 2 of 3
    assert (
        '<span class="cell" title="layer 2, thought 1: mean 0.123, 95% CI [0.1, 0.2], n 5" '
        'style="left:50.000%;top:55.000%;width:20.000%;height:12.500%"></span>'
    ) in html
    assert 'title="layer 0, thought -1: mean -1.5, 95% CI [-2, -1], n 7" style="left:10.000%;top:67.500%;' in html
    assert html.count('class="cell"') == 2
    assert html.startswith('<figure><span class="hover"><span class="cell"')
    assert html.endswith("</span><figcaption>caption</figcaption></figure>")


def test_grid_hover_figure_spans_titles_and_fallbacks(tmp_path):
    Image.new("RGB", (20, 10), "white").save(tmp_path / "g.png")
    assert grid_hover_figure(tmp_path, "absent", "c", {("a", "b"): "x"}) == ""
    plain = grid_hover_figure(tmp_path, "g", "c", {("a", "b"): "x"})
    assert plain.startswith("<figure><img ") and "cell" not in plain
    layout = {"axes": [0.0, 0.0, 1.0, 1.0], "rows": ["a", "b"], "cols": ["x", "y"], "origin": "upper"}
    (tmp_path / "g.cells.json").write_text(json.dumps(layout))
    tips = {("a", "y"): 'mean <1> & "q"', ("b", "x"): "plain", ("z", "x"): "not in the layout"}
    html = grid_hover_figure(tmp_path, "g", "c", tips)
    assert html.count('class="cell"') == 2
    assert (
        'title="mean &lt;1&gt; &amp; &quot;q&quot;" style="left:50.000%;top:0.000%;width:50.000%;height:50.000%"'
        in html
    )
    assert 'title="plain" style="left:0.000%;top:50.000%;' in html
