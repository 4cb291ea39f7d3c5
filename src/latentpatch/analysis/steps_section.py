"""The report's step-level sections (docs/method.md §13): thought interventions, early answers,
the influence matrix, intermediate values. Each: a figure, a table with bootstrap CIs and
Holm-corrected Wilcoxon p-values (:mod:`latentpatch.analysis.inference`), and a one-sentence reading.

Reads ``results/steps.parquet`` and ``results/influence.parquet`` (absent: each section says how to
get it). :func:`steps_sections` returns the HTML of all four; :func:`build_steps_report` writes the
page of a run made of step-level experiments only (it has no ``cells.parquet`` rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from latentpatch.analysis.html import escape, fmt, fmt_p, table
from latentpatch.analysis.inference import bootstrap_mean_ci, holm, wilcoxon_p
from latentpatch.analysis.sections import (
    figure,
    note,
    section,
)
from latentpatch.analysis.steps_figures import early_figure, influence_figures, thought_figure
from latentpatch.names import ALL_POSITIONS, INFLUENCE_FILE, STEPS_FILE
from latentpatch.rundir import RunPaths

#: Section ids of this module, in page order.
STEP_SECTION_IDS: tuple[str, ...] = ("thought", "early", "influence", "intermediate")
HOW = "run with <code>--experiments thought,early,influence,intermediate</code> (docs/method.md §13)"


def read_steps(run_dir: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """``steps.parquet`` and ``influence.parquet`` of a run (None where absent)."""
    res = RunPaths(run_dir).results
    return tuple(pd.read_parquet(res / f) if (res / f).is_file() else None for f in (STEPS_FILE, INFLUENCE_FILE))  # type: ignore[return-value]


def summarize(
    table_: pd.DataFrame, keys: list[str], metrics: Iterable[str], seed: int, n_resamples: int = 9999
) -> pd.DataFrame:
    """Per group of ``keys`` and metric: n, mean, 95% bootstrap CI, Wilcoxon p against 0 and its
    Holm adjustment across the groups of one metric (NaNs dropped; booleans as 0/1)."""
    rows = []
    for metric in metrics:
        block = []
        for key, grp in table_.groupby(keys, sort=True):
            x = grp[metric].astype(float).to_numpy()
            x = x[~np.isnan(x)]
            lo, hi = bootstrap_mean_ci(x[None], seed, n_resamples) if x.size else (np.array([np.nan]),) * 2
            key = key if isinstance(key, tuple) else (key,)
            row = dict(zip(keys, key), metric=metric, n=int(x.size), mean=float(x.mean()) if x.size else np.nan)
            row.update(ci_low=float(lo[0]), ci_high=float(hi[0]), p=wilcoxon_p(x)[1])
            block.append(row)
        for row, adj in zip(block, holm([r["p"] for r in block])):
            row["p_holm"] = float(adj)
        rows += block
    return pd.DataFrame(rows)


def thought_signature(steps: pd.DataFrame) -> dict[str, float | int | list[list[int]]]:
    """Do the answers follow the thoughts? Three numbers over the pairs right on both sides (docs/method.md §13).

    ``source_answer``: fraction of pairs whose target run gives the source's answer when every thought
    is the source run's (``thought``/``thought``/``source``/every step); ``same_flip`` and
    ``diff_flip``: flip rates of same- and different-value donors at the thought that stores each
    intermediate s (the p with the largest different-minus-same gap), rows pooled over s; ``cells``:
    those [s, p]. NaN where the run lacks the experiment.

    >>> rows = [dict(pair_id=i, experiment="thought", site="thought", replacement="source", position=-1,
    ...              intermediate=-1, flipped=True, to_source=ok, flagged=False) for i, ok in enumerate((True, False))]
    >>> rows += [dict(pair_id=0, experiment="intermediate", site="thought", replacement=k, position=p,
    ...               intermediate=0, flipped=f, to_source=False, flagged=False)
    ...          for k, p, f in [("same", 1, False), ("diff", 1, True), ("same", 2, True), ("diff", 2, True)]]
    >>> sig = thought_signature(pd.DataFrame(rows))
    >>> sig["source_answer"], sig["same_flip"], sig["diff_flip"], sig["cells"]
    (0.5, 0.0, 1.0, [[0, 1]])
    """
    ok = steps[~steps["flagged"].astype(bool)]
    every = ok[
        (ok["experiment"] == "thought")
        & (ok["site"] == "thought")
        & (ok["replacement"] == "source")
        & (ok["position"] == ALL_POSITIONS)
    ]
    has_col = "to_source" in every.columns and len(every)
    out: dict[str, float | int | list[list[int]]] = {
        "n_pairs": int(every["pair_id"].nunique()),
        "source_answer": float(every["to_source"].astype(float).mean()) if has_col else math.nan,
        "same_flip": math.nan,
        "diff_flip": math.nan,
        "cells": [],
    }
    inter = ok[ok["experiment"] == "intermediate"]
    if inter.empty:
        return out
    rate = inter.pivot_table(
        index=["intermediate", "position"], columns="replacement", values="flipped", aggfunc="mean"
    )
    if not {"same", "diff"} <= set(rate.columns):
        return out
    gap = (rate["diff"] - rate["same"]).dropna()
    if gap.empty:
        return out
    best = gap.groupby(level="intermediate").idxmax().tolist()
    chosen = inter.set_index(["intermediate", "position"]).loc[best]
    flips = chosen.groupby("replacement")["flipped"].mean()
    out.update(
        same_flip=float(flips["same"]), diff_flip=float(flips["diff"]), cells=[[int(s), int(p)] for s, p in best]
    )
    return out


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


def thought_section(steps: pd.DataFrame | None, seed: int, fig_dir: Path, formats) -> str:
    """Interventions on the continuous thought: flip rate, accuracy, KL, recovery per site x replacement x step."""
    sub = steps[steps["experiment"] == "thought"] if steps is not None else None
    if sub is None or sub.empty:
        return section("thought", note(f"This run has no thought interventions; {HOW}."))
    keys = ["site", "replacement", "position"]
    metrics = (
        ["flipped", "correct", "to_source", "kl", "recovery"]
        if "to_source" in sub
        else ["flipped", "correct", "kl", "recovery"]
    )
    summary = summarize(sub, keys, metrics, seed)
    thought_figure(summary, fig_dir, formats)
    flips = summary[(summary["metric"] == "flipped") & (summary["position"] >= 0)]
    top = flips.loc[flips["mean"].idxmax()] if len(flips) else None
    reading = (
        f"Replacing a single thought flips the answer most at thought {int(top['position'])} "
        f"({top['replacement']} at {top['site']}: {fmt(top['mean'])} of pairs)."
        if top is not None
        else ""
    )
    sig = thought_signature(steps) if steps is not None else {}
    if not math.isnan(float(sig.get("source_answer", math.nan))):  # type: ignore[arg-type]
        reading += (
            f" With every thought taken from the source run, {fmt(sig['source_answer'])} of the "
            f"{sig['n_pairs']} pairs right on both sides give the source's answer"
        )
        if not math.isnan(float(sig["same_flip"])):  # type: ignore[arg-type]
            reading += (
                f"; at the thought that stores each intermediate, a different-value donor flips "
                f"{fmt(sig['diff_flip'])} of answers and a same-value donor {fmt(sig['same_flip'])}"
            )
        reading += " (for answers that follow the thoughts, the first two are high and the last low)."
    body = f"<p><b>Reading.</b> {escape(reading)}</p>"
    body += figure(fig_dir, "thought_bars", "Answer flip rate per thought p (all = every thought) and replacement.")
    body += _table(summary, keys, metrics)
    return section("thought", body)


def early_section(steps: pd.DataFrame | None, seed: int, fig_dir: Path, formats) -> str:
    """S(k): accuracy, answer logit difference and P(final answer) per k."""
    sub = steps[steps["experiment"] == "early"] if steps is not None else None
    if sub is None or sub.empty:
        return section("early", note(f"This run has no early answers; {HOW}."))
    summary = summarize(sub.rename(columns={"position": "k"}), ["k"], ["correct", "p_final", "answer_logit_diff"], seed)
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


def influence_matrices(influence: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per replacement: [K, K] mean ``thought_rel_l2`` over pairs, rows = step i, columns = thought j."""
    out = {}
    for rep, grp in influence.groupby("replacement", sort=False):
        means = grp.groupby(["step", "later"])["thought_rel_l2"].mean()
        K = int(grp["step"].max()) + 1
        mat = np.full((K, int(grp["later"].max()) + 1), np.nan)
        for (i, j), v in means.items():
            mat[int(i), int(j)] = v
        out[str(rep)] = mat
    return out


def influence_section(influence: pd.DataFrame | None, seed: int, fig_dir: Path, formats) -> str:
    """The K x K influence matrix per intervention, and the answer's KL and flip rate per step i."""
    if influence is None or influence.empty:
        return section("influence", note(f"This run has no influence matrix; {HOW}."))
    mats = influence_matrices(influence)
    influence_figures(mats, fig_dir, formats)
    later = influence[influence["later"] > influence["step"]]
    summary = summarize(later, ["replacement", "step", "later"], ["thought_rel_l2", "thought_cos"], seed)
    answer = influence.drop_duplicates(["pair_id", "replacement", "step"])
    ans_summary = summarize(answer, ["replacement", "step"], ["kl", "flipped"], seed)
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


def intermediate_section(steps: pd.DataFrame | None, seed: int) -> str:
    """Same vs different intermediate donors at thought p: flip rates and their paired difference."""
    sub = steps[steps["experiment"] == "intermediate"] if steps is not None else None
    if sub is None or sub.empty:
        return section(
            "intermediate",
            note(f"This run has no intermediate-value contrast (needs pairs with <code>intermediates</code>); {HOW}."),
        )
    summary = summarize(sub, ["intermediate", "position", "replacement"], ["flipped", "kl"], seed)
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


def steps_sections(run_dir: Path, seed: int, formats=("png", "svg")) -> str:
    """The HTML of the four step-level sections (figures drawn into ``figures/``)."""
    steps, influence = read_steps(run_dir)
    fig_dir = RunPaths(run_dir).figures
    return (
        thought_section(steps, seed, fig_dir, formats)
        + early_section(steps, seed, fig_dir, formats)
        + influence_section(influence, seed, fig_dir, formats)
        + intermediate_section(steps, seed)
    )
