"""Logit-lens statistics (docs/method.md §14): ``stats.json``'s ``lens`` (no torch).

From ``results/lens.parquet`` (one row per run x known value x layer x position with the rank of the
value's first number token): :func:`lens_stats` gives, per known value, where (layer, position) its
median rank over runs is lowest, that median, and the top-1 rate there; the report's lens section
reads it from ``stats.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.files import json_safe
from latentpatch.names import LENS_FILE
from latentpatch.rundir import RunPaths


def read_lens(run_dir: Path | str) -> pd.DataFrame | None:
    """``results/lens.parquet``, or None when the run has none."""
    path = RunPaths(run_dir).results / LENS_FILE
    return pd.read_parquet(path) if path.is_file() else None


def lens_stats(lens: pd.DataFrame | None) -> dict[str, Any] | None:
    """``{best: [{kind, index, layer, position, median_rank, top1_rate, n}, ...]}``, one row per known
    value (``kind`` answer / intermediate / operand, its ``index``), sorted by value; None without a lens.

    >>> rows = pd.DataFrame({"kind": ["answer"] * 4, "index": [0] * 4, "layer": [0, 0, 1, 1],
    ...     "position": [2, 2, 2, 2], "rank": [5, 7, 0, 1]})
    >>> lens_stats(rows)["best"]
    [{'kind': 'answer', 'index': 0, 'layer': 1, 'position': 2, 'median_rank': 0.5, 'top1_rate': 0.5, 'n': 2}]
    """
    if lens is None or lens.empty:
        return None
    best = []
    for (kind, index), grp in lens.groupby(["kind", "index"], sort=True):
        med = grp.groupby(["layer", "position"])["rank"].median()
        layer, position = med.idxmin()
        at = grp[(grp["layer"] == layer) & (grp["position"] == position)]
        best.append(
            {
                "kind": str(kind),
                "index": int(index),
                "layer": int(layer),
                "position": int(position),
                "median_rank": float(med.min()),
                "top1_rate": float((at["rank"] == 0).mean()),
                "n": len(at),
            }
        )
    return json_safe({"best": best})
