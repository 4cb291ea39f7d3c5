"""The report's attribution patching section (docs/method.md §15).

Its numbers are ``stats.json``'s ``atp`` (:func:`latentpatch.analysis.atp_stats.atp_stats`: the
agreement of the estimate with the exact effect, the attention and recurrent paths, the ``--refine``
rows); the figure ``atp_scatter`` shows estimate vs exact effect, one panel per component, from
``results/atp.parquet``. A run without ``atp`` has no section.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from latentpatch.analysis.atp_stats import TOP_K, component_group, read_atp
from latentpatch.analysis.figures import DPI, save_figure
from latentpatch.analysis.html import escape, fmt, table
from latentpatch.analysis.sections import figure, note
from latentpatch.analysis.skeleton import ExperimentSection, Quote
from latentpatch.names import COMPONENTS
from latentpatch.rundir import RunPaths, read_manifest

METHOD = "docs/method.md §15"


def atp_scatter(rows: pd.DataFrame, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Estimate (x) vs exact effect (y) per component group, y = x dashed."""
    groups = [g for g in (*COMPONENTS, "head_out") if (rows["group"] == g).any()]
    if not groups:
        return []
    fig = Figure(figsize=(3.2 * len(groups) + 0.6, 3.4), dpi=DPI)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups):
        g = rows[rows["group"] == group]
        ax.scatter(g["atp"], g["exact"], s=8, alpha=0.6, color="#3465a4", edgecolors="none")
        lo = float(min(g["atp"].min(), g["exact"].min()))
        hi = float(max(g["atp"].max(), g["exact"].max()))
        ax.plot([lo, hi], [lo, hi], ls="--", lw=0.8, color="#888888")
        ax.set_title(group)
        ax.set_xlabel("AtP estimate")
    axes[0].set_ylabel("exact effect")
    fig.suptitle("Attribution patching vs exact patching (change of the answer logit difference)")
    fig.tight_layout()
    return save_figure(fig, out_dir, "atp_scatter", formats)


def _timing_note(run_dir: Path, n_pairs: int, n_exact: int) -> str:
    timings = read_manifest(run_dir).get("timings") or {}
    est, ex = timings.get("atp_estimate_s"), timings.get("atp_exact_s")
    if not est or not ex or not n_exact:
        return ""
    return (
        f"Time: estimates {fmt(est)} s for {n_pairs} pair(s) (every site); exact patching {fmt(ex)} s for "
        f"{n_exact} site(s). "
    )


def _atp_finding(stats: dict[str, Any]) -> str:
    q, a = Quote(stats), stats["atp"]["agreement"]
    if not a.get("n_sites"):
        return "No site was checked against exact patching, so the estimate's agreement is not known."
    at = ("atp", "agreement")
    return (
        f"On the {q.num(*at, 'n_sites')} sites of {q.num(*at, 'n_pairs')} pair(s) checked exactly, the "
        f"estimate ranks the effects with Spearman {q.num(*at, 'spearman')} (Pearson {q.num(*at, 'pearson')}, "
        f"pooled over pairs); per pair, {q.num(*at, 'top_overlap')} of the exact top sites are among its own "
        "top sites (the top-k overlap, k as in the table)."
    )


def atp_section(run_dir: Path, formats: Sequence[str], stats: dict[str, Any]) -> ExperimentSection | None:
    """The ``atp`` section: agreement table, scatter, worst misses and the paths folded, ``--refine`` summary.
    ``stats``: ``stats.json`` (its ``atp``); None when the run has no attribution patching."""
    atp = read_atp(run_dir)
    if atp is None or not stats.get("atp"):
        return None
    a = stats["atp"]["agreement"]
    notes = note(
        "Estimate = (patched-in value − target activation) · gradient of the answer logit difference at the target "
        "run, through the KV cache and the recurrence; 'attention path' stops the gradient at each fed thought. "
        + _timing_note(run_dir, int(atp["pair_id"].nunique()), int(atp["exact"].notna().sum()))
    )
    rows = [["all", str(a["n_sites"]), fmt(a["pearson"]), fmt(a["spearman"])]]
    rows += [[escape(g), str(v["n"]), fmt(v["pearson"]), fmt(v["spearman"])] for g, v in a["by_component"].items()]
    compact = (
        f"<p>Per pair (mean over pairs): Pearson {fmt(a['pair_pearson'])}, Spearman {fmt(a['pair_spearman'])}, "
        f"top-{TOP_K} overlap {fmt(a['top_overlap'])}. "
        "Pooled over pairs:</p>" + table(["component", "sites", "Pearson", "Spearman"], rows, left=1)
    )
    checked = atp[atp["checked"].astype(bool) & atp["exact"].notna()].copy()
    checked["group"] = checked["component"].map(component_group)
    fig_dir = RunPaths(run_dir).figures
    figures = (
        figure(fig_dir, "atp_scatter", "One point per pair and site of the exact check.")
        if atp_scatter(checked, fig_dir, formats)
        else ""
    )
    folded = []
    if a["misses"]:
        miss_rows = [
            [escape(str(r["pair_id"])), escape(r["component"]), str(r["layer"]), str(r["position"])]
            + [fmt(r["exact"]), fmt(r["atp"]), fmt(r["atp_attention"])]
            for r in a["misses"]
        ]
        folded.append(
            (
                "Where the approximation fails (large exact effect, small estimate)",
                table(["pair", "component", "layer", "position", "exact", "AtP", "AtP attention path"], miss_rows, 2),
            )
        )
    paths_table = table(
        ["component", "mean |AtP|", "mean |attention path|", "mean |recurrent path|", "recurrent fraction"],
        [
            [escape(r["group"])]
            + [fmt(r[k]) for k in ("mean_abs_atp", "mean_abs_attention", "mean_abs_recurrent", "recurrent_fraction")]
            for r in stats["atp"]["paths"]
        ],
        left=1,
    )
    folded.append(("Attention path and recurrent path (every pair and site)", paths_table))
    refined = stats["atp"]["refine"]
    if refined:
        compact += "<h3>--refine: exact effects of the top sites and of a random control sample</h3>" + table(
            ["sites", "n", "mean |exact|"],
            [[k, str(int(v["n"])), fmt(v["mean_abs_exact"])] for k, v in refined.items()],
            left=1,
        )
    return ExperimentSection(
        "atp", _atp_finding(stats), notes=notes, figures=figures, table=compact, folded=tuple(folded), method=METHOD
    )
