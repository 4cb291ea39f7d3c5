"""Paired contrasts: the differences the report's findings state, each with a bootstrap CI (no torch).

A finding that compares two things ("chained restores more than frozen", "influence is local",
"a different-value donor flips more answers than a same-value one") is a statement about a paired
difference over pairs, and the report states it as that difference with its CI: "more" only where
the CI lies above 0, "no clear difference" where it holds 0. The rows are ``stats.json``'s
``contrasts`` (one record per contrast, columns :data:`CONTRAST_COLUMNS`), computed here from the
per-pair results:

- ``iterative``: per layer, chained vs parallel, chained vs frozen, parallel vs frozen (recovery,
  the primary component; the pairs of :func:`latentpatch.analysis.selection.mode_table`);
- ``early``: accuracy after every thought vs after none;
- ``influence``: per replacement and pooled, the next thought's change vs the change of thoughts two
  or more steps later (relative L2; per pair, means over the steps);
- ``intermediate``: at the thought that stores each intermediate (the signature's cells), the flip
  rate of a different-value donor vs a same-value one.

>>> c = paired_contrast("early", "all vs none", "k = 2", "k = 0", np.array([1.0, 1, 1, 0]), np.zeros(4), 0, 999)
>>> c["diff"], c["n"], c["ci_low"] <= 0.75 <= c["ci_high"]
(0.75, 4, True)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from latentpatch.analysis.inference import bootstrap_mean_ci, wilcoxon_p
from latentpatch.analysis.selection import mode_table, primary_component_of
from latentpatch.analysis.step_stats import thought_signature
from latentpatch.names import MODE_COMPARISONS

#: The columns of one contrast record; ``where`` holds the keys that place it (layer, replacement).
CONTRAST_COLUMNS = ("experiment", "name", "a", "b", "where", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "p")
#: The metric of the iterative contrasts (the findings' metric).
CONTRAST_METRIC = "recovery"


def paired_contrast(
    experiment: str,
    name: str,
    a_label: str,
    b_label: str,
    a: np.ndarray,
    b: np.ndarray,
    seed: int,
    n_resamples: int = 9999,
    **where: Any,
) -> dict[str, Any]:
    """One contrast record: ``a`` − ``b`` over the same pairs ([n] each, same order; a pair with a NaN
    on either side is left out): the two means, the mean difference, its 95% bootstrap CI (percentile,
    ``seed``) and the two-sided Wilcoxon signed-rank p of the differences."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = ~np.isnan(a) & ~np.isnan(b)
    a, b = a[ok], b[ok]
    d = a - b
    lo, hi = bootstrap_mean_ci(d[None], seed, n_resamples) if d.size else (np.array([math.nan]),) * 2
    return {
        "experiment": experiment,
        "name": name,
        "a": a_label,
        "b": b_label,
        "where": where,
        "n": int(d.size),
        "mean_a": float(a.mean()) if a.size else math.nan,
        "mean_b": float(b.mean()) if b.size else math.nan,
        "diff": float(d.mean()) if d.size else math.nan,
        "ci_low": float(lo[0]),
        "ci_high": float(hi[0]),
        "p": wilcoxon_p(d)[1],
    }


def iterative_contrasts(cells: pd.DataFrame, seed: int, n_resamples: int = 9999) -> list[dict[str, Any]]:
    """Per layer: chained vs parallel, chained vs frozen, parallel vs frozen recovery (the primary
    component), the modes the run has."""
    if cells.empty or CONTRAST_METRIC not in cells:
        return []
    component = primary_component_of(cells)
    tables = {m: mode_table(cells, m) for m in {x for ab in MODE_COMPARISONS for x in ab}}
    out = []
    for a, b in MODE_COMPARISONS:
        ta, tb = tables.get(a), tables.get(b)
        if ta is None or tb is None:
            continue
        joined = pd.merge(ta[[CONTRAST_METRIC]], tb[[CONTRAST_METRIC]], left_index=True, right_index=True)
        joined = joined.xs(component, level="component")
        for layer, g in joined.groupby(level="layer", sort=True):
            x, y = g[f"{CONTRAST_METRIC}_x"].to_numpy(float), g[f"{CONTRAST_METRIC}_y"].to_numpy(float)
            out.append(
                paired_contrast(
                    "iterative", f"{a} vs {b}", a, b, x, y, seed, n_resamples, layer=int(layer), component=component
                )
            )
    return out


def early_contrast(steps: pd.DataFrame, seed: int, n_resamples: int = 9999) -> list[dict[str, Any]]:
    """Accuracy after every thought (the largest k) vs after none (k = 0), per pair."""
    early = steps[steps["experiment"] == "early"]
    if early.empty:
        return []
    acc = early.pivot_table(index="pair_id", columns="position", values="correct", aggfunc="mean")
    first, last = int(acc.columns.min()), int(acc.columns.max())
    if first == last:
        return []
    a, b = acc[last].to_numpy(float), acc[first].to_numpy(float)
    return [paired_contrast("early", "all thoughts vs none", f"k = {last}", f"k = {first}", a, b, seed, n_resamples)]


def influence_contrasts(influence: pd.DataFrame, seed: int, n_resamples: int = 9999) -> list[dict[str, Any]]:
    """Next thought vs thoughts two or more steps later: per pair, the mean relative L2 change of
    thought i+1 and the mean over thoughts j >= i+2, over every step i (and replacement: the pooled
    record, ``where`` without ``replacement``); one record per replacement and one pooled. Needs K >= 3."""
    later = influence[influence["later"] > influence["step"]]
    gap = later["later"] - later["step"]
    if not (gap >= 2).any():
        return []
    tagged = later.assign(distance=np.where(gap == 1, "next", "far"))
    out = []
    groups = [(str(rep), g) for rep, g in tagged.groupby("replacement", sort=False)] + [(None, tagged)]
    for rep, g in groups:
        per_pair = g.pivot_table(index="pair_id", columns="distance", values="thought_rel_l2", aggfunc="mean")
        where = {} if rep is None else {"replacement": rep}
        out.append(
            paired_contrast(
                "influence",
                "next vs later thoughts",
                "next thought",
                "thoughts 2+ steps later",
                per_pair["next"].to_numpy(float),
                per_pair["far"].to_numpy(float),
                seed,
                n_resamples,
                **where,
            )
        )
    return out


def intermediate_contrast(steps: pd.DataFrame, seed: int, n_resamples: int = 9999) -> list[dict[str, Any]]:
    """Different- vs same-value donor flip rate at the thought that stores each intermediate (the
    cells of :func:`~latentpatch.analysis.step_stats.thought_signature`, chosen on the same pairs);
    per pair, the mean over its intermediates. Pairs right on both sides only, as the signature."""
    sig = thought_signature(steps)
    cells = sig["cells"]
    if not isinstance(cells, list) or not cells:
        return []
    ok = steps[(steps["experiment"] == "intermediate") & ~steps["flagged"].astype(bool)]
    keys = pd.MultiIndex.from_tuples([tuple(c) for c in cells], names=["intermediate", "position"])
    chosen = ok.set_index(["intermediate", "position"]).loc[lambda t: t.index.isin(keys)].reset_index()
    rate = chosen.pivot_table(index="pair_id", columns="replacement", values="flipped", aggfunc="mean")
    if not {"diff", "same"} <= set(rate.columns):
        return []
    return [
        paired_contrast(
            "intermediate",
            "different vs same donor",
            "different-value donor",
            "same-value donor",
            rate["diff"].to_numpy(float),
            rate["same"].to_numpy(float),
            seed,
            n_resamples,
            cells=cells,
        )
    ]


def step_contrasts(
    steps: pd.DataFrame | None, influence: pd.DataFrame | None, seed: int, n_resamples: int = 9999
) -> list[dict[str, Any]]:
    """The contrasts of the step-level experiments the run has (early, influence, intermediate)."""
    out: list[dict[str, Any]] = []
    if steps is not None and not steps.empty:
        out += early_contrast(steps, seed, n_resamples)
    if influence is not None and not influence.empty:
        out += influence_contrasts(influence, seed, n_resamples)
    if steps is not None and not steps.empty:
        out += intermediate_contrast(steps, seed, n_resamples)
    return out


def find_contrast(stats: dict[str, Any], experiment: str, name: str, **where: Any) -> int | None:
    """The index in ``stats["contrasts"]`` of the record of ``experiment``/``name`` placed at ``where``
    (exactly: a pooled record has no ``replacement``), or None.

    >>> find_contrast({"contrasts": [{"experiment": "early", "name": "x", "where": {}}]}, "early", "x")
    0
    """
    for i, c in enumerate(stats.get("contrasts") or []):
        if c["experiment"] == experiment and c["name"] == name and c["where"] == where:
            return i
    return None
