"""Probe statistics (docs/method.md §16): ``stats.json``'s ``probe`` (no torch).

From ``results/probes.parquet`` (one row per label x site: held-out accuracy with its group-bootstrap
CI, the majority and random-vector baselines, the control task and the selectivity; see
:func:`latentpatch.probing.probes.probe_site`): per label, the site where the held-out accuracy is
highest (ties: the higher selectivity), and every row (the report's maps read them). With the lens
and the ``intermediate`` experiment in the same run, :func:`three_readings` puts, per intermediate s
and thought p, the probe on the fed thought, the lens's median rank of s there, and the donor
experiment's flip-rate gap side by side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.files import json_safe
from latentpatch.names import PROBES_FILE, THOUGHT_LAYER
from latentpatch.rundir import RunPaths

#: The columns of a probe row kept in ``stats.json``.
PROBE_KEEP = (
    "label",
    "component",
    "layer",
    "position",
    "n",
    "n_groups",
    "classes",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "majority_accuracy",
    "random_accuracy",
    "control_accuracy",
    "selectivity",
    "selectivity_ci_low",
    "selectivity_ci_high",
    "train_accuracy",
)

#: The columns of a regression probe row kept in ``stats.json`` (``--probe-regression``).
REGRESSION_KEEP: tuple[str, ...] = ("label", "component", "layer", "position", "n", "r2", "r2_ci_low", "r2_ci_high")
REGRESSION_KEEP += ("mean_baseline_r2", "random_r2", "train_r2")


def read_probes(run_dir: Path | str) -> pd.DataFrame | None:
    """``results/probes.parquet``, or None when the run has none."""
    path = RunPaths(run_dir).results / PROBES_FILE
    return pd.read_parquet(path) if path.is_file() else None


def probe_stats(
    probes: pd.DataFrame | None, lens: pd.DataFrame | None = None, steps: dict | None = None
) -> dict[str, Any] | None:
    """``{rows: [...], best: [{label, row}], readings: [...]}`` (None without probes): ``best[i]["row"]``
    is the index in ``rows`` of label i's site with the highest held-out accuracy."""
    if probes is None or probes.empty:
        return None
    kind = probes["kind"] if "kind" in probes.columns else pd.Series("classification", index=probes.index)
    regression = probes[kind == "regression"]
    probes = probes[kind == "classification"]
    rows = probes[[c for c in PROBE_KEEP if c in probes.columns]].reset_index(drop=True)
    best = []
    for label, g in rows.groupby("label", sort=False):
        ranked = g.sort_values(["accuracy", "selectivity"], ascending=False, kind="stable", na_position="last")
        best.append({"label": str(label), "row": int(ranked.index[0])})
    out: dict[str, Any] = {"rows": rows.to_dict(orient="records"), "best": best}
    out["readings"] = three_readings(rows, lens, steps)
    if not regression.empty:
        reg = regression[[c for c in REGRESSION_KEEP if c in regression.columns]].reset_index(drop=True)
        out["regression"] = {
            "rows": reg.to_dict(orient="records"),
            "best": [
                {"label": str(label), "row": int(g.sort_values("r2", ascending=False, kind="stable").index[0])}
                for label, g in reg.groupby("label", sort=False)
            ],
        }
    return json_safe(out)


def three_readings(rows: pd.DataFrame, lens: pd.DataFrame | None, steps: dict | None) -> list[dict[str, Any]]:
    """Per intermediate s and thought p: the probe of s on the fed thought p (held-out accuracy,
    selectivity), the lens's median rank of s at the fed thought p (the run's pairs), and the
    ``intermediate`` experiment's different-minus-same donor flip rate at p; None where absent."""
    fed = rows[(rows["component"] == "thought") & rows["label"].str.startswith("intermediate_")]
    out = []
    rates: dict[tuple[int, int], dict[str, float]] = {}
    for r in ((steps or {}).get("intermediate") or {}).get("summary", []):
        if r["metric"] == "flipped" and r["mean"] is not None:
            rates.setdefault((int(r["intermediate"]), int(r["position"])), {})[r["replacement"]] = float(r["mean"])
    donors = {key: v["diff"] - v["same"] for key, v in rates.items() if {"diff", "same"} <= set(v)}
    ranks = None
    if lens is not None and not lens.empty:
        at = lens[(lens["kind"] == "intermediate") & (lens["layer"] == THOUGHT_LAYER)]
        ranks = at.groupby(["index", "position"])["rank"].median()
    for r in fed.itertuples():
        s, p = int(r.label.split("_")[1]), int(str(r.position).lstrip("t"))
        rank = ranks.get((s, p)) if ranks is not None else None
        out.append(
            {
                "intermediate": s,
                "position": p,
                "probe_accuracy": r.accuracy,
                "probe_selectivity": r.selectivity,
                "lens_median_rank": None if rank is None or math.isnan(rank) else float(rank),
                "donor_gap": donors.get((s, p)),
            }
        )
    return out
