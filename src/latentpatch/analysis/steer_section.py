"""The report's steering section (docs/method.md §16) in the one skeleton.

Finding and tables from ``stats.json``'s ``steer`` and its ``contrasts`` (direction - random controls of
the same norm, paired over pairs, at the best site); figures: the answers moved to the source run per
alpha at the best site (direction vs random), and a layer x thought map of that rate at each site
for the largest alpha (values on hover).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from latentpatch.analysis.contrasts import find_contrast
from latentpatch.analysis.figures import DPI, save_figure
from latentpatch.analysis.hover import grid_hover_figure
from latentpatch.analysis.html import escape, fmt, table
from latentpatch.analysis.sections import figure, note
from latentpatch.analysis.skeleton import ExperimentSection, Quote
from latentpatch.analysis.steps_figures import save_map
from latentpatch.rundir import RunPaths

METHOD = "docs/method.md §16"


def _frame(stats: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(stats["steer"]["summary"])
    for c in ("mean", "ci_low", "ci_high", "n", "alpha"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    return frame


def alpha_figure(summary: pd.DataFrame, layer: int, position: int, fig_dir: Path, formats: Sequence[str]) -> bool:
    """``steer_alpha``: answers moved to the source run vs alpha at the best site, direction and random."""
    at = summary[(summary["layer"] == layer) & (summary["position"] == position)]
    if at.empty:
        return False
    fig = Figure(figsize=(8, 3.2), dpi=DPI)
    for k, (metric, label) in enumerate(
        (("to_source", "answers moved to the source run"), ("answer_logit_diff", "answer logit diff"))
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        for kind, colour in (("direction", "#1b9e77"), ("random", "#888888")):
            rows = at[(at["kind"] == kind) & (at["metric"] == metric)].sort_values("alpha")
            x, mean = rows["alpha"].to_numpy(float), rows["mean"].to_numpy(float)
            err = np.vstack([mean - rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float) - mean])
            ax.errorbar(x, mean, yerr=np.nan_to_num(np.abs(err)), marker="o", capsize=3, color=colour, label=kind)
        ax.set_xlabel("alpha (x the site's typical clean/corrupted difference)")
        ax.set_title(label, fontsize=9)
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle(f"Steering at layer {layer}, thought {position}: mean over pairs, 95% CI", fontsize=9)
    fig.tight_layout()
    save_figure(fig, fig_dir, "steer_alpha", formats)
    return True


def site_map(summary: pd.DataFrame, fig_dir: Path, formats: Sequence[str]) -> dict[tuple[str, str], str]:
    """``steer_sites``: the direction's rate of answers moved to the source run per layer x thought at
    the largest alpha; returns the hover tips."""
    alpha = summary["alpha"].max()
    rows = summary[(summary["kind"] == "direction") & (summary["metric"] == "to_source") & (summary["alpha"] == alpha)]
    layers, positions = sorted(rows["layer"].unique()), sorted(rows["position"].unique())
    grid = np.full((len(layers), len(positions)), np.nan)
    tips = {}
    for r in rows.itertuples():
        i, j = layers.index(r.layer), positions.index(r.position)
        grid[i, j] = r.mean
        tips[(str(r.layer), str(r.position))] = (
            f"layer {r.layer}, thought {r.position}, alpha {fmt(alpha)}: moved {fmt(r.mean)}, "
            f"95% CI [{fmt(r.ci_low)}, {fmt(r.ci_high)}], n {int(r.n)}"
        )
    fig = Figure(
        figsize=(max(4.5, 1.8 + 0.7 * len(positions)), max(3.0, 1.4 + 0.35 * len(layers))), layout="constrained"
    )
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(positions)), [str(p) for p in positions])
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("thought p")
    ax.set_ylabel("layer")
    ax.set_title(f"Answers moved to the source run, alpha {fmt(alpha)}", fontsize=9)
    fig.colorbar(im, ax=ax)
    save_map(fig, ax, fig_dir, "steer_sites", formats, [str(x) for x in layers], [str(p) for p in positions], "lower")
    return tips


def _finding(stats: dict[str, Any]) -> str:
    q, steer = Quote(stats), stats["steer"]
    best = steer["best"]
    rows = [
        (i, r)
        for i, r in enumerate(steer["summary"])
        if r["kind"] == "direction"
        and r["metric"] == "to_source"
        and (r["layer"], r["position"]) == (best["layer"], best["position"])
    ]
    i, top = max(rows, key=lambda ir: (ir[1]["mean"] or 0, ir[1]["alpha"]))
    at = ("steer", "summary", i)
    text = (
        f"Adding the {q.num('steer', 'direction')} direction at layer {q.num(*at, 'layer')}, thought "
        f"{q.num(*at, 'position')} (where it moves the most answers; alpha {q.num(*at, 'alpha')}) gives the source "
        f"run's answer in {q.count((*at, 'mean'), (*at, 'n'))} pairs"
    )
    k = find_contrast(
        stats,
        "steer",
        "direction vs random: to_source",
        layer=best["layer"],
        position=best["position"],
        alpha=top["alpha"],
    )
    if k is not None:
        text += f"; that is {q.compare(k, than='random directions of the same norm')}"
    return text + "."


def steer_section(run_dir: Path, formats: Sequence[str], stats: dict[str, Any]) -> ExperimentSection | None:
    """The ``steer`` section; None when the run has no steering."""
    if not stats.get("steer"):
        return None
    fig_dir = RunPaths(run_dir).figures
    summary = _frame(stats)
    best = stats["steer"]["best"]
    figures = ""
    if alpha_figure(summary, best["layer"], best["position"], fig_dir, formats):
        figures += figure(
            fig_dir, "steer_alpha", "At the best site: the direction vs random directions of the same norm."
        )
    figures += grid_hover_figure(
        fig_dir,
        "steer_sites",
        "Every steered site at the largest alpha; hover a cell for its CI and n.",
        site_map(summary, fig_dir, formats),
    )
    at = summary[(summary["layer"] == best["layer"]) & (summary["position"] == best["position"])]
    compact_rows = []
    for alpha, g in at.groupby("alpha", sort=True):
        cells = [fmt(alpha)]
        for kind in ("direction", "random"):
            for metric in ("to_source", "answer_logit_diff", "kl"):
                r = g[(g["kind"] == kind) & (g["metric"] == metric)]
                cells.append(
                    f"{fmt(r['mean'].iloc[0])} [{fmt(r['ci_low'].iloc[0])}, {fmt(r['ci_high'].iloc[0])}]"
                    if len(r)
                    else "–"
                )
        compact_rows.append(cells)
    header = ["alpha"] + [f"{k}: {m}" for k in ("direction", "random") for m in ("moved", "logit diff", "KL")]
    full = table(
        ["kind", "layer", "thought", "alpha", "metric", "n", "mean [95% CI]"],
        [
            [
                escape(r.kind),
                str(r.layer),
                str(r.position),
                fmt(r.alpha),
                escape(r.metric),
                str(int(r.n)),
                f"{fmt(r.mean)} [{fmt(r.ci_low)}, {fmt(r.ci_high)}]",
            ]
            for r in summary.itertuples()
        ],
        left=1,
    )
    return ExperimentSection(
        "steer",
        _finding(stats),
        notes=note(
            "alpha x the site's typical clean/corrupted difference (mean over pairs of |source - target| there) "
            "times a unit direction, added at one thought at one layer; later thoughts regenerate. The random "
            f"directions ({stats['steer']['n_controls']} per site, seeded) are added with the same norm; 'moved' = "
            "the fraction of pairs whose answer becomes the source run's."
        ),
        figures=figures,
        table="<h3>At the best site, per alpha</h3>" + table(header, compact_rows, left=1),
        folded=((f"Every site and alpha ({len(summary)} rows)", full),),
        method=METHOD,
    )
