"""``--seeds N``: the spread of a run's numbers over the seeds of a random feedback (docs/method.md §21).

A run with ``--seeds N`` is N ordinary runs (``OUT/seed-S/``, S = ``--seed`` .. ``--seed`` + N - 1;
:func:`latentpatch.pipeline.seeds.run_seeds`); this module reads their ``stats.json`` files and
writes ``OUT/seeds.json`` and ``OUT/seeds.html``: per statistics cell (experiment, mode, component,
layer, position, metric) the mean of each seed, their range and standard deviation, and per seed
the baselines' accuracies; ``identical`` says whether every seed wrote the same bytes in
``results/`` (a deterministic family must). No torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentpatch.analysis.html import CSS, escape, fmt, table
from latentpatch.files import atomic_write_text, write_json
from latentpatch.rundir import read_manifest, read_stats

#: the fields that name a statistics cell
CELL_KEY = ("experiment", "mode", "component", "layer", "position", "metric")


def results_digest(run: Path) -> str:
    """sha256 over every file of ``run/results`` (sorted relative paths and bytes).

    >>> len(results_digest(Path("/nonexistent")))
    64
    """
    h = hashlib.sha256()
    root = Path(run) / "results"
    for f in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def spread(values: Sequence[float]) -> dict[str, float]:
    """min, max, range and sample standard deviation (0 for one value) of finite ``values``.

    >>> spread([1.0, 3.0])
    {'min': 1.0, 'max': 3.0, 'range': 2.0, 'sd': 1.4142135623730951}
    """
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"min": math.nan, "max": math.nan, "range": math.nan, "sd": math.nan}
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"min": min(v), "max": max(v), "range": max(v) - min(v), "sd": sd}


def seeds_summary(runs: Sequence[Path], seeds: Sequence[int]) -> dict[str, Any]:
    """The summary of the seed runs ``runs`` (one per seed, same order): ``seeds.json``'s content."""
    per_cell: dict[tuple, list[float | None]] = {}
    baselines = []
    for i, run in enumerate(runs):
        stats = read_stats(run) or {}
        for c in stats.get("cells", []):
            key = tuple(c.get(k) for k in CELL_KEY)
            per_cell.setdefault(key, [None] * len(runs))[i] = c.get("mean")
        b = read_manifest(run).get("baselines") or {}
        baselines.append({k: b.get(k) for k in ("clean_accuracy", "corrupted_accuracy")})
    cells = [
        {**dict(zip(CELL_KEY, key)), "means": means, **spread([m for m in means if m is not None])}
        for key, means in per_cell.items()
    ]
    cells.sort(key=lambda c: -(c["range"] if math.isfinite(c["range"]) else -1.0))
    digests = [results_digest(r) for r in runs]
    return {
        "seeds": list(seeds),
        "runs": [Path(r).name for r in runs],
        "identical": len(set(digests)) == 1,
        "baselines": baselines,
        "cells": cells,
    }


def write_seeds(out: Path, runs: Sequence[Path], seeds: Sequence[int], top: int = 40) -> Path:
    """Write ``out/seeds.json`` and ``out/seeds.html`` (the ``top`` cells of largest range); returns the page."""
    summary = seeds_summary(runs, seeds)
    write_json(Path(out) / "seeds.json", summary)
    head = ["experiment", "mode", "component", "layer", "position", "metric"]
    rows = [
        [escape(c[k]) for k in CELL_KEY] + [fmt(m) for m in c["means"]] + [fmt(c["range"]), fmt(c["sd"])]
        for c in summary["cells"][:top]
    ]
    acc = [
        [str(s), fmt(b["clean_accuracy"]), fmt(b["corrupted_accuracy"])] for s, b in zip(seeds, summary["baselines"])
    ]
    same = (
        "Every seed wrote the same bytes in results/ (a deterministic feedback)."
        if summary["identical"]
        else "The seeds' results differ: the numbers below are each seed's cell mean."
    )
    html = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>spread over seeds</title><style>{CSS}</style>"
        f"</head><body><h1>Spread over {len(seeds)} seeds</h1><p>{escape(same)} Runs: "
        + ", ".join(f"<a href='{escape(r)}/report.html'>{escape(r)}</a>" for r in summary["runs"])
        + "</p><h2>Baselines per seed</h2>"
        + table(["seed", "clean accuracy", "corrupted accuracy"], acc, left=1)
        + f"<h2>The {min(top, len(rows))} cells whose mean moves most between seeds</h2>"
        + table(head + [f"seed {s}" for s in seeds] + ["range", "sd"], rows, left=6)
        + "</body></html>"
    )
    page = Path(out) / "seeds.html"
    atomic_write_text(page, html)
    return page
