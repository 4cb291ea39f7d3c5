"""Steering directions read from a run's question activations (docs/method.md §16).

Two sources besides the pairs' mean clean - corrupted difference, both per site of one component
(every layer x thought: [L, K, d]) and both from the activations the ``probe`` stage recorded:

- ``label:NAME=A,B``: the mean activation of the questions whose label NAME is A minus that of those
  whose label is B (e.g. ``label:intermediate_0=6,8``);
- ``probe:NAME=V``: the weight vector of class V of a logistic-regression probe of NAME fitted on every
  question at the site, mapped back from the standardised features to the activation space
  (w / sigma per coordinate), so adding it raises the probe's score of V.

:func:`parse_direction` reads the ``--steer-direction`` text.

>>> parse_direction("label:intermediate_0=6,8")
('label', 'intermediate_0', ('6', '8'))
>>> parse_direction("probe:answer=18")
('probe', 'answer', ('18',))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from latentpatch.errors import LatentPatchError

#: ``--steer-direction`` kinds: the pairs' mean difference, a label's two values, a probe's class.
DIRECTION_KINDS = ("meandiff", "label", "probe")


def parse_direction(text: str) -> tuple[str, str, tuple[str, ...]]:
    """``(kind, label, values)`` of a ``--steer-direction`` (``meandiff`` has no label or values)."""
    if text == "meandiff":
        return "meandiff", "", ()
    kind, _, rest = text.partition(":")
    label, _, values = rest.partition("=")
    parts = tuple(v.strip() for v in values.split(",") if v.strip())
    want = {"label": 2, "probe": 1}.get(kind)
    if want is None or not label or len(parts) != want:
        raise LatentPatchError(
            f"--steer-direction {text!r}: use meandiff, label:NAME=A,B (mean of A minus mean of B) or "
            "probe:NAME=V (the probe's weight vector of value V)"
        )
    return kind, label, parts


def matches(values: Sequence, wanted: str) -> np.ndarray:
    """[n] bool: which label values equal ``wanted`` (numbers compared as numbers, the rest as text).

    >>> matches([6.0, 8, None, "6"], "6").tolist()
    [True, False, False, True]
    """
    try:
        target: float | None = float(wanted)
    except ValueError:
        target = None
    out = []
    for v in values:
        if v is None:
            out.append(False)
        elif target is not None and isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            out.append(float(v) == target)
        else:
            out.append(str(v) == wanted or (target is not None and _as_float(v) == target))
    return np.array(out, dtype=bool)


def _as_float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def label_difference(acts: np.ndarray, values: Sequence, a: str, b: str, name: str = "label") -> np.ndarray:
    """[L, K, d]: mean of ``acts`` [n, L, K, d] over the questions with value ``a`` minus over ``b``."""
    ia, ib = matches(values, a), matches(values, b)
    for v, mask in ((a, ia), (b, ib)):
        if not mask.any():
            raise LatentPatchError(
                f"--steer-direction: no question has {name} = {v}; fix: pick values the questions have"
            )
    return acts[ia].mean(0) - acts[ib].mean(0)


def probe_weights(acts: np.ndarray, values: Sequence, value: str, seed: int = 0, name: str = "label") -> np.ndarray:
    """[L, K, d]: at each site, the activation-space weight vector of class ``value`` of a standardised
    logistic regression of the label fitted on every question that has one."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    keep = np.array([v is not None for v in values])
    labels = np.array(
        [str(_as_float(v)) if _as_float(v) is not None else str(v) for v in np.asarray(values, object)[keep]]
    )
    wanted = str(_as_float(value)) if _as_float(value) is not None else value
    if wanted not in set(labels):
        raise LatentPatchError(
            f"--steer-direction: no question has {name} = {value}; fix: pick a value the questions have"
        )
    n, L, K, d = acts.shape
    out = np.zeros((L, K, d), dtype=np.float32)
    with threadpool_limits(limits=1):  # small fits: threaded BLAS and OpenMP only slow them
        for layer in range(L):
            for p in range(K):
                X = acts[keep, layer, p].astype(np.float64)
                scaler = StandardScaler().fit(X)
                clf = LogisticRegression(max_iter=1000, random_state=seed).fit(scaler.transform(X), labels)
                row = list(clf.classes_).index(wanted)
                coef = clf.coef_[0] * (1 if row == 1 else -1) if clf.coef_.shape[0] == 1 else clf.coef_[row]
                out[layer, p] = coef / np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return out
