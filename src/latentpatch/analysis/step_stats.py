"""Step-level statistics (docs/method.md §13): ``stats.json``'s ``steps``, read by the report's
step-level sections (no torch).

From ``results/steps.parquet`` and ``results/influence.parquet``: per experiment present, group
summaries (n, mean, 95% bootstrap CI, Wilcoxon p and its Holm adjustment; :func:`summarize`), the
thought experiment's signature (:func:`thought_signature`) and the influence matrices
(:func:`influence_matrices`), gathered by :func:`step_stats`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latentpatch.analysis.inference import bootstrap_mean_ci, holm, wilcoxon_p
from latentpatch.files import json_safe
from latentpatch.names import (
    ALL_POSITIONS,
    INFLUENCE_FILE,
    STEPS_FILE,
)
from latentpatch.rundir import RunPaths

#: The group keys of each step-level summary.
STEP_SUMMARY_KEYS: dict[str, tuple[str, ...]] = {
    "thought": ("site", "replacement", "position"),
    "early": ("k",),
    "influence_answer": ("replacement", "step"),
    "influence_later": ("replacement", "step", "later"),
    "intermediate": ("intermediate", "position", "replacement"),
}
#: The numeric columns of a step-level summary (null in ``stats.json`` where NaN).
SUMMARY_NUMBERS = ("n", "mean", "ci_low", "ci_high", "p", "p_holm")


def read_steps(run_dir: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """``steps.parquet`` and ``influence.parquet`` of a run (None where absent)."""
    res = RunPaths(run_dir).results
    return tuple(pd.read_parquet(res / f) if (res / f).is_file() else None for f in (STEPS_FILE, INFLUENCE_FILE))  # type: ignore[return-value]


def summarize(
    table_: pd.DataFrame, keys: list[str], metrics: Iterable[str], seed: int, n_resamples: int = 9999
) -> pd.DataFrame:
    """Per group of ``keys`` and metric: n, mean, 95% bootstrap CI, Wilcoxon p against 0 and its
    Holm adjustment across the groups of one metric (NaNs dropped; booleans as 0/1)."""
    rows = []
    for metric in metrics:
        block = []
        for key, grp in table_.groupby(keys, sort=True):
            x = grp[metric].astype(float).to_numpy()
            x = x[~np.isnan(x)]
            lo, hi = bootstrap_mean_ci(x[None], seed, n_resamples) if x.size else (np.array([np.nan]),) * 2
            key = key if isinstance(key, tuple) else (key,)
            row = dict(zip(keys, key), metric=metric, n=int(x.size), mean=float(x.mean()) if x.size else np.nan)
            row.update(ci_low=float(lo[0]), ci_high=float(hi[0]), p=wilcoxon_p(x)[1])
            block.append(row)
        for row, adj in zip(block, holm([r["p"] for r in block])):
            row["p_holm"] = float(adj)
        rows += block
    return pd.DataFrame(rows)


def thought_signature(steps: pd.DataFrame) -> dict[str, float | int | list[list[int]]]:
    """Do the answers follow the thoughts? Three numbers over the pairs right on both sides (docs/method.md §13).

    ``source_answer``: fraction of pairs whose target run gives the source's answer when every thought
    is the source run's (``thought``/``thought``/``source``/every step); ``same_flip`` and
    ``diff_flip``: flip rates of same- and different-value donors at the thought that stores each
    intermediate s (the p with the largest different-minus-same gap), rows pooled over s; ``cells``:
    those [s, p]. NaN where the run lacks the experiment.

    >>> rows = [dict(pair_id=i, experiment="thought", site="thought", replacement="source", position=-1,
    ...              intermediate=-1, flipped=True, to_source=ok, flagged=False) for i, ok in enumerate((True, False))]
    >>> rows += [dict(pair_id=0, experiment="intermediate", site="thought", replacement=k, position=p,
    ...               intermediate=0, flipped=f, to_source=False, flagged=False)
    ...          for k, p, f in [("same", 1, False), ("diff", 1, True), ("same", 2, True), ("diff", 2, True)]]
    >>> sig = thought_signature(pd.DataFrame(rows))
    >>> sig["source_answer"], sig["same_flip"], sig["diff_flip"], sig["cells"]
    (0.5, 0.0, 1.0, [[0, 1]])
    """
    ok = steps[~steps["flagged"].astype(bool)]
    every = ok[
        (ok["experiment"] == "thought")
        & (ok["site"] == "thought")
        & (ok["replacement"] == "source")
        & (ok["position"] == ALL_POSITIONS)
    ]
    has_col = "to_source" in every.columns and len(every)
    out: dict[str, float | int | list[list[int]]] = {
        "n_pairs": int(every["pair_id"].nunique()),
        "source_answer": float(every["to_source"].astype(float).mean()) if has_col else math.nan,
        "same_flip": math.nan,
        "diff_flip": math.nan,
        "cells": [],
    }
    inter = ok[ok["experiment"] == "intermediate"]
    if inter.empty:
        return out
    rate = inter.pivot_table(
        index=["intermediate", "position"], columns="replacement", values="flipped", aggfunc="mean"
    )
    if not {"same", "diff"} <= set(rate.columns):
        return out
    gap = (rate["diff"] - rate["same"]).dropna()
    if gap.empty:
        return out
    best = gap.groupby(level="intermediate").idxmax().tolist()
    chosen = inter.set_index(["intermediate", "position"]).loc[best]
    flips = chosen.groupby("replacement")["flipped"].mean()
    out.update(
        same_flip=float(flips["same"]), diff_flip=float(flips["diff"]), cells=[[int(s), int(p)] for s, p in best]
    )
    return out


def influence_matrices(influence: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per replacement: [K, K] mean ``thought_rel_l2`` over pairs, rows = step i, columns = thought j."""
    out = {}
    for rep, grp in influence.groupby("replacement", sort=False):
        means = grp.groupby(["step", "later"])["thought_rel_l2"].mean()
        K = int(grp["step"].max()) + 1
        mat = np.full((K, int(grp["later"].max()) + 1), np.nan)
        for (i, j), v in means.items():
            mat[int(i), int(j)] = v
        out[str(rep)] = mat
    return out


def step_stats(
    steps: pd.DataFrame | None, influence: pd.DataFrame | None, seed: int, n_resamples: int = 9999
) -> dict[str, Any] | None:
    """The step-level summaries the report's sections show, for ``stats.json``'s ``steps`` (None
    without step-level results): per experiment present, :func:`summarize` records (``thought``
    also its metrics and :func:`thought_signature`; ``influence`` its :func:`influence_matrices`,
    the answer per step and the later thoughts). Over every pair, flagged ones included."""
    out: dict[str, Any] = {}
    if steps is not None:
        sub = steps[steps["experiment"] == "thought"]
        if not sub.empty:
            metrics = ["flipped", "correct"] + ["to_source"] * ("to_source" in sub) + ["kl", "recovery"]
            summary = summarize(sub, list(STEP_SUMMARY_KEYS["thought"]), metrics, seed, n_resamples)
            out["thought"] = {
                "metrics": metrics,
                "summary": summary.to_dict(orient="records"),
                "signature": thought_signature(steps),
            }
        sub = steps[steps["experiment"] == "early"]
        if not sub.empty:
            early = sub.rename(columns={"position": "k"})
            summary = summarize(early, ["k"], ["correct", "p_final", "answer_logit_diff"], seed, n_resamples)
            out["early"] = {"summary": summary.to_dict(orient="records")}
        sub = steps[steps["experiment"] == "intermediate"]
        if not sub.empty:
            keys = list(STEP_SUMMARY_KEYS["intermediate"])
            out["intermediate"] = {
                "summary": summarize(sub, keys, ["flipped", "kl"], seed, n_resamples).to_dict(orient="records")
            }
    if influence is not None and not influence.empty:
        later = influence[influence["later"] > influence["step"]]
        answer = influence.drop_duplicates(["pair_id", "replacement", "step"])
        out["influence"] = {
            "matrices": {rep: m.tolist() for rep, m in influence_matrices(influence).items()},
            "answer": summarize(
                answer, list(STEP_SUMMARY_KEYS["influence_answer"]), ["kl", "flipped"], seed, n_resamples
            ).to_dict(orient="records"),
            "later": summarize(
                later, list(STEP_SUMMARY_KEYS["influence_later"]), ["thought_rel_l2", "thought_cos"], seed, n_resamples
            ).to_dict(orient="records"),
        }
    return json_safe(out) if out else None
