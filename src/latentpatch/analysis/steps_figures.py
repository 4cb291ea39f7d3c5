"""Figures of the step-level analyses (docs/method.md §13), drawn from their summary tables.

Files (``<name>.png`` and ``<name>.svg`` under ``figures/``):
- ``early_answers``: accuracy and P(final answer) vs k thoughts, mean ± 95% CI.
- ``influence_<replacement>``: the K x K matrix of mean relative L2 change of thought j (columns)
  after an intervention at step i (rows).
- ``thought_bars``: answer flip rate per step (and "all") and replacement, one panel per site.
- ``thought_flips``: the same flip rates as a map, rows "site · replacement", columns thought p ("all" last).

The maps (``influence_<replacement>``, ``thought_flips``) also write ``<name>.cells.json``
(:func:`latentpatch.analysis.hover.write_grid_layout`) for the page's hover grid; :func:`influence_tips`
and :func:`thought_tips` give the titles, keyed by the same (row label, column label).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from latentpatch.analysis.figures import DPI, save_figure
from latentpatch.analysis.hover import write_grid_layout
from latentpatch.analysis.html import fmt
from latentpatch.names import ALL_POSITIONS

#: The colour map of the flip-rate map (sequential, 0..1).
FLIP_CMAP = "viridis"
#: Largest map whose cells get their value written in them (columns, rows).
ANNOTATE_MAX = (12, 16)
#: Separator of a flip-rate map's row label: f"{site}{ROW_SEP}{replacement}".
ROW_SEP = " · "

#: Colours of the thought replacements, in :data:`latentpatch.names.STEP_REPLACEMENTS` order.
REPLACEMENT_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")


def _errbar(ax, x: np.ndarray, tab: pd.DataFrame, label: str, **kw) -> None:
    mean = tab["mean"].to_numpy(float)
    err = np.vstack([mean - tab["ci_low"].to_numpy(float), tab["ci_high"].to_numpy(float) - mean])
    ax.errorbar(x, mean, yerr=np.nan_to_num(np.abs(err)), marker="o", capsize=3, label=label, **kw)


def early_figure(summary: pd.DataFrame, out_dir: Path, formats: Sequence[str], unit: str = "thoughts") -> list[Path]:
    """``summary``: :func:`latentpatch.analysis.steps_section.early_summary` rows (metric, k, mean, CI);
    ``unit``: what k counts (PCCoT: Jacobi rounds)."""
    if summary.empty:
        return []
    fig = Figure(figsize=(6, 3.6), dpi=DPI)
    ax = fig.add_subplot()
    for metric, label in (("correct", "accuracy"), ("p_final", "P(final answer)")):
        tab = summary[summary["metric"] == metric].sort_values("k")
        _errbar(ax, tab["k"].to_numpy(), tab, label)
    ax.set_xlabel(f"k {unit} before [EOT]")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Early answers S(k): mean over pairs, 95% CI")
    ax.legend(frameon=False)
    fig.tight_layout()
    return save_figure(fig, out_dir, "early_answers", formats)


def save_map(
    fig: Figure, ax, out_dir: Path, name: str, formats: Sequence[str], rows: list[str], cols: list[str], origin: str
) -> list[Path]:
    """:func:`~latentpatch.analysis.figures.save_figure` of a map drawn on ``ax``, with its hover layout
    (:func:`~latentpatch.analysis.hover.write_grid_layout`) taken as the PNG has it: the PNG first, then
    ``<name>.cells.json``, then the other formats (a save in another format may lay the figure out
    again). Returns the paths of the figure files (PNG first)."""
    paths = save_figure(fig, out_dir, name, [f for f in formats if f == "png"])
    write_grid_layout(out_dir, name, ax, rows, cols, origin)
    return paths + save_figure(fig, out_dir, name, [f for f in formats if f != "png"])


def influence_figures(matrices: dict[str, np.ndarray], out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """``matrices[replacement]``: [K, K'] mean relative L2 change of thought j (column) after step i (row).

    Writes ``influence_<replacement>.<fmt>`` and ``influence_<replacement>.cells.json`` (rows: step
    labels "0".."K-1", cols: thought labels "0".."K'-1", origin "upper": step 0 at the top; the keys of
    :func:`influence_tips`). Returns the figure paths."""
    paths: list[Path] = []
    for rep, mat in matrices.items():
        fig = Figure(figsize=(4.8, 4), dpi=DPI)
        ax = fig.add_subplot()
        im = ax.imshow(mat, cmap="viridis", vmin=0, origin="upper")
        ax.set_xticks(range(mat.shape[1]))
        ax.set_yticks(range(mat.shape[0]))
        ax.set_xlabel("thought j (changed)")
        ax.set_ylabel("step i (intervened)")
        ax.set_title(f"Influence ({rep}): |Δ thought j| / |thought j|")
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        rows, cols = [str(i) for i in range(mat.shape[0])], [str(j) for j in range(mat.shape[1])]
        paths += save_map(fig, ax, out_dir, f"influence_{rep}", formats, rows, cols, "upper")
    return paths


def _n(n) -> str:
    """A count for a tip: the integer, '–' where missing."""
    return str(int(n)) if n is not None and np.isfinite(float(n)) else "–"


def _ci(row) -> str:
    return f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"


def influence_tips(later_summary: pd.DataFrame, rep: str) -> dict[tuple[str, str], str]:
    """Hover titles of ``influence_<rep>``: {(step label, thought label): text} from the ``later``
    summary (:func:`~latentpatch.analysis.step_stats.step_stats`; columns replacement, step, later,
    metric, n, mean, ci_low, ci_high), one per (step i, later thought j) it has (j > i), with the
    cosine appended where it has ``thought_cos`` rows.

    >>> later = pd.DataFrame([dict(replacement="zero", step=0, later=1, metric=m, n=4, mean=v, ci_low=v - 0.1,
    ...                            ci_high=v + 0.1) for m, v in (("thought_rel_l2", 0.5), ("thought_cos", 0.9))])
    >>> influence_tips(later, "zero")
    {('0', '1'): 'step 0 → thought 1: relative L2 0.5, 95% CI [0.4, 0.6], n 4; cos 0.9'}
    """
    if later_summary.empty:
        return {}
    sub = later_summary[later_summary["replacement"].astype(str) == str(rep)]
    cos = {(int(r["step"]), int(r["later"])): r["mean"] for _, r in sub[sub["metric"] == "thought_cos"].iterrows()}
    tips = {}
    for _, r in sub[sub["metric"] == "thought_rel_l2"].iterrows():
        i, j = int(r["step"]), int(r["later"])
        tip = f"step {i} → thought {j}: relative L2 {fmt(r['mean'])}, 95% CI {_ci(r)}, n {_n(r['n'])}"
        tips[(str(i), str(j))] = tip + (f"; cos {fmt(cos[(i, j)])}" if (i, j) in cos else "")
    return tips


def position_label(p: int) -> str:
    """The column label of thought position ``p`` in the flip-rate map: "all" for every thought.

    >>> position_label(-1), position_label(2)
    ('all', '2')
    """
    return "all" if p == ALL_POSITIONS else str(p)


def thought_grid(summary: pd.DataFrame) -> tuple[np.ndarray, list[str], list[str]]:
    """The flip-rate map of the thought experiment: ([rows, cols] mean of metric "flipped", row labels,
    col labels). Rows: (site, replacement) in order of appearance, labelled f"{site} · {replacement}";
    cols: thought positions ascending, the all-positions one (-1) last as "all"; NaN where missing.

    >>> s = pd.DataFrame(dict(site="thought", replacement=["zero", "zero", "mean"], position=[-1, 0, 1],
    ...                       metric="flipped", mean=[0.5, 0.25, 1.0]))
    >>> grid, rows, cols = thought_grid(s)
    >>> grid.tolist(), rows, cols
    ([[0.25, nan, 0.5], [nan, 1.0, nan]], ['thought · zero', 'thought · mean'], ['0', '1', 'all'])
    """
    if summary.empty:
        return np.full((0, 0), np.nan), [], []
    tab = summary[summary["metric"] == "flipped"]
    keys = list(dict.fromkeys(zip(tab["site"].astype(str), tab["replacement"].astype(str))))
    positions = sorted({int(p) for p in tab["position"]}, key=lambda p: (p == ALL_POSITIONS, p))
    row_of, col_of = {k: i for i, k in enumerate(keys)}, {p: k for k, p in enumerate(positions)}
    grid = np.full((len(keys), len(positions)), np.nan)
    for site, rep, p, mean in zip(tab["site"], tab["replacement"], tab["position"], tab["mean"]):
        grid[row_of[(str(site), str(rep))], col_of[int(p)]] = np.nan if mean is None else float(mean)
    return grid, [f"{s}{ROW_SEP}{r}" for s, r in keys], [position_label(p) for p in positions]


def thought_heatmap(
    summary: pd.DataFrame, out_dir: Path, formats: Sequence[str], annotate: bool | None = None
) -> list[Path]:
    """The thought experiment's answer flip rate as a map (:func:`thought_grid`: rows "site · replacement",
    cols thought p then "all"), colour 0..1, each value written in its cell when ``annotate`` (default:
    when the map has at most 12 columns and 16 rows).

    ``summary``: :func:`~latentpatch.analysis.step_stats.summarize` rows of the thought experiment
    (site, replacement, position, metric, n, mean, ...). Writes ``thought_flips.<fmt>`` and
    ``thought_flips.cells.json`` (origin "upper": the first row at the top; the keys of
    :func:`thought_tips`). Returns the figure paths; ``[]`` without "flipped" rows.
    """
    grid, rows, cols = thought_grid(summary)
    if not grid.size:
        return []
    n_rows, n_cols = grid.shape
    fig = Figure(figsize=(max(4.5, 2.8 + 0.55 * n_cols), max(2.6, 1.5 + 0.38 * n_rows)), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    cmap, norm = colormaps[FLIP_CMAP].with_extremes(bad="#eeeeee"), Normalize(0.0, 1.0)
    im = ax.imshow(grid, aspect="auto", origin="upper", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(n_cols), cols)
    ax.set_yticks(range(n_rows), rows, fontsize=8)
    ax.set_xlabel("thought p intervened on (all = every thought)")
    if annotate is None:
        annotate = n_cols <= ANNOTATE_MAX[0] and n_rows <= ANNOTATE_MAX[1]
    if annotate:
        for (r, k), v in np.ndenumerate(grid):
            if np.isfinite(v):
                red, green, blue, _ = cmap(norm(v))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(k, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="answer flip rate")
    flips = summary[summary["metric"] == "flipped"]
    pairs = f"up to {_n(flips['n'].max())} pairs" if "n" in flips else "pairs"
    ax.set_title(f"Answer flip rate after an intervention at thought p (mean over {pairs})", fontsize=9)
    return save_map(fig, ax, out_dir, "thought_flips", formats, rows, cols, "upper")


def thought_tips(summary: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Hover titles of ``thought_flips``: {(row label, col label) as in :func:`thought_grid`: text}, one
    per "flipped" row of ``summary``.

    >>> s = pd.DataFrame([dict(site="thought", replacement="zero", position=-1, metric="flipped", n=8,
    ...                        mean=0.5, ci_low=0.25, ci_high=0.75)])
    >>> thought_tips(s)
    {('thought · zero', 'all'): 'site thought, replacement zero, thought all: flip rate 0.5, 95% CI [0.25, 0.75], n 8'}
    """
    tips: dict[tuple[str, str], str] = {}
    if summary.empty:
        return tips
    for _, r in summary[summary["metric"] == "flipped"].iterrows():
        site, rep, pos = str(r["site"]), str(r["replacement"]), position_label(int(r["position"]))
        what = f"site {site}, replacement {rep}, thought {pos}"
        tips[(f"{site}{ROW_SEP}{rep}", pos)] = f"{what}: flip rate {fmt(r['mean'])}, 95% CI {_ci(r)}, n {_n(r['n'])}"
    return tips


def thought_figure(summary: pd.DataFrame, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """``summary``: :func:`latentpatch.analysis.steps_section.thought_summary` rows; bars of the flip rate."""
    tab = summary[summary["metric"] == "flipped"]
    if tab.empty:
        return []
    sites = list(dict.fromkeys(tab["site"]))
    reps = list(dict.fromkeys(tab["replacement"]))
    fig = Figure(figsize=(7.5, 3.2 * len(sites)), dpi=DPI)
    for n, site in enumerate(sites):
        ax = fig.add_subplot(len(sites), 1, n + 1)
        positions = sorted(set(tab["position"]), key=lambda p: (p < 0, p))
        x = np.arange(len(positions))
        width = 0.8 / len(reps)
        for r, rep in enumerate(reps):
            sub = tab[(tab["site"] == site) & (tab["replacement"] == rep)].set_index("position")
            means = [float(sub["mean"].get(p, np.nan)) for p in positions]
            ax.bar(x + r * width, means, width, label=rep, color=REPLACEMENT_COLOURS[r % len(REPLACEMENT_COLOURS)])
        ax.set_xticks(x + 0.4 - width / 2, ["all" if p < 0 else str(p) for p in positions])
        ax.set_ylim(0, 1)
        ax.set_ylabel("answer flip rate")
        ax.set_title(f"site {site}: intervention at thought p")
        ax.legend(frameon=False, ncol=len(reps), fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_dir, "thought_bars", formats)
