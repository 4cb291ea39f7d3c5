"""The report's reading sections (docs/method.md §14): logit lens, attention to the question, per-head patching.

Reads ``results/lens.parquet``, ``results/lens_top.parquet``, ``results/attention.parquet``, the
per-pair attention files and the ``head_out.<h>`` rows of ``results/cells.parquet``. A run without
them gets each section as one line that says how to get it (as the step-level sections do).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.analysis.html import escape, fmt, table
from latentpatch.analysis.reading_figures import attention_pair, attention_roles, head_maps, lens_ranks, position_name
from latentpatch.analysis.reading_stats import lens_stats
from latentpatch.analysis.sections import figure, note, section
from latentpatch.names import ATTENTION_DIR, ATTENTION_FILE, LENS_FILE, LENS_TOP_FILE, THOUGHT_LAYER, parse_head
from latentpatch.rundir import RunPaths, read_manifest

HOW = "docs/method.md §14"
#: Pairs shown with their own tables / heatmaps.
PAIRS_SHOWN = 3
#: Heads listed in the top-heads table.
TOP_HEADS = 10


def _read(run_dir: Path, name: str) -> pd.DataFrame | None:
    path = RunPaths(run_dir).results / name
    return pd.read_parquet(path) if path.is_file() else None


def _num_latent(run_dir: Path) -> int:
    return int((read_manifest(run_dir).get("model") or {}).get("num_latent", 0))


def _layer(layer: int) -> str:
    return "thought" if layer == THOUGHT_LAYER else str(layer)


def _lens_summary(stats: dict[str, Any], K: int) -> str:
    """Per known value: where (layer, position) its median rank is lowest, and the top-1 rate there
    (``stats.json``'s ``lens``, :func:`latentpatch.analysis.reading_stats.lens_stats`)."""
    rows = [
        [f"{r['kind']} {r['index']}", _layer(r["layer"]), position_name(r["position"], K)]
        + [fmt(r["median_rank"]), fmt(r["top1_rate"]), str(r["n"])]
        for r in stats["best"]
    ]
    return table(["value", "layer", "position", "median rank", "top-1 rate", "n runs"], rows, left={0})


def _pair_table(top: pd.DataFrame, K: int) -> str:
    """One pair's clean lens: rows layers, columns positions, top-3 tokens with probabilities."""
    top = top[(top["variant"] == "clean") & (top["k"] < 3)]
    positions = sorted(top["position"].unique())
    rows = []
    for layer, grp in top.groupby("layer", sort=True):
        cells = [_layer(layer)]
        for p in positions:
            at = grp[grp["position"] == p].sort_values("k")
            cells.append(", ".join(f"{t!r} {fmt(pr)}" for t, pr in zip(at["token"], at["prob"])))
        rows.append(cells)
    return table(["layer"] + [position_name(p, K) for p in positions], [[escape(c) for c in r] for r in rows], left=0)


def lens_section(run_dir: Path, formats: Sequence[str], stats: dict[str, Any] | None = None) -> str:
    """The ``lens`` section; ``stats``: ``stats.json``'s ``lens`` (computed here when not given)."""
    lens, top = _read(run_dir, LENS_FILE), _read(run_dir, LENS_TOP_FILE)
    if lens is None or top is None:
        return section("lens", note(f"This run has no logit lens; run with <code>--experiments lens</code> ({HOW})."))
    K, fig_dir = _num_latent(run_dir), RunPaths(run_dir).figures
    body = note(
        "Each layer's residual stream at each thought (t0..) and the first answer position (ans), and the fed "
        "vector itself (layer 'thought'), through the final norm and the LM head; ranks of the first number "
        "token of each known value (0 = top token). Values: the answer, the pair's intermediates (if given), "
        "the question's numbers (operands)."
    )
    if not lens.empty and lens_ranks(lens, K, fig_dir, formats):
        body += figure(fig_dir, "lens_ranks", "Median rank over pairs and variants (log scale; lower is better).")
    stats = stats or lens_stats(lens)
    if stats:
        body += "<h3>Where each value is read best</h3>" + _lens_summary(stats, K)
    for pid in list(dict.fromkeys(top["pair_id"]))[:PAIRS_SHOWN]:
        body += f"<h3>{escape(str(pid))} (clean): top-3 tokens</h3>" + _pair_table(top[top["pair_id"] == pid], K)
    return section("lens", body)


def attention_section(run_dir: Path, formats: Sequence[str]) -> str:
    att = _read(run_dir, ATTENTION_FILE)
    if att is None:
        return section("attention", note(f"This run has no attention maps; add <code>attention</code> ({HOW})."))
    K, paths = _num_latent(run_dir), RunPaths(run_dir)
    body = note(
        "Attention (mean over heads) of each thought and of the first answer position on the prompt's tokens, "
        "by role: the question's numbers in order, operator words, other words, special tokens; 'thoughts' is "
        "the mass on the latent positions (earlier thoughts and itself)."
    )
    if attention_roles(att, K, paths.figures, formats):
        body += figure(paths.figures, "attention_roles", "Mean attention mass per layer and role.")
    mean = att.groupby(["position", "role"])["weight"].mean().unstack("role")
    roles = list(mean.columns)
    rows = [[position_name(int(p), K)] + [fmt(mean.loc[p, r]) for r in roles] for p in mean.index]
    body += "<h3>Mean over layers and pairs</h3>" + table(["position"] + roles, rows, left={0})
    for n, f in enumerate(sorted((paths.results / ATTENTION_DIR).glob("*.json"))[:PAIRS_SHOWN]):
        if attention_pair(json.loads(f.read_text()), n, K, paths.figures, formats):
            body += figure(paths.figures, f"attention_pair_{n}", "Attention over the prompt (one pair).")
    return section("attention", body)


def heads_section(run_dir: Path, formats: Sequence[str]) -> str:
    cells_path = RunPaths(run_dir).cells
    cells = pd.read_parquet(cells_path) if cells_path.is_file() else pd.DataFrame({"component": []})
    heads = cells["component"].map(parse_head)
    cells = cells[heads.notna()].assign(head=heads[heads.notna()].astype(int))
    if cells.empty:
        return section("heads", note(f"This run patched no heads; run with <code>--component head_out</code> ({HOW})."))
    fig_dir = RunPaths(run_dir).figures
    body = note(
        "--component head_out: head h's slice of the attention output projection's input patched alone "
        "(component head_out.h); mean recovery per layer x head."
    )
    for exp, grp in cells.groupby("experiment", sort=True):
        if exp in ("layer", "position") and head_maps(grp, str(exp), fig_dir, formats):
            body += figure(fig_dir, f"heads_{exp}", f"{exp} experiment: layer x head, mean recovery.")
    mean = cells.groupby(["experiment", "layer", "head", "position"])[["recovery", "kl"]].agg(["mean", "count"])
    best = mean.sort_values(("recovery", "mean"), ascending=False).head(TOP_HEADS)
    rows = [
        [str(e), str(lay), str(h), "all" if p < 0 else f"t{p}", str(int(r[("recovery", "count")]))]
        + [fmt(r[("recovery", "mean")]), fmt(r[("kl", "mean")])]
        for (e, lay, h, p), r in best.iterrows()
    ]
    body += "<h3>Top heads by mean recovery</h3>" + table(
        ["experiment", "layer", "head", "position", "n", "recovery", "KL"], rows, left={0}
    )
    return section("heads", body)


def reading_sections(
    run_dir: Path, formats: Sequence[str] = ("png", "svg"), stats: dict[str, Any] | None = None
) -> str:
    """The HTML of the lens, attention and heads sections (each a one-line note when its results are
    absent); ``stats``: ``stats.json`` (its ``lens``)."""
    run_dir = Path(run_dir)
    lens = lens_section(run_dir, formats, (stats or {}).get("lens"))
    return lens + attention_section(run_dir, formats) + heads_section(run_dir, formats)
