"""The pieces that keep a probe honest: which classes count, splits grouped by problem (and the
:class:`Design` every site of one label shares), the Hewitt & Liang control task, norm-matched
random vectors and the group (cluster) bootstrap.

Pure numpy / scikit-learn / scipy on arrays; :mod:`latentpatch.probing.probes` puts them together.
Every random draw takes an explicit seed, so the same inputs and seed give the same result.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

Label = Hashable
"""A class label after :func:`normalise_label`: int, str, bool or a non-integral float."""

# Independent random streams derived from the caller's one seed (numpy SeedSequence entropy [seed, k]).
RANDOM_VECTORS_STREAM = 1
CONTROL_STREAM = 2


def normalise_label(value: Any) -> Label | None:
    """One label as a plain Python value; None for a missing one (None or NaN).

    numpy scalars become Python scalars and integral floats become ints (a pandas integer column
    with gaps arrives as float: 3.0 and 3 are the same class).

    >>> [normalise_label(v) for v in (3, 3.0, np.int64(3), "3", None, float("nan"), 2.5, True)]
    [3, 3, 3, '3', None, None, 2.5, True]
    """
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return int(value) if value.is_integer() else value
    return value


def prepare_classes(y: Sequence[Any] | np.ndarray, min_count: int = 10) -> tuple[np.ndarray, list[Label]]:
    """Which rows a classification probe keeps, and which classes it predicts.

    y [n]: int / str / bool labels (see :func:`normalise_label`); None and NaN are dropped.
    A class is kept when it has at least ``min_count`` rows. Returns (mask [n] bool, kept classes
    sorted). Labels of different kinds (str beside int) raise ValueError.

    >>> mask, kept = prepare_classes([3, 3, 5, None, 3.0, 7, 5, float("nan")], min_count=2)
    >>> mask.astype(int).tolist(), kept
    ([1, 1, 1, 0, 1, 0, 1, 0], [3, 5])
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    labels = [normalise_label(v) for v in y]
    kinds = {_kind(v) for v in labels if v is not None}
    if len(kinds) > 1:
        raise ValueError(f"labels mix kinds {sorted(kinds)}; give one kind (e.g. all int or all str)")
    counts: Counter[Any] = Counter(v for v in labels if v is not None)
    kept = sorted(c for c, k in counts.items() if k >= min_count)
    keep = set(kept)
    mask = np.array([v is not None and v in keep for v in labels], dtype=bool)
    return mask, kept


def _kind(value: Label) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else type(value).__name__


@dataclass(frozen=True, eq=False)
class GroupedSplits:
    """K folds over n rows in which no group is on both sides of a split.

    folds: (train [n_train], test [n_test]) row indices per fold, each sorted; the test sets
    partition range(n), so every row is predicted exactly once. method: the scikit-learn splitter.
    """

    folds: tuple[tuple[np.ndarray, np.ndarray], ...]
    method: str

    @property
    def n_splits(self) -> int:
        return len(self.folds)


def grouped_splits(
    groups: Sequence[Any] | np.ndarray, n_splits: int = 5, seed: int = 0, y: np.ndarray | None = None
) -> GroupedSplits:
    """Cross-validation folds grouped by problem, deterministic given ``seed``.

    groups [n]: a group id per row (a pair's two questions share one). ``n_splits`` is cut to the
    number of groups; fewer than 2 groups raise ValueError. With class codes ``y`` [n]:
    ``StratifiedGroupKFold(shuffle=True, random_state=seed)`` (class proportions kept alike across
    folds), unless it fails (every class rarer than n_splits) or leaves a fold empty. Otherwise, and
    without y: ``GroupKFold(shuffle=True, random_state=seed)`` (groups shuffled, then dealt into
    n_splits nearly equal sets of groups).

    >>> s = grouped_splits([0, 0, 1, 1, 2, 2, 3], n_splits=5, seed=0)
    >>> s.n_splits, s.method, sorted(t.tolist() for _, t in s.folds)
    (4, 'GroupKFold', [[0, 1], [2, 3], [4, 5], [6]])
    """
    groups = np.asarray(groups)
    n_groups = np.unique(groups).size
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if n_groups < 2:
        raise ValueError(f"grouped cross-validation needs at least 2 groups, got {n_groups}")
    k = min(n_splits, n_groups)
    dummy = np.zeros((groups.size, 1))
    tests: list[np.ndarray] = []
    if y is not None:
        with warnings.catch_warnings():  # a class rarer than k: stratification is then approximate, which is fine
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            try:
                tests = [np.sort(np.asarray(t, dtype=np.int64)) for _, t in splitter.split(dummy, y, groups)]
            except ValueError:  # every class has fewer than k rows
                tests = []
        method = "StratifiedGroupKFold"
    if not tests or any(t.size == 0 for t in tests):
        tests = [
            np.sort(t) for _, t in GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(dummy, None, groups)
        ]
        method = "GroupKFold"
    everything = np.arange(groups.size)
    folds = tuple((np.setdiff1d(everything, t), t) for t in tests)
    return GroupedSplits(folds=folds, method=method)


@dataclass(frozen=True, eq=False)
class Design:
    """What every site probed for one label shares, so that sites are scored on the same splits.

    rows [n]: kept input rows; target [n]: class codes (int) or values (float); group_index [n]
    in 0..G-1; control [n_classes]: control label of each class code (None: no control task).
    """

    rows: np.ndarray
    target: np.ndarray
    group_index: np.ndarray
    splits: GroupedSplits
    n_splits_requested: int
    n_dropped: int
    classes: tuple[Label, ...] = ()
    control: np.ndarray | None = None


def classification_design(
    n: int, y: Any, groups: Any, seed: int, n_splits: int, min_count: int, controls: bool
) -> Design:
    """The :class:`Design` of a classification probe over n rows: classes kept by
    :func:`prepare_classes`, splits stratified by class, the control map. ValueError when fewer than
    2 classes (or 2 groups) remain."""
    y, groups = _aligned(n, y, groups)
    mask, classes = prepare_classes(y, min_count)
    rows = np.flatnonzero(mask)
    if len(classes) < 2:
        raise ValueError(f"fewer than 2 classes with at least {min_count} rows (kept: {classes})")
    code_of = {c: i for i, c in enumerate(classes)}
    codes = np.array([code_of[normalise_label(y[i])] for i in rows], dtype=np.int64)
    group_index = np.unique(groups[rows], return_inverse=True)[1].ravel()
    splits = grouped_splits(group_index, n_splits, seed, y=codes)
    control = control_map(len(classes), seed) if controls else None
    return Design(rows, codes, group_index, splits, n_splits, n - rows.size, tuple(classes), control)


def regression_design(n: int, y: Any, groups: Any, seed: int, n_splits: int) -> Design:
    """The :class:`Design` of a regression probe over n rows: rows with a finite y [n], GroupKFold splits."""
    y, groups = _aligned(n, y, groups)
    values = np.array([math.nan if v is None else float(v) for v in y], dtype=float)
    rows = np.flatnonzero(np.isfinite(values))
    group_index = np.unique(groups[rows], return_inverse=True)[1].ravel()
    splits = grouped_splits(group_index, n_splits, seed)
    return Design(rows, values[rows], group_index, splits, n_splits, n - rows.size)


def _aligned(n: int, y: Any, groups: Any) -> tuple[np.ndarray, np.ndarray]:
    y_arr = np.asarray(y, dtype=object)
    groups_arr = np.asarray(groups)
    if y_arr.shape != (n,) or groups_arr.shape != (n,):
        raise ValueError(f"X has {n} rows; y {y_arr.shape} and groups {groups_arr.shape} must both be ({n},)")
    return y_arr, groups_arr


def control_map(n_classes: int, seed: int) -> np.ndarray | None:
    """Hewitt & Liang control task: class k gets control label ``m[k]`` in 0..n_classes-1.

    Each class (value type) draws a label uniformly from 0..n_classes-1 (numpy
    ``default_rng([seed, CONTROL_STREAM])``, redrawn until the map is neither constant nor
    one-to-one: a constant map is a trivial task, a one-to-one map is the real task renamed).
    None for fewer than 3 classes, where every non-constant map is a renaming.

    >>> m = control_map(6, seed=0)
    >>> m.shape, 1 < len(set(m.tolist())) < 6, bool((m == control_map(6, seed=0)).all())
    ((6,), True, True)
    """
    if n_classes < 3:
        return None
    rng = np.random.default_rng([seed, CONTROL_STREAM])
    while True:  # accepts with probability >= 2/3 each draw (n_classes = 3 is the worst case)
        m = rng.integers(0, n_classes, size=n_classes)
        if 1 < np.unique(m).size < n_classes:
            return m


def random_like(X: np.ndarray, seed: int) -> np.ndarray:
    """Gaussian vectors [n, d] with each row's norm equal to that row of X [n, d] (a zero row stays zero).

    Drawn with ``default_rng([seed, RANDOM_VECTORS_STREAM])``: a probe on them shows what the
    probe scores on activations that carry nothing but X's row norms.

    >>> X = np.array([[3.0, 4.0], [0.0, 0.0]])
    >>> np.linalg.norm(random_like(X, seed=0), axis=1).round(6).tolist()
    [5.0, 0.0]
    """
    R = np.random.default_rng([seed, RANDOM_VECTORS_STREAM]).standard_normal(X.shape)
    norm_r = np.linalg.norm(R, axis=1, keepdims=True)
    return R * (np.linalg.norm(X, axis=1, keepdims=True) / np.where(norm_r > 0, norm_r, 1.0))


def group_bootstrap_ci(
    per_group: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    seed: int,
    n_resamples: int = 9999,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile CI of a statistic of per-group sums, resampling GROUPS (cluster bootstrap).

    per_group [k, G]: k sums per group (e.g. rows, correct predictions). ``statistic`` maps an
    array [k, ..., G] to [...] by summing over the last axis first (e.g. correct.sum / rows.sum:
    pooled accuracy over the resampled groups). Questions of one group are not independent, so the
    group is the unit resampled; a ratio of sums weights each question once whatever its group's
    size (:func:`latentpatch.analysis.inference.bootstrap_mean_ci` averages per-group values, the
    same thing only when all groups are the same size, and cannot express R^2).

    Same conventions as ``bootstrap_mean_ci``: :func:`scipy.stats.bootstrap`, percentile method,
    ``rng=default_rng(seed)`` and its batch size, so with equal group sizes the two give the same
    interval, and two calls with the same seed and G resample the same groups (paired CIs).
    NaN when some resample's statistic is NaN (e.g. constant y in a resample of very few groups).
    """
    per_group = np.asarray(per_group, dtype=float)
    n_groups = per_group.shape[-1]
    if n_groups < 2:
        return math.nan, math.nan
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        res = sps.bootstrap(
            (per_group,),
            lambda x, axis=-1: statistic(x),
            axis=-1,
            vectorized=True,
            n_resamples=n_resamples,
            batch=max(1, min(n_resamples, 2_000_000 // n_groups)),
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def ratio_ci(
    numerator: np.ndarray, denominator: np.ndarray, seed: int, n_resamples: int = 9999, confidence: float = 0.95
) -> tuple[float, float]:
    """Group-bootstrap CI of sum(numerator) / sum(denominator), both [G] per-group sums.

    >>> ratio_ci(np.array([2.0, 2.0, 2.0]), np.array([2.0, 2.0, 2.0]), seed=0)
    (1.0, 1.0)
    """
    return group_bootstrap_ci(
        np.vstack([numerator, denominator]),
        lambda x: x[0].sum(axis=-1) / x[1].sum(axis=-1),
        seed,
        n_resamples,
        confidence,
    )
