"""Log a finished run directory to Weights & Biases (optional extra: ``pip install 'latentpatch[wandb]'``).

:func:`log_run` logs, from the run directory alone (docs/ARCHITECTURE.md):
- ``config``: the manifest's run config plus ``model_info`` (manifest ``model``), seed, dtype,
  device, git commit, command;
- ``cells``: ``results/cells.parquet`` as a ``wandb.Table`` (one row per pair x patch spec);
- ``cell_stats``: the per-cell statistics (``stats/cells.csv``: mean, CI, p-values) as a table;
- aggregates: per-layer means of the all-positions patch as ``layer_sweep/<metric>`` against the
  step metric ``layer``; checks, baselines and the best layer per metric in the run summary;
- ``figures/<name>``: every ``figures/*.png`` as ``wandb.Image``.
Works offline (``WANDB_MODE=offline``) without an account. Missing statistics/figures are built first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.analysis.selection import all_positions_rows, primary_component_of, used_pairs
from latentpatch.analysis.stats import compute_stats
from latentpatch.errors import LatentPatchError
from latentpatch.files import json_safe
from latentpatch.rundir import RunPaths, read_cells, read_manifest, read_stats, read_trajectories

DEFAULT_PROJECT = "latentpatch"


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise LatentPatchError("wandb is not installed: pip install 'latentpatch[wandb]'") from None
    return wandb


def _layer_means(summary: pd.DataFrame) -> pd.DataFrame:
    """Per-layer mean of each metric for the all-positions patch (layer sweep, else parallel): layer x metric."""
    if summary.empty:
        return pd.DataFrame()
    comp = primary_component_of(summary)
    d = all_positions_rows(summary[summary["component"] == comp])
    if d.empty:
        return pd.DataFrame()
    return d.pivot_table(index="layer", columns="metric", values="mean").sort_index()


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _read_or_compute_stats(run_dir: Path, exclude_flagged: bool) -> dict[str, Any]:
    """``stats.json`` when it holds what is logged (every pair's statistics), else recomputed (and written)."""
    stats = None
    if not exclude_flagged:  # stats.json holds every pair's statistics
        try:
            stats = read_stats(run_dir)
        except LatentPatchError:  # corrupt: rebuilt below
            stats = None
    if stats is None or "cells" not in stats:
        stats = compute_stats(run_dir, exclude_flagged=exclude_flagged)
    return stats


def _figure_pngs(run_dir: Path, summary: pd.DataFrame, cells: pd.DataFrame, exclude_flagged: bool) -> list[Path]:
    """The run's ``figures/*.png``, drawn first if there are none."""
    fig_dir = RunPaths(run_dir).figures
    pngs = sorted(fig_dir.glob("*.png")) if fig_dir.is_dir() else []
    if not pngs:
        from latentpatch.analysis.figure_set import make_figures

        used = used_pairs(cells, exclude_flagged)
        make_figures(run_dir, summary, used, read_trajectories(run_dir), formats=("png",))
        pngs = sorted(fig_dir.glob("*.png"))
    return pngs


def _init_run(
    wandb: Any, run_dir: Path, manifest: dict, project: str | None, exclude_flagged: bool, wandb_dir: Path | str | None
) -> Any:
    """``wandb.init`` with the run's config; LatentPatchError (with what to do) if W&B refuses."""
    config = dict(manifest.get("config") or {})
    config.update(
        model_info=manifest.get("model"),
        seed=manifest.get("seed"),
        dtype=manifest.get("dtype"),
        device=manifest.get("device"),
        git_commit=manifest.get("git_commit"),
        command=manifest.get("command"),
        run_dir=str(run_dir.resolve()),
        exclude_flagged=exclude_flagged,
    )
    init_kwargs: dict[str, Any] = dict(
        project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        name=run_dir.name,
        config=json_safe(config),
        job_type="patching",
    )
    if wandb_dir is not None:
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        init_kwargs["dir"] = str(wandb_dir)
    try:
        return wandb.init(**init_kwargs)
    except Exception as err:  # not logged in, no network, bad project name: user-fixable
        raise LatentPatchError(
            f"wandb.init failed ({type(err).__name__}: {err}); run `wandb login` or set WANDB_MODE=offline"
        ) from None


def _log_layer_sweep(run: Any, summary: pd.DataFrame) -> None:
    """``layer_sweep/<metric>`` against the step metric ``layer``; best layer and its mean in the summary."""
    means = _layer_means(summary)
    if means.empty:
        return
    run.define_metric("layer")
    run.define_metric("layer_sweep/*", step_metric="layer")
    for layer, row in means.iterrows():
        run.log({"layer": int(layer), **{f"layer_sweep/{m}": _finite(float(v)) for m, v in row.items() if pd.notna(v)}})
    for m in means.columns:
        col = means[m].dropna()
        if not col.empty:
            run.summary[f"best_layer/{m}"] = int(col.idxmax())
            run.summary[f"max_layer_mean/{m}"] = float(col.max())


def _log_manifest_summary(run: Any, manifest: dict, stats: dict[str, Any]) -> None:
    """Checks, baselines and the number of pairs used, into the run summary."""
    for name, c in (manifest.get("checks") or {}).items():
        if isinstance(c, dict):
            run.summary[f"checks/{name}/passed"] = c.get("passed")
            if isinstance(c.get("value"), (int, float)):
                run.summary[f"checks/{name}/value"] = _finite(float(c["value"]))
    for k, v in (manifest.get("baselines") or {}).items():
        run.summary[f"baselines/{k}"] = len(v) if isinstance(v, list) else v
    run.summary["n_pairs_used"] = stats.get("n_pairs_used")


def log_run(
    run_dir: Path | str, project: str | None = None, exclude_flagged: bool = False, wandb_dir: Path | str | None = None
) -> Path:
    """Log a run directory to W&B; return the local W&B run directory (``.../wandb/<run>-<id>``).

    ``project``: W&B project (default ``$WANDB_PROJECT`` or ``"latentpatch"``). ``wandb_dir``: where
    W&B writes locally (default ``$WANDB_DIR`` or the current directory). Statistics are read from
    ``stats.json`` when present (else computed), figures from ``figures/*.png`` (else drawn).
    """
    wandb = _import_wandb()
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    cells = read_cells(run_dir)
    stats = _read_or_compute_stats(run_dir, exclude_flagged)
    summary = pd.DataFrame(stats["cells"])
    pngs = _figure_pngs(run_dir, summary, cells, exclude_flagged)

    run = _init_run(wandb, run_dir, manifest, project, exclude_flagged, wandb_dir)
    try:
        table_cells = cells.copy()
        table_cells["flagged"] = table_cells["flagged"].astype(bool)
        run.log({"cells": wandb.Table(dataframe=table_cells), "cell_stats": wandb.Table(dataframe=summary)})
        _log_layer_sweep(run, summary)
        run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in pngs})
        _log_manifest_summary(run, manifest, stats)
        local_dir = Path(run.dir).parent
    finally:
        run.finish()
    return local_dir
