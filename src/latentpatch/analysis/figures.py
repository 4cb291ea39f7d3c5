"""Figures of a run (PNG, and SVG on request, under ``RUN_DIR/figures/``), drawn from the results only.

Uses matplotlib's object API (:class:`matplotlib.figure.Figure`, Agg canvas), never pyplot, so
nothing global (backend, open figures) is touched. Every function takes the tidy tables of
:mod:`latentpatch.analysis.stats` and returns the paths it wrote; a figure whose data the run lacks (e.g.
no position sweep) is skipped, not an error. :func:`latentpatch.analysis.figure_set.make_figures` draws them all.

Files (``<name>.png``; ``<name>.svg`` too when asked for):
- ``layer_bars``: per layer mean ± bootstrap CI of KL, recovery, answer logit diff (layer sweep).
- ``position_heatmap_{kl,recovery,answer_logit_diff}``: layer x latent position means, top-5 marked.
- ``position_heatmap_pairs_{metric}``: the same per pair (:mod:`latentpatch.analysis.pair_figures`).
- ``pairs_layers``: pairs x layers heatmaps of the layer sweep.
- ``cumulative_trajectories``: cumulative patching, x = last patched position, one line per layer.
- ``chained_similarity``: chained/frozen activation cosine to clean and corrupted per position.
- ``modes_comparison``: chained vs parallel vs frozen per layer, mean ± CI.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.patches import Rectangle

from latentpatch.analysis.findings import RunLabels
from latentpatch.analysis.selection import all_positions_rows, mode_rows, primary_component_of
from latentpatch.names import KEY_METRICS, METRIC_LABELS, POSITION_MODE, TRACKED_MODES

#: Metrics of the layer bars and the position heatmaps.
HEATMAP_METRICS = KEY_METRICS
#: Metrics with a meaningful sign get a diverging map centred at 0; the others a sequential map.
DIVERGING = {"recovery", "answer_logit_diff", "act_bias"}
#: Colours of the compared iterative modes, in the order the comparison figure draws them.
MODE_COLOURS = {"chained": "#d95f02", "parallel": "#1b9e77", "frozen": "#7570b3"}
DPI = 110
#: Percentiles the per-pair heatmaps clip their colour scale at (outliers do not flatten the rest).
CLIP_PERCENTILES = (2.0, 98.0)


def page_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """The formats to write for a page: PNG first (the page embeds it), then the others as given.

    A fixed order, because each save lays the figure out again: PNG bytes depend on what was
    saved before them.

    >>> page_formats(["svg", "png", "pdf"])
    ('png', 'svg', 'pdf')
    """
    return tuple(dict.fromkeys(["png", *formats]))


def save_figure(fig: Figure, out_dir: Path, name: str, formats: Sequence[str]) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for each format; an SVG has no date and fixed ids,
    so the same figure gives the same bytes.

    The PNG is drawn once on an Agg canvas and its pixels written as they are (what ``savefig``
    writes, without its second, layout-only pass over the figure: half the cost of a figure).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        if fmt == "png":
            fig.set_dpi(DPI)
            canvas = FigureCanvasAgg(fig)
            canvas.draw()  # lays the figure out and renders it, measuring each text once
            imsave(path, np.asarray(canvas.buffer_rgba()), format="png", dpi=DPI)
        else:
            with rc_context({"svg.hashsalt": "latentpatch"}):  # SVG ids from a fixed salt, not a random one
                fig.savefig(path, dpi=DPI, metadata={"Date": None} if fmt == "svg" else None)
        paths.append(path)
    return paths


def colour_norm(metric: str, values: np.ndarray):
    """(norm, colour map) for ``values`` of ``metric``.

    Colour normalisation: symmetric around 0 for signed metrics whose values straddle 0 (a diverging
    map); otherwise a sequential map over the values' own range (from 0 for unsigned metrics).
    """
    finite = values[np.isfinite(values)]
    if metric in DIVERGING and finite.size and (finite.min() >= 0 or finite.max() <= 0):
        lo, hi = float(finite.min()), float(finite.max())
        return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0), "viridis"
    if metric in DIVERGING:
        lim = float(np.max(np.abs(finite))) if finite.size else 1.0
        lim = lim or 1.0
        return TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim), "RdBu_r"
    hi = float(finite.max()) if finite.size else 1.0
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0), "viridis"


def _of(summary: pd.DataFrame, metric: str, component: str | None) -> pd.DataFrame:
    """The summary rows of one metric and component."""
    return summary[(summary["metric"] == metric) & (summary["component"] == component)]


# ---------------------------------------------------------------------------------------------


def layer_bars(
    summary: pd.DataFrame, out_dir: Path, formats: Sequence[str] = ("png", "svg"), run: RunLabels | None = None
) -> list[Path]:
    """Bar chart per layer (mean over pairs, 95% bootstrap CI error bars) of KL, recovery, logit diff."""
    comp = primary_component_of(summary)
    data = {m: all_positions_rows(_of(summary, m, comp)).sort_values("layer") for m in HEATMAP_METRICS}
    data = {m: d for m, d in data.items() if not d.empty}
    if not data:
        return []
    fig = Figure(figsize=(4.2 * len(data), 3.6), layout="constrained")
    axes = fig.subplots(1, len(data), squeeze=False)[0]
    for ax, (metric, d) in zip(axes, data.items()):
        mean = d["mean"].to_numpy(float)
        err = np.vstack([mean - d["ci_low"].to_numpy(float), d["ci_high"].to_numpy(float) - mean])
        err = np.where(np.isfinite(err), np.clip(err, 0, None), 0)
        colours = ["#c44e52" if m < 0 else "#4c72b0" for m in mean]
        ax.bar(d["layer"], mean, yerr=err, color=colours, capsize=2, ecolor="#333333")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("layer")
        ax.set_ylabel((run or RunLabels()).label(metric))
        ax.set_xticks(d["layer"])
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Patching all latent positions at one layer ({comp}): mean over pairs ± 95% CI")
    return save_figure(fig, out_dir, "layer_bars", formats)


def mark_top(ax, grid: np.ndarray, top: int, x0: int = 0, y0: int = 0) -> None:
    """Outline and number the ``top`` cells of ``grid`` [layers, positions] with the largest |value|;
    the grid's cell (0, 0) is drawn at data coordinates (``x0``, ``y0``)."""
    flat = np.where(np.isfinite(grid), np.abs(grid), -np.inf).ravel()  # ranked by effect size
    order = np.argsort(-flat, kind="stable")[:top]
    for rank, idx in enumerate(order, start=1):
        if not np.isfinite(flat[idx]):
            continue
        r, c = divmod(int(idx), grid.shape[1])
        ax.add_patch(Rectangle((x0 + c - 0.5, y0 + r - 0.5), 1, 1, fill=False, ec="black", lw=1.8))
        ax.text(
            x0 + c,
            y0 + r,
            f"#{rank}\n{grid[r, c]:.2g}",
            ha="center",
            va="center",
            fontsize=7,
            color="black",
            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75),
        )


def draw_heatmap(
    ax,
    grid: np.ndarray,
    layers: np.ndarray,
    positions: np.ndarray,
    metric: str,
    norm,
    cmap,
    top: int = 5,
    annotate_top: bool = True,
):
    """Draw one layer (rows) x position (cols) heatmap (``grid`` [layers, positions]) on ``ax``;
    outline and number the ``top`` largest cells. Returns the image (for a colour bar)."""
    im = ax.imshow(grid, aspect="auto", origin="lower", norm=norm, cmap=cmap, interpolation="nearest")
    ax.set_xticks(range(len(positions)), [str(p) for p in positions])
    step = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]])
    ax.set_xlabel("latent position")
    ax.set_ylabel("layer")
    if annotate_top and top:
        mark_top(ax, grid, top)
    return im


def position_heatmaps(
    summary: pd.DataFrame,
    out_dir: Path,
    formats: Sequence[str] = ("png", "svg"),
    top: int = 5,
    run: RunLabels | None = None,
) -> list[Path]:
    """Layer x position heatmaps of the position sweep (mean over pairs), the top-``top`` cells (by
    |mean|) numbered. The answer logit diff is shown as the change from the unpatched target run
    when its baseline is known. Writes ``<name>.cells.json`` (the axes box in figure fractions) for
    the page's hover grid."""
    run = run or RunLabels()
    comp = primary_component_of(summary)
    paths: list[Path] = []
    for metric in HEATMAP_METRICS:
        d = mode_rows(_of(summary, metric, comp), "position", POSITION_MODE)
        if d.empty:
            continue
        piv = d.pivot(index="layer", columns="position", values="mean").sort_index().sort_index(axis=1)
        grid = piv.to_numpy(float)
        label, what = run.label(metric), f"mean {metric}"
        if metric == "answer_logit_diff" and run.baseline_ld is not None:
            grid = grid - run.baseline_ld
            label = f"Δ answer logit diff vs unpatched {run.target} run"
            what = f"Δ answer logit diff vs unpatched {run.target} ({run.baseline_ld:.3g})"
        norm, cmap = colour_norm(metric, grid)
        fig = Figure(
            figsize=(max(4.5, 2.2 + 0.75 * grid.shape[1]), max(3.5, 1.6 + 0.32 * grid.shape[0])), layout="constrained"
        )
        ax = fig.subplots()
        im = draw_heatmap(ax, grid, piv.index.to_numpy(), piv.columns.to_numpy(), metric, norm, cmap, top)
        fig.colorbar(im, ax=ax, label=label)
        ax.set_title(
            f"Position sweep ({comp}): {what}\n{int(d['n'].max())} pairs; boxes: top {top} |value|",
            fontsize=9,
        )
        name = f"position_heatmap_{metric}"
        # the layout as the PNG (the page's image) was saved: saving an SVG lays the figure out again
        paths += save_figure(fig, out_dir, name, [f for f in formats if f == "png"])
        layout = {
            "axes": [round(float(v), 6) for v in ax.get_position().bounds],
            "layers": [int(x) for x in piv.index],
            "positions": [int(x) for x in piv.columns],
            "change_from_baseline": bool(metric == "answer_logit_diff" and run.baseline_ld is not None),
        }
        (out_dir / f"{name}.cells.json").write_text(json.dumps(layout) + "\n")
        paths += save_figure(fig, out_dir, name, [f for f in formats if f != "png"])
    return paths


def pairs_layers(
    cells: pd.DataFrame, out_dir: Path, formats: Sequence[str] = ("png", "svg"), run: RunLabels | None = None
) -> list[Path]:
    """Pairs (rows) x layers (cols) heatmaps of the all-positions patch (layer sweep, else parallel)."""
    comp = primary_component_of(cells)
    d = all_positions_rows(cells[cells["component"] == comp])
    if d.empty:
        return []
    metrics = [m for m in HEATMAP_METRICS if m in d]
    pair_ids = list(dict.fromkeys(d["pair_id"]))
    flagged = set(d.loc[d["flagged"], "pair_id"]) if "flagged" in d else set()
    n_layers = d["layer"].nunique()
    fig = Figure(
        figsize=(1.0 + len(metrics) * max(3.6, 1.6 + 0.17 * n_layers), max(3.2, 1.6 + 0.11 * len(pair_ids))),
        layout="constrained",
    )
    # the panels share the pair axis: its (many) labels are measured and drawn once, on the first panel
    axes = fig.subplots(1, len(metrics), squeeze=False, sharey=True)[0]
    for k, (ax, metric) in enumerate(zip(axes, metrics)):
        piv = d.pivot(index="pair_id", columns="layer", values=metric).reindex(pair_ids).sort_index(axis=1)
        grid = piv.to_numpy(float)
        norm, cmap = colour_norm(metric, grid)
        im = ax.imshow(grid, aspect="auto", norm=norm, cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in piv.columns], fontsize=7)
        step = max(1, len(pair_ids) // 40)
        labels = [f"{p} *" if p in flagged else str(p) for p in pair_ids]
        ax.set_xlabel("layer")
        if k == 0:
            ax.set_yticks(range(0, len(pair_ids), step), labels[::step], fontsize=7)
            ax.set_ylabel("pair (* = flagged)")
        else:
            ax.tick_params(labelleft=False)
        fig.colorbar(im, ax=ax, label=(run or RunLabels()).label(metric), shrink=0.6, aspect=30)
    fig.suptitle(f"All latent positions patched at one layer ({comp}), per pair")
    return save_figure(fig, out_dir, "pairs_layers", formats)


def _strongest(values: pd.Series, k: int = 3) -> list:
    return list(values.sort_values(ascending=False).head(k).index)


def cumulative_trajectories(
    summary: pd.DataFrame,
    out_dir: Path,
    formats: Sequence[str] = ("png", "svg"),
    highlight: int = 3,
    run: RunLabels | None = None,
) -> list[Path]:
    """Cumulative patching (positions 0..n at one layer): mean KL and recovery vs n, one line per layer."""
    comp = primary_component_of(summary)
    data = {m: mode_rows(_of(summary, m, comp), "iterative", "cumulative") for m in ("kl", "recovery")}
    data = {m: d for m, d in data.items() if not d.empty}
    if not data:
        return []
    fig = Figure(figsize=(6.0 * len(data), 3.8), layout="constrained")
    axes = fig.subplots(1, len(data), squeeze=False)[0]
    for ax, (metric, d) in zip(axes, data.items()):
        piv = d.pivot(index="position", columns="layer", values="mean").sort_index()
        strong = _strongest(piv.iloc[-1], highlight)
        for layer in piv.columns:
            if layer in strong:
                continue
            ax.plot(piv.index, piv[layer], color="#bbbbbb", lw=0.9)
        for i, layer in enumerate(strong):
            ax.plot(piv.index, piv[layer], lw=2.2, marker="o", ms=4, color=f"C{i}", label=f"layer {layer}")
        ax.set_xticks(piv.index)
        ax.set_xlabel("thoughts patched: positions 0..n (n)")
        ax.set_ylabel((run or RunLabels()).label(metric))
        ax.legend(
            title=f"strongest {len(strong)}\n(grey: other layers)",
            fontsize=8,
            title_fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
        )
    fig.suptitle(f"Cumulative patching ({comp}): mean over pairs")
    return save_figure(fig, out_dir, "cumulative_trajectories", formats)


def chained_similarity(
    trajectories: pd.DataFrame | None,
    out_dir: Path,
    formats: Sequence[str] = ("png", "svg"),
    highlight: int = 3,
    run: RunLabels | None = None,
) -> list[Path]:
    """Chained (and frozen) patching: cosine of the generated activation to clean / corrupted per position."""
    if trajectories is None or trajectories.empty:
        return []
    modes = [m for m in TRACKED_MODES if (trajectories["mode"] == m).any()]
    if not modes:
        return []
    run = run or RunLabels()
    cols = [(c, METRIC_LABELS[c]) for c in ("act_cos_clean", "act_cos_corr", "act_bias") if c in trajectories]
    mean = trajectories.groupby(["mode", "layer", "position"])[[c for c, _ in cols]].mean()
    # a column whose means vary by less than float noise (e.g. cos to a run it equals) is no panel
    cols = [(c, label) for c, label in cols if np.nanmax(mean[c]) - np.nanmin(mean[c]) > 1e-5] or cols[:1]
    fig = Figure(figsize=(4.3 * len(cols), 3.3 * len(modes)), layout="constrained")
    axes = fig.subplots(len(modes), len(cols), squeeze=False, sharex=True)
    for r, mode in enumerate(modes):
        m = mean.loc[mode]
        strength = (
            m.groupby(level="layer")["act_bias"].mean()
            if "act_bias" in m
            else m.groupby(level="layer")[cols[0][0]].mean()
        )
        strong = _strongest(strength, highlight)
        for c, (col, label) in enumerate(cols):
            ax = axes[r, c]
            piv = m[col].unstack("layer").sort_index()
            ax.set_title(f"{mode}: {label}", fontsize=10)
            values = piv.to_numpy(float)
            if np.nanmax(values) - np.nanmin(values) < 1e-5:  # float noise around a constant: say so, no lines
                ax.text(
                    0.5,
                    0.5,
                    f"{np.nanmean(values):.5f} everywhere\n(no variation beyond float noise)",
                    ha="center",
                    transform=ax.transAxes,
                )
                ax.set_yticks([])
                continue
            for layer in piv.columns:
                if layer not in strong:
                    ax.plot(piv.index, piv[layer], color="#bbbbbb", lw=0.9)
            for i, layer in enumerate(strong):
                ax.plot(piv.index, piv[layer], lw=2.2, marker="o", ms=4, color=f"C{i}", label=f"layer {layer}")
                ref = run.reference_cos.get(int(layer))
                if col == "act_cos_clean" and ref:  # where the unpatched corrupted run already is
                    ys = [ref[int(q)] if int(q) < len(ref) else np.nan for q in piv.index]
                    unpatched = "unpatched cos(clean, corrupted)" if i == 0 else None
                    ax.plot(piv.index, ys, ls=(0, (3, 2)), lw=1.3, color="black", zorder=3, label=unpatched)
            ax.set_xticks(piv.index)
            ax.set_ylabel(label)
            if r == len(modes) - 1:
                ax.set_xlabel("later thought position")
            if c == 0:
                ax.legend(title="strongest\n(grey: others)", fontsize=8, title_fontsize=8, loc="best")
    fig.suptitle(
        f"Position 0 {run.values}; later thoughts generated (chained) or with inputs held {run.target} (frozen)"
    )
    return save_figure(fig, out_dir, "chained_similarity", formats)


def modes_comparison(
    summary: pd.DataFrame, out_dir: Path, formats: Sequence[str] = ("png", "svg"), run: RunLabels | None = None
) -> list[Path]:
    """Chained vs parallel vs frozen per layer: grouped bars, mean over pairs ± 95% CI."""
    comp = primary_component_of(summary)
    panels = []
    for metric in ("recovery", "kl", "answer_logit_diff"):
        of = _of(summary, metric, comp)
        per_mode = {}
        for mode in MODE_COLOURS:
            d = all_positions_rows(of, prefer="iterative") if mode == "parallel" else mode_rows(of, "iterative", mode)
            if not d.empty:
                per_mode[mode] = d.sort_values(["layer", "position"]).drop_duplicates("layer")
        if len(per_mode) >= 2:
            panels.append((metric, per_mode))
    if not panels:
        return []
    fig = Figure(figsize=(11, 3.0 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (metric, per_mode) in zip(axes, panels):
        width = 0.8 / len(per_mode)
        for i, (mode, d) in enumerate(per_mode.items()):
            x = d["layer"].to_numpy() + (i - (len(per_mode) - 1) / 2) * width
            mean = d["mean"].to_numpy(float)
            err = np.vstack([mean - d["ci_low"].to_numpy(float), d["ci_high"].to_numpy(float) - mean])
            err = np.where(np.isfinite(err), np.clip(err, 0, None), 0)
            ax.bar(x, mean, width, yerr=err, capsize=1.5, label=mode, color=MODE_COLOURS[mode], ecolor="#333333")
        layers = sorted(set().union(*[set(d["layer"]) for d in per_mode.values()]))
        ax.set_xticks(layers)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel((run or RunLabels()).label(metric), fontsize=9)
        ax.legend(fontsize=8, ncols=3, loc="best")
    axes[-1].set_xlabel("layer")
    fig.suptitle(f"Chained vs parallel vs frozen ({comp}): mean over pairs ± 95% CI")
    return save_figure(fig, out_dir, "modes_comparison", formats)
