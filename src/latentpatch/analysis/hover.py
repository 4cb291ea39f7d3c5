"""Hover on the report's heatmaps: a transparent grid of cells over the embedded PNG, each with an
HTML ``title`` (e.g. mean, 95% CI, n), so the page stays one self-contained file without a script.

The grid's place comes from ``figures/<name>.cells.json``, written with the heatmap:
- by :func:`write_grid_layout` (any rows x columns map): ``{"axes": [x0, y0, w, h], "rows": [...],
  "cols": [...], "origin": "lower"|"upper"}``, the axes box in figure fractions (matplotlib's, from
  the bottom left), the row and column labels in data order;
- by :func:`latentpatch.analysis.figures.position_heatmaps` (layer x position):
  ``{"axes": ..., "layers": [...], "positions": [...]}``, read as rows = layers, cols = positions,
  origin "lower".

:func:`grid_hover_figure` lays one ``<span class="cell">`` per tip over its cell; :func:`hover_figure`
does it for the layer x position heatmaps from their summary cells.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from latentpatch.analysis.html import embed_png, escape, fmt

#: Where row 0 of a map is drawn (as imshow's ``origin``): at the bottom or at the top.
ORIGINS = ("lower", "upper")


def write_grid_layout(out_dir: Path, name: str, ax: Any, rows: list[str], cols: list[str], origin: str) -> None:
    """Write ``out_dir/<name>.cells.json``: the box of ``ax`` (an image of ``len(rows)`` x ``len(cols)``
    cells filling the axes) and its labels, for :func:`grid_hover_figure`.

    ``rows``/``cols``: the labels of the image's rows and columns in data order (row index 0 first);
    ``origin``: as in ``imshow`` ("upper": row 0 at the top). The box is ``ax.get_position().bounds``
    (x0, y0, width, height in figure fractions, y from the bottom), rounded to 6 digits: call this after
    the PNG is saved (:func:`~latentpatch.analysis.figures.save_figure` draws the whole figure, no
    tight bounding box, so these fractions are the PNG's) and before any other format re-lays the
    figure out. A figure not drawn yet is laid out here first.

    >>> import tempfile
    >>> from matplotlib.figure import Figure
    >>> ax = Figure().add_axes((0.1, 0.2, 0.5, 0.6))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_grid_layout(Path(d), "m", ax, ["a", "b"], ["0", "all"], "upper")
    ...     print((Path(d) / "m.cells.json").read_text().strip())
    {"axes": [0.1, 0.2, 0.5, 0.6], "rows": ["a", "b"], "cols": ["0", "all"], "origin": "upper"}
    """
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {ORIGINS}, not {origin!r}")
    fig = ax.figure.figure  # the root figure (an axes of a subfigure: the subfigure's)
    if fig.stale:  # not drawn since its last change: its layout engine has not placed the axes yet
        fig.draw_without_rendering()
    layout = {
        "axes": [round(float(v), 6) for v in ax.get_position().bounds],
        "rows": [str(r) for r in rows],
        "cols": [str(c) for c in cols],
        "origin": origin,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.cells.json").write_text(json.dumps(layout) + "\n")


def read_grid_layout(path: Path) -> dict | None:
    """``<name>.cells.json`` as {"axes", "rows", "cols", "origin"} (labels as strings), from either
    format (the old ``layers``/``positions`` one: origin "lower"); None if absent.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = Path(d) / "x.cells.json"
    ...     _ = p.write_text('{"axes": [0, 0, 1, 1], "layers": [0, 2], "positions": [-1, 0]}')
    ...     read_grid_layout(p)
    {'axes': [0.0, 0.0, 1.0, 1.0], 'rows': ['0', '2'], 'cols': ['-1', '0'], 'origin': 'lower'}
    """
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    if "rows" in raw:
        rows, cols, origin = raw["rows"], raw["cols"], raw.get("origin", "upper")
    else:
        rows, cols, origin = raw["layers"], raw["positions"], "lower"
    return {
        "axes": [float(v) for v in raw["axes"]],
        "rows": [str(r) for r in rows],
        "cols": [str(c) for c in cols],
        "origin": origin,
    }


def cell_box(layout: dict, r: int, k: int) -> tuple[float, float, float, float]:
    """(left, top, width, height) in percent of the image (from its top left) of the cell in row
    index ``r`` and column index ``k`` of ``layout`` (:func:`read_grid_layout`).

    >>> lay = {"axes": [0.1, 0.2, 0.8, 0.6], "rows": ["a", "b"], "cols": ["x", "y"], "origin": "upper"}
    >>> [round(v, 6) for v in cell_box(lay, 0, 1)]  # row 0 at the top
    [50.0, 20.0, 40.0, 30.0]
    >>> [round(v, 6) for v in cell_box(dict(lay, origin="lower"), 0, 1)]  # row 0 at the bottom
    [50.0, 50.0, 40.0, 30.0]
    """
    x0, y0, w, h = layout["axes"]
    n_rows, n_cols = len(layout["rows"]), len(layout["cols"])
    left = 100 * (x0 + w * k / n_cols)
    below = r + 1 if layout["origin"] == "lower" else n_rows - r  # rows from the axes' bottom to the cell's top
    top = 100 * (1 - y0 - h * below / n_rows)
    return left, top, 100 * w / n_cols, 100 * h / n_rows


def grid_hover_figure(fig_dir: Path, name: str, caption: str, tips: dict[tuple[str, str], str]) -> str:
    """The embedded ``fig_dir/<name>.png`` (:func:`~latentpatch.analysis.html.embed_png`) with a
    transparent ``<span class="cell" title="...">`` over each cell (row label, col label) in ``tips``
    (the title: the tip's text, escaped), placed from ``<name>.cells.json`` (:func:`write_grid_layout`).

    Returns the HTML: ``""`` without the PNG; the plain figure without the layout; labels not in the
    layout get no span. Spans come in layout order (rows, then columns).
    """
    html = embed_png(fig_dir / f"{name}.png", caption)
    layout = read_grid_layout(fig_dir / f"{name}.cells.json")
    if not html or layout is None:
        return html
    boxes = []
    for r, row in enumerate(layout["rows"]):
        for k, col in enumerate(layout["cols"]):
            tip = tips.get((row, col))
            if tip is None:
                continue
            left, top, width, height = cell_box(layout, r, k)
            boxes.append(
                f'<span class="cell" title="{escape(tip)}" style="left:{left:.3f}%;top:{top:.3f}%;'
                f'width:{width:.3f}%;height:{height:.3f}%"></span>'
            )
    return html.replace("<img ", '<span class="hover">' + "".join(boxes) + "<img ", 1).replace(
        "<figcaption>", "</span><figcaption>", 1
    )


def hover_figure(fig_dir: Path, name: str, caption: str, cells: list[dict]) -> str:
    """:func:`grid_hover_figure` for a layer x position heatmap
    (:func:`~latentpatch.analysis.figures.position_heatmaps`): hovering a cell shows its mean, CI and n.

    ``cells``: summary records with ``layer``, ``position``, ``mean``, ``ci_low``, ``ci_high``, ``n``.
    """
    tips = {}
    for c in cells:
        ci = f"[{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]"
        layer, pos = int(c["layer"]), int(c["position"])  # as the layout lists them
        tips[(str(layer), str(pos))] = f"layer {layer}, thought {pos}: mean {fmt(c['mean'])}, 95% CI {ci}, n {c['n']}"
    return grid_hover_figure(fig_dir, name, caption, tips)


def heatmap_shows_change(fig_dir: Path, metric: str) -> bool:
    """Whether the heatmap of ``metric`` shows the change from the unpatched target run."""
    path = fig_dir / f"position_heatmap_{metric}.cells.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("change_from_baseline"))
