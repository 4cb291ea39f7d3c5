"""The report's reading experiments (docs/method.md §14) in the one skeleton: logit lens, attention to
the question, per-head patching.

Findings quote ``stats.json`` (``lens``, ``attention``, the ``head_out.<h>`` cells); figures and pair
views read ``results/lens.parquet``, ``results/lens_top.parquet``, ``results/attention.parquet`` and
the per-pair attention files. An experiment the run lacks has no section (None).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.analysis.html import escape, fmt, table
from latentpatch.analysis.reading_figures import (
    attention_pair,
    attention_roles,
    head_maps,
    lens_ranks,
    position_name,
    thought_maps,
)
from latentpatch.analysis.reading_stats import tuned_lens_report
from latentpatch.analysis.sections import figure, note
from latentpatch.analysis.skeleton import ExperimentSection, Quote
from latentpatch.names import (
    ATTENTION_DIR,
    ATTENTION_FILE,
    LENS_COLUMN,
    LENS_FILE,
    LENS_TOP_FILE,
    THOUGHT_LAYER,
    parse_head,
)
from latentpatch.rundir import RunPaths, read_manifest

METHOD = "docs/method.md §14"
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
    """Per known value (and lens, with ``--lens tuned|both``): where (layer, position) its median rank is
    lowest, and the top-1 rate there (``stats.json``'s ``lens``,
    :func:`latentpatch.analysis.reading_stats.lens_stats`)."""
    by_lens = stats.get("by_lens") or {"": stats["best"]}
    rows = [
        ([name] if name else [])
        + [f"{r['kind']} {r['index']}", _layer(r["layer"]), position_name(r["position"], K)]
        + [fmt(r["median_rank"]), fmt(r["top1_rate"]), str(r["n"])]
        for name, best in by_lens.items()
        for r in best
    ]
    header = ["value", "layer", "position", "median rank", "top-1 rate", "n runs"]
    return table((["lens"] if "by_lens" in stats else []) + header, rows, left={0, 1} if "by_lens" in stats else {0})


def _layer_ranks(lens: pd.DataFrame, K: int) -> str:
    """The lenses side by side: per layer, the answer's lowest median rank over positions (and where)."""
    answer = lens[lens["kind"] == "answer"]
    names = sorted(set(answer[LENS_COLUMN]), key=lambda n: (n != "logit", n))
    med = answer.groupby([LENS_COLUMN, "layer", "position"])["rank"].median()
    rows = []
    for layer in sorted(answer["layer"].unique()):
        cells = [_layer(int(layer))]
        for name in names:
            at = med.loc[(name, layer)]
            cells.append(f"{fmt(at.min())} ({position_name(int(at.idxmin()), K)})")
        rows.append(cells)
    return table(["layer"] + [f"{n} lens: median rank (position)" for n in names], rows, left={0})


def _kl_table(report: dict[str, Any]) -> str:
    """The tuned lens's held-out KL(final || lens) per layer beside the logit lens's (the manifest's ``tuned_lens``)."""
    rows = [[_layer(r["layer"]), fmt(r["logit"]), fmt(r["tuned"])] for r in report["held_out_kl"]]
    n, positions = report["n_questions"], report["n_positions"]
    how = "loaded from the cache" if report.get("loaded") else "trained in this run"
    return (
        f"<h3>Held-out KL(final layer || lens), mean over {positions['held_out']} positions of "
        f"{n['held_out']} held-out questions (lens {how} on {n['train']} questions)</h3>"
        + table(["layer", "logit lens", "tuned lens"], rows, left={0})
    )


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


def _where(q: Quote, keys: tuple, K: int) -> str:
    """``layer L, thought p`` (or the fed vector / the first answer position) of a record at ``keys``."""
    record = q.stats
    for k in keys:
        record = record[k]
    layer = "the fed thought vector" if record["layer"] == THOUGHT_LAYER else f"layer {q.num(*keys, 'layer')}"
    position = "the first answer position" if record["position"] >= K else f"thought {q.num(*keys, 'position')}"
    return f"{layer}, {position}"


def _lens_clauses(q: Quote, keys: tuple, K: int) -> list[str]:
    """``the answer is read best at ... (median rank r, the top token in k of n runs)`` per answer and
    intermediate of the rows at ``keys`` (``("lens", "best")`` or ``("lens", "by_lens", name)``)."""
    rows: Any = q.stats
    for k in keys:
        rows = rows[k]
    parts = []
    for i, r in enumerate(rows):
        if r["kind"] not in ("answer", "intermediate"):
            continue
        what = "the answer" if r["kind"] == "answer" else f"intermediate {q.num(*keys, i, 'index')}"
        parts.append(
            f"{what} is read best at {_where(q, (*keys, i), K)} "
            f"(median rank {q.num(*keys, i, 'median_rank')}, "
            f"the top token in {q.count((*keys, i, 'top1_rate'), (*keys, i, 'n'))} runs)"
        )
    return parts


def _lens_finding(stats: dict[str, Any], K: int) -> str:
    lens, q = stats["lens"], Quote(stats)
    if "by_lens" in lens:  # --lens tuned|both: one clause per lens
        clauses = [
            f"with the {escape(name)} lens, " + ("; ".join(parts) or "no answer or intermediate value is read")
            for name in lens["lenses"]
            for parts in [_lens_clauses(q, ("lens", "by_lens", name), K)]
        ]
        text = "; ".join(clauses)
    else:
        text = "; ".join(_lens_clauses(q, ("lens", "best"), K))
    if not text:
        return "The lens has no answer or intermediate value to read."
    return text[0].upper() + text[1:] + "."


def lens_section(run_dir: Path, formats: Sequence[str], stats: dict[str, Any]) -> ExperimentSection | None:
    """The ``lens`` section; ``stats``: ``stats.json`` (its ``lens``)."""
    lens, top = _read(run_dir, LENS_FILE), _read(run_dir, LENS_TOP_FILE)
    if lens is None or top is None or not stats.get("lens"):
        return None
    K, fig_dir = _num_latent(run_dir), RunPaths(run_dir).figures
    figures = ""
    if not lens.empty and lens_ranks(lens, K, fig_dir, formats):
        figures = figure(fig_dir, "lens_ranks", "Median rank over pairs and variants (log scale; lower is better).")
    tuned = LENS_COLUMN in lens.columns
    pairs = "".join(
        f"<h3>{escape(str(pid))} (clean{'' if name is None else ', ' + escape(name) + ' lens'}): top-3 tokens</h3>"
        + _pair_table(rows, K)
        for pid in list(dict.fromkeys(top["pair_id"]))[:PAIRS_SHOWN]
        for name, rows in _by_lens(top[top["pair_id"] == pid])
    )
    compact = "<h3>Where each value is read best</h3>" + _lens_summary(stats["lens"], K)
    if tuned and (lens["kind"] == "answer").any():
        compact += "<h3>The answer per layer, lenses side by side</h3>" + _layer_ranks(lens, K)
    report = tuned_lens_report(run_dir) if tuned else None
    if report is not None:
        compact += _kl_table(report)
    return ExperimentSection(
        "lens",
        _lens_finding(stats, K),
        notes=note(
            "Each layer's residual stream at each thought (t0..) and the first answer position (ans), and the fed "
            "vector itself (layer 'thought'), through the final norm and the LM head; ranks of the first number "
            "token of each known value (0 = top token). Values: the answer, the pair's intermediates (if given), "
            "the question's numbers (operands)." + (TUNED_NOTE if tuned else "")
        ),
        figures=figures,
        table=compact,
        folded=((f"Top tokens of the first {PAIRS_SHOWN} pairs", pairs),) if pairs else (),
        method=METHOD + (" and §14.1" if tuned else ""),
    )


#: What the lens section says about the tuned lens (``--lens tuned|both``).
TUNED_NOTE = (
    " Tuned lens: each layer's vector first goes through that layer's affine translator, trained to give the "
    "model's final-layer distribution (KL) on this run's questions; at the last layer it is the logit lens."
)


def _by_lens(rows: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """``rows`` per lens (logit first), or ``[(None, rows)]`` without a ``lens`` column."""
    if LENS_COLUMN not in rows.columns:
        return [(None, rows)]
    names = sorted(set(rows[LENS_COLUMN]), key=lambda n: (n != "logit", n))
    return [(n, rows[rows[LENS_COLUMN] == n]) for n in names]


def _attention_finding(stats: dict[str, Any], K: int) -> str:
    q, rows = Quote(stats), stats["attention"]["summary"]
    at_answer = {r["role"]: i for i, r in enumerate(rows) if r["position"] >= K}
    if not at_answer:
        return "The run recorded no attention at the first answer position."
    top = max(at_answer, key=lambda role: rows[at_answer[role]]["mean"] or 0)
    parts = [f"the most on {escape(ROLE_WORDS.get(top, top))} ({q.ci('attention', 'summary', at_answer[top])})"]
    parts += [
        f"{q.ci('attention', 'summary', at_answer[role])} on {escape(ROLE_WORDS[role])}"
        for role in ("thoughts", "numbers")
        if role in at_answer and role != top
    ]
    text = "At the first answer position, attention (mean over heads and layers) puts " + "; ".join(parts)
    maps = stats["attention"].get("thoughts")
    if maps:
        where = {r["key"]: i for i, r in enumerate(maps["summary"])}
        relations = (
            ("previous", "the thought before it"),
            ("earlier", "earlier thoughts"),
            ("question", "the question"),
        )
        said = [
            f"{q.ci('attention', 'thoughts', 'summary', where[key])} on {words}"
            for key, words in relations
            if key in where
        ]
        if said:
            text += ". A thought (from the second on) puts " + ", ".join(said) + " (mean over layers and heads)"
    return text + "."


#: How the finding names each role group.
ROLE_WORDS = {
    "thoughts": "the latent thoughts",
    "numbers": "the question's numbers",
    "operator": "operator words",
    "other": "the question's other words",
    "special": "special tokens",
}


def attention_section(run_dir: Path, formats: Sequence[str], stats: dict[str, Any]) -> ExperimentSection | None:
    att = _read(run_dir, ATTENTION_FILE)
    if att is None or not stats.get("attention"):
        return None
    K, paths = _num_latent(run_dir), RunPaths(run_dir)
    figures = ""
    if attention_roles(att, K, paths.figures, formats):
        figures = figure(paths.figures, "attention_roles", "Mean attention mass per layer and role.")
    thought_figs = ""
    maps = stats["attention"].get("thoughts")
    if maps:
        layers = thought_maps(pd.DataFrame(maps["heads"]), K, paths.figures, formats)
        thought_figs = "".join(
            figure(
                paths.figures, f"thought_attention_L{layer}", f"Layer {layer}: thought-to-thought attention per head."
            )
            for layer in layers
        )
    mean = att.groupby(["position", "role"])["weight"].mean().unstack("role")
    roles = list(mean.columns)
    rows = [[position_name(int(p), K)] + [fmt(mean.loc[p, r]) for r in roles] for p in mean.index]
    pairs = "".join(
        figure(paths.figures, f"attention_pair_{n}", "Attention over the prompt (one pair).")
        for n, f in enumerate(sorted((paths.results / ATTENTION_DIR).glob("*.json"))[:PAIRS_SHOWN])
        if attention_pair(json.loads(f.read_text()), n, K, paths.figures, formats)
    )
    return ExperimentSection(
        "attention",
        _attention_finding(stats, K),
        notes=note(
            "Attention (mean over heads) of each thought and of the first answer position on the prompt's tokens, "
            "by role: the question's numbers in order, operator words, other words, special tokens; 'thoughts' is "
            "the mass on the latent positions (earlier thoughts and itself)."
        ),
        figures=figures,
        table="<h3>Mean over layers and pairs</h3>" + table(["position"] + roles, rows, left={0}),
        folded=(((f"Attention over the prompt, first {PAIRS_SHOWN} pairs", pairs),) if pairs else ())
        + ((("Thought-to-thought attention per head, every layer", thought_figs),) if thought_figs else ()),
        method=METHOD,
    )


def _heads_finding(stats: dict[str, Any]) -> str:
    q = Quote(stats)
    heads = [
        (i, c)
        for i, c in enumerate(stats.get("cells", []))
        if parse_head(c["component"]) is not None and c["metric"] == "recovery" and c.get("mean") is not None
    ]
    if not heads:
        return "The run has no per-head recovery values."
    i, best = max(heads, key=lambda ic: abs(ic[1]["mean"]))
    position = "" if best["position"] < 0 else f", thought {q.num('cells', i, 'position')}"
    return (
        f"Patching one head alone restores the most at {q.num('cells', i, 'component')} of layer "
        f"{q.num('cells', i, 'layer')}{position} ({escape(best['experiment'])} experiment): recovery "
        f"{q.ci('cells', i)}, p (Holm) {q.p('cells', i, 'p_holm')}."
    )


def heads_section(run_dir: Path, formats: Sequence[str], stats: dict[str, Any]) -> ExperimentSection | None:
    cells_path = RunPaths(run_dir).cells
    cells = pd.read_parquet(cells_path) if cells_path.is_file() else pd.DataFrame({"component": []})
    heads = cells["component"].map(parse_head)
    cells = cells[heads.notna()].assign(head=heads[heads.notna()].astype(int))
    if cells.empty:
        return None
    fig_dir = RunPaths(run_dir).figures
    figures = "".join(
        figure(fig_dir, f"heads_{exp}", f"{exp} experiment: layer x head, mean recovery.")
        for exp, grp in cells.groupby("experiment", sort=True)
        if exp in ("layer", "position") and head_maps(grp, str(exp), fig_dir, formats)
    )
    mean = cells.groupby(["experiment", "layer", "head", "position"])[["recovery", "kl"]].agg(["mean", "count"])
    ranked = mean.sort_values(("recovery", "mean"), ascending=False)

    def rows(frame: pd.DataFrame) -> list[list[str]]:
        return [
            [str(e), str(lay), str(h), "all" if p < 0 else f"t{p}", str(int(r[("recovery", "count")]))]
            + [fmt(r[("recovery", "mean")]), fmt(r[("kl", "mean")])]
            for (e, lay, h, p), r in frame.iterrows()
        ]

    header = ["experiment", "layer", "head", "position", "n", "recovery", "KL"]
    return ExperimentSection(
        "heads",
        _heads_finding(stats),
        notes=note(
            "--component head_out: head h's slice of the attention output projection's input patched alone "
            "(component head_out.h); mean recovery per layer x head."
        ),
        figures=figures,
        table="<h3>Top heads by mean recovery</h3>" + table(header, rows(ranked.head(TOP_HEADS)), left={0}),
        folded=((f"Every head ({len(ranked)} rows)", table(header, rows(ranked), left={0})),),
        method=METHOD,
    )


def reading_sections(run_dir: Path, formats: Sequence[str], stats: dict[str, Any]) -> list[ExperimentSection]:
    """The lens, attention and heads sections the run has; ``stats``: ``stats.json``."""
    run_dir = Path(run_dir)
    made = (
        lens_section(run_dir, formats, stats),
        attention_section(run_dir, formats, stats),
        heads_section(run_dir, formats, stats),
    )
    return [s for s in made if s is not None]
