"""Statistical building blocks: multiple-comparison corrections, tests, effect sizes, bootstrap CIs.

Pure functions on numpy arrays (scipy underneath); :mod:`latentpatch.analysis.stats` applies them
to a run's cells. NaNs are left out of every test and family.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable

import numpy as np
from scipy import stats as sps


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


def wilcoxon_p(x: np.ndarray, y: np.ndarray | None = None) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of x (or x − y) against 0: (statistic, p).

    scipy's defaults (``zero_method="wilcox"``: zero differences dropped; exact distribution for
    small samples without ties). (NaN, NaN) when there is nothing to test (n < 1 or all zero).
    """
    d = np.asarray(x, float) if y is None else np.asarray(x, float) - np.asarray(y, float)
    d = d[~np.isnan(d)]
    if d.size == 0 or np.all(d == 0):
        return math.nan, math.nan
    return _wilcoxon_sorted(tuple(np.sort(d).tolist()))


@functools.lru_cache(maxsize=4096)
def _wilcoxon_sorted(d: tuple[float, ...]) -> tuple[float, float]:
    """:func:`wilcoxon_p` of a sorted sample (the test depends on the multiset only). Cached: with
    ties and n <= 13 scipy runs the exact permutation null (2^n sign flips, ~0.5 s at n = 12), and
    the 0/1 metrics of a small step-level run repeat the same few samples hundreds of times."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = sps.wilcoxon(np.asarray(d))
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
