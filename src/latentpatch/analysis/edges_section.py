"""The report's edges section (docs/method.md §17) in the one skeleton.

Finding from ``stats.json``'s ``edges`` and its contrast (the strongest path i -> j against the frozen
patch of i, paired over pairs); figures: the K x K map of path effects (sender thought i x receiver j,
mean change of the answer's logit difference) beside the whole-thought ``total`` and ``frozen`` patches
of each sender, and the knockout map (query x key, every head: the fraction of answers that change),
values on hover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from latentpatch.analysis.contrasts import find_contrast
from latentpatch.analysis.hover import grid_hover_figure
from latentpatch.analysis.html import escape, fmt, table
from latentpatch.analysis.sections import note
from latentpatch.analysis.skeleton import ExperimentSection, Quote
from latentpatch.analysis.steps_figures import save_map
from latentpatch.rundir import RunPaths

METHOD = "docs/method.md §17"


def query_label(j: int, num_latent: int) -> str:
    """``thought j`` or ``the answer start`` (j = K).

    >>> query_label(2, 6), query_label(6, 6)
    ('thought 2', 'the answer start')
    """
    return "the answer start" if j == num_latent else f"thought {j}"


def key_label(key: str) -> str:
    """``t3`` -> ``thought 3``; ``bot`` -> ``[BOT]``; ``question`` -> ``the question``.

    >>> key_label("t3"), key_label("bot"), key_label("question")
    ('thought 3', '[BOT]', 'the question')
    """
    if key[:1] == "t" and key[1:].isdigit():
        return f"thought {key[1:]}"
    return {"bot": "[BOT]", "question": "the question"}.get(key, key)


def _grid(values: list[list[float | None]]) -> np.ndarray:
    return np.array([[math.nan if v is None else float(v) for v in row] for row in values], dtype=float)


def path_map(edges: dict[str, Any], fig_dir: Path, formats: Sequence[str]) -> dict[tuple[str, str], str]:
    """``edges_paths``: rows sender thought i, columns receiver j = 1..K-1 and the answer, then ``total``
    and ``frozen`` (the whole-thought patches of i): mean change of the answer logit difference. Returns tips."""
    K = edges["num_latent"]
    grid = np.concatenate([_grid(edges["matrices"]["path_ld_change"]), _grid(edges["matrices"]["sender_ld_change"])], 1)
    cols = [f"t{j}" for j in range(1, K)] + ["answer", "total", "frozen"]
    rows = [f"t{i}" for i in range(K)]
    bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    fig = Figure(figsize=(max(5.0, 1.6 + 0.6 * len(cols)), max(3.2, 1.2 + 0.45 * K)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-bound or -1, vmax=bound or 1, origin="upper", interpolation="nearest")
    ax.axvline(K - 0.5, color="black", linewidth=1)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(K), rows)
    ax.set_xlabel("receiver j (reads thought i patched)  |  whole-thought patches of i")
    ax.set_ylabel("sender thought i")
    ax.set_title("Path patching i -> j: change of the answer logit difference (mean over pairs)", fontsize=9)
    fig.colorbar(im, ax=ax)
    save_map(fig, ax, fig_dir, "edges_paths", formats, rows, cols, "upper")
    return {
        (rows[r], cols[c]): f"sender {rows[r]}, {cols[c]}: mean change {fmt(grid[r, c])}"
        for r in range(K)
        for c in range(len(cols))
        if np.isfinite(grid[r, c])
    }


def knockout_map(edges: dict[str, Any], fig_dir: Path, formats: Sequence[str]) -> dict[tuple[str, str], str]:
    """``edges_knockouts``: rows query j (thoughts, the answer start), columns key; the fraction of answers
    that change when j does not attend to the key (every head). Returns tips."""
    K, keys = edges["num_latent"], edges["keys"]
    flips, kl = _grid(edges["matrices"]["knockout_flipped"]), _grid(edges["matrices"]["knockout_kl"])
    rows = [f"t{j}" for j in range(K)] + ["answer"]
    fig = Figure(figsize=(max(5.0, 1.6 + 0.6 * len(keys)), max(3.2, 1.2 + 0.45 * len(rows))), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(flips, cmap="viridis", vmin=0, vmax=1, origin="upper", interpolation="nearest")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("key removed from the query's attention")
    ax.set_ylabel("query")
    ax.set_title("Edge knockouts (every head): answers changed", fontsize=9)
    fig.colorbar(im, ax=ax)
    save_map(fig, ax, fig_dir, "edges_knockouts", formats, rows, keys, "upper")
    return {
        (rows[r], keys[c]): f"{rows[r]} without {keys[c]}: changed {fmt(flips[r, c])}, KL {fmt(kl[r, c])}"
        for r in range(len(rows))
        for c in range(len(keys))
        if np.isfinite(flips[r, c])
    }


def _row(summary: list[dict], like: dict, metric: str) -> int | None:
    """Index of the summary row of the same edge as ``like`` with ``metric``."""
    keys = ("kind", "sender", "query", "key", "head")
    return next(
        (k for k, r in enumerate(summary) if r["metric"] == metric and all(r[x] == like[x] for x in keys)), None
    )


def _finding(stats: dict[str, Any]) -> str:
    q, edges = Quote(stats), stats["edges"]
    summary, K = edges["summary"], edges["num_latent"]

    def query(at: tuple) -> str:  # every number of the sentence is quoted from stats.json
        return "the answer start" if summary[at[-1]]["query"] == K else f"thought {q.num(*at, 'query')}"

    def key(at: tuple) -> str:
        k = summary[at[-1]]["key"]
        return f"thought {q.num(*at, 'sender')}" if summary[at[-1]]["sender"] >= 0 else escape(key_label(k))

    parts = []
    k = edges["best"]["knockout"]
    if k is not None:
        at = ("edges", "summary", k)
        text = (
            f"Removing one attention edge (every head) changes the answer most often when {query(at)} does not "
            f"read {key(at)}: in {q.count((*at, 'mean'), (*at, 'n'))} pairs"
        )
        ld = _row(summary, summary[k], "ld_change")
        if ld is not None:
            text += f" (change of the answer logit difference {q.ci('edges', 'summary', ld)})"
        parts.append(text)
    p = edges["best"]["path"]
    if p is not None:
        r, at = summary[p], ("edges", "summary", p)
        text = (
            f"the strongest path between positions, {key(at)} read patched by {query(at)} alone, changes the "
            f"answer logit difference by {q.ci(*at)}"
        )
        c = find_contrast(stats, "edges", "path vs frozen: ld_change", sender=r["sender"], query=r["query"])
        if c is not None:
            text += ", " + q.compare(c, than="the frozen patch of that thought (every later position reads it)")
        parts.append(text)
    return ("; ".join(parts) or "No edge of this run has a result") + "."


def edges_section(run_dir: Path, formats: Sequence[str], stats: dict[str, Any]) -> ExperimentSection | None:
    """The ``edges`` section; None when the run has no edge results."""
    edges = stats.get("edges")
    if not edges:
        return None
    fig_dir = RunPaths(run_dir).figures
    figures = grid_hover_figure(
        fig_dir,
        "edges_paths",
        "Path patching: sender thought i (rows) read patched by receiver j alone (columns), beside the whole-thought "
        "total and frozen patches of i; hover a cell for its value.",
        path_map(edges, fig_dir, formats),
    )
    figures += grid_hover_figure(
        fig_dir,
        "edges_knockouts",
        "Edge knockouts: the query (rows) does not attend to the key (columns) in any head; hover for the KL.",
        knockout_map(edges, fig_dir, formats),
    )
    summary = edges["summary"]
    compact = [
        [
            escape(r["kind"]),
            "–" if r["sender"] < 0 else str(r["sender"]),
            "–" if r["query"] < 0 else str(r["query"]),
            escape(r["key"]),
            "every" if r["head"] < 0 else str(r["head"]),
            str(int(r["n"])),
            f"{fmt(r['mean'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
            fmt(r["p_holm"]),
        ]
        for r in summary
        if r["metric"] == "ld_change" and r["kind"] != "knockout"
    ]
    header = ["kind", "sender", "query", "key", "head", "n", "logit diff change [95% CI]", "p (Holm)"]
    full = table(
        ["kind", "sender", "query", "key", "head", "metric", "n", "mean [95% CI]", "p (Holm)"],
        [
            [
                escape(r["kind"]),
                str(r["sender"]),
                str(r["query"]),
                escape(r["key"]),
                str(r["head"]),
                escape(r["metric"]),
                str(int(r["n"])),
                f"{fmt(r['mean'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                fmt(r["p_holm"]),
            ]
            for r in summary
        ],
        left=1,
    )
    return ExperimentSection(
        "edges",
        _finding(stats),
        notes=note(
            "Knockout: the query does not attend to the key (masked before the softmax, so the weights are "
            "renormalised over the remaining keys) in its own forward call; later thoughts regenerate. Path i -> j: "
            "only j reads thought i's keys and values as they are with the source run's thought i fed there (the "
            "answer: its whole phase); every other position reads the target's. Changes are against the same "
            "pair's unpatched target run (paired); p: Wilcoxon against 0, Holm over the edges of a metric."
        ),
        figures=figures,
        table="<h3>Paths and whole-thought patches</h3>" + table(header, compact, left=1),
        folded=((f"Every edge and metric ({len(summary)} rows)", full),),
        method=METHOD,
    )
