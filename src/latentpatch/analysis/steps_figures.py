"""Figures of the step-level analyses (docs/method.md §13), drawn from their summary tables.

Files (``<name>.png`` and ``<name>.svg`` under ``figures/``):
- ``early_answers``: accuracy and P(final answer) vs k thoughts, mean ± 95% CI.
- ``influence_<replacement>``: the K x K matrix of mean relative L2 change of thought j (columns)
  after an intervention at step i (rows).
- ``thought_bars``: answer flip rate per step (and "all") and replacement, one panel per site.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from latentpatch.analysis.figures import DPI, save_figure

#: Colours of the thought replacements, in :data:`latentpatch.names.STEP_REPLACEMENTS` order.
REPLACEMENT_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")


def _errbar(ax, x: np.ndarray, tab: pd.DataFrame, label: str, **kw) -> None:
    mean = tab["mean"].to_numpy(float)
    err = np.vstack([mean - tab["ci_low"].to_numpy(float), tab["ci_high"].to_numpy(float) - mean])
    ax.errorbar(x, mean, yerr=np.nan_to_num(np.abs(err)), marker="o", capsize=3, label=label, **kw)


def early_figure(summary: pd.DataFrame, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """``summary``: :func:`latentpatch.analysis.steps_section.early_summary` rows (metric, k, mean, CI)."""
    if summary.empty:
        return []
    fig = Figure(figsize=(6, 3.6), dpi=DPI)
    ax = fig.add_subplot()
    for metric, label in (("correct", "accuracy"), ("p_final", "P(final answer)")):
        tab = summary[summary["metric"] == metric].sort_values("k")
        _errbar(ax, tab["k"].to_numpy(), tab, label)
    ax.set_xlabel("k thoughts before [EOT]")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Early answers S(k): mean over pairs, 95% CI")
    ax.legend(frameon=False)
    fig.tight_layout()
    return save_figure(fig, out_dir, "early_answers", formats)


def influence_figures(matrices: dict[str, np.ndarray], out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """``matrices[replacement]``: [K, K] mean relative L2 change of thought j after step i."""
    paths: list[Path] = []
    for rep, mat in matrices.items():
        fig = Figure(figsize=(4.8, 4), dpi=DPI)
        ax = fig.add_subplot()
        im = ax.imshow(mat, cmap="viridis", vmin=0)
        K = mat.shape[0]
        ax.set_xticks(range(K))
        ax.set_yticks(range(K))
        ax.set_xlabel("thought j (changed)")
        ax.set_ylabel("step i (intervened)")
        ax.set_title(f"Influence ({rep}): |Δ thought j| / |thought j|")
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        paths += save_figure(fig, out_dir, f"influence_{rep}", formats)
    return paths


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
