"""Linear probes that cannot flatter themselves.

A probe reads a label (an intermediate value, the final answer, whether the model was right, any
label column) from the activations at one site (component x layer x thought position), X [n, d].
Every score here is held-out: cross-validation grouped by problem (:func:`grouped_splits`: a
group's questions, e.g. a pair's two, are never on both sides of a split), each question predicted
exactly once, and judged beside baselines computed on the same splits:

- majority: the training folds' most frequent class, predicted on the held-out fold;
- random vectors: the same probe on Gaussian vectors with X's per-row norms (they carry only the
  norms, so they show what the norm alone gives);
- control task (Hewitt & Liang 2019): each class (value type) mapped to a fixed random label
  (:func:`control_map`); selectivity = accuracy - control accuracy.

What selectivity measures here: the control labels are a random function of the class, so a site
that codes each class in its own direction (d >= n_classes - 1, e.g. X = onehot(y) @ W) fits any
such labelling and has selectivity ~0 although it decodes the class perfectly; selectivity is high
when the code has structure a random relabelling breaks (values along a line or a circle). Read
decodability from accuracy against the majority and random-vector baselines, structure from
selectivity. CIs resample groups (:func:`group_bootstrap_ci`), paired across the quantities.

The probe is ``make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))``
(lbfgs, multinomial), fit on the training folds only; fits that stop at max_iter are counted in
``not_converged`` (scikit-learn's ConvergenceWarning is not shown). Regression:
:func:`probe_regression` (Ridge on standardised X, held-out R^2). Fits run with BLAS on one
thread: these problems are small, and threaded BLAS made them ~10x slower on a busy 2-core machine
(run sites in parallel processes instead).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from latentpatch.probing.controls import (
    Design,
    Label,
    classification_design,
    group_bootstrap_ci,
    grouped_splits,
    prepare_classes,
    random_like,
    ratio_ci,
    regression_design,
)

__all__ = [
    "ProbeResult",
    "RegressionResult",
    "grouped_splits",
    "prepare_classes",
    "probe_all",
    "probe_regression",
    "probe_site",
]

CI = tuple[float, float]


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """A classification probe at one site. Accuracies are over held-out predictions only.

    accuracy / majority / random / control accuracies: pooled over all held-out predictions;
    above_majority = accuracy - majority_accuracy and selectivity = accuracy - control_accuracy,
    their CIs from the same resampled groups as accuracy_ci. train_accuracy: pooled accuracy of each
    fold's probe on its own training rows (the overfitting gap; never a result). not_converged:
    fits (probe, random-vector and control, all folds) that hit max_iter. control_map: class ->
    control label (None with fewer than 3 classes; control fields NaN). rows [n]: the input rows
    kept (index into X); folds: each fold's held-out rows (index into X); predicted [n]: each kept
    row's held-out prediction as an index into ``classes``.
    """

    n: int
    n_groups: int
    n_dropped: int
    classes: tuple[Label, ...]
    class_counts: tuple[int, ...]
    n_splits: int
    n_splits_requested: int
    split_method: str
    accuracy: float
    accuracy_ci: CI
    train_accuracy: float
    majority_accuracy: float
    above_majority: float
    above_majority_ci: CI
    random_accuracy: float
    control_accuracy: float
    selectivity: float
    selectivity_ci: CI
    control_map: dict[Label, int] | None
    not_converged: int
    seed: int
    C: float
    rows: np.ndarray
    folds: tuple[np.ndarray, ...]
    predicted: np.ndarray

    def to_record(self) -> dict[str, Any]:
        """A flat JSON-safe dict for a results table: the scalar fields in order, each CI as
        ``<name>_low`` / ``<name>_high``, classes and class_counts as JSON lists in strings,
        n_control_labels for the map; NaN -> None. No arrays."""
        return _record(self, "classification")


@dataclass(frozen=True, eq=False)
class RegressionResult:
    """A Ridge probe of a magnitude at one site; R^2 over held-out predictions only.

    r2 = 1 - SS_res / SS_tot over all held-out predictions, SS_tot around the mean of the held-out
    y; train_r2: mean over folds of the training-fold R^2; mean_baseline_r2: predicting the
    training folds' mean y. rows, folds as in :class:`ProbeResult`; predicted [n] held-out.
    """

    n: int
    n_groups: int
    n_dropped: int
    n_splits: int
    n_splits_requested: int
    split_method: str
    r2: float
    r2_ci: CI
    train_r2: float
    mean_baseline_r2: float
    random_r2: float
    alpha: float
    seed: int
    rows: np.ndarray
    folds: tuple[np.ndarray, ...]
    predicted: np.ndarray

    def to_record(self) -> dict[str, Any]:
        """A flat JSON-safe dict, as :meth:`ProbeResult.to_record`."""
        return _record(self, "regression")


def probe_site(
    X: np.ndarray,
    y: Sequence[Any] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    *,
    seed: int = 0,
    n_splits: int = 5,
    min_count: int = 10,
    C: float = 1.0,
    max_iter: int = 1000,
    controls: bool = True,
    random_baseline: bool = True,
    n_resamples: int = 9999,
    confidence: float = 0.95,
) -> ProbeResult:
    """Grouped cross-validated linear probe of the class y from X [n, d], with its baselines.

    y [n]: labels (rows with None/NaN or a class rarer than ``min_count`` are dropped, see
    :func:`prepare_classes`); groups [n]: problem ids. Splits: :func:`grouped_splits` stratified
    by class, ``n_splits`` cut to the number of groups (``n_splits`` in the result). ValueError
    when fewer than 2 classes or 2 groups remain. ``controls`` / ``random_baseline`` False leave
    those fields NaN. Deterministic given the inputs and ``seed``.

    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([0, 1, 2], 20)
    >>> X = y[:, None] * np.ones((1, 4)) + 0.1 * rng.standard_normal((60, 4))
    >>> r = probe_site(X, y, groups=np.arange(60) // 2, n_resamples=999)
    >>> r.n, r.n_groups, r.n_splits, r.accuracy, r.majority_accuracy < 0.4
    (60, 30, 5, 1.0, True)
    """
    design = classification_design(len(X), y, groups, seed, n_splits, min_count, controls)
    return _probe_design(X, design, seed, C, max_iter, random_baseline, n_resamples, confidence)


def probe_regression(
    X: np.ndarray,
    y: Sequence[Any] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    *,
    seed: int = 0,
    n_splits: int = 5,
    alpha: float = 1.0,
    random_baseline: bool = True,
    n_resamples: int = 9999,
    confidence: float = 0.95,
) -> RegressionResult:
    """Grouped cross-validated Ridge probe of a magnitude y [n] (float, NaN/None dropped) from X [n, d].

    ``make_pipeline(StandardScaler(), Ridge(alpha))`` on the training folds; splits from
    :func:`grouped_splits` (GroupKFold). R^2 with a group-bootstrap CI, and the same probe on
    norm-matched random vectors.

    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((40, 3))
    >>> r = probe_regression(X, X @ [1.0, 2.0, 0.0], np.arange(40) // 2, alpha=1e-6, n_resamples=999)
    >>> round(r.r2, 6), r.n_splits
    (1.0, 5)
    """
    design = regression_design(len(X), y, groups, seed, n_splits)
    return _regress_design(X, design, seed, alpha, random_baseline, n_resamples, confidence)


def probe_all(
    sites: Mapping[str, np.ndarray],
    y: Sequence[Any] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    *,
    kind: Literal["classification", "regression"] = "classification",
    **kw: Any,
) -> list[dict[str, Any]]:
    """One record per site ({"site": name, **result.to_record()}), all sites on the same splits.

    sites: name -> X [n, d] (d may differ between sites, n may not); y, groups and the keyword
    arguments as for :func:`probe_site` (or :func:`probe_regression` with kind="regression").
    Rows kept, splits and the control map are computed once, so the sites' scores are comparable.
    """
    seed = int(kw.pop("seed", 0))
    n_splits = int(kw.pop("n_splits", 5))
    n_rows = {len(X) for X in sites.values()}
    if len(n_rows) > 1:
        raise ValueError(f"sites have different numbers of rows: {sorted(n_rows)}")
    n = n_rows.pop() if n_rows else len(y)
    records = []
    if kind == "classification":
        min_count = int(kw.pop("min_count", 10))
        design = classification_design(n, y, groups, seed, n_splits, min_count, bool(kw.pop("controls", True)))
        for name, X in sites.items():
            records.append({"site": name, **_probe_design(X, design, seed, **kw).to_record()})
    elif kind == "regression":
        design = regression_design(n, y, groups, seed, n_splits)
        for name, X in sites.items():
            records.append({"site": name, **_regress_design(X, design, seed, **kw).to_record()})
    else:
        raise ValueError(f"kind must be 'classification' or 'regression', got {kind!r}")
    return records


def _features(X: np.ndarray, design: Design) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be [n, d], got shape {X.shape}")
    X = X[design.rows]
    if not np.isfinite(X).all():
        raise ValueError("X has NaN or inf in the rows probed")
    return X


def _probe_design(
    X: np.ndarray,
    design: Design,
    seed: int,
    C: float = 1.0,
    max_iter: int = 1000,
    random_baseline: bool = True,
    n_resamples: int = 9999,
    confidence: float = 0.95,
) -> ProbeResult:
    X = _features(X, design)
    codes, folds = design.target, design.splits.folds
    pred, train_acc, not_converged = _classify(X, codes, folds, C, max_iter)
    majority = np.empty_like(codes)
    for train, test in folds:
        majority[test] = np.bincount(codes[train]).argmax()
    random_acc = math.nan
    if random_baseline:
        random_pred, _, nc = _classify(random_like(X, seed), codes, folds, C, max_iter)
        random_acc, not_converged = float(np.mean(random_pred == codes)), not_converged + nc
    correct = (pred == codes).astype(float)
    gi = design.group_index
    per_group_n = np.bincount(gi).astype(float)
    correct_g = np.bincount(gi, weights=correct)
    majority_g = np.bincount(gi, weights=(majority == codes).astype(float))
    ci = partial(ratio_ci, denominator=per_group_n, seed=seed, n_resamples=n_resamples, confidence=confidence)
    accuracy = float(correct.mean())
    majority_acc = float(np.mean(majority == codes))
    control_acc, selectivity, selectivity_ci, cmap = math.nan, math.nan, (math.nan, math.nan), None
    if design.control is not None:
        control_codes = design.control[codes]
        control_pred, _, nc = _classify(X, control_codes, folds, C, max_iter)
        not_converged += nc
        control_correct = (control_pred == control_codes).astype(float)
        control_acc = float(control_correct.mean())
        selectivity = accuracy - control_acc
        selectivity_ci = ci(correct_g - np.bincount(gi, weights=control_correct))
        cmap = {c: int(m) for c, m in zip(design.classes, design.control)}
    return ProbeResult(
        n=codes.size,
        n_groups=per_group_n.size,
        n_dropped=design.n_dropped,
        classes=design.classes,
        class_counts=tuple(int(k) for k in np.bincount(codes, minlength=len(design.classes))),
        n_splits=design.splits.n_splits,
        n_splits_requested=design.n_splits_requested,
        split_method=design.splits.method,
        accuracy=accuracy,
        accuracy_ci=ci(correct_g),
        train_accuracy=train_acc,
        majority_accuracy=majority_acc,
        above_majority=accuracy - majority_acc,
        above_majority_ci=ci(correct_g - majority_g),
        random_accuracy=random_acc,
        control_accuracy=control_acc,
        selectivity=selectivity,
        selectivity_ci=selectivity_ci,
        control_map=cmap,
        not_converged=not_converged,
        seed=seed,
        C=C,
        rows=design.rows,
        folds=tuple(design.rows[test] for _, test in folds),
        predicted=pred,
    )


@threadpool_limits.wrap(limits=1)  # see the module docstring: threaded BLAS and OpenMP only slow these fits
def _classify(
    X: np.ndarray, codes: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], C: float, max_iter: int
) -> tuple[np.ndarray, float, int]:
    """Held-out predictions [n], pooled training accuracy, and how many fits hit max_iter."""
    pred = np.empty_like(codes)
    train_correct = train_total = not_converged = 0
    for train, test in folds:
        train_total += train.size
        if np.unique(codes[train]).size < 2:  # one class in the training folds: the probe can only say it
            pred[test] = codes[train][0]
            train_correct += train.size
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X[train], codes[train])
        not_converged += int(np.max(model[-1].n_iter_) >= max_iter)
        pred[test] = model.predict(X[test])
        train_correct += int(np.sum(model.predict(X[train]) == codes[train]))
    return pred, train_correct / train_total, not_converged


def _regress_design(
    X: np.ndarray,
    design: Design,
    seed: int,
    alpha: float = 1.0,
    random_baseline: bool = True,
    n_resamples: int = 9999,
    confidence: float = 0.95,
) -> RegressionResult:
    X = _features(X, design)
    y, folds = design.target, design.splits.folds
    pred, train_r2 = _regress(X, y, folds, alpha)
    mean_pred = np.empty_like(y)
    for train, test in folds:
        mean_pred[test] = y[train].mean()
    random_r2 = _r2(y, _regress(random_like(X, seed), y, folds, alpha)[0]) if random_baseline else math.nan
    gi = design.group_index
    yc = y - y.mean()  # R^2 is shift-invariant; centring keeps the bootstrap's sums of squares exact
    per_group = np.vstack(
        [
            np.bincount(gi),
            np.bincount(gi, weights=yc),
            np.bincount(gi, weights=yc**2),
            np.bincount(gi, weights=(y - pred) ** 2),
        ]
    )
    r2_ci = group_bootstrap_ci(per_group, _r2_of_sums, seed, n_resamples, confidence)
    return RegressionResult(
        n=y.size,
        n_groups=per_group.shape[1],
        n_dropped=design.n_dropped,
        n_splits=design.splits.n_splits,
        n_splits_requested=design.n_splits_requested,
        split_method=design.splits.method,
        r2=_r2(y, pred),
        r2_ci=r2_ci,
        train_r2=train_r2,
        mean_baseline_r2=_r2(y, mean_pred),
        random_r2=random_r2,
        alpha=alpha,
        seed=seed,
        rows=design.rows,
        folds=tuple(design.rows[test] for _, test in folds),
        predicted=pred,
    )


@threadpool_limits.wrap(limits=1)
def _regress(
    X: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], alpha: float
) -> tuple[np.ndarray, float]:
    """Held-out predictions [n] and the mean over folds of the training R^2."""
    pred = np.empty_like(y)
    train_r2 = []
    for train, test in folds:
        model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X[train], y[train])
        pred[test] = model.predict(X[test])
        train_r2.append(_r2(y[train], model.predict(X[train])))
    return pred, float(np.mean(train_r2))


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    """1 - SS_res / SS_tot, SS_tot around the mean of y; NaN when y is constant."""
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else math.nan


def _r2_of_sums(x: np.ndarray) -> np.ndarray:
    """R^2 from per-group sums [4, ..., G]: rows, sum y, sum y^2, sum of squared residuals."""
    n, sy, syy, sres = (x[i].sum(axis=-1) for i in range(4))
    ss_tot = syy - sy**2 / n
    return np.where(ss_tot > 0, 1.0 - sres / ss_tot, np.nan)


def _record(result: ProbeResult | RegressionResult, kind: str) -> dict[str, Any]:
    """Flat JSON-safe record of a result's scalar fields (see :meth:`ProbeResult.to_record`)."""
    out: dict[str, Any] = {"kind": kind}
    for field in fields(result):
        value = getattr(result, field.name)
        if field.name in ("rows", "folds", "predicted"):
            continue
        if field.name == "control_map":
            out["n_control_labels"] = len(set(value.values())) if value else None
        elif field.name in ("classes", "class_counts"):
            out[field.name] = json.dumps(list(value))
        elif field.name.endswith("_ci"):
            out[field.name + "_low"], out[field.name + "_high"] = (_scalar(v) for v in value)
        else:
            out[field.name] = _scalar(value)
    return out


def _scalar(value: Any) -> Any:
    """A plain Python scalar; NaN and inf become None."""
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value
