"""The report's attribution patching section (docs/method.md §15).

Its numbers are ``stats.json``'s ``atp`` (:func:`latentpatch.analysis.atp_stats.atp_stats`: the
agreement of the estimate with the exact effect, the attention and recurrent paths, the ``--refine``
rows); the figure ``atp_scatter`` shows estimate vs exact effect, one panel per component, from
``results/atp.parquet``. A run without ``atp`` gets one line that says how to get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from latentpatch.analysis.atp_stats import TOP_K, atp_stats, component_group, read_atp
from latentpatch.analysis.figures import DPI, save_figure
from latentpatch.analysis.html import escape, fmt, table
from latentpatch.analysis.sections import figure, note, section
from latentpatch.names import COMPONENTS
from latentpatch.rundir import RunPaths, read_manifest

HOW = "docs/method.md §15"


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


def atp_section(run_dir: Path, formats: Sequence[str] = ("png",), stats: dict[str, Any] | None = None) -> str:
    """The ``atp`` section: agreement table, scatter, worst misses, ``--refine`` summary. ``stats``:
    ``stats.json``'s ``atp`` (computed here when not given: a run directory from before it was written)."""
    atp = read_atp(run_dir)
    if atp is None:
        return section(
            "atp", note(f"This run has no attribution patching; run with <code>--experiments atp</code> ({HOW}).")
        )
    stats = stats or atp_stats(atp) or {}
    a = stats["agreement"]
    body = note(
        "Estimate = (patched-in value − target activation) · gradient of the answer logit difference at the target "
        "run, through the KV cache and the recurrence; 'attention path' stops the gradient at each fed thought. "
        + _timing_note(run_dir, int(atp["pair_id"].nunique()), int(atp["exact"].notna().sum()))
    )
    rows = [["all", str(a["n_sites"]), fmt(a["pearson"]), fmt(a["spearman"])]]
    rows += [[escape(g), str(v["n"]), fmt(v["pearson"]), fmt(v["spearman"])] for g, v in a["by_component"].items()]
    body += (
        f"<p>Exact check: {a['n_pairs']} pair(s); per pair (mean over pairs): Pearson {fmt(a['pair_pearson'])}, "
        f"Spearman {fmt(a['pair_spearman'])}, top-{TOP_K} overlap {fmt(a['top_overlap'])}. Pooled over pairs:</p>"
    )
    body += table(["component", "sites", "Pearson", "Spearman"], rows, left=1)
    checked = atp[atp["checked"].astype(bool) & atp["exact"].notna()].copy()
    checked["group"] = checked["component"].map(component_group)
    if atp_scatter(checked, RunPaths(run_dir).figures, formats):
        body += figure(RunPaths(run_dir).figures, "atp_scatter", "One point per pair and site of the exact check.")
    if a["misses"]:
        body += "<h3>Where the approximation fails (large exact effect, small estimate)</h3>"
        miss_rows = [
            [escape(str(r["pair_id"])), escape(r["component"]), str(r["layer"]), str(r["position"])]
            + [fmt(r["exact"]), fmt(r["atp"]), fmt(r["atp_attention"])]
            for r in a["misses"]
        ]
        body += table(["pair", "component", "layer", "position", "exact", "AtP", "AtP attention path"], miss_rows, 2)
    body += "<h3>Attention path and recurrent path (every pair and site)</h3>"
    body += table(
        ["component", "mean |AtP|", "mean |attention path|", "mean |recurrent path|", "recurrent fraction"],
        [
            [escape(r["group"])]
            + [fmt(r[k]) for k in ("mean_abs_atp", "mean_abs_attention", "mean_abs_recurrent", "recurrent_fraction")]
            for r in stats["paths"]
        ],
        left=1,
    )
    refined = stats["refine"]
    if refined:
        body += "<h3>--refine: exact effects of the top sites and of a random control sample</h3>"
        body += table(
            ["sites", "n", "mean |exact|"],
            [[k, str(int(v["n"])), fmt(v["mean_abs_exact"])] for k, v in refined.items()],
            left=1,
        )
    return section("atp", body)
