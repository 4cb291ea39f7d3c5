"""The report's attribution patching section (docs/method.md §15), and the agreement statistics.

Reads ``results/atp.parquet``. :func:`agreement` compares the estimate with the exact effect on the
exact check's rows (Pearson and Spearman correlation, pooled and per component; top-10 overlap per
pair; the worst misses: large exact effect, small estimate); :func:`path_split` splits the estimate
into the attention path and the recurrent path; :func:`refine_summary` the ``--refine`` rows. The
figure ``atp_scatter`` shows estimate vs exact effect, one panel per component. A run without ``atp``
gets one line that says how to get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from latentpatch.analysis.figures import DPI, save_figure
from latentpatch.analysis.html import escape, fmt, table
from latentpatch.analysis.sections import figure, note, section
from latentpatch.names import ATP_FILE, COMPONENTS, parse_head
from latentpatch.rundir import RunPaths, read_manifest

HOW = "docs/method.md §15"
#: Sites compared in the top-k overlap, and misses listed.
TOP_K = 10
MISSES_SHOWN = 10


def read_atp(run_dir: Path | str) -> pd.DataFrame | None:
    """``results/atp.parquet``, or None when the run has none."""
    path = RunPaths(run_dir).results / ATP_FILE
    return pd.read_parquet(path) if path.is_file() else None


def component_group(component: str) -> str:
    """The group a site's component is shown in: the block component, or ``head_out`` for any head.

    >>> component_group("head_out.3"), component_group("attn_out")
    ('head_out', 'attn_out')
    """
    return "head_out" if parse_head(component) is not None else component


def _corr(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    """(Pearson, Spearman); NaN where either side is constant or fewer than 3 rows."""
    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return float("nan"), float("nan")
    return float(x.corr(y)), float(x.corr(y, method="spearman"))


def top_overlap(rows: pd.DataFrame, k: int = TOP_K) -> float:
    """Mean over pairs of |top-k by |atp| ∩ top-k by |exact|| / k (k capped at the pair's site count)."""
    out = []
    for _, g in rows.groupby("pair_id", sort=True):
        n = min(k, len(g))
        by_atp = set(g["atp"].abs().sort_values(ascending=False, kind="stable").index[:n])
        by_exact = set(g["exact"].abs().sort_values(ascending=False, kind="stable").index[:n])
        out.append(len(by_atp & by_exact) / n if n else float("nan"))
    return float(np.mean(out)) if out else float("nan")


def agreement(atp: pd.DataFrame) -> dict[str, Any]:
    """Estimate vs exact effect on the exact check's rows (``checked`` and ``exact`` known).

    Returns ``{n_pairs, n_sites, pearson, spearman (pooled over pairs and sites), pair_pearson,
    pair_spearman (the mean over pairs of each pair's), top_overlap, by_component: {group: {n, pearson,
    spearman}}, misses: DataFrame}``; ``misses``: the rows with the largest ``|exact| − |atp|``
    (the approximation's false negatives), at most :data:`MISSES_SHOWN`.

    >>> rows = pd.DataFrame({"pair_id": ["a"] * 4, "component": ["resid_out"] * 4, "layer": [0, 0, 1, 1],
    ...     "position": [0, 1, 0, 1], "atp": [1.0, 2.0, 3.0, 0.0], "exact": [1.1, 2.0, 2.9, 2.0],
    ...     "checked": [True] * 4})
    >>> a = agreement(rows)
    >>> a["n_sites"], round(a["spearman"], 2), a["misses"]["layer"].tolist()[:1]
    (4, 0.63, [1])
    """
    rows = atp[atp["checked"].astype(bool) & atp["exact"].notna()].copy()
    pearson, spearman = _corr(rows["atp"], rows["exact"])
    rows["group"] = rows["component"].map(component_group)
    by_component = {}
    for group, g in rows.groupby("group", sort=False):
        p, s = _corr(g["atp"], g["exact"])
        by_component[str(group)] = {"n": len(g), "pearson": p, "spearman": s}
    per_pair = [_corr(g["atp"], g["exact"]) for _, g in rows.groupby("pair_id", sort=True)]
    rows["miss"] = rows["exact"].abs() - rows["atp"].abs()
    misses = rows.sort_values("miss", ascending=False, kind="stable").head(MISSES_SHOWN)
    return {
        "n_pairs": int(rows["pair_id"].nunique()),
        "n_sites": len(rows),
        "pearson": pearson,
        "spearman": spearman,
        "pair_pearson": float(np.nanmean([p for p, _ in per_pair])) if per_pair else float("nan"),
        "pair_spearman": float(np.nanmean([q for _, q in per_pair])) if per_pair else float("nan"),
        "top_overlap": top_overlap(rows),
        "by_component": by_component,
        "misses": misses[misses["miss"] > 0],
    }


def refine_summary(atp: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per ``selected`` group (``top``, ``control``): n rows and mean |exact|; {} without ``--refine``."""
    out = {}
    for name in ("top", "control"):
        g = atp[(atp["selected"] == name) & atp["exact"].notna()]
        if len(g):
            out[name] = {"n": float(len(g)), "mean_abs_exact": float(g["exact"].abs().mean())}
    return out


def path_split(atp: pd.DataFrame) -> list[dict[str, Any]]:
    """Per component group (every pair and site): mean |estimate|, mean |attention-path estimate|, mean
    |recurrent share| (``atp − atp_attention``) and the recurrent fraction Σ|recurrent| / (Σ|attention| +
    Σ|recurrent|).

    >>> rows = pd.DataFrame({"component": ["resid_out", "resid_out"], "atp": [1.0, -2.0], "atp_attention": [1.0, 0.0]})
    >>> round(path_split(rows)[0]["recurrent_fraction"], 3)  # |1 − 1| + |−2 − 0| over that + |1| + |0|
    0.667
    """
    out = []
    groups = atp["component"].map(component_group)
    for group in [g for g in (*COMPONENTS, "head_out") if (groups == g).any()]:
        g = atp[groups == group]
        attention, recurrent = g["atp_attention"].abs(), (g["atp"] - g["atp_attention"]).abs()
        total = float(attention.sum() + recurrent.sum())
        out.append(
            {
                "group": group,
                "mean_abs_atp": float(g["atp"].abs().mean()),
                "mean_abs_attention": float(attention.mean()),
                "mean_abs_recurrent": float(recurrent.mean()),
                "recurrent_fraction": float(recurrent.sum()) / total if total else float("nan"),
            }
        )
    return out


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


def atp_section(run_dir: Path, formats: Sequence[str] = ("png",)) -> str:
    """The ``atp`` section: agreement table, scatter, worst misses, ``--refine`` summary."""
    atp = read_atp(run_dir)
    if atp is None:
        return section(
            "atp", note(f"This run has no attribution patching; run with <code>--experiments atp</code> ({HOW}).")
        )
    a = agreement(atp)
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
    if len(a["misses"]):
        body += "<h3>Where the approximation fails (large exact effect, small estimate)</h3>"
        miss_rows = [
            [escape(str(r.pair_id)), escape(r.component), str(r.layer), str(r.position)]
            + [fmt(r.exact), fmt(r.atp), fmt(r.atp_attention)]
            for r in a["misses"].itertuples()
        ]
        body += table(["pair", "component", "layer", "position", "exact", "AtP", "AtP attention path"], miss_rows, 2)
    body += "<h3>Attention path and recurrent path (every pair and site)</h3>"
    body += table(
        ["component", "mean |AtP|", "mean |attention path|", "mean |recurrent path|", "recurrent fraction"],
        [
            [escape(r["group"])]
            + [fmt(r[k]) for k in ("mean_abs_atp", "mean_abs_attention", "mean_abs_recurrent", "recurrent_fraction")]
            for r in path_split(atp)
        ],
        left=1,
    )
    refined = refine_summary(atp)
    if refined:
        body += "<h3>--refine: exact effects of the top sites and of a random control sample</h3>"
        body += table(
            ["sites", "n", "mean |exact|"],
            [[k, str(int(v["n"])), fmt(v["mean_abs_exact"])] for k, v in refined.items()],
            left=1,
        )
    return section("atp", body)
