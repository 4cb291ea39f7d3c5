"""latentpatch.probing: held-out grouped probes, their baselines, control task and CIs.

Each check recomputes the number with plain scikit-learn / numpy written here (no shared helper).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from latentpatch.analysis.inference import bootstrap_mean_ci
from latentpatch.probing.controls import control_map, grouped_splits, ratio_ci
from latentpatch.probing.probes import prepare_classes, probe_all, probe_regression, probe_site

B = 999  # bootstrap resamples in these tests (the default 9999 only narrows the CI's Monte Carlo error)


def _pairs(n_groups: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two questions per group (a pair), each with its own class, roughly balanced."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), 2)
    return rng.permutation(np.arange(2 * n_groups) % n_classes), groups


@threadpool_limits.wrap(limits=1, user_api="blas")  # as the module does: threaded BLAS only slows small fits
def _plain_cv_predict(X: np.ndarray, y: np.ndarray, splits: list) -> np.ndarray:
    pred = np.empty_like(y)
    for train, test in splits:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(X[train], y[train])
        pred[test] = model.predict(X[test])
    return pred


def test_a_site_that_codes_the_value_beats_the_baselines_and_noise_does_not() -> None:
    y, groups = _pairs(150, 6, seed=1)  # n = 300, 6 balanced classes: chance = majority ~ 1/6
    rng = np.random.default_rng(2)
    line = y[:, None] * rng.standard_normal((1, 16)) + 0.1 * rng.standard_normal((300, 16))  # the value on a line
    noise = rng.standard_normal((300, 16))
    onehot = np.eye(6)[y] @ rng.standard_normal((6, 16)) + 0.1 * rng.standard_normal((300, 16))
    rec = {r["site"]: r for r in probe_all({"line": line, "noise": noise, "onehot": onehot}, y, groups, n_resamples=B)}

    assert rec["line"]["accuracy"] > 0.95 and rec["line"]["accuracy_ci_low"] > 0.9
    # A random relabelling of the value types breaks the line's order: here classes 2 and 4 share a
    # control label, which no cut of the line separates from 3, so the control task is harder. (A map
    # that merged only neighbours would stay separable: selectivity depends on the map drawn.)
    m = control_map(6, seed=0).tolist()
    assert m[2] == m[4] and len(set(m)) == 5
    assert rec["line"]["selectivity"] > 0.1 and rec["line"]["selectivity_ci_low"] > 0.05
    assert rec["line"]["above_majority_ci_low"] > 0.5
    # n = 300 held-out predictions at p ~ 1/6: SE = sqrt(p (1 - p) / 300) ~ 0.022 (pairs share only a
    # group id here, not a signal); 0.1 is ~4.5 SE.
    tol = 0.1
    assert abs(rec["noise"]["accuracy"] - rec["noise"]["majority_accuracy"]) < tol
    assert abs(rec["noise"]["random_accuracy"] - rec["noise"]["majority_accuracy"]) < tol
    # Norm-matched random vectors keep what the row norm alone tells: on the line the norm grows with
    # the value, so they beat chance, yet stay far below the probe on the real activations.
    assert rec["line"]["random_accuracy"] < rec["line"]["accuracy"] - 0.5
    assert rec["noise"]["accuracy_ci_low"] < rec["noise"]["majority_accuracy"] + 0.02
    # One direction per class (d >= n_classes - 1) fits ANY labelling of the classes, the control
    # included: perfectly decodable, selectivity ~0. Selectivity measures structure, not presence.
    assert rec["onehot"]["accuracy"] > 0.95 and rec["onehot"]["control_accuracy"] > 0.95
    assert abs(rec["onehot"]["selectivity"]) < 0.05


def test_grouped_splits_stop_a_between_problem_label_from_leaking() -> None:
    # 80 problems x 4 near-duplicate questions; the label is a property of the problem (random per
    # problem), X a random per-problem signature with no linear code of the label.
    rng = np.random.default_rng(3)
    n_groups, per = 80, 4
    groups = np.repeat(np.arange(n_groups), per)
    y = np.repeat(rng.permutation(np.arange(n_groups) % 2), per)
    X = np.repeat(rng.standard_normal((n_groups, 200)), per, axis=0) + 0.05 * rng.standard_normal((n_groups * per, 200))

    leaky = _plain_cv_predict(X, y, list(KFold(5, shuffle=True, random_state=0).split(X)))
    grouped = probe_site(X, y, groups, n_resamples=B)
    assert np.mean(leaky == y) > 0.9  # a question's siblings in training give its label away
    # 80 independent problems: SE of accuracy ~ sqrt(0.25 / 80) ~ 0.056; 0.2 is ~3.5 SE.
    assert grouped.accuracy < grouped.majority_accuracy + 0.2
    assert grouped.accuracy_ci[0] < 0.5 < grouped.accuracy_ci[1]
    assert grouped.train_accuracy == 1.0  # what the research code reported as its result


def test_accuracy_control_selectivity_and_cis_equal_a_plain_loop() -> None:
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 4, size=120)  # unequal groups: the CI must pool questions, not average groups
    groups = np.repeat(np.arange(120), sizes) * 7 + 5  # arbitrary group ids
    n = groups.size
    y = rng.integers(0, 5, size=n)
    X = y[:, None] * rng.standard_normal((1, 12)) + 1.5 * rng.standard_normal((n, 12))  # imperfect code
    seed = 11
    r = probe_site(X, y, groups, seed=seed, n_resamples=B, min_count=5)

    splits = list(StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed).split(X, y, groups))
    pred = _plain_cv_predict(X, y, splits)
    assert 0.5 < r.accuracy < 0.95
    assert r.accuracy == np.mean(pred == y)
    assert np.array_equal(r.predicted, pred)
    majority = np.empty_like(y)
    for train, test in splits:
        majority[test] = np.bincount(y[train]).argmax()
    assert r.majority_accuracy == np.mean(majority == y)

    # The control map: a fixed random label per class, neither constant nor a renaming.
    assert r.control_map is not None and list(r.control_map) == [0, 1, 2, 3, 4]
    assert 1 < len(set(r.control_map.values())) < 5
    assert list(r.control_map.values()) == control_map(5, seed).tolist()
    control_y = np.array([r.control_map[v] for v in y])
    control_pred = _plain_cv_predict(X, control_y, splits)
    assert r.control_accuracy == np.mean(control_pred == control_y)
    assert r.selectivity == r.accuracy - r.control_accuracy

    # Random vectors: seeded Gaussian (stream [seed, 1]) scaled to X's row norms, same probe, same splits.
    R = np.random.default_rng([seed, 1]).standard_normal(X.shape)
    R *= np.linalg.norm(X, axis=1, keepdims=True) / np.linalg.norm(R, axis=1, keepdims=True)
    assert r.random_accuracy == np.mean(_plain_cv_predict(R, y, splits) == y)

    # Cluster bootstrap: resample the 120 groups (the same draws for every quantity), pool the questions.
    _, gi = np.unique(groups, return_inverse=True)
    idx = np.random.default_rng(seed).integers(0, 120, size=(B, 120))
    n_g = np.bincount(gi)
    correct_g = np.bincount(gi, weights=pred == y)
    control_g = np.bincount(gi, weights=control_pred == control_y)
    acc_b = correct_g[idx].sum(1) / n_g[idx].sum(1)
    sel_b = (correct_g - control_g)[idx].sum(1) / n_g[idx].sum(1)
    assert np.allclose(r.accuracy_ci, np.quantile(acc_b, [0.025, 0.975]))
    assert np.allclose(r.selectivity_ci, np.quantile(sel_b, [0.025, 0.975]))
    assert r.accuracy_ci[0] < r.accuracy < r.accuracy_ci[1]


def test_ratio_ci_is_the_projects_bootstrap_when_groups_are_equal() -> None:
    correct = np.random.default_rng(5).integers(0, 3, size=40).astype(float)  # pairs: 0, 1 or 2 right
    lo, hi = bootstrap_mean_ci(correct / 2, seed=3, n_resamples=B)
    assert ratio_ci(correct, np.full(40, 2.0), seed=3, n_resamples=B) == pytest.approx((lo[0], hi[0]))


def test_every_question_is_predicted_once_and_no_group_straddles_a_split() -> None:
    y, groups = _pairs(40, 3, seed=6)
    X = np.random.default_rng(7).standard_normal((80, 5))
    y = y.astype(object)
    y[[0, 9]] = None  # dropped rows are never predicted
    r = probe_site(X, y, groups, n_resamples=B)
    held_out = np.concatenate(r.folds)
    assert np.array_equal(np.sort(held_out), r.rows) and held_out.size == r.n == 78
    fold_groups = [set(groups[f].tolist()) for f in r.folds]
    assert all(not (a & b) for i, a in enumerate(fold_groups) for b in fold_groups[i + 1 :])

    s = grouped_splits(groups, n_splits=5, seed=0)
    for train, test in s.folds:
        assert not set(groups[train]) & set(groups[test])
        assert np.array_equal(np.union1d(train, test), np.arange(80)) and not np.intersect1d(train, test).size
    few = grouped_splits([1, 1, 2, 2, 3], n_splits=5, seed=0)  # 3 groups: 3 folds, and says so
    assert few.n_splits == 3
    r3 = probe_site(np.arange(12.0)[:, None], [0, 1] * 6, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], min_count=2)
    assert (r3.n_splits, r3.n_splits_requested) == (3, 5)


def test_rare_classes_are_dropped_and_too_little_data_is_refused() -> None:
    y = ["a"] * 12 + ["b"] * 11 + ["c"] * 3 + [None, float("nan")]
    mask, kept = prepare_classes(y, min_count=10)
    assert kept == ["a", "b"]
    assert mask.tolist() == [v in ("a", "b") for v in y]
    assert prepare_classes([3, 3.0, np.int64(3), 4], min_count=3)[1] == [3]

    groups = np.arange(len(y)) // 2
    X = np.random.default_rng(8).standard_normal((len(y), 4))
    r = probe_site(X, y, groups, n_resamples=B)
    assert (r.classes, r.class_counts, r.n, r.n_dropped) == (("a", "b"), (12, 11), 23, 5)
    assert r.control_map is None and r.to_record()["selectivity"] is None  # 2 classes: no control task

    with pytest.raises(ValueError, match="2 classes"):
        probe_site(X, y, groups, min_count=12)
    with pytest.raises(ValueError, match="2 groups"):
        probe_site(X, y, np.zeros(len(y)))
    with pytest.raises(ValueError, match="mix kinds"):
        prepare_classes([1, "1"])
    with pytest.raises(ValueError, match="rows"):
        probe_site(X[:-1], y, groups)


def test_regression_r2_equals_a_plain_loop() -> None:
    rng = np.random.default_rng(9)
    groups = np.repeat(np.arange(100), 2)
    X = rng.standard_normal((200, 10))
    y = X @ rng.standard_normal(10) + 0.05 * rng.standard_normal(200) + 40.0
    seed = 2
    r = probe_regression(X, y, groups, seed=seed, n_resamples=B)
    noise = probe_regression(rng.standard_normal((200, 10)), y, groups, seed=seed, n_resamples=B)

    pred = np.empty_like(y)
    mean_pred = np.empty_like(y)
    for train, test in GroupKFold(5, shuffle=True, random_state=seed).split(X, y, groups):
        pred[test] = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(X[train], y[train]).predict(X[test])
        mean_pred[test] = y[train].mean()
    ss_tot = np.sum((y - y.mean()) ** 2)
    assert r.r2 == pytest.approx(1 - np.sum((y - pred) ** 2) / ss_tot, abs=1e-12)
    assert r.mean_baseline_r2 == pytest.approx(1 - np.sum((y - mean_pred) ** 2) / ss_tot, abs=1e-12)
    assert r.r2 > 0.99 and noise.r2 <= 0.02 and r.random_r2 <= 0.02 and r.mean_baseline_r2 <= 0

    # Group bootstrap of R^2, row by row: resample the pairs, recompute R^2 on their questions.
    idx = np.random.default_rng(seed).integers(0, 100, size=(B, 100))
    members = np.arange(200).reshape(100, 2)
    r2_b = []
    for draw in idx:
        rows = members[draw].ravel()
        r2_b.append(1 - np.sum((y[rows] - pred[rows]) ** 2) / np.sum((y[rows] - y[rows].mean()) ** 2))
    assert np.allclose(r.r2_ci, np.quantile(r2_b, [0.025, 0.975]))
    y_gaps = y.astype(object)
    y_gaps[3] = None
    assert probe_regression(X, y_gaps, groups, n_resamples=B).n == 199


def test_records_are_deterministic_json_safe_and_silent() -> None:
    y, groups = _pairs(30, 4, seed=10)
    rng = np.random.default_rng(11)
    sites = {"a": rng.standard_normal((60, 8)), "b": y[:, None] + 0.3 * rng.standard_normal((60, 3))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on a normal run, nor a non-converging one
        first = probe_all(sites, y, groups, seed=4, min_count=5, n_resamples=B)
        second = probe_all(sites, y, groups, seed=4, min_count=5, n_resamples=B)
        stuck = probe_site(sites["a"], y, groups, max_iter=2, min_count=5, n_resamples=B)
        reg = probe_all(sites, y.astype(float), groups, kind="regression", seed=4, n_resamples=B)
    assert first == second
    assert first[1] == {
        "site": "b",
        **probe_site(sites["b"], y, groups, seed=4, min_count=5, n_resamples=B).to_record(),
    }
    assert stuck.not_converged > 0
    for record in first + reg:
        json.dumps(record, allow_nan=False)
        assert all(not isinstance(v, (list, dict, np.ndarray)) for v in record.values())
    assert first[0]["classes"] == "[0, 1, 2, 3]" and reg[1]["kind"] == "regression"
