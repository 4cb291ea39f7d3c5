"""Every figure of a run's page, drawn serially or partly in child processes.

The figures split in two independent sets: those of the summary statistics (they need the
bootstrap of :mod:`latentpatch.analysis.stats`) and those of the cells and trajectories alone
(per-pair heatmaps, pairs x layers, chained similarity). :func:`start_cell_figures` draws the second
set in a forked child process while the caller computes the statistics and draws the first set,
whose position heatmaps go to a second child once the statistics are there: on two free cores the
report takes about half its serial time. The same code draws each figure in any process, so the
files are byte-identical to a serial run.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.analysis import figures as figs
from latentpatch.analysis.findings import RunLabels
from latentpatch.analysis.pair_figures import position_heatmaps_per_pair

__all__ = ["cell_figures", "in_child", "make_figures", "start_cell_figures", "summary_figures"]


def summary_figures(
    out: Path, summary: pd.DataFrame, formats: tuple[str, ...], run: RunLabels | None = None
) -> list[Path]:
    """The figures of the per-cell summary (layer bars, position heatmaps, cumulative, modes); the
    heatmaps, the largest of them, in a child process (:func:`in_child`) while this one draws the rest."""
    if summary.empty:
        return []
    heatmaps = in_child(partial(figs.position_heatmaps, run=run), summary, out, formats)
    paths = figs.layer_bars(summary, out, formats, run=run)
    later = figs.cumulative_trajectories(summary, out, formats, run=run)
    later += figs.modes_comparison(summary, out, formats, run=run)
    return paths + heatmaps.result() + later


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


def in_child(draw: Callable[..., list[Path]], *args: Any) -> Future[list[Path]]:
    """Start ``draw(*args)``; ``.result()`` gives the files it wrote.

    In a forked child process when the platform forks and two cores are available (a child only
    draws with matplotlib, never uses torch); otherwise drawn here, before returning.

    >>> in_child(sorted, [Path("b"), Path("a")]).result()
    [PosixPath('a'), PosixPath('b')]
    """
    if _free_cores() >= 2 and "fork" in multiprocessing.get_all_start_methods():
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
        future = pool.submit(draw, *args)
        pool.shutdown(wait=False)  # the child exits once its one job is done
        return future
    done: Future[list[Path]] = Future()
    done.set_result(draw(*args))
    return done


def start_cell_figures(
    out: Path,
    cells: pd.DataFrame,
    trajectories: pd.DataFrame | None,
    formats: Iterable[str],
    run: RunLabels | None = None,
) -> Future[list[Path]]:
    """Start drawing :func:`cell_figures` into ``out`` (:func:`in_child`); ``.result()`` gives the files."""
    out.mkdir(parents=True, exist_ok=True)
    return in_child(cell_figures, out, cells, trajectories, tuple(formats), run)


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
