"""Assembly: the per-pair files of every stage folder -> the run directory's result tables (no torch).

Each stage of a run commits one file per pair under ``results/<folder>/`` (written atomically by the
driver, :mod:`latentpatch.pipeline.stages`); :func:`assemble` turns every folder present into its
tables, in global pair order, through :data:`ASSEMBLERS` (folder -> the list key of a whole file,
its assembler). Needs no model: ``latentpatch merge`` runs it on the shards' copied files, and the
report process runs it while the run finishes. The formats are in docs/ARCHITECTURE.md; the
paths and readers in :mod:`latentpatch.rundir`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from latentpatch.errors import LatentPatchError
from latentpatch.files import write_json, write_parquet
from latentpatch.names import (
    ATP_COLUMNS,
    ATP_DIR,
    ATP_FILE,
    ATP_FLOAT_COLUMNS,
    ATTENTION_COLUMNS,
    ATTENTION_DIR,
    ATTENTION_FILE,
    ATTENTION_THOUGHT_COLUMNS,
    ATTENTION_THOUGHTS_FILE,
    CELL_COLUMNS,
    EDGE_COLUMNS,
    EDGE_FLOAT_COLUMNS,
    EDGES_DIR,
    EDGES_FILE,
    INFLUENCE_COLUMNS,
    INFLUENCE_FILE,
    LATENT_COUNT,
    LENS_COLUMN,
    LENS_COLUMNS,
    LENS_DIR,
    LENS_FILE,
    LENS_TOP_COLUMNS,
    LENS_TOP_FILE,
    STEER_COLUMNS,
    STEER_DIR,
    STEER_FILE,
    STEER_FLOAT_COLUMNS,
    STEP_COLUMNS,
    STEP_FLOAT_COLUMNS,
    STEPS_DIR,
    STEPS_FILE,
    STOP_COLUMNS,
    TRACKED_MODES,
    TRAJECTORY_COLUMNS,
)
from latentpatch.rundir import PAIRS_DIR, RunPaths, read_pair_result, read_stage_entry


def _stage_entries(folder: Path, key: str) -> list[dict[str, Any]]:
    """Every per-pair file of a stage folder, in global pair order; a damaged one is an error."""
    entries = []
    for f in sorted(folder.glob("[0-9]*.json")):
        data = read_stage_entry(f, key)
        if data is None:
            raise LatentPatchError(f"{f} is damaged (truncated?); fix: delete it and rerun the run with --resume")
        entries.append(data)
    return entries


# ---- assembly ------------------------------------------------------------------------------------
#: Keys of a per-pair cell row that are not metrics of ``results/{experiment}.json``.
_NOT_NESTED = ("experiment", "mode", "component", "layer", "position", "key", "answer_ids")
#: Cell columns stored as NaN (not null) when a row lacks them, so their dtype is float.
_NAN_IF_MISSING = ("act_cos_clean", "act_cos_corr", "act_bias", "pred_answer", "recovery", "kl")


def assemble(out: Path | str) -> None:
    """Per-pair files (in global pair order) -> results/{experiment}.json, cells.parquet,
    trajectories.parquet, thoughts.json, and the tables of every other stage folder present
    (:data:`ASSEMBLERS`). Needs no model: ``merge`` uses it on shard outputs."""
    paths = RunPaths(out)
    files = sorted(paths.pair_results.glob("[0-9]*.json"))
    nested: dict[str, dict] = {}
    cell_rows, traj_rows, thoughts = [], [], {}
    for f in files:
        data = read_pair_result(f)
        if data is None:
            raise LatentPatchError(f"{f} is damaged (truncated?); fix: delete it and rerun the run with --resume")
        pid = data["pair_id"]
        if "thoughts" in data:
            thoughts[pid] = data["thoughts"]
        for row in data["cells"]:
            metrics = {k: v for k, v in row.items() if k not in _NOT_NESTED}
            by_layer = nested.setdefault(row["experiment"], {}).setdefault(pid, {})
            by_layer.setdefault(str(row["layer"]), {})[row["key"]] = metrics
            cell = {c: row.get(c) for c in CELL_COLUMNS + [c for c in STOP_COLUMNS if c in row]}
            cell["pair_id"] = pid
            for c in _NAN_IF_MISSING:
                if cell[c] is None:
                    cell[c] = math.nan
            cell_rows.append(cell)
            if row["mode"] in TRACKED_MODES and "act_positions" in row:
                by_position = zip(
                    row["act_positions"], row["act_cos_clean_by_position"], row["act_cos_corr_by_position"]
                )
                for q, cc, cr in by_position:
                    traj_rows.append(
                        {
                            "pair_id": pid,
                            "layer": row["layer"],
                            "mode": row["mode"],
                            "position": q,
                            "act_cos_clean": cc,
                            "act_cos_corr": cr,
                            "act_bias": cc - cr,
                        }
                    )
    for name, data in nested.items():
        write_json(paths.experiment_result(name), data)
    # a family with a stop rule adds its columns (docs/method.md §22); other runs' tables stay as they were
    stops = STOP_COLUMNS if any(LATENT_COUNT in row for row in cell_rows) else []
    write_parquet(paths.cells, cell_rows, CELL_COLUMNS + stops)
    write_parquet(paths.trajectories, traj_rows, TRAJECTORY_COLUMNS)
    write_json(paths.thoughts, thoughts)
    done = {assemble}
    for folder, (_, assembler) in ASSEMBLERS.items():
        if assembler not in done and (paths.results / folder).is_dir():
            done.add(assembler)  # lens and attention share one
            assembler(out)


def assemble_steer(out: Path | str) -> None:
    """``results/steer/*.json`` (in global pair order) -> ``results/steer.parquet``."""
    results = RunPaths(out).results
    rows = [row for entry in _stage_entries(results / STEER_DIR, "rows") for row in entry["rows"]]
    for row in rows:
        for c in STEER_FLOAT_COLUMNS:
            if row[c] is None:
                row[c] = float("nan")
    write_parquet(results / STEER_FILE, rows, STEER_COLUMNS)


def assemble_edges(out: Path | str) -> None:
    """``results/edges/*.json`` (in global pair order) -> ``results/edges.parquet``."""
    results = RunPaths(out).results
    rows = [row for entry in _stage_entries(results / EDGES_DIR, "rows") for row in entry["rows"]]
    for row in rows:
        for c in EDGE_FLOAT_COLUMNS:
            if row[c] is None:
                row[c] = float("nan")
    write_parquet(results / EDGES_FILE, rows, EDGE_COLUMNS)


def assemble_steps(out: Path | str) -> None:
    """``results/steps/*.json`` (in global pair order) -> ``results/steps.parquet``, ``influence.parquet``."""
    results = RunPaths(out).results
    rows: list[dict] = []
    influence: list[dict] = []
    for entry in _stage_entries(results / STEPS_DIR, "rows"):
        rows += entry["rows"]
        influence += entry["influence"]
    for row in rows + influence:
        for c in STEP_FLOAT_COLUMNS:
            if c in row and row[c] is None:
                row[c] = float("nan")
    write_parquet(results / STEPS_FILE, rows, STEP_COLUMNS)
    write_parquet(results / INFLUENCE_FILE, influence, INFLUENCE_COLUMNS)


def _rows(folder: Path, key: str) -> list[dict]:
    rows: list[dict] = []
    for entry in _stage_entries(folder, key):
        rows += [{"pair_id": entry["pair_id"], **row} for row in entry[key]]
    return rows


def assemble_reading(out: Path | str) -> None:
    """Per-pair reading files (global pair order) -> ``lens.parquet``, ``lens_top.parquet``, ``attention.parquet``."""
    results = RunPaths(out).results
    if (results / LENS_DIR).is_dir():
        for key, name, columns in (("lens", LENS_FILE, LENS_COLUMNS), ("lens_top", LENS_TOP_FILE, LENS_TOP_COLUMNS)):
            rows = _rows(results / LENS_DIR, key)
            if rows and LENS_COLUMN in rows[0]:  # --lens tuned|both: the lens after pair_id
                columns = [columns[0], LENS_COLUMN, *columns[1:]]
            write_parquet(results / name, rows, columns)
    if (results / ATTENTION_DIR).is_dir():
        write_parquet(results / ATTENTION_FILE, _rows(results / ATTENTION_DIR, "rows"), ATTENTION_COLUMNS)
        entries = _stage_entries(results / ATTENTION_DIR, "rows")
        if entries and all("thoughts" in e for e in entries):  # files written before the maps have none
            rows = [{"pair_id": e["pair_id"], **row} for e in entries for row in e["thoughts"]]
            write_parquet(results / ATTENTION_THOUGHTS_FILE, rows, ATTENTION_THOUGHT_COLUMNS)


def assemble_atp(out: Path | str) -> None:
    """``results/atp/*.json`` (global pair order) -> ``results/atp.parquet``."""
    results = RunPaths(out).results
    rows: list[dict] = []
    for entry in _stage_entries(results / ATP_DIR, "rows"):
        for row in entry["rows"]:
            row = {"pair_id": entry["pair_id"], **row}
            for c in ATP_FLOAT_COLUMNS:
                if row[c] is None:
                    row[c] = math.nan
            rows.append(row)
    write_parquet(results / ATP_FILE, rows, ATP_COLUMNS)


#: Every stage folder under ``results/`` -> (the list key its whole per-pair files hold, the
#: model-free assembler of its tables). ``merge`` copies and assembles each one present.
ASSEMBLERS: dict[str, tuple[str, Any]] = {
    PAIRS_DIR: ("cells", assemble),
    STEPS_DIR: ("rows", assemble_steps),
    STEER_DIR: ("rows", assemble_steer),
    LENS_DIR: ("lens", assemble_reading),
    ATTENTION_DIR: ("rows", assemble_reading),
    ATP_DIR: ("rows", assemble_atp),
    EDGES_DIR: ("rows", assemble_edges),
}
