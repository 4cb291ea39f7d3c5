"""The report's DAS section (docs/method.md §20) in the one skeleton.

Finding and tables from ``stats.json``'s ``das`` and its ``contrasts`` (trained subspace - random
rotation, trained - shuffled-label control, paired over the held-out examples at the best (site, k));
figure: the trained subspace's IIA per site x k as a map (values on hover), with the full interchange
(k = d) as its last column.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from latentpatch.analysis.contrasts import find_contrast
from latentpatch.analysis.hover import grid_hover_figure
from latentpatch.analysis.html import escape, fmt, table
from latentpatch.analysis.sections import note
from latentpatch.analysis.skeleton import ExperimentSection, Quote
from latentpatch.analysis.steps_figures import save_map
from latentpatch.rundir import RunPaths

METHOD = "docs/method.md §20"


def _frame(stats: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(stats["das"]["summary"])
    for c in ("mean", "ci_low", "ci_high", "n", "k"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    return frame


def _cell(r: Any) -> str:
    return f"{fmt(r.mean)} [{fmt(r.ci_low)}, {fmt(r.ci_high)}]"


def iia_map(summary: pd.DataFrame, fig_dir: Path, formats: Sequence[str]) -> dict[tuple[str, str], str]:
    """``das_iia``: the trained subspace's IIA per site (rows) x k (columns; the last, d, is the full
    interchange); returns the hover tips."""
    rows = summary[summary["method"].isin(["das", "full"])]
    sites = list(dict.fromkeys(summary["site"]))
    ks = [str(k) for k in sorted(rows["k"].unique())]
    grid = np.full((len(sites), len(ks)), np.nan)
    tips = {}
    for r in rows.itertuples():
        i, j = sites.index(r.site), ks.index(str(r.k))
        grid[i, j] = r.mean
        what = "full interchange" if r.method == "full" else "trained"
        tips[(r.site, str(r.k))] = f"{r.site}, k {r.k} ({what}): IIA {_cell(r)}, n {int(r.n)}"
    fig = Figure(figsize=(max(4.5, 1.8 + 0.7 * len(ks)), max(3.0, 1.4 + 0.35 * len(sites))), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", origin="upper", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(ks)), ks)
    ax.set_yticks(range(len(sites)), sites)
    ax.set_xlabel("subspace size k (last: k = d, the whole site)")
    ax.set_title("Interchange-intervention accuracy on held-out pairs", fontsize=9)
    fig.colorbar(im, ax=ax)
    save_map(fig, ax, fig_dir, "das_iia", formats, sites, ks, "upper")
    return tips


def _finding(stats: dict[str, Any]) -> str:
    q, das = Quote(stats), stats["das"]
    best = das["best"]
    i = next(
        j
        for j, r in enumerate(das["summary"])
        if r["site"] == best["site"] and r["k"] == best["k"] and r["method"] == "das"
    )
    at = ("das", "summary", i)
    text = (
        f"For the variable {escape(das['variable'])}, the trained {q.num('das', 'best', 'k')}-dimensional subspace of "
        f"{escape(best['site'])} (the best site and k) gives the counterfactual answer in "
        f"{q.count((*at, 'mean'), (*at, 'n'))} held-out pairs (IIA {q.ci(*at)})"
    )
    for word, name, than in (
        ("that is", "trained vs random rotation: IIA", "a random rotation of the same k"),
        ("and", "trained vs shuffled labels: IIA", "the same k trained on shuffled counterfactuals"),
    ):
        k = find_contrast(stats, "das", name, site=best["site"], k=best["k"])
        if k is not None:
            text += f"; {word} {q.compare(k, than=than)}"
    s = next(j for j, r in enumerate(das["sites"]) if r["site"] == best["site"])
    text += f". Interchanging the whole site gives IIA {q.num('das', 'sites', s, 'full')}"
    if das["sites"][s]["smallest_k"] is not None:
        text += (
            f"; the smallest k reaching {q.num('das', 'reach')} of it there is {q.num('das', 'sites', s, 'smallest_k')}"
        )
    else:
        text += f"; no trained k reaches {q.num('das', 'reach')} of it there"
    return text + "."


def das_section(run_dir: Path, formats: Sequence[str], stats: dict[str, Any]) -> ExperimentSection | None:
    """The ``das`` section; None when the run has no DAS."""
    if not stats.get("das"):
        return None
    fig_dir = RunPaths(run_dir).figures
    summary = _frame(stats)
    figures = grid_hover_figure(
        fig_dir,
        "das_iia",
        "IIA of the trained subspace per site and k; hover a cell for its CI and n.",
        iia_map(summary, fig_dir, formats),
    )
    ks = sorted(int(k) for k in summary.loc[summary["method"] == "das", "k"].unique())
    compact = []
    for site_rec in stats["das"]["sites"]:
        site = site_rec["site"]
        at = summary[summary["site"] == site]
        cells = [escape(site), fmt(site_rec["full"]), str(site_rec["smallest_k"] or "–")]
        for k in ks:
            for method in ("das", "random", "shuffled"):
                r = at[(at["k"] == k) & (at["method"] == method)]
                cells.append(fmt(r["mean"].iloc[0]) if len(r) else "–")
        compact.append(cells)
    header = ["site", "full (k = d)", "smallest k"] + [
        f"k {k}: {m}" for k in ks for m in ("trained", "random", "shuffled")
    ]
    full = table(
        ["site", "k", "method", "n", "IIA [95% CI]"],
        [[escape(r.site), str(int(r.k)), escape(r.method), str(int(r.n)), _cell(r)] for r in summary.itertuples()],
        left=1,
    )
    return ExperimentSection(
        "das",
        _finding(stats),
        notes=note(
            "A learned orthonormal basis R (k x d) per site: the base run's activation a becomes a + R^T R (s - a), "
            "s the source run's, and the rollout continues through the real loop (later thoughts regenerate). "
            "IIA = the share of held-out pairs (problems split 70/30 by group) whose greedy answer is the "
            "high-level model's counterfactual; controls: a random rotation of the same k, the same k trained "
            "on shuffled counterfactuals, the whole site (k = d) and no intervention (k = 0). CIs: bootstrap "
            f"over the base problems of the {stats['das']['n_test']} held-out pairs."
        ),
        figures=figures,
        table="<h3>IIA per site and k</h3>" + table(header, compact, left=1),
        folded=((f"Every site, k and method ({len(summary)} rows)", full),),
        method=METHOD,
    )
