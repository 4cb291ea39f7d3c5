"""How often a patch moves where a family's stop rule ends the latent phase (docs/method.md §22).

A run on a family with a stop rule (CoLaR, Soft Thinking with ``</think>``) has, per cell,
``latent_count`` (the pair's K), ``rule_latents`` (where the rule fires in the patched run; -1:
not within K) and ``stops_elsewhere``. :func:`latent_stop_stats` gives ``stats.json``'s
``latent_stops``: per experiment the share of patched runs the rule would end elsewhere (with
``--patched-stop keep``) or did (``rule``), as a mean over pairs of each pair's share with a
bootstrap CI over pairs, split into earlier and later; and how the pairs' counts fall.
:func:`stops_section` is its part of the page. No torch.

>>> import pandas as pd
>>> cells = pd.DataFrame({"pair_id": ["a", "a", "b", "b"], "experiment": ["layer"] * 4,
...     "latent_count": [3, 3, 4, 4], "rule_latents": [3, 2, -1, 4], "stops_elsewhere": [False, True, True, False]})
>>> s = latent_stop_stats(cells, {"latent_stops": {"cap": 6}}, seed=0, n_resamples=99)
>>> s["experiments"][0]["mean"], s["experiments"][0]["earlier"], s["experiments"][0]["later"]
(0.5, 0.25, 0.25)
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from latentpatch.analysis.html import escape, fmt, table
from latentpatch.analysis.inference import bootstrap_mean_ci
from latentpatch.analysis.skeleton import ExperimentSection, Quote
from latentpatch.names import LATENT_COUNT, RULE_LATENTS, STOPS_ELSEWHERE

#: the section's place in docs/method.md
METHOD = "§22 Per-pair latent counts"


def _share(rows: pd.DataFrame, seed: int, n_resamples: int) -> dict[str, Any]:
    """Share of ``rows`` whose rule stops elsewhere: mean over pairs of each pair's share, its CI."""
    per_pair = rows.groupby("pair_id", sort=True)[STOPS_ELSEWHERE].mean().to_numpy(float)
    lo, hi = bootstrap_mean_ci(per_pair[None], seed, n_resamples)
    K, r = rows[LATENT_COUNT].to_numpy(), rows[RULE_LATENTS].to_numpy()
    moved = rows[STOPS_ELSEWHERE].to_numpy(bool)
    earlier = moved & (r >= 0) & (r < K)
    return {
        "cells": int(len(rows)),
        "n": int(len(per_pair)),
        "mean": float(per_pair.mean()),
        "ci_low": float(lo[0]),
        "ci_high": float(hi[0]),
        "earlier": float(earlier.mean()),
        "later": float((moved & ~earlier).mean()),
    }


def latent_stop_stats(
    cells: pd.DataFrame | None, manifest: dict[str, Any], seed: int, n_resamples: int = 9999
) -> dict[str, Any] | None:
    """``stats.json``'s ``latent_stops`` from the cell table, or None when the run has no stop rule."""
    if cells is None or LATENT_COUNT not in cells.columns or cells.empty:
        return None
    info = dict(manifest.get("latent_stops") or {})
    counts = cells.groupby("pair_id", sort=True)[LATENT_COUNT].first()
    return {
        **info,
        "pairs": {"n": int(len(counts)), "counts": {str(k): int(n) for k, n in sorted(counts.value_counts().items())}},
        "experiments": [
            {"experiment": str(e), **_share(rows, seed, n_resamples)}
            for e, rows in cells.groupby("experiment", sort=False)
        ],
    }


def stops_section(stats: dict[str, Any]) -> ExperimentSection | None:
    """The page's part on the stop rule: the finding (share of patched runs per experiment the rule
    ends elsewhere, with its CI), the pairs' counts and a table per experiment."""
    s = stats.get("latent_stops")
    if not s:
        return None
    q = Quote(stats)
    keep = s.get("patched_stop", "keep") == "keep"
    verb = "would have stopped" if keep else "stopped"
    parts = [f"{e['experiment']}: {q.ci('latent_stops', 'experiments', i)}" for i, e in enumerate(s["experiments"])]
    finding = (
        f"The family's stop rule {verb} a patched run at another latent count than its "
        f"pair's (mean over pairs of the share of patched runs): {'; '.join(parts)}."
    )
    if keep:
        finding += " Patched runs kept their pair's count, so the sites stay comparable (--patched-stop keep)."
    else:
        finding += " Those runs were answered where the rule stopped them (--patched-stop rule)."
    counts = ", ".join(f"{n} pair(s) at {k}" for k, n in s["pairs"]["counts"].items())
    how = "each pair runs its target run's own count" if s.get("latent_count") == "target" else "fixed"
    notes = (
        f'<p class="note">Stop rule: {escape(str(s.get("rule")))}. Latent counts ({escape(how)}, at most '
        f"{fmt(s.get('cap'))}): {counts}.</p>"
    )
    rows = [
        [e["experiment"], fmt(e["cells"]), fmt(e["n"]), fmt(e["mean"]), fmt(e["earlier"]), fmt(e["later"])]
        for e in s["experiments"]
    ]
    head = ["experiment", "patched runs", "pairs", f"share {verb} elsewhere", "earlier", "later"]
    return ExperimentSection("stops", finding, table=table(head, rows, left=1), method=METHOD, notes=notes)
