"""The report's step-level sections (docs/method.md §13): thought interventions, early answers,
the influence matrix, intermediate values. Each: a figure, a table with bootstrap CIs and
Holm-corrected Wilcoxon p-values (:mod:`latentpatch.analysis.inference`), and a one-sentence reading.

Reads the summaries from ``stats.json``'s ``steps`` (computed from ``results/steps.parquet`` and
``results/influence.parquet`` by :func:`latentpatch.analysis.step_stats.step_stats`; absent: each section
says how to get it). :func:`steps_sections` returns the HTML of all four; :func:`build_steps_report` writes the
page of a run made of step-level experiments only (it has no ``cells.parquet`` rows).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from latentpatch.analysis.html import escape, fmt, fmt_p, table
from latentpatch.analysis.sections import (
    figure,
    note,
    section,
)
from latentpatch.analysis.step_stats import (  # noqa: F401 - read_steps, summarize, thought_signature: re-exported
    STEP_SUMMARY_KEYS,
    SUMMARY_NUMBERS,
    influence_matrices,
    read_steps,
    summarize,
    thought_signature,
)
from latentpatch.analysis.steps_figures import early_figure, influence_figures, thought_figure
from latentpatch.rundir import RunPaths

#: Section ids of this module, in page order.
STEP_SECTION_IDS: tuple[str, ...] = ("thought", "early", "influence", "intermediate")
HOW = "run with <code>--experiments thought,early,influence,intermediate</code> (docs/method.md §13)"


def _ci(row: pd.Series) -> str:
    return f"{fmt(row['mean'])} [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"


def _table(summary: pd.DataFrame, keys: list[str], metrics: list[str]) -> str:
    """One row per group: each metric as mean [CI], then the first metric's Holm p."""
    wide = {m: summary[summary["metric"] == m].set_index(keys) for m in metrics}
    first = wide[metrics[0]]
    rows = []
    for key, row in first.iterrows():
        cells = [escape(str(k)) for k in (key if isinstance(key, tuple) else (key,))] + [str(int(row["n"]))]
        cells += [_ci(wide[m].loc[key]) for m in metrics]
        rows.append(cells + [fmt_p(row["p_holm"])])
    header = keys + ["n"] + [f"{m} mean [95% CI]" for m in metrics] + [f"p Holm ({metrics[0]} ≠ 0)"]
    return table(header, rows, left=len(keys))


def _frame(records: list[dict]) -> pd.DataFrame:
    """A summary table of ``stats.json`` (NaN written as null) as the frame :func:`summarize` gave."""
    frame = pd.DataFrame(records)
    for c in SUMMARY_NUMBERS:
        if c in frame:
            frame[c] = pd.to_numeric(frame[c], errors="coerce")
    return frame


def thought_section(steps: dict | None, fig_dir: Path, formats) -> str:
    """Interventions on the continuous thought: flip rate, accuracy, KL, recovery per site x replacement x step
    (``steps``: ``stats.json``'s ``steps``)."""
    stats = (steps or {}).get("thought")
    if not stats:
        return section("thought", note(f"This run has no thought interventions; {HOW}."))
    keys, metrics = list(STEP_SUMMARY_KEYS["thought"]), list(stats["metrics"])
    summary = _frame(stats["summary"])
    thought_figure(summary, fig_dir, formats)
    flips = summary[(summary["metric"] == "flipped") & (summary["position"] >= 0)]
    top = flips.loc[flips["mean"].idxmax()] if len(flips) else None
    reading = (
        f"Replacing a single thought flips the answer most at thought {int(top['position'])} "
        f"({top['replacement']} at {top['site']}: {fmt(top['mean'])} of pairs)."
        if top is not None
        else ""
    )
    sig = {k: math.nan if v is None else v for k, v in stats["signature"].items()}
    if not math.isnan(float(sig.get("source_answer", math.nan))):
        reading += (
            f" With every thought taken from the source run, {fmt(sig['source_answer'])} of the "
            f"{sig['n_pairs']} pairs right on both sides give the source's answer"
        )
        if not math.isnan(float(sig["same_flip"])):
            reading += (
                f"; at the thought that stores each intermediate, a different-value donor flips "
                f"{fmt(sig['diff_flip'])} of answers and a same-value donor {fmt(sig['same_flip'])}"
            )
        reading += " (for answers that follow the thoughts, the first two are high and the last low)."
    body = f"<p><b>Reading.</b> {escape(reading)}</p>"
    body += figure(fig_dir, "thought_bars", "Answer flip rate per thought p (all = every thought) and replacement.")
    body += _table(summary, keys, metrics)
    return section("thought", body)


def early_section(steps: dict | None, fig_dir: Path, formats) -> str:
    """S(k): accuracy, answer logit difference and P(final answer) per k."""
    stats = (steps or {}).get("early")
    if not stats:
        return section("early", note(f"This run has no early answers; {HOW}."))
    summary = _frame(stats["summary"])
    early_figure(summary, fig_dir, formats)
    acc = summary[summary["metric"] == "correct"].sort_values("k")
    final = acc["mean"].iloc[-1]
    committed = next((int(r["k"]) for _, r in acc.iterrows() if r["mean"] >= final - 1e-9), int(acc["k"].iloc[-1]))
    reading = (
        f"Accuracy reaches its full-chain value ({fmt(final)}) after k = {committed} of {int(acc['k'].max())} thoughts."
    )
    body = f"<p><b>Reading.</b> {escape(reading)}</p>"
    body += figure(fig_dir, "early_answers", "Accuracy and P(final answer) after k thoughts, mean and 95% CI.")
    body += _table(summary, ["k"], ["correct", "p_final", "answer_logit_diff"])
    return section("early", body)


def influence_section(steps: dict | None, fig_dir: Path, formats) -> str:
    """The K x K influence matrix per intervention, and the answer's KL and flip rate per step i."""
    stats = (steps or {}).get("influence")
    if not stats:
        return section("influence", note(f"This run has no influence matrix; {HOW}."))
    mats = {rep: np.array(m, dtype=float) for rep, m in stats["matrices"].items()}
    influence_figures(mats, fig_dir, formats)
    summary = _frame(stats["later"])
    ans_summary = _frame(stats["answer"])
    band = np.nanmean([np.nanmean(np.diagonal(m, 1)) for m in mats.values() if m.shape[0] > 1] or [np.nan])
    far = np.nanmean([np.nanmean(np.triu(m, 2)[np.triu_indices(m.shape[0], 2)]) for m in mats.values()] or [np.nan])
    reading = (
        f"An intervention at step i changes the next thought by {fmt(band)} (relative L2, mean over steps and "
        f"interventions) and thoughts two or more steps later by {fmt(far)}: "
        + ("influence is local (a band above the diagonal)." if band > far else "later steps are reached directly.")
    )
    body = f"<p><b>Reading.</b> {escape(reading)}</p>"
    body += "".join(
        figure(fig_dir, f"influence_{rep}", f"Influence matrix, intervention {rep}: mean over pairs.") for rep in mats
    )
    body += "<h3>Answer after an intervention at step i</h3>" + _table(
        ans_summary, ["replacement", "step"], ["kl", "flipped"]
    )
    body += "<h3>Later thoughts (j &gt; i)</h3>" + _table(
        summary, ["replacement", "step", "later"], ["thought_rel_l2", "thought_cos"]
    )
    return section("influence", body)


def intermediate_section(steps: dict | None) -> str:
    """Same vs different intermediate donors at thought p: flip rates and their paired difference."""
    stats = (steps or {}).get("intermediate")
    if not stats:
        return section(
            "intermediate",
            note(f"This run has no intermediate-value contrast (needs pairs with <code>intermediates</code>); {HOW}."),
        )
    summary = _frame(stats["summary"])
    flips = summary[summary["metric"] == "flipped"].pivot_table(
        index=["intermediate", "position"], columns="replacement", values="mean"
    )
    gap = (flips.get("diff") - flips.get("same")) if {"diff", "same"} <= set(flips.columns) else None
    reading = ""
    if gap is not None and gap.notna().any():
        (s, p), g = gap.idxmax(), gap.max()
        reading = (
            f"Thought {p} looks most like the store of intermediate {s}: a different-value donor "
            f"flips {fmt(g)} more answers than a same-value one."
        )
    body = f"<p><b>Reading.</b> {escape(reading)}</p>" + _table(
        summary, ["intermediate", "position", "replacement"], ["flipped", "kl"]
    )
    return section("intermediate", body)


def steps_sections(run_dir: Path, steps: dict | None, formats=("png", "svg")) -> str:
    """The HTML of the four step-level sections from ``stats.json``'s ``steps``
    (:func:`~latentpatch.analysis.step_stats.step_stats`; figures drawn into ``figures/``)."""
    fig_dir = RunPaths(run_dir).figures
    return (
        thought_section(steps, fig_dir, formats)
        + early_section(steps, fig_dir, formats)
        + influence_section(steps, fig_dir, formats)
        + intermediate_section(steps)
    )
