"""Rows of a run's tables chosen by the run directory's rules (:mod:`latentpatch.names`).

Works on both tidy tables: ``results/cells.parquet`` (one row per pair x spec) and the per-cell
summary of :func:`latentpatch.analysis.stats.summarize_cells` (one row per cell x metric). Every
analysis selects "the all-positions patch" and "the component to show" through these functions.
"""

from __future__ import annotations

import pandas as pd

from latentpatch.names import all_positions_cell, primary_component


def mode_rows(table: pd.DataFrame, experiment: str, mode: str) -> pd.DataFrame:
    """The rows of one (experiment, mode)."""
    return table[(table["experiment"] == experiment) & (table["mode"] == mode)]


def all_positions_rows(table: pd.DataFrame, prefer: str = "layer") -> pd.DataFrame:
    """The rows that patch every latent position at one layer (:func:`latentpatch.names.all_positions_cell`):
    the layer sweep's ``all`` cells, else iterative ``parallel`` (``prefer="iterative"``: the other
    way round). Empty if the table has neither."""
    cell = all_positions_cell(zip(table["experiment"], table["mode"]), prefer)
    return table.iloc[0:0] if cell is None else mode_rows(table, *cell)


def mode_table(cells: pd.DataFrame, mode: str) -> pd.DataFrame | None:
    """Per (pair_id, component, layer) rows of one iterative mode; parallel falls back to the layer sweep.

    If a mode has several positions at a layer, the smallest is used (chained/frozen start at 0).
    """
    sel = all_positions_rows(cells, prefer="iterative") if mode == "parallel" else mode_rows(cells, "iterative", mode)
    if sel.empty:
        return None
    sel = sel.sort_values("position", kind="stable").drop_duplicates(["pair_id", "component", "layer"], keep="first")
    return sel.set_index(["pair_id", "component", "layer"])


def primary_component_of(table: pd.DataFrame) -> str | None:
    """The component to show (:func:`latentpatch.names.primary_component` of the ``component`` column)."""
    return primary_component(table["component"])


def used_pairs(cells: pd.DataFrame, exclude_flagged: bool) -> pd.DataFrame:
    """The cells of the pairs an analysis uses: without flagged pairs (the model gets clean or
    corrupted wrong) when ``exclude_flagged``."""
    return cells[~cells["flagged"]] if exclude_flagged else cells
