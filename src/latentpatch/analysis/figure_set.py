"""Every figure of a run's page, drawn serially or with the per-pair ones in a child process.

The figures split in two independent sets: those of the summary statistics (they need the
bootstrap of :mod:`latentpatch.analysis.stats`) and those of the cells and trajectories alone
(per-pair heatmaps, pairs x layers, chained similarity). :func:`start_cell_figures` draws the second
set in a forked child process while the caller computes the statistics and draws the first set:
on two free cores the report takes about the time of the slower half. The same code draws each
figure in either process, so the files are byte-identical to a serial run.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from latentpatch.analysis import figures as figs
from latentpatch.analysis.findings import RunLabels
from latentpatch.analysis.pair_figures import position_heatmaps_per_pair

__all__ = ["cell_figures", "make_figures", "start_cell_figures", "summary_figures"]


def summary_figures(
    out: Path, summary: pd.DataFrame, formats: tuple[str, ...], run: RunLabels | None = None
) -> list[Path]:
    """The figures of the per-cell summary (layer bars, position heatmaps, cumulative, modes)."""
    if summary.empty:
        return []
    paths = figs.layer_bars(summary, out, formats, run=run)
    paths += figs.position_heatmaps(summary, out, formats, run=run)
    paths += figs.cumulative_trajectories(summary, out, formats, run=run)
    paths += figs.modes_comparison(summary, out, formats, run=run)
    return paths


def cell_figures(
    out: Path,
    cells: pd.DataFrame,
    trajectories: pd.DataFrame | None,
    formats: tuple[str, ...],
    run: RunLabels | None = None,
) -> list[Path]:
    """The figures of the cells and trajectories alone (no statistics needed)."""
    paths: list[Path] = []
    if not cells.empty:
        paths += position_heatmaps_per_pair(cells, out, formats, run=run)
        paths += figs.pairs_layers(cells, out, formats, run=run)
    paths += figs.chained_similarity(trajectories, out, formats, run=run)
    return paths


def _free_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def start_cell_figures(
    out: Path,
    cells: pd.DataFrame,
    trajectories: pd.DataFrame | None,
    formats: Iterable[str],
    run: RunLabels | None = None,
) -> Future[list[Path]]:
    """Start drawing :func:`cell_figures` into ``out``; ``.result()`` gives the files written.

    In a forked child process when the platform forks and two cores are available (the child only
    draws with matplotlib, never uses torch); otherwise drawn here, before returning.
    """
    out.mkdir(parents=True, exist_ok=True)
    formats = tuple(formats)
    if _free_cores() >= 2 and "fork" in multiprocessing.get_all_start_methods():
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
        future = pool.submit(cell_figures, out, cells, trajectories, formats, run)
        pool.shutdown(wait=False)  # the child exits once its one job is done
        return future
    done: Future[list[Path]] = Future()
    done.set_result(cell_figures(out, cells, trajectories, formats, run))
    return done


def make_figures(
    run_dir: Path | str,
    summary: pd.DataFrame,
    cells: pd.DataFrame,
    trajectories: pd.DataFrame | None = None,
    formats: Iterable[str] = ("png",),
    run: RunLabels | None = None,
) -> list[Path]:
    """Draw every figure the run's data allows into ``RUN_DIR/figures`` (serially); return the files.
    ``run``: the run's wording and baseline (:meth:`RunLabels.of`), so titles and labels follow it.

    ``summary``: :func:`latentpatch.analysis.stats.summarize_cells` output (e.g. ``pd.DataFrame(stats["cells"])``);
    ``cells``: ``results/cells.parquet`` (already filtered if flagged pairs are excluded);
    ``trajectories``: ``results/trajectories.parquet`` or None.
    """
    out = Path(run_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    formats = tuple(formats)
    return summary_figures(out, summary, formats, run) + cell_figures(out, cells, trajectories, formats, run)
