"""``report.html``: one self-contained page per run, rebuilt from the results alone (no model).

:func:`build_report` reads the run directory (docs/ARCHITECTURE.md), recomputes the statistics
(:mod:`latentpatch.analysis.stats`) and the figures (:mod:`latentpatch.analysis.figures`) and writes
``RUN_DIR/report.html``. Figures are embedded as base64 PNG; the page loads nothing from the
network. The page is assembled here from its sections (:mod:`latentpatch.analysis.sections`,
:mod:`latentpatch.analysis.stats_section`); section ids (for links and tests) are in :data:`SECTIONS`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.analysis import figures as figs
from latentpatch.analysis import stats as st
from latentpatch.analysis.atp_section import atp_section
from latentpatch.analysis.das_section import das_section
from latentpatch.analysis.edges_section import edges_section
from latentpatch.analysis.figure_set import start_cell_figures, summary_figures
from latentpatch.analysis.findings import what_was_run
from latentpatch.analysis.html import CSS, escape
from latentpatch.analysis.probe_section import probe_section
from latentpatch.analysis.reading_section import reading_sections
from latentpatch.analysis.sections import (
    SECTIONS,
    baselines_section,
    checks_section,
    config_section,
    flagged_section,
    reproduce_section,
    section,
    summary_section,
    thoughts_section,
)
from latentpatch.analysis.selection import used_pairs
from latentpatch.analysis.skeleton import EXPERIMENT_SECTIONS, ExperimentSection, findings_list, not_run_line
from latentpatch.analysis.stats_section import statistics_section
from latentpatch.analysis.steer_section import steer_section
from latentpatch.analysis.steps_section import steps_sections
from latentpatch.analysis.stop_stats import stops_section
from latentpatch.analysis.sweep_sections import sweep_sections
from latentpatch.files import atomic_write_text
from latentpatch.rundir import (
    RunPaths,
    check_result_files,
    read_cells,
    read_manifest,
    read_pairs_json,
    read_thoughts,
    read_trajectories,
)

__all__ = ["SECTIONS", "build_report", "render_page"]


def _banners(manifest: dict, n_fail: int) -> str:
    """Warnings at the top of the page: an unfinished run, failed checks."""
    banners = ""
    if manifest.get("status") != "complete":
        status = escape(manifest.get("status", "unknown"))
        banners += f'<div class="banner warn">Run status is "{status}": the results may be partial.</div>'
    if n_fail:
        banners += (
            f'<div class="banner bad">{n_fail} built-in check(s) failed — '
            'see <a href="#checks">Built-in checks</a>.</div>'
        )
    return banners


def experiment_sections(
    run_dir: Path, stats: dict[str, Any], fig_dir: Path, config: dict, formats: tuple[str, ...]
) -> list[ExperimentSection]:
    """The sections of the experiments this run has, in page order (:data:`EXPERIMENT_SECTIONS`)."""
    made = [
        *(sweep_sections(stats, fig_dir, config) if stats.get("cells") else []),
        *steps_sections(run_dir, stats, formats),
        *reading_sections(run_dir, formats, stats),
        *([atp] if (atp := atp_section(run_dir, formats, stats)) is not None else []),
        *([probe] if (probe := probe_section(run_dir, formats, stats)) is not None else []),
        *([steer] if (steer := steer_section(run_dir, formats, stats)) is not None else []),
        *([edges] if (edges := edges_section(run_dir, formats, stats)) is not None else []),
        *([das] if (das := das_section(run_dir, formats, stats)) is not None else []),
        *([stops] if (stops := stops_section(stats)) is not None else []),
    ]
    order = [sid for sid, _, _ in EXPERIMENT_SECTIONS]
    return sorted(made, key=lambda s: order.index(s.sid))


def render_page(
    run_dir: Path,
    manifest: dict,
    stats: dict[str, Any],
    all_cells: pd.DataFrame | None,
    thoughts: dict | None,
    pairs: dict[str, dict[str, Any]],
    exclude_flagged: bool,
    formats: tuple[str, ...] = ("png",),
) -> str:
    """The HTML of ``report.html`` from the run's manifest and statistics; figures are drawn (or were).

    The page: the findings of every experiment that ran (one sentence each, quoted from ``stats``),
    the checks and baselines, one section per experiment that ran (:mod:`latentpatch.analysis.skeleton`),
    the statistics, flagged pairs and decoded thoughts where the run has them, then model, configuration,
    the reproduce command and a line naming what else the tool can run. ``all_cells``: every pair's rows of
    ``results/cells.parquet`` (flagged pairs listed even when excluded from ``stats``; None: no cells).
    """
    fig_dir = RunPaths(page_dir(run_dir, exclude_flagged)).figures
    config = manifest.get("config") or {}
    experiments = experiment_sections(run_dir, stats, fig_dir, config, formats)
    checks_html, n_fail = checks_section(manifest)
    predictions = (manifest.get("baselines") or {}).get("per_pair")
    parts = [
        section("findings", what_was_run(manifest, stats) + findings_list(experiments)),
        checks_html,
        baselines_section(manifest),
        *(s.html() for s in experiments),
    ]
    if stats.get("cells"):
        parts.append(statistics_section(stats))
    if stats.get("flagged_pairs") and all_cells is not None:
        parts.append(flagged_section(stats, all_cells))
    if thoughts:
        parts.append(thoughts_section(thoughts, pairs, predictions=predictions))
    parts += [summary_section(manifest, stats, run_dir), config_section(manifest)]
    parts += [reproduce_section(manifest, run_dir, exclude_flagged), not_run_line(s.sid for s in experiments)]
    body = "\n".join(parts)
    ids = set(re.findall(r'<section id="([^"]+)"', body))
    nav = "".join(f'<a href="#{sid}">{escape(h.split(":")[0])}</a>' for sid, h in SECTIONS if sid in ids)
    model = manifest.get("model") or {}
    title = f"latentpatch report: {run_dir.name}"
    # the run's own date, not the page's: the same run gives the same page whenever it is rebuilt
    finished = f" · run finished {escape(manifest['finished'])}" if manifest.get("finished") else ""
    n_pairs = stats.get("n_pairs_used", (manifest.get("baselines") or {}).get("n_pairs", "?"))
    ran = ", ".join(s.sid for s in experiments) or "none"
    sub = f"model {escape(model.get('name', '?'))} · {n_pairs} pairs · experiments: {escape(ran)}{finished}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head>
<body><header><h1>{escape(title)}</h1><div class="sub">{sub}</div></header>
<nav>{nav}</nav><main>{_banners(manifest, n_fail)}
{body}
</main></body></html>
"""


#: Where ``latentpatch report --exclude-flagged`` writes its stats, figures and page: beside the full
#: report, not over it.
EXCLUDE_FLAGGED_DIR = "exclude_flagged"


def page_dir(run_dir: Path, exclude_flagged: bool) -> Path:
    """The folder of a report's outputs: the run directory, or ``RUN_DIR/exclude_flagged``."""
    return run_dir / EXCLUDE_FLAGGED_DIR if exclude_flagged else run_dir


def figure_formats(manifest: dict, formats: Iterable[str] | None) -> tuple[str, ...]:
    """The figure formats of a report: ``formats`` if given, else the run's ``figure_formats`` option
    (e.g. ``"svg"``), PNG always first (the page embeds it).

    >>> figure_formats({"config": {"figure_formats": "svg"}}, None)
    ('png', 'svg')
    >>> figure_formats({"config": {}}, None)
    ('png',)
    """
    if formats is None:
        extra = (manifest.get("config") or {}).get("figure_formats") or ""
        formats = [f.strip().lower() for f in str(extra).split(",") if f.strip()]
    return figs.page_formats(formats)


def has_no_cells(run_dir: Path) -> bool:
    """A run of step-level and/or reading experiments only: ``cells.parquet`` exists with no rows."""
    import pyarrow.parquet as pq

    paths = RunPaths(run_dir)
    try:
        return pq.ParquetFile(paths.cells).metadata.num_rows == 0
    except Exception:  # missing or damaged: read_cells names the file and the fix
        return False


def build_sections_report(run_dir: Path, manifest: dict[str, Any], formats: tuple[str, ...]) -> Path:
    """``report.html`` of a run without cells (step-level, reading and ``atp`` experiments only): its
    ``stats.json`` holds their statistics (no per-cell ones), the page the same skeleton."""
    stats = st.add_stage_stats(run_dir, {})
    settings = {"seed": st.run_seed(manifest), "n_resamples": 9999}
    if stats:
        atomic_write_text(
            RunPaths(run_dir).stats, json.dumps({"settings": settings, **stats}, indent=1, allow_nan=False)
        )
    page = render_page(
        run_dir,
        manifest,
        {"settings": settings, **stats},
        None,
        read_thoughts(run_dir),
        read_pairs_json(run_dir),
        False,
        formats,
    )
    out = RunPaths(run_dir).report
    atomic_write_text(out, page)
    return out


def build_report(
    run_dir: Path | str,
    exclude_flagged: bool = False,
    n_resamples: int = 9999,
    ci_method: str = "percentile",
    formats: Iterable[str] | None = None,
) -> Path:
    """Rebuild ``stats.json``, ``stats/*.csv``, ``figures/*`` and ``report.html`` from a run's results.

    Needs ``manifest.json`` and ``results/cells.parquet``; uses ``results/trajectories.parquet``,
    ``results/thoughts.json`` and ``pairs.json`` when present. A missing or corrupt file raises
    :class:`LatentPatchError` naming it. Returns the path of ``report.html``. With
    ``exclude_flagged`` every output goes to ``RUN_DIR/exclude_flagged/`` (the full report stays).
    ``formats``: figure files besides PNG (e.g. ``("svg",)``); default: the run's ``figure_formats``.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    check_result_files(run_dir)
    formats = figure_formats(manifest, formats)
    if has_no_cells(run_dir):  # only step-level / reading experiments (docs/method.md §13-§14)
        return build_sections_report(run_dir, manifest, formats)
    all_cells = read_cells(run_dir)
    trajectories = read_trajectories(run_dir)
    out_dir = page_dir(run_dir, exclude_flagged)
    cells = used_pairs(all_cells, exclude_flagged)
    if trajectories is not None and exclude_flagged:
        trajectories = trajectories[trajectories["pair_id"].astype(str).isin(set(cells["pair_id"]))]
    run = figs.RunLabels.of(manifest, set(cells["pair_id"]))
    # the figures of the cells alone are drawn (in a child process where cores allow) meanwhile
    cell_job = start_cell_figures(RunPaths(out_dir).figures, cells, trajectories, formats, run)

    stats = st.stats_from_cells(all_cells, st.run_seed(manifest), exclude_flagged, n_resamples, ci_method=ci_method)
    stats = st.add_stage_stats(run_dir, stats, n_resamples, cells)  # "steps": only with step-level experiments
    st.write_stats(out_dir, stats)
    summary_figures(RunPaths(out_dir).figures, pd.DataFrame(stats["cells"]), formats, run)
    cell_job.result()

    page = render_page(
        run_dir,
        manifest,
        stats,
        all_cells,
        read_thoughts(run_dir),
        read_pairs_json(run_dir),
        exclude_flagged,
        formats,
    )
    out = RunPaths(out_dir).report
    atomic_write_text(out, page)
    return out
