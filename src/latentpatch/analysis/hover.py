"""Hover on the report's heatmaps: a transparent grid of cells over the embedded PNG, each with an
HTML ``title`` (mean, 95% CI, n), so the page stays one self-contained file without a script.

The grid's place comes from ``figures/<name>.cells.json``, written with the heatmap by
:func:`latentpatch.analysis.figures.position_heatmaps` (the axes box in figure fractions).
"""

from __future__ import annotations

import json
from pathlib import Path

from latentpatch.analysis.html import embed_png, escape, fmt


def hover_figure(fig_dir: Path, name: str, caption: str, cells: list[dict]) -> str:
    """:func:`figure` with a transparent grid over the heatmap's cells: hovering one shows its mean,
    CI and n (an HTML ``title``; no script). The grid's place comes from ``figures/<name>.cells.json``
    (axes box in figure fractions, written with the figure); without it, the plain figure."""
    html = embed_png(fig_dir / f"{name}.png", caption)
    layout_path = fig_dir / f"{name}.cells.json"
    if not html or not layout_path.is_file():
        return html
    layout = json.loads(layout_path.read_text())
    x0, y0, w, h = layout["axes"]
    layers, positions = layout["layers"], layout["positions"]
    by_cell = {(c["layer"], c["position"]): c for c in cells}
    boxes = []
    for r, layer in enumerate(layers):
        for k, pos in enumerate(positions):
            c = by_cell.get((layer, pos))
            if c is None:
                continue
            ci = f"[{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]"
            tip = f"layer {layer}, thought {pos}: mean {fmt(c['mean'])}, 95% CI {ci}, n {c['n']}"
            left, top = 100 * (x0 + w * k / len(positions)), 100 * (1 - y0 - h * (r + 1) / len(layers))
            boxes.append(
                f'<span class="cell" title="{escape(tip)}" style="left:{left:.3f}%;top:{top:.3f}%;'
                f'width:{100 * w / len(positions):.3f}%;height:{100 * h / len(layers):.3f}%"></span>'
            )
    return html.replace("<img ", '<span class="hover">' + "".join(boxes) + "<img ", 1).replace(
        "<figcaption>", "</span><figcaption>", 1
    )


def heatmap_shows_change(fig_dir: Path, metric: str) -> bool:
    """Whether the heatmap of ``metric`` shows the change from the unpatched target run."""
    path = fig_dir / f"position_heatmap_{metric}.cells.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("change_from_baseline"))
