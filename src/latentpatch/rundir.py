"""The run directory: its file names, atomic writers and the model-free assembly of results.

Imports no torch, so ``report``, ``compare`` and ``merge`` stay light. Layout::

    RUN_DIR/manifest.json  pairs.json  results/pairs/NNNNN.json (one committed file per pair)
    results/{experiment}.json  results/cells.parquet  results/trajectories.parquet  results/thoughts.json
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

FORMAT = "latentpatch-run/1"

# ---- files -----------------------------------------------------------------------------------
def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "tolist"):  # torch tensors and numpy arrays/scalars, without importing torch here
        return _json_safe(x.tolist())
    return x


def write_json(path: Path, data: Any) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_json_safe(data), f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def write_parquet(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


CELL_COLUMNS = [
    "pair_id", "experiment", "mode", "component", "layer", "position",
    "kl", "logit_l2", "pred_change_rate", "answer_logit_diff", "answer_logprob_diff", "recovery",
    "pred_answer", "pred_is_clean", "pred_is_corrupted", "act_cos_clean", "act_cos_corr", "act_bias",
    "clean_correct", "corrupted_correct", "flagged",
]
TRAJECTORY_COLUMNS = ["pair_id", "layer", "mode", "position", "act_cos_clean", "act_cos_corr", "act_bias"]


def assemble(out: Path) -> None:
    """Per-pair files (in global pair order) -> results/{experiment}.json, cells.parquet,
    trajectories.parquet, thoughts.json. Needs no model: ``merge`` uses it on shard outputs."""
    files = sorted((out / "results" / "pairs").glob("[0-9]*.json"))
    nested: dict[str, dict] = {}
    cell_rows, traj_rows, thoughts = [], [], {}
    for f in files:
        data = json.loads(f.read_text())
        pid = data["pair_id"]
        if "thoughts" in data:
            thoughts[pid] = data["thoughts"]
        for row in data["cells"]:
            metrics = {k: v for k, v in row.items() if k not in ("experiment", "mode", "component", "layer", "position", "key", "answer_ids")}
            nested.setdefault(row["experiment"], {}).setdefault(pid, {}).setdefault(str(row["layer"]), {})[row["key"]] = metrics
            cell = {c: row.get(c) for c in CELL_COLUMNS}
            cell["pair_id"] = pid
            for c in ("act_cos_clean", "act_cos_corr", "act_bias", "pred_answer", "recovery", "kl"):
                if cell[c] is None:
                    cell[c] = math.nan
            cell_rows.append(cell)
            if row["mode"] in ("chained", "frozen") and "act_positions" in row:
                for q, cc, cr in zip(row["act_positions"], row["act_cos_clean_by_position"], row["act_cos_corr_by_position"]):
                    traj_rows.append({"pair_id": pid, "layer": row["layer"], "mode": row["mode"], "position": q,
                                      "act_cos_clean": cc, "act_cos_corr": cr, "act_bias": cc - cr})
    for name, data in nested.items():
        write_json(out / "results" / f"{name}.json", data)
    write_parquet(out / "results" / "cells.parquet", cell_rows, CELL_COLUMNS)
    write_parquet(out / "results" / "trajectories.parquet", traj_rows, TRAJECTORY_COLUMNS)
    write_json(out / "results" / "thoughts.json", thoughts)
