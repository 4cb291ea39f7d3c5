"""DAS statistics (docs/method.md §20): ``stats.json``'s ``das`` and its contrasts (no torch).

From ``results/das.parquet`` (one row per site x k x method x held-out example): the
interchange-intervention accuracy (IIA: the share of held-out examples whose intervened answer is the
counterfactual) per site, k and method with its 95% CI from a bootstrap over base problems
(:func:`group_ci`: examples that share a base problem are not independent); per site the full interchange's IIA and the
smallest k whose trained subspace reaches :data:`REACH` of it (where the full interchange reaches
:data:`MIN_FULL` with a CI above 0); the *best* (site, k), where the trained
subspace's IIA is highest (ties: the smaller k); and there the paired contrasts trained - random
rotation and trained - shuffled-label control over the same held-out examples
(:func:`~latentpatch.analysis.contrasts.paired_contrast`).

>>> rows = [dict(site="thought.t1", k=k, method=m, example=i, hit=h, group=str(i)) for i in range(4)
...         for k, m, h in ((2, "das", i < 3), (2, "random", False), (2, "shuffled", False), (8, "full", i < 3))]
>>> das, contrasts = das_stats(pd.DataFrame(rows).assign(variable="intermediate:0"), seed=0, n_resamples=99)
>>> das["best"], das["sites"][0]["smallest_k"], [c["name"] for c in contrasts]
({'site': 'thought.t1', 'k': 2}, 2, ['trained vs random rotation: IIA', 'trained vs shuffled labels: IIA'])
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latentpatch.analysis.contrasts import paired_contrast
from latentpatch.analysis.step_stats import summarize
from latentpatch.files import json_safe
from latentpatch.names import DAS_FILE
from latentpatch.rundir import RunPaths

#: "Most of the full interchange's IIA": the share of it the smallest k must reach.
REACH = 0.8
#: A site carries the variable (and a smallest k is stated) only where the full interchange's IIA is at
#: least this, with a CI above 0.
MIN_FULL = 0.2
#: The keys of a DAS summary row.
DAS_KEYS = ["site", "k", "method"]
#: The controls each trained subspace is contrasted with: (method, the contrast's name, its label).
CONTROLS = (
    ("random", "trained vs random rotation: IIA", "a random rotation of the same k"),
    ("shuffled", "trained vs shuffled labels: IIA", "the same k trained on shuffled counterfactuals"),
)


def read_das(run_dir: Path | str) -> pd.DataFrame | None:
    """``results/das.parquet``, or None when the run has none."""
    path = RunPaths(run_dir).results / DAS_FILE
    return pd.read_parquet(path) if path.is_file() else None


def das_stats(das: pd.DataFrame | None, seed: int, n_resamples: int = 9999) -> tuple[dict | None, list[dict]]:
    """(``stats.json``'s ``das``: ``{variable, n_test, reach, best, sites, summary}``, the contrasts at the
    best (site, k)), or (None, []) without DAS results."""
    if das is None or das.empty:
        return None, []
    table = das.assign(hit=das["hit"].astype(float))
    summary = summarize(table, DAS_KEYS, ["hit"], seed, n_resamples).drop(columns="metric")
    # held-out examples that share a base problem are not independent: the CI resamples problems
    cis = [
        group_ci(g["hit"].to_numpy(float), g["group"].astype(str).to_numpy(), seed, n_resamples)
        for _, g in table.groupby(DAS_KEYS, sort=True)
    ]
    summary["ci_low"], summary["ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
    trained = summary[summary["method"] == "das"]
    sites = []
    for site in dict.fromkeys(table["site"]):
        full = summary[(summary["site"] == site) & (summary["method"] == "full")]
        full_iia = float(full["mean"].iloc[0]) if len(full) else math.nan
        mine = trained[trained["site"] == site].sort_values("k")
        full_low = float(full["ci_low"].iloc[0]) if len(full) else math.nan
        carries = full_iia >= MIN_FULL and full_low > 0  # else 80% of next to nothing sizes nothing
        reached = mine[mine["mean"] >= REACH * full_iia] if carries else mine.iloc[:0]
        smallest = int(reached["k"].iloc[0]) if len(reached) else None
        sites.append({"site": site, "full": full_iia, "smallest_k": smallest})
    best_row = trained.sort_values(["mean", "k"], ascending=[False, True], kind="stable").iloc[0]
    best = {"site": str(best_row["site"]), "k": int(best_row["k"])}
    at = table[(table["site"] == best["site"]) & (table["k"] == best["k"])]
    wide = at.pivot_table(index="example", columns="method", values="hit")
    contrasts = [
        paired_contrast(
            "das",
            name,
            "trained subspace",
            label,
            wide["das"].to_numpy(float),
            wide[method].to_numpy(float),
            seed,
            n_resamples,
            site=best["site"],
            k=best["k"],
        )
        for method, name, label in CONTROLS
        if method in wide.columns and "das" in wide.columns
    ]
    out: dict[str, Any] = {
        "variable": str(table["variable"].iloc[0]),
        "n_test": int(table["example"].nunique()),
        "reach": REACH,
        "best": best,
        "sites": sites,
        "summary": summary.to_dict(orient="records"),
    }
    return json_safe(out), contrasts


def group_ci(hits: np.ndarray, groups: np.ndarray, seed: int, n_resamples: int = 9999) -> tuple[float, float]:
    """95% percentile CI of the pooled rate ``hits.sum() / n`` resampling *groups* with replacement
    (a cluster bootstrap, seeded); NaN with fewer than 2 groups.

    >>> lo, hi = group_ci(np.array([1.0, 1, 0, 0]), np.array(["a", "a", "b", "b"]), 0, 999)
    >>> 0.0 <= lo <= 0.5 <= hi <= 1.0
    True
    """
    names, index = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        return math.nan, math.nan
    sums = np.bincount(index, weights=hits, minlength=len(names))
    counts = np.bincount(index, minlength=len(names)).astype(float)
    draw = np.random.default_rng(seed).integers(0, len(names), size=(n_resamples, len(names)))
    rates = sums[draw].sum(1) / counts[draw].sum(1)
    return float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))
