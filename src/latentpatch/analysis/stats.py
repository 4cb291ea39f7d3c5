"""The statistics of a run (``stats.json``, ``stats/*.csv``) from its per-pair cells.

Everything is a pure function on the tidy ``results/cells.parquet`` table (one row per pair x
patch spec), plus :func:`compute_stats` which reads a run directory and writes ``stats.json``,
``stats/cells.csv``, ``stats/comparisons.csv`` and ``stats/additivity.csv``. The tests, CIs and
corrections themselves are in :mod:`latentpatch.analysis.inference`.

A *cell* is one ``(experiment, mode, component, layer, position)``; its sample is the metric's
values over pairs. Per cell: n, mean, std (ddof=1), median, a seeded bootstrap CI of the mean
(:func:`scipy.stats.bootstrap`) and a one-sample Wilcoxon signed-rank test against 0, with Holm and
Benjamini–Hochberg adjusted p-values across the cells of one ``(experiment, mode, component,
metric)`` family (the layer x position grid). Per layer: paired chained/parallel/frozen
comparisons and the additivity of single-position effects (docs/method.md §10).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latentpatch.analysis.atp_stats import atp_stats, read_atp
from latentpatch.analysis.contrasts import iterative_contrasts, step_contrasts
from latentpatch.analysis.das_stats import das_stats, read_das
from latentpatch.analysis.edge_stats import edge_stats, read_edges
from latentpatch.analysis.inference import benjamini_hochberg, bootstrap_mean_ci, holm, paired_test, wilcoxon_p
from latentpatch.analysis.probe_stats import probe_stats, read_probes
from latentpatch.analysis.reading_stats import (
    attention_stats,
    lens_stats,
    read_attention,
    read_lens,
    read_thought_attention,
    thought_attention_stats,
)
from latentpatch.analysis.selection import all_positions_rows, mode_rows, mode_table, used_pairs
from latentpatch.analysis.steer_stats import read_steer, steer_stats
from latentpatch.analysis.step_stats import read_steps, step_stats
from latentpatch.analysis.stop_stats import latent_stop_stats
from latentpatch.errors import LatentPatchError
from latentpatch.files import atomic_write_text, json_safe
from latentpatch.names import (
    ADDITIVE_METRICS,
    CELL_KEYS,
    MODE_COMPARISONS,
    POSITION_MODE,
    SUMMARY_METRICS,
)
from latentpatch.rundir import RunPaths, check_result_files, read_cells, read_manifest

#: Metrics summarised per cell (``act_bias`` only exists for chained/frozen rows; NaN elsewhere).
METRICS = SUMMARY_METRICS


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _present_metrics(cells: pd.DataFrame, metrics: Iterable[str]) -> list[str]:
    return [m for m in metrics if m in cells.columns]


#: Columns of :func:`summarize_cells`.
SUMMARY_COLUMNS = [
    *CELL_KEYS,
    *("metric", "n", "mean", "std", "median", "ci_low", "ci_high"),
    *("wilcoxon_stat", "p_wilcoxon", "p_holm", "p_bh"),
]


def _cell_row(key: dict[str, Any], x: np.ndarray) -> dict[str, Any]:
    """One cell's summary of its sample ``x`` [n_pairs] (CI filled in later by the family's bootstrap)."""
    stat, p = wilcoxon_p(x)
    return dict(
        **key,
        n=int(x.size),
        mean=float(x.mean()),
        std=float(x.std(ddof=1)) if x.size > 1 else math.nan,
        median=float(np.median(x)),
        ci_low=math.nan,
        ci_high=math.nan,
        wilcoxon_stat=stat,
        p_wilcoxon=p,
    )


def _add_cis(
    rows: list[dict], samples: list[np.ndarray], seed: int, n_resamples: int, confidence: float, ci_method: str
) -> None:
    """Fill ``ci_low``/``ci_high`` of ``rows`` from their ``samples``, in place.

    Cells with the same n are bootstrapped in one call (same draws as per-cell calls).
    """
    by_n: dict[int, list[int]] = {}
    for i, x in enumerate(samples):
        by_n.setdefault(x.size, []).append(i)
    for idx in by_n.values():
        lo, hi = bootstrap_mean_ci(np.stack([samples[i] for i in idx]), seed, n_resamples, confidence, ci_method)
        for j, i in enumerate(idx):
            rows[i]["ci_low"], rows[i]["ci_high"] = float(lo[j]), float(hi[j])


def summarize_cells(
    cells: pd.DataFrame,
    metrics: Iterable[str] = METRICS,
    seed: int = 0,
    n_resamples: int = 9999,
    confidence: float = 0.95,
    ci_method: str = "percentile",
) -> pd.DataFrame:
    """Per cell and metric over pairs: n, mean, std, median, bootstrap CI, Wilcoxon p (raw, Holm, BH).

    ``cells``: the ``results/cells.parquet`` table (rows = pair x spec). Returns one row per
    (experiment, mode, component, layer, position, metric) with columns ``n, mean, std, median,
    ci_low, ci_high, wilcoxon_stat, p_wilcoxon, p_holm, p_bh``. A metric that is NaN for every
    pair of a cell (e.g. ``act_bias`` outside chained/frozen) gives no row. Corrections run over
    the cells of one (experiment, mode, component, metric) family, i.e. the layer x position grid.
    """
    metrics = _present_metrics(cells, metrics)
    long = cells.melt(id_vars=CELL_KEYS + ["pair_id"], value_vars=metrics, var_name="metric", value_name="value")
    long = long.dropna(subset=["value"]).sort_values(CELL_KEYS + ["metric", "pair_id"], kind="stable")
    out_rows: list[dict] = []
    for (exp, mode, comp, metric), fam in long.groupby(["experiment", "mode", "component", "metric"], sort=True):
        fam_rows = []
        samples = []  # per cell, values in pair order
        for (layer, pos), g in fam.groupby(["layer", "position"], sort=True):
            samples.append(g["value"].to_numpy(float))
            key = dict(experiment=exp, mode=mode, component=comp, layer=int(layer), position=int(pos), metric=metric)
            fam_rows.append(_cell_row(key, samples[-1]))
        _add_cis(fam_rows, samples, seed, n_resamples, confidence, ci_method)
        p = [r["p_wilcoxon"] for r in fam_rows]
        for r, ph, pb in zip(fam_rows, holm(p), benjamini_hochberg(p)):
            r["p_holm"], r["p_bh"] = float(ph), float(pb)
        out_rows.extend(fam_rows)
    return pd.DataFrame(out_rows, columns=SUMMARY_COLUMNS)


def _all_positions_table(cells: pd.DataFrame) -> pd.DataFrame | None:
    """Per (pair_id, component, layer) all-latent-positions patch: the layer sweep, else iterative parallel."""
    sel = all_positions_rows(cells)
    if sel.empty:
        return None
    return sel.drop_duplicates(["pair_id", "component", "layer"]).set_index(["pair_id", "component", "layer"])


def compare_modes(
    cells: pd.DataFrame,
    metrics: Iterable[str] = METRICS,
    comparisons: Iterable[tuple[str, str]] = MODE_COMPARISONS,
) -> pd.DataFrame:
    """Per layer, paired tests between iterative modes (chained vs parallel vs frozen) over pairs.

    Returns one row per (comparison a−b, component, layer, metric) with the :func:`paired_test`
    columns plus ``p_wilcoxon_holm``, ``p_wilcoxon_bh``, ``p_ttest_holm``, ``p_ttest_bh``
    (corrected across layers within one comparison, component and metric). Modes that the run
    lacks are skipped; an empty frame if none can be compared.
    """
    metrics = _present_metrics(cells, metrics)
    tables = {m: mode_table(cells, m) for m in {x for ab in comparisons for x in ab}}
    rows: list[dict] = []
    for a, b in comparisons:
        ta, tb = tables.get(a), tables.get(b)
        if ta is None or tb is None:
            continue
        joined = pd.merge(ta[metrics], tb[metrics], left_index=True, right_index=True, suffixes=("_a", "_b"))
        for (comp, layer), g in joined.groupby(level=["component", "layer"], sort=True):
            for metric in metrics:
                x, y = g[f"{metric}_a"].to_numpy(float), g[f"{metric}_b"].to_numpy(float)
                if np.all(np.isnan(x)) or np.all(np.isnan(y)):
                    continue
                rows.append(
                    dict(
                        comparison=f"{a} vs {b}",
                        a=a,
                        b=b,
                        component=comp,
                        layer=int(layer),
                        metric=metric,
                        **paired_test(x, y),
                    )
                )
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for test in ("wilcoxon", "ttest"):
        df[f"p_{test}_holm"] = np.nan
        df[f"p_{test}_bh"] = np.nan
        for _, idx in df.groupby(["comparison", "component", "metric"]).groups.items():
            p = df.loc[idx, f"p_{test}"].to_numpy(float)
            df.loc[idx, f"p_{test}_holm"] = holm(p)
            df.loc[idx, f"p_{test}_bh"] = benjamini_hochberg(p)
    return df


def additivity(cells: pd.DataFrame, metrics: Iterable[str] = ADDITIVE_METRICS) -> pd.DataFrame:
    """Per layer: the sum over latent positions of single-position effects vs the all-positions effect.

    Single-position cells come from the position sweep; the all-positions effect from the layer
    sweep (or, if absent, the iterative ``parallel`` mode). Per pair, ``sum_single`` sums the
    metric over positions (only pairs with every position present). Returns per (component,
    layer, metric): n, mean_sum_single, mean_all, mean_diff (sum − all), ratio (mean_sum /
    mean_all), and a Wilcoxon signed-rank p of sum − all. Empty if either sweep is missing.
    """
    metrics = _present_metrics(cells, metrics)
    single = mode_rows(cells, "position", POSITION_MODE)
    allpos = _all_positions_table(cells)
    if single.empty or allpos is None:
        return pd.DataFrame()
    n_pos = single["position"].nunique()
    counts = single.groupby(["pair_id", "component", "layer"])["position"].nunique()
    sums = single.groupby(["pair_id", "component", "layer"])[metrics].sum(min_count=1)
    sums = sums[counts == n_pos]
    joined = pd.merge(sums, allpos[metrics], left_index=True, right_index=True, suffixes=("_sum", "_all"))
    rows = []
    for (comp, layer), g in joined.groupby(level=["component", "layer"], sort=True):
        for metric in metrics:
            s, a = g[f"{metric}_sum"].to_numpy(float), g[f"{metric}_all"].to_numpy(float)
            ok = ~np.isnan(s) & ~np.isnan(a)
            s, a = s[ok], a[ok]
            if s.size == 0:
                continue
            _, p = wilcoxon_p(s - a)
            ms, ma = float(s.mean()), float(a.mean())
            rows.append(
                dict(
                    component=comp,
                    layer=int(layer),
                    metric=metric,
                    n=int(s.size),
                    n_positions=int(n_pos),
                    mean_sum_single=ms,
                    mean_all=ma,
                    mean_diff=ms - ma,
                    ratio=ms / ma if ma != 0 else math.nan,
                    p_wilcoxon=p,
                )
            )
    return pd.DataFrame(rows)


def top_cells(summary: pd.DataFrame, k: int = 10, metrics: Iterable[str] = METRICS) -> dict[str, dict[str, list[dict]]]:
    """Top-k cells by mean (largest first) for each ``"experiment/mode"`` and metric.

    Returns ``{"position/single": {"kl": [{layer, position, component, n, mean, ci_low, ci_high,
    p_holm, p_bh}, ...]}}``. Larger is "stronger" for every metric here (KL, recovery, logit
    difference toward the clean answer, RMS change, change rate, bias toward clean).
    """
    out: dict[str, dict[str, list[dict]]] = {}
    if summary.empty:
        return out
    keep = ["component", "layer", "position", "n", "mean", "ci_low", "ci_high", "p_wilcoxon", "p_holm", "p_bh"]
    for (exp, mode, metric), g in summary.groupby(["experiment", "mode", "metric"], sort=True):
        if metric not in metrics:
            continue
        best = g.sort_values("mean", ascending=False, kind="stable").head(k)
        out.setdefault(f"{exp}/{mode}", {})[metric] = best[keep].to_dict(orient="records")
    return out


def add_stage_stats(
    run_dir: Path | str, result: dict[str, Any], n_resamples: int = 9999, cells: pd.DataFrame | None = None
) -> dict[str, Any]:
    """``result`` with the statistics of the run's other stages, where it has them: ``steps``
    (:func:`step_stats` of the step-level tables) and ``atp`` (:func:`atp_stats`: the estimate's
    agreement with the exact effects, its paths, the ``--refine`` rows) and ``lens`` (:func:`lens_stats`:
    where each known value is read best), ``attention`` (:func:`attention_stats`: the attention mass
    per query position and role), and ``contrasts`` (:mod:`latentpatch.analysis.contrasts`: the paired
    differences the findings state; the iterative ones from ``cells``, the pairs the statistics use)."""
    seed = run_seed(read_manifest(run_dir))
    steps_table, influence = read_steps(Path(run_dir))
    steps = step_stats(steps_table, influence, seed, n_resamples)
    atp = atp_stats(read_atp(run_dir))
    lens = lens_stats(read_lens(run_dir))
    attention = attention_stats(read_attention(run_dir), seed, n_resamples)
    thought_maps = thought_attention_stats(read_thought_attention(run_dir), seed, n_resamples)
    if attention is not None and thought_maps is not None:
        attention["thoughts"] = thought_maps
    steer, steer_contrasts = steer_stats(read_steer(run_dir), seed, n_resamples)
    contrasts = iterative_contrasts(cells, seed, n_resamples) if cells is not None else []
    contrasts += step_contrasts(steps_table, influence, seed, n_resamples) + steer_contrasts
    probe = probe_stats(read_probes(run_dir), read_lens(run_dir), steps)
    edges, edge_contrasts = edge_stats(read_edges(run_dir), seed, n_resamples)
    contrasts += edge_contrasts
    das, das_contrasts = das_stats(read_das(run_dir), seed, n_resamples)
    contrasts += das_contrasts
    latent_stops = latent_stop_stats(cells, read_manifest(run_dir), seed, n_resamples)
    named = (
        ("steps", steps),
        ("lens", lens),
        ("atp", atp),
        ("attention", attention),
        ("steer", steer),
        ("probe", probe),
        ("edges", edges),
        ("das", das),
        ("latent_stops", latent_stops),
    )
    extra = {k: v for k, v in named if v is not None}
    if contrasts:
        extra["contrasts"] = json_safe(contrasts)
    return {**result, **extra}


# ---------------------------------------------------------------------------------------------
# The run-level entry point
# ---------------------------------------------------------------------------------------------


def stats_from_cells(
    cells: pd.DataFrame,
    seed: int = 0,
    exclude_flagged: bool = False,
    n_resamples: int = 9999,
    confidence: float = 0.95,
    ci_method: str = "percentile",
    top_k: int = 10,
) -> dict[str, Any]:
    """All statistics for one cells table, as a JSON-safe dict (see :func:`compute_stats`)."""
    flagged_ids = sorted(cells.loc[cells["flagged"], "pair_id"].unique().tolist())
    used = used_pairs(cells, exclude_flagged)
    if used.empty:
        raise LatentPatchError(
            "every pair is flagged (the model gets clean or corrupted wrong): drop --exclude-flagged to keep them"
        )
    summary = summarize_cells(used, seed=seed, n_resamples=n_resamples, confidence=confidence, ci_method=ci_method)
    comps = compare_modes(used)
    add = additivity(used)
    return json_safe(
        {
            "settings": {
                "seed": seed,
                "n_resamples": n_resamples,
                "confidence": confidence,
                "ci_method": ci_method,
                "exclude_flagged": exclude_flagged,
                "top_k": top_k,
                "cell_test": "one-sample Wilcoxon signed-rank vs 0 (two-sided), scipy.stats.wilcoxon",
                "corrections": "Holm and Benjamini-Hochberg across the layer x position grid of each "
                "(experiment, mode, component, metric)",
                "comparison_tests": "paired Wilcoxon and paired t-test per layer; Holm/BH across layers",
            },
            "n_pairs_total": int(cells["pair_id"].nunique()),
            "n_pairs_used": int(used["pair_id"].nunique()),
            "flagged_pairs": flagged_ids,
            "experiments": sorted(used["experiment"].unique().tolist()),
            "cells": summary.to_dict(orient="records"),
            "comparisons": comps.to_dict(orient="records"),
            "additivity": add.to_dict(orient="records"),
            "top_cells": top_cells(summary, k=top_k),
        }
    )


def compute_stats(
    run_dir: Path | str,
    exclude_flagged: bool = False,
    n_resamples: int = 9999,
    confidence: float = 0.95,
    ci_method: str = "percentile",
    top_k: int = 10,
    write: bool = True,
) -> dict[str, Any]:
    """Read a run directory, compute all statistics and (if ``write``) save them.

    Writes ``stats.json`` (the returned dict; NaN -> null), ``stats/cells.csv`` (per-cell
    summary), ``stats/comparisons.csv`` (chained/parallel/frozen tests) and
    ``stats/additivity.csv``. The bootstrap seed is the manifest's ``seed`` (0 if absent).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    check_result_files(run_dir)
    cells = read_cells(run_dir)
    result = stats_from_cells(cells, run_seed(manifest), exclude_flagged, n_resamples, confidence, ci_method, top_k)
    result = add_stage_stats(run_dir, result, n_resamples, used_pairs(cells, exclude_flagged))
    if write:
        write_stats(run_dir, result)
    return result


def run_seed(manifest: dict) -> int:
    """The run's seed (manifest ``seed``, else ``config.seed``, else 0): seeds every bootstrap."""
    seed = manifest.get("seed", (manifest.get("config") or {}).get("seed"))
    try:
        return int(seed) if seed is not None else 0
    except (TypeError, ValueError):
        return 0


def write_stats(run_dir: Path | str, result: dict[str, Any]) -> list[Path]:
    """Write ``stats.json`` and ``stats/{cells,comparisons,additivity}.csv``; return the paths."""
    paths = RunPaths(run_dir)
    written = []
    for name in ("cells", "comparisons", "additivity"):
        path = paths.stats_table(name)
        atomic_write_text(path, pd.DataFrame(result[name]).to_csv(index=False))
        written.append(path)
    atomic_write_text(paths.stats, json.dumps(result, indent=1, allow_nan=False))
    return [paths.stats] + written
