"""Edge statistics (docs/method.md §17): ``stats.json``'s ``edges`` and its contrasts (no torch).

From ``results/edges.parquet`` (one row per pair x edge): per edge (kind, sender, query, key, head) the
answer metrics over pairs with CIs and Wilcoxon p against 0 (:func:`~latentpatch.analysis.step_stats.summarize`;
``flipped`` and ``ld_change`` are already paired: the edge's run minus the same pair's unpatched run);
the K x K path matrix (sender i x receiver j, mean ``ld_change``) beside ``total`` and ``frozen`` per
sender; the knockout map (query x key, every head: mean ``flipped`` and ``kl``); the strongest knockout
and path; and the paired contrast of the strongest path i -> j against the frozen patch of i (every
later position reading thought i), the edge's share of the attention path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.analysis.contrasts import paired_contrast
from latentpatch.analysis.step_stats import summarize
from latentpatch.files import json_safe
from latentpatch.names import ALL_HEADS, EDGE_KNOCKOUT, EDGE_PATH, EDGES_FILE
from latentpatch.rundir import RunPaths

#: The metrics summarised per edge.
EDGE_METRICS = ("flipped", "ld_change", "kl")
#: The keys of an edge summary row.
EDGE_KEYS = ["kind", "sender", "query", "key", "head"]


def read_edges(run_dir: Path | str) -> pd.DataFrame | None:
    """``results/edges.parquet``, or None when the run has none."""
    path = RunPaths(run_dir).results / EDGES_FILE
    return pd.read_parquet(path) if path.is_file() else None


def key_order(num_latent: int) -> list[str]:
    """The knockout map's columns: the question, [BOT], thoughts 0..K-1.

    >>> key_order(2)
    ['question', 'bot', 't0', 't1']
    """
    return ["question", "bot"] + [f"t{i}" for i in range(num_latent)]


def _mean(frame: pd.DataFrame, metric: str) -> float:
    x = frame[metric].astype(float)
    return float(x.mean()) if len(x) else math.nan


def edge_matrices(edges: pd.DataFrame, num_latent: int) -> dict[str, list[list[float]]]:
    """``path_ld_change`` [K senders][K receivers 1..K] (NaN where j <= i), ``sender_ld_change``
    [K][total, frozen], ``knockout_flipped`` and ``knockout_kl`` [K+1 queries][question, bot, t0..]
    (every head; NaN where the query cannot see the key), means over pairs."""
    K = num_latent
    path = [[math.nan] * K for _ in range(K)]
    for (i, j), g in edges[edges["kind"] == EDGE_PATH].groupby(["sender", "query"]):
        path[int(i)][int(j) - 1] = _mean(g, "ld_change")
    whole = [[math.nan, math.nan] for _ in range(K)]
    for (kind, i), g in edges[edges["kind"].isin(["total", "frozen"])].groupby(["kind", "sender"]):
        whole[int(i)][0 if kind == "total" else 1] = _mean(g, "ld_change")
    keys = key_order(K)
    knock = edges[(edges["kind"] == EDGE_KNOCKOUT) & (edges["head"] == ALL_HEADS)]
    out: dict[str, list[list[float]]] = {"path_ld_change": path, "sender_ld_change": whole}
    for metric in ("flipped", "kl"):
        grid = [[math.nan] * len(keys) for _ in range(K + 1)]
        for (j, key), g in knock.groupby(["query", "key"]):
            if key in keys:
                grid[int(j)][keys.index(key)] = _mean(g, metric)
        out[f"knockout_{metric}"] = grid
    return out


def _strongest(summary: pd.DataFrame, kind: str, metric: str, last: int | None = None) -> int | None:
    """Index (in ``summary``) of the every-head edge of ``kind`` with the largest |mean ``metric``|
    (``last``: leave out sender ``last``, whose one path is its frozen patch by construction)."""
    rows = summary[(summary["kind"] == kind) & (summary["metric"] == metric) & (summary["head"] == ALL_HEADS)]
    if last is not None:
        rows = rows[rows["sender"] != last]
    rows = rows[rows["mean"].notna()]
    if rows.empty:
        return None
    return int(rows["mean"].abs().sort_values(ascending=False, kind="stable").index[0])


def edge_stats(edges: pd.DataFrame | None, seed: int, n_resamples: int = 9999) -> tuple[dict | None, list[dict]]:
    """(``stats.json``'s ``edges``: ``{num_latent, summary, matrices, keys, best: {knockout, path}}``,
    the contrast path vs frozen at the strongest path), or (None, []) without edge results.
    ``best``'s values index ``summary`` (the knockout's by ``flipped``; the path's by ``ld_change``, senders
    before the last thought: the last thought's one path, to the answer, is its frozen patch)."""
    if edges is None or edges.empty:
        return None, []
    K = int(edges.loc[edges["kind"] == EDGE_PATH, "query"].max())
    frame = edges.assign(flipped=edges["flipped"].astype(float))
    summary = summarize(frame, EDGE_KEYS, EDGE_METRICS, seed, n_resamples)
    best_knockout = _strongest(summary, EDGE_KNOCKOUT, "flipped")
    best_path = _strongest(summary, EDGE_PATH, "ld_change", last=K - 1)
    contrasts = []
    if best_path is not None:
        row = summary.loc[best_path]
        i, j = int(row["sender"]), int(row["query"])
        path = frame[(frame["kind"] == EDGE_PATH) & (frame["sender"] == i) & (frame["query"] == j)]
        frozen = frame[(frame["kind"] == "frozen") & (frame["sender"] == i)]
        both = (
            path.set_index("pair_id")["ld_change"]
            .to_frame("path")
            .join(frozen.set_index("pair_id")["ld_change"].to_frame("frozen"), how="inner")
        )
        contrasts.append(
            paired_contrast(
                "edges",
                "path vs frozen: ld_change",
                f"path t{i} -> {j}",
                f"frozen patch of thought {i}",
                both["path"].to_numpy(float),
                both["frozen"].to_numpy(float),
                seed,
                n_resamples,
                sender=i,
                query=j,
            )
        )
    out: dict[str, Any] = {
        "num_latent": K,
        "keys": key_order(K),
        "best": {"knockout": best_knockout, "path": best_path},
        "matrices": edge_matrices(edges, K),
        "summary": summary.to_dict(orient="records"),
    }
    return json_safe(out), contrasts
