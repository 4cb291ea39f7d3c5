"""Steering statistics (docs/method.md §16): ``stats.json``'s ``steer`` and its contrasts (no torch).

From ``results/steer.parquet`` (one row per pair x direction x site x alpha): per site and alpha, the
direction's and the random controls' (per pair, the mean over the controls) answer metrics over
pairs with CIs (:func:`~latentpatch.analysis.step_stats.summarize`); the *best* site, where the
direction moves the most answers to the source run's (chosen on these pairs); and there, per alpha,
the paired contrast direction - random controls (:func:`~latentpatch.analysis.contrasts.paired_contrast`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.analysis.contrasts import paired_contrast
from latentpatch.analysis.step_stats import summarize
from latentpatch.files import json_safe
from latentpatch.names import STEER_FILE
from latentpatch.rundir import RunPaths

#: The metrics summarised per site and alpha.
STEER_METRICS = ("to_source", "answer_logit_diff", "kl")
#: The keys of a steering summary row.
STEER_KEYS = ["kind", "layer", "position", "alpha"]


def read_steer(run_dir: Path | str) -> pd.DataFrame | None:
    """``results/steer.parquet``, or None when the run has none."""
    path = RunPaths(run_dir).results / STEER_FILE
    return pd.read_parquet(path) if path.is_file() else None


def per_pair(steer: pd.DataFrame) -> pd.DataFrame:
    """One row per pair x kind (``direction``, ``random``: the mean over the controls) x site x alpha."""
    frame = steer.assign(
        kind=steer["control"].map({True: "random", False: "direction"}),
        to_source=steer["to_source"].astype(float),
    )
    keys = ["pair_id", *STEER_KEYS]
    return frame.groupby(keys, sort=True)[list(STEER_METRICS)].mean().reset_index()


def steer_stats(steer: pd.DataFrame | None, seed: int, n_resamples: int = 9999) -> tuple[dict | None, list[dict]]:
    """(``stats.json``'s ``steer``: ``{direction, summary, best: {layer, position}}``, the contrasts at the
    best site), or (None, []) without steering results."""
    if steer is None or steer.empty:
        return None, []
    pairs = per_pair(steer)
    summary = summarize(pairs, STEER_KEYS, STEER_METRICS, seed, n_resamples)
    real = summary[(summary["kind"] == "direction") & (summary["metric"] == "to_source")]
    best = real.sort_values(["mean", "alpha"], ascending=[False, False], kind="stable").iloc[0]
    layer, position = int(best["layer"]), int(best["position"])
    at = pairs[(pairs["layer"] == layer) & (pairs["position"] == position)]
    contrasts = []
    for alpha, g in at.groupby("alpha", sort=True):
        wide = g.pivot_table(index="pair_id", columns="kind", values=list(STEER_METRICS))
        for metric in ("to_source", "answer_logit_diff"):
            contrasts.append(
                paired_contrast(
                    "steer",
                    f"direction vs random: {metric}",
                    "direction",
                    "random directions of the same norm",
                    wide[(metric, "direction")].to_numpy(float),
                    wide[(metric, "random")].to_numpy(float),
                    seed,
                    n_resamples,
                    layer=layer,
                    position=position,
                    alpha=float(alpha),
                )
            )
    direction = str(steer.loc[~steer["control"], "direction"].iloc[0])
    out: dict[str, Any] = {
        "direction": direction,
        "n_controls": int(steer.loc[steer["control"], "direction"].nunique()),
        "best": {"layer": layer, "position": position},
        "summary": summary.to_dict(orient="records"),
    }
    return json_safe(out), contrasts
