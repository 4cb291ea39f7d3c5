"""Attribution patching statistics (docs/method.md §15): ``stats.json``'s ``atp`` (no torch).

From ``results/atp.parquet``: :func:`agreement` compares the estimate with the exact effect on the
exact check's rows (Pearson and Spearman, pooled and per component; top-10 overlap per pair; the
worst misses: large exact effect, small estimate); :func:`path_split` splits the estimate into the
attention path and the recurrent path; :func:`refine_summary` the ``--refine`` rows;
:func:`atp_stats` gathers them as JSON for ``stats.json``, which the report's section reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latentpatch.files import json_safe
from latentpatch.names import ATP_FILE, COMPONENTS, parse_head
from latentpatch.rundir import RunPaths

#: Sites compared in the top-k overlap, and misses listed.
TOP_K = 10
MISSES_SHOWN = 10
#: The columns of a listed miss.
MISS_COLUMNS = ("pair_id", "component", "layer", "position", "exact", "atp", "atp_attention")


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


def atp_stats(atp: pd.DataFrame | None) -> dict[str, Any] | None:
    """``stats.json``'s ``atp``: ``{agreement: {...; misses: [row, ...]}, paths: [...], refine: {...}}``
    (None without attribution patching results)."""
    if atp is None:
        return None
    a = agreement(atp)
    misses = a.pop("misses")
    a["misses"] = [{c: getattr(r, c) for c in MISS_COLUMNS} for r in misses.itertuples()]
    return json_safe({"agreement": a, "paths": path_split(atp), "refine": refine_summary(atp)})
