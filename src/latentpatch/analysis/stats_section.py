"""The "Statistics" section of ``report.html`` (docs/method.md §10), built from ``stats.json``.

:func:`statistics_section` = a paragraph on the methods, the all-positions patch per layer, the
chained/parallel/frozen comparisons per metric, and two collapsed tables with every comparison
and every cell (the same rows as ``stats/comparisons.csv`` and ``stats/cells.csv``).
"""

from __future__ import annotations

import pandas as pd

from latentpatch.analysis.html import escape, fmt, fmt_p, table
from latentpatch.analysis.sections import TABLE_METRICS, position_label, section
from latentpatch.analysis.selection import all_positions_rows
from latentpatch.names import METRIC_LABELS

#: Columns of the collapsed table of every comparison (``stats["comparisons"]``).
COMPARISON_COLUMNS = [
    *("metric", "comparison", "layer", "n", "mean a", "mean b", "mean a−b"),
    *("p W", "p W Holm", "p W BH", "p t", "p t Holm", "p t BH", "d_z", "r_rb"),
]
#: Columns of the collapsed table of every cell (``stats["cells"]``).
CELL_COLUMNS = [
    *("experiment", "mode", "component", "layer", "pos", "metric", "n", "mean", "median"),
    *("95% CI", "p", "p Holm", "p BH"),
]


def _methods(stats: dict) -> str:
    """What a cell's mean, CI and p-values are (from the settings the statistics were run with)."""
    s = stats["settings"]
    return (
        f"<p>Per cell (experiment, mode, layer, position) over {stats['n_pairs_used']} pairs: mean, "
        f"{int(s['confidence'] * 100)}% bootstrap CI ({escape(s['ci_method'])}, {s['n_resamples']} resamples, "
        f"seed {s['seed']}), {escape(s['cell_test'])}; {escape(s['corrections'])}. Bold: p &lt; 0.05.</p>"
    )


def _per_layer(cells: pd.DataFrame) -> str:
    """All latent positions patched: mean [CI] and Holm p per layer for each table metric."""
    lay = all_positions_rows(cells)
    if lay.empty:
        return ""
    mets = [m for m in TABLE_METRICS if m in set(lay["metric"])]
    rows = []
    for layer, g in lay.groupby("layer"):
        row = [str(layer)]
        for m in mets:
            r = g[g["metric"] == m]
            if r.empty:
                row += ["–", "–"]
                continue
            r = r.iloc[0]
            row += [f"{fmt(r['mean'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]", fmt_p(r["p_holm"])]
        rows.append(row)
    header = ["layer"] + [x for m in mets for x in (f"{m} mean [CI]", "p Holm")]
    return "<h3>All latent positions patched, per layer</h3>" + table(header, rows, left=1)


def _comparison_table(sub: pd.DataFrame, metric: str) -> str:
    """One metric's comparisons: per layer, Δ, Holm-corrected Wilcoxon p and d_z of each comparison."""
    names = list(dict.fromkeys(sub["comparison"]))
    rows = []
    for layer, g in sub.groupby("layer"):
        row = [str(layer)]
        for name in names:
            r = g[g["comparison"] == name]
            if r.empty:
                row += ["–"] * 3
                continue
            r = r.iloc[0]
            row += [fmt(r["mean_diff"]), fmt_p(r["p_wilcoxon_holm"]), fmt(r["cohens_dz"])]
        rows.append(row)
    header = ["layer"] + [x for n in names for x in (f"{n}: Δ", "p", "d_z")]
    # recovery's "1 = ..." depends on the run's direction (the findings say which): a neutral label here
    label = "recovery [fraction restored]" if metric == "recovery" else METRIC_LABELS.get(metric, metric)
    return f"<div><h3>{escape(label)}</h3>" + table(header, rows, left=1) + "</div>"


def _comparisons(comps: pd.DataFrame) -> str:
    """Chained vs parallel vs frozen, one table per table metric, side by side."""
    blocks = [
        _comparison_table(comps[comps["metric"] == metric], metric)
        for metric in TABLE_METRICS
        if metric in set(comps["metric"])
    ]
    return (
        "<h3>Chained vs parallel vs frozen (paired, per layer)</h3>"
        "<p>Δ = mean over pairs of a − b; p: paired Wilcoxon, Holm-corrected across layers; "
        "d<sub>z</sub> = mean / sd of the paired differences. "
        "Paired t-tests, BH and the rank-biserial correlation are in the full table and stats/comparisons.csv.</p>"
        f'<div class="row">{"".join(blocks)}</div>'
    )


def _every_comparison(comparisons: list[dict]) -> str:
    """Every comparison row of ``stats.json``, collapsed."""
    rows = [
        [escape(r["metric"]), escape(r["comparison"]), str(r["layer"]), str(r["n"])]
        + [fmt(r["mean_a"]), fmt(r["mean_b"]), fmt(r["mean_diff"])]
        + [fmt_p(r[f"p_{test}{fix}"]) for test in ("wilcoxon", "ttest") for fix in ("", "_holm", "_bh")]
        + [fmt(r["cohens_dz"]), fmt(r["rank_biserial"])]
        for r in comparisons
    ]
    return (
        f"<details><summary>Every comparison ({len(rows)} rows)</summary>"
        + table(COMPARISON_COLUMNS, rows, left=2)
        + "</details>"
    )


def _every_cell(cells: list[dict]) -> str:
    """Every cell row of ``stats.json``, collapsed."""
    rows = [
        [escape(r["experiment"]), escape(r["mode"]), escape(r["component"]), str(r["layer"])]
        + [position_label(r["position"]), escape(r["metric"]), str(r["n"]), fmt(r["mean"]), fmt(r["median"])]
        + [f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]", fmt_p(r["p_wilcoxon"]), fmt_p(r["p_holm"]), fmt_p(r["p_bh"])]
        for r in cells
    ]
    return (
        f"<details><summary>Every cell ({len(rows)} rows; also in stats/cells.csv)</summary>"
        + table(CELL_COLUMNS, rows, left=3)
        + "</details>"
    )


def statistics_section(stats: dict) -> str:
    """The statistics section: methods, per-layer table, mode comparisons, every comparison and cell."""
    body = _methods(stats)
    cells = pd.DataFrame(stats["cells"])
    comps = pd.DataFrame(stats["comparisons"])
    if not cells.empty:
        body += _per_layer(cells)
    if not comps.empty:
        body += _comparisons(comps) + _every_comparison(stats["comparisons"])
    if not cells.empty:
        body += _every_cell(stats["cells"])
    return section("statistics", body)
