"""``position_heatmap_pairs_{metric}``: the position sweep's layer x position heatmaps of the first
pairs, side by side on one colour scale (the figures' conventions are those of
:mod:`latentpatch.analysis.figures`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from latentpatch.analysis.figures import CLIP_PERCENTILES, HEATMAP_METRICS, colour_norm, mark_top, save_figure
from latentpatch.analysis.findings import RunLabels
from latentpatch.analysis.selection import mode_rows, primary_component_of
from latentpatch.names import POSITION_MODE

__all__ = ["position_heatmaps_per_pair"]


def _pair_grids(d: pd.DataFrame, pair_ids: list, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([pairs, layers, positions] values of ``metric``, layers, positions): each pair on the union axes."""
    piv = d.pivot_table(index=["pair_id", "layer"], columns="position", values=metric, aggfunc="first", dropna=False)
    layers = np.sort(d["layer"].unique())
    positions = np.sort(d["position"].unique())
    full = pd.MultiIndex.from_product([pair_ids, layers], names=["pair_id", "layer"])
    grid = piv.reindex(index=full, columns=positions).to_numpy(float)
    return grid.reshape(len(pair_ids), len(layers), len(positions)), layers, positions


def position_heatmaps_per_pair(
    cells: pd.DataFrame,
    out_dir: Path,
    formats: Sequence[str] = ("png", "svg"),
    max_pairs: int = 6,
    run: RunLabels | None = None,
) -> list[Path]:
    """Small multiples: layer x position heatmaps for the first ``max_pairs`` pairs, one colour scale.

    Drawn as one image on one axes (the pairs' grids side by side, a blank cell between them), not
    one axes per pair: the layout engine then measures one set of ticks instead of ``max_pairs``,
    which made this figure the slowest of the report.
    """
    comp = primary_component_of(cells)
    d = mode_rows(cells[cells["component"] == comp], "position", POSITION_MODE)
    if d.empty:
        return []
    pair_ids = list(dict.fromkeys(d["pair_id"]))[:max_pairs]
    d = d[d["pair_id"].isin(pair_ids)]
    flagged = set(d.loc[d["flagged"], "pair_id"]) if "flagged" in d else set()
    ncol = min(3, len(pair_ids))
    nrow = int(np.ceil(len(pair_ids) / ncol))
    paths: list[Path] = []
    for metric in HEATMAP_METRICS:
        if metric not in d:
            continue
        grids, layers, positions = _pair_grids(d, pair_ids, metric)  # [pairs, layers, positions]
        n_layers, n_pos = grids.shape[1:]
        finite = grids[np.isfinite(grids)]
        allv = finite
        if finite.size:  # the colour scale from the 2nd..98th percentile: an outlier does not flatten the rest
            allv = np.clip(finite, *np.percentile(finite, CLIP_PERCENTILES))
        norm, cmap = colour_norm(metric, allv)
        # mosaic [rows, cols]: pair k at block (k // ncol, k % ncol), top row first; NaN = blank
        mosaic = np.full((nrow * (n_layers + 1) - 1, ncol * (n_pos + 1) - 1), np.nan)
        offsets = []
        for k in range(len(pair_ids)):
            y0, x0 = (nrow - 1 - k // ncol) * (n_layers + 1), (k % ncol) * (n_pos + 1)
            mosaic[y0 : y0 + n_layers, x0 : x0 + n_pos] = grids[k]
            offsets.append((x0, y0))
        fig = Figure(
            figsize=(1.2 + ncol * (1.0 + 0.5 * n_pos), 1.0 + nrow * (0.8 + 0.2 * n_layers)), layout="constrained"
        )
        ax = fig.subplots()
        im = ax.imshow(mosaic, aspect="auto", origin="lower", norm=norm, cmap=cmap, interpolation="nearest")
        ax.set_frame_on(False)
        for k, (pid, (x0, y0)) in enumerate(zip(pair_ids, offsets)):
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), n_pos, n_layers, fill=False, ec="black", lw=0.8))
            mark_top(ax, grids[k], 1, x0, y0)
            ax.text(
                x0 + (n_pos - 1) / 2,
                y0 + n_layers - 0.4,
                f"pair {pid}" + (" (flagged)" if pid in flagged else ""),
                ha="center",
                va="bottom",
                fontsize=9,
                color="#b00" if pid in flagged else "black",
            )
        step = max(1, n_layers // 16)
        ax.set_xticks(
            [c * (n_pos + 1) + i for c in range(ncol) for i in range(n_pos)],
            [str(p) for _ in range(ncol) for p in positions],
        )
        ax.set_yticks(
            [r * (n_layers + 1) + i for r in range(nrow) for i in range(0, n_layers, step)],
            [str(layer) for _ in range(nrow) for layer in layers[::step]],
        )
        ax.set_xlabel("latent position")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label=(run or RunLabels()).label(metric), shrink=0.9)
        lo, hi = CLIP_PERCENTILES
        fig.suptitle(f"Position sweep per pair: {metric} (box = strongest cell; colours clipped at p{lo:g}–p{hi:g})")
        paths += save_figure(fig, out_dir, f"position_heatmap_pairs_{metric}", formats)
    return paths
