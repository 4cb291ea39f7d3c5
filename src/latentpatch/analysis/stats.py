"""Statistics over a run's per-pair cells (design.md §3–§5, docs/ARCHITECTURE.md "Run directory").

Everything is a pure function on the tidy ``results/cells.parquet`` table (one row per pair x
patch spec), plus :func:`compute_stats` which reads a run directory and writes
``stats.json``, ``stats/cells.csv``, ``stats/comparisons.csv`` and ``stats/additivity.csv``.

A *cell* is one ``(experiment, mode, component, layer, position)``; its sample is the metric's
values over pairs. Per cell: n, mean, std (ddof=1), median, a seeded bootstrap CI of the mean
(:func:`scipy.stats.bootstrap`) and a one-sample Wilcoxon signed-rank test against 0, with Holm and
Benjamini–Hochberg adjusted p-values across the cells of one ``(experiment, mode, component,
metric)`` family (the layer x position grid). Per layer: paired chained/parallel/frozen
comparisons and the additivity of single-position effects.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd
from scipy import stats as sps

from latentpatch.errors import LatentPatchError

#: Metrics summarised per cell (``act_bias`` only exists for chained/frozen rows; NaN elsewhere).
METRICS: tuple[str, ...] = ("kl", "recovery", "answer_logit_diff", "logit_l2", "pred_change_rate", "act_bias")
#: Columns that identify a cell.
CELL_KEYS: list[str] = ["experiment", "mode", "component", "layer", "position"]
#: Human-readable metric names with units, for tables and figure labels.
METRIC_LABELS: dict[str, str] = {
    "kl": "KL(patched ‖ corrupted) [nats]",
    "recovery": "recovery [fraction; 1 = clean restored]",
    "answer_logit_diff": "answer logit diff, clean − corr [logits]",
    "logit_l2": "logit RMS change [logits]",
    "pred_change_rate": "argmax change rate [fraction]",
    "act_bias": "cos(clean) − cos(corrupted)",
}
#: Paired comparisons made per layer (a, b): the difference is a − b.
MODE_COMPARISONS: tuple[tuple[str, str], ...] = (("chained", "parallel"), ("chained", "frozen"), ("parallel", "frozen"))

REQUIRED_CELL_COLUMNS = ["pair_id", "experiment", "mode", "component", "layer", "position"]


# ---------------------------------------------------------------------------------------------
# Reading a run directory (only the documented contract)
# ---------------------------------------------------------------------------------------------


def _rerun_hint(run_dir: Path) -> str:
    return f"rerun the command in {run_dir / 'manifest.json'} ('command') to regenerate it"


def load_manifest(run_dir: Path | str) -> dict:
    """Read ``manifest.json``; a missing or corrupt file is a :class:`LatentPatchError`."""
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not run_dir.is_dir():
        raise LatentPatchError(f"{run_dir} is not a directory: pass a run directory written by `latentpatch run`")
    if not path.is_file():
        raise LatentPatchError(f"{path} is missing: {run_dir} is not a complete run directory; run `latentpatch run` to create one")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LatentPatchError(f"{path} is not valid JSON ({err}); restore it or rerun `latentpatch run`") from None
    if not isinstance(manifest, dict):
        raise LatentPatchError(f"{path} must hold a JSON object; restore it or rerun `latentpatch run`")
    return manifest


def load_cells(run_dir: Path | str) -> pd.DataFrame:
    """Read ``results/cells.parquet`` (one row per pair x spec) and check its columns."""
    run_dir = Path(run_dir)
    path = run_dir / "results" / "cells.parquet"
    if not path.is_file():
        raise LatentPatchError(f"{path} is missing: the run wrote no results; {_rerun_hint(run_dir)}")
    try:
        cells = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise LatentPatchError(f"{path} is not a readable parquet file ({type(err).__name__}); {_rerun_hint(run_dir)}") from None
    missing = [c for c in REQUIRED_CELL_COLUMNS if c not in cells.columns]
    if missing:
        raise LatentPatchError(f"{path} lacks columns {missing}; {_rerun_hint(run_dir)}")
    if cells.empty:
        raise LatentPatchError(f"{path} has no rows; {_rerun_hint(run_dir)}")
    cells = cells.copy()
    cells["pair_id"] = cells["pair_id"].astype(str)
    cells["layer"] = cells["layer"].astype(int)
    cells["position"] = cells["position"].astype(int)
    if "flagged" not in cells.columns:
        cells["flagged"] = False
    cells["flagged"] = cells["flagged"].fillna(False).astype(bool)
    return cells


def load_json_result(run_dir: Path | str, name: str, required: bool = False) -> Optional[Any]:
    """Read ``results/<name>`` as JSON; None if absent and not required; corrupt -> LatentPatchError."""
    run_dir = Path(run_dir)
    path = run_dir / "results" / name
    if not path.is_file():
        if required:
            raise LatentPatchError(f"{path} is missing; {_rerun_hint(run_dir)}")
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LatentPatchError(f"{path} is not valid JSON ({err}); {_rerun_hint(run_dir)}") from None


def load_trajectories(run_dir: Path | str) -> Optional[pd.DataFrame]:
    """Read ``results/trajectories.parquet`` (chained/frozen per later position), None if absent."""
    run_dir = Path(run_dir)
    path = run_dir / "results" / "trajectories.parquet"
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as err:
        raise LatentPatchError(f"{path} is not a readable parquet file ({type(err).__name__}); {_rerun_hint(run_dir)}") from None


def check_result_files(run_dir: Path | str) -> list[str]:
    """Parse every ``results/{layer,position,iterative}.json`` present; return the experiments found.

    A corrupt file raises :class:`LatentPatchError` naming it, so a damaged run is reported
    rather than silently summarised from the parquet alone.
    """
    found = []
    for exp in ("layer", "position", "iterative"):
        if load_json_result(run_dir, f"{exp}.json") is not None:
            found.append(exp)
    load_json_result(run_dir, "thoughts.json")
    return found


# ---------------------------------------------------------------------------------------------
# Small statistical building blocks
# ---------------------------------------------------------------------------------------------


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error). NaNs are left out of the family.

    With p sorted ascending, adj_(i) = max_{j<=i} min(1, (m - j + 1) p_(j)) (1-based j).
    """
    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m:
        order = np.argsort(q, kind="stable")
        adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
        res = np.empty(m)
        res[order] = adj
        out[ok] = res
    return out


def benjamini_hochberg(pvalues: Iterable[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (:func:`scipy.stats.false_discovery_control`); NaNs kept out."""
    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = sps.false_discovery_control(p[ok], method="bh")
    return out


def wilcoxon_p(x: np.ndarray, y: Optional[np.ndarray] = None) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of x (or x − y) against 0: (statistic, p).

    scipy's defaults (``zero_method="wilcox"``: zero differences dropped; exact distribution for
    small samples without ties). (NaN, NaN) when there is nothing to test (n < 1 or all zero).
    """
    d = np.asarray(x, float) if y is None else np.asarray(x, float) - np.asarray(y, float)
    d = d[~np.isnan(d)]
    if d.size == 0 or np.all(d == 0):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = sps.wilcoxon(d)
        except ValueError:
            return math.nan, math.nan
    return float(res.statistic), float(res.pvalue)


def cohens_dz(diff: np.ndarray) -> float:
    """Paired effect size d_z = mean(d) / sd(d) (ddof=1); NaN if n < 2 or sd = 0."""
    d = np.asarray(diff, float)
    d = d[~np.isnan(d)]
    if d.size < 2:
        return math.nan
    sd = d.std(ddof=1)
    return float(d.mean() / sd) if sd > 0 else math.nan


def rank_biserial(diff: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (W+ − W−) / (W+ + W−) over nonzero differences, in [-1, 1]."""
    d = np.asarray(diff, float)
    d = d[~np.isnan(d) & (d != 0)]
    if d.size == 0:
        return math.nan
    ranks = sps.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def bootstrap_mean_ci(
    samples: np.ndarray,
    seed: int,
    n_resamples: int = 9999,
    confidence: float = 0.95,
    method: str = "percentile",
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap CI of the mean for each row of ``samples`` (shape (rows, n), no NaNs).

    One :func:`scipy.stats.bootstrap` call with ``rng=np.random.default_rng(seed)`` over the last
    axis, so every row is resampled with the same index draws — identical to calling it per row
    with the same seed. Returns (low, high), each shape (rows,). Rows with n < 2 give NaN.
    """
    samples = np.atleast_2d(np.asarray(samples, float))
    rows, n = samples.shape
    if n < 2 or rows == 0:
        return np.full(rows, np.nan), np.full(rows, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate (constant) rows: BCa gives NaN, that's the answer
        res = sps.bootstrap(
            (samples,),
            np.mean,
            axis=-1,
            vectorized=True,
            n_resamples=n_resamples,
            batch=max(1, min(n_resamples, 2_000_000 // max(1, rows * n))),
            confidence_level=confidence,
            method=method,
            rng=np.random.default_rng(seed),
        )
    lo = np.atleast_1d(res.confidence_interval.low).astype(float)
    hi = np.atleast_1d(res.confidence_interval.high).astype(float)
    const = np.all(samples == samples[:, :1], axis=1)  # every resample has the same mean (BCa would give NaN)
    lo[const], hi[const] = samples[const, 0], samples[const, 0]
    return lo, hi


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired comparison of a and b (same pairs, same order); pairs with a NaN on either side dropped.

    Returns n, mean_a, mean_b, mean_diff (a − b), Wilcoxon signed-rank (statistic, p), paired
    t-test (:func:`scipy.stats.ttest_rel`: t, p), Cohen's d_z and the rank-biserial correlation.
    """
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    ok = ~np.isnan(a) & ~np.isnan(b)
    a, b = a[ok], b[ok]
    d = a - b
    out = dict(n=int(d.size), mean_a=_mean(a), mean_b=_mean(b), mean_diff=_mean(d))
    out["wilcoxon_stat"], out["p_wilcoxon"] = wilcoxon_p(d)
    t, p = math.nan, math.nan
    if d.size >= 2 and d.std(ddof=1) > 0:
        res = sps.ttest_rel(a, b)
        t, p = float(res.statistic), float(res.pvalue)
    out["t_stat"], out["p_ttest"] = t, p
    out["cohens_dz"] = cohens_dz(d)
    out["rank_biserial"] = rank_biserial(d)
    return out


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else math.nan


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _present_metrics(cells: pd.DataFrame, metrics: Iterable[str]) -> list[str]:
    return [m for m in metrics if m in cells.columns]


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
            x = g["value"].to_numpy(float)
            samples.append(x)
            stat, p = wilcoxon_p(x)
            fam_rows.append(
                dict(
                    experiment=exp, mode=mode, component=comp, layer=int(layer), position=int(pos), metric=metric,
                    n=int(x.size), mean=float(x.mean()), std=float(x.std(ddof=1)) if x.size > 1 else math.nan,
                    median=float(np.median(x)), ci_low=math.nan, ci_high=math.nan,
                    wilcoxon_stat=stat, p_wilcoxon=p,
                )
            )
        # Bootstrap all cells that have the same n in one call (same draws as per-cell calls).
        by_n: dict[int, list[int]] = {}
        for i, x in enumerate(samples):
            by_n.setdefault(x.size, []).append(i)
        for n, idx in by_n.items():
            lo, hi = bootstrap_mean_ci(np.stack([samples[i] for i in idx]), seed, n_resamples, confidence, ci_method)
            for j, i in enumerate(idx):
                fam_rows[i]["ci_low"], fam_rows[i]["ci_high"] = float(lo[j]), float(hi[j])
        p = [r["p_wilcoxon"] for r in fam_rows]
        for r, ph, pb in zip(fam_rows, holm(p), benjamini_hochberg(p)):
            r["p_holm"], r["p_bh"] = float(ph), float(pb)
        out_rows.extend(fam_rows)
    cols = CELL_KEYS + ["metric", "n", "mean", "std", "median", "ci_low", "ci_high", "wilcoxon_stat", "p_wilcoxon", "p_holm", "p_bh"]
    return pd.DataFrame(out_rows, columns=cols)


def _mode_table(cells: pd.DataFrame, mode: str) -> Optional[pd.DataFrame]:
    """Per (pair_id, component, layer) rows of one iterative mode; parallel falls back to the layer sweep.

    If a mode has several positions at a layer, the smallest is used (chained/frozen start at 0).
    """
    sel = cells[(cells["experiment"] == "iterative") & (cells["mode"] == mode)]
    if sel.empty and mode == "parallel":
        sel = cells[(cells["experiment"] == "layer") & (cells["mode"] == "all")]
    if sel.empty:
        return None
    sel = sel.sort_values("position", kind="stable").drop_duplicates(["pair_id", "component", "layer"], keep="first")
    return sel.set_index(["pair_id", "component", "layer"])


def _all_positions_table(cells: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Per (pair_id, component, layer) all-latent-positions patch: the layer sweep, else iterative parallel."""
    sel = cells[(cells["experiment"] == "layer") & (cells["mode"] == "all")]
    if sel.empty:
        return _mode_table(cells, "parallel")
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
    tables = {m: _mode_table(cells, m) for m in {x for ab in comparisons for x in ab}}
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
                rows.append(dict(comparison=f"{a} vs {b}", a=a, b=b, component=comp, layer=int(layer), metric=metric, **paired_test(x, y)))
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


def additivity(cells: pd.DataFrame, metrics: Iterable[str] = ("kl", "recovery", "answer_logit_diff", "logit_l2", "pred_change_rate")) -> pd.DataFrame:
    """Per layer: the sum over latent positions of single-position effects vs the all-positions effect.

    Single-position cells come from the position sweep; the all-positions effect from the layer
    sweep (or, if absent, the iterative ``parallel`` mode). Per pair, ``sum_single`` sums the
    metric over positions (only pairs with every position present). Returns per (component,
    layer, metric): n, mean_sum_single, mean_all, mean_diff (sum − all), ratio (mean_sum /
    mean_all), and a Wilcoxon signed-rank p of sum − all. Empty if either sweep is missing.
    """
    metrics = _present_metrics(cells, metrics)
    single = cells[(cells["experiment"] == "position") & (cells["mode"] == "single")]
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
            rows.append(dict(component=comp, layer=int(layer), metric=metric, n=int(s.size), n_positions=int(n_pos),
                             mean_sum_single=ms, mean_all=ma, mean_diff=ms - ma,
                             ratio=ms / ma if ma != 0 else math.nan, p_wilcoxon=p))
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


# ---------------------------------------------------------------------------------------------
# The run-level entry point
# ---------------------------------------------------------------------------------------------


def json_safe(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays into Python values and NaN/±inf into None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_safe(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is pd.NA or obj is None:
        return None
    return obj


def select_pairs(cells: pd.DataFrame, exclude_flagged: bool) -> pd.DataFrame:
    """Drop flagged pairs (the model gets clean or corrupted wrong) when ``exclude_flagged``."""
    return cells[~cells["flagged"]] if exclude_flagged else cells


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
    used = select_pairs(cells, exclude_flagged)
    if used.empty:
        raise LatentPatchError("every pair is flagged (the model gets clean or corrupted wrong): drop --exclude-flagged to keep them")
    summary = summarize_cells(used, seed=seed, n_resamples=n_resamples, confidence=confidence, ci_method=ci_method)
    comps = compare_modes(used)
    add = additivity(used)
    return json_safe(
        {
            "settings": {
                "seed": seed, "n_resamples": n_resamples, "confidence": confidence, "ci_method": ci_method,
                "exclude_flagged": exclude_flagged, "top_k": top_k,
                "cell_test": "one-sample Wilcoxon signed-rank vs 0 (two-sided), scipy.stats.wilcoxon",
                "corrections": "Holm and Benjamini-Hochberg across the layer x position grid of each (experiment, mode, component, metric)",
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
    manifest = load_manifest(run_dir)
    check_result_files(run_dir)
    cells = load_cells(run_dir)
    result = stats_from_cells(cells, run_seed(manifest), exclude_flagged, n_resamples, confidence, ci_method, top_k)
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
    run_dir = Path(run_dir)
    out = run_dir / "stats"
    out.mkdir(exist_ok=True)
    paths = []
    for name in ("cells", "comparisons", "additivity"):
        path = out / f"{name}.csv"
        pd.DataFrame(result[name]).to_csv(path, index=False)
        paths.append(path)
    _atomic_write_text(run_dir / "stats.json", json.dumps(result, indent=1, allow_nan=False))
    return [run_dir / "stats.json"] + paths


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
