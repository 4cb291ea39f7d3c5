"""The report's step-level experiments (docs/method.md §13) in the one skeleton: thought interventions,
early answers, the influence matrix, intermediate values.

Each ``*_section`` returns an :class:`~latentpatch.analysis.skeleton.ExperimentSection` (None when the
run lacks the experiment): a finding quoted from ``stats.json`` (``steps`` and ``contrasts``), a map
with the values on hover, a compact table and the full table folded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latentpatch.analysis.contrasts import find_contrast
from latentpatch.analysis.hover import grid_hover_figure
from latentpatch.analysis.html import escape, fmt, fmt_p, table
from latentpatch.analysis.sections import figure
from latentpatch.analysis.skeleton import ExperimentSection, Quote, contrast_claim
from latentpatch.analysis.step_stats import STEP_SUMMARY_KEYS, SUMMARY_NUMBERS
from latentpatch.analysis.steps_figures import (
    early_figure,
    influence_figures,
    influence_tips,
    thought_heatmap,
    thought_tips,
)
from latentpatch.errors import LatentPatchError
from latentpatch.names import ALL_POSITIONS
from latentpatch.rundir import RunPaths, read_manifest

METHOD = "docs/method.md §13"
#: Rows of a compact table (the full table is folded under it).
COMPACT_ROWS = 6


def _ci(row: pd.Series) -> str:
    return f"{fmt(row['mean'])} [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"


def _table(summary: pd.DataFrame, keys: list[str], metrics: list[str], first_rows: pd.Index | None = None) -> str:
    """One row per group: each metric as mean [CI], then the first metric's Holm p (``first_rows``:
    only these groups, in this order)."""
    wide = {m: summary[summary["metric"] == m].set_index(keys) for m in metrics}
    first = wide[metrics[0]] if first_rows is None else wide[metrics[0]].loc[first_rows]
    rows = []
    for key, row in first.iterrows():
        named = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        cells = [escape("all" if k == "position" and v == ALL_POSITIONS else str(v)) for k, v in named.items()]
        cells.append(str(int(row["n"])))
        cells += [_ci(wide[m].loc[key]) if key in wide[m].index else "–" for m in metrics]
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


def _full(summary: pd.DataFrame, keys: list[str], metrics: list[str]) -> tuple[str, str]:
    n = int((summary["metric"] == metrics[0]).sum())
    return f"Full table ({n} rows)", _table(summary, keys, metrics)


#: What each thought replacement writes, for the findings (docs/method.md §13).
WRITTEN = {
    "source": "taken from the source run",
    "zero": "set to zero",
    "mean": "set to the mean over pairs and steps",
    "step_mean": "set to its step's mean over pairs",
    "noise": "with Gaussian noise added",
    "resample": "taken from another pair's source run",
    "discretize": "replaced by its nearest token embedding",
    "discretize_norm": "replaced by its nearest token embedding at its own norm",
    "vocab_proj": "projected on its nearest token embeddings",
    "remove_top1": "without its nearest token's direction",
}


def written(replacement: str) -> str:
    """What a thought replacement writes, in words (``number:s``: an intermediate's token).

    >>> written("zero"), written("number_plus1:0")
    ('set to zero', "replaced by the token of one more than an intermediate's value")
    """
    kind = replacement.partition(":")[0]
    if kind == "number":
        return "replaced by the token of an intermediate's value"
    if kind == "number_plus1":
        return "replaced by the token of one more than an intermediate's value"
    return WRITTEN.get(kind, replacement)


def _thought_finding(stats: dict[str, Any]) -> str:
    q, steps = Quote(stats), stats["steps"]["thought"]
    sig = steps["signature"]
    parts = []
    if sig.get("source_answer") is not None and sig.get("n_pairs"):
        sig_path = ("steps", "thought", "signature")
        share = q.count((*sig_path, "source_answer"), (*sig_path, "n_pairs"))
        parts.append(
            f"with every thought taken from the source run, {share} pairs right on both sides give the source "
            "run's answer"
        )
    single = [
        (i, r)
        for i, r in enumerate(steps["summary"])
        if r["metric"] == "flipped" and r["position"] >= 0 and r["mean"] is not None
    ]
    if single:
        i, best = max(single, key=lambda ir: ir[1]["mean"])
        tied = sum(r["mean"] == best["mean"] for _, r in single) > 1
        at = ("summary", i)
        parts.append(
            f"the largest flip rate from replacing one thought is {q.ci('steps', 'thought', *at)}, at thought "
            f"{q.num('steps', 'thought', *at, 'position')} ({escape(best['site'])} "
            f"{escape(written(best['replacement']))}" + ("; other settings tie with it" if tied else "") + ")"
        )
    text = "; ".join(parts) or "the run has no thought interventions to summarise"
    return text[0].upper() + text[1:] + "."


def thought_section(stats: dict[str, Any], fig_dir: Path, formats) -> ExperimentSection | None:
    """Interventions on the continuous thought: flip rate map (site x replacement by thought), top rows, full table."""
    steps = (stats.get("steps") or {}).get("thought")
    if not steps:
        return None
    keys, metrics = list(STEP_SUMMARY_KEYS["thought"]), list(steps["metrics"])
    summary = _frame(steps["summary"])
    thought_heatmap(summary, fig_dir, formats)
    flips = summary[summary["metric"] == "flipped"].sort_values("mean", ascending=False, kind="stable")
    top = flips.set_index(keys).index[:COMPACT_ROWS]
    return ExperimentSection(
        "thought",
        _thought_finding(stats),
        figures=grid_hover_figure(
            fig_dir,
            "thought_flips",
            "Answer flip rate per site and replacement (rows) and thought p (all = every thought); "
            "hover a cell for its mean, CI and n.",
            thought_tips(summary),
        ),
        table=f"<h3>The {len(top)} settings that flip the most answers</h3>" + _table(summary, keys, metrics, top),
        folded=(_full(summary, keys, metrics),),
        method=METHOD,
    )


def early_section(stats: dict[str, Any], fig_dir: Path, formats, unit: str = "thoughts") -> ExperimentSection | None:
    """S(k): accuracy, answer logit difference and P(final answer) per k; ``unit``: what k counts
    (:func:`early_unit`)."""
    steps = (stats.get("steps") or {}).get("early")
    if not steps:
        return None
    q, summary = Quote(stats), _frame(steps["summary"])
    early_figure(summary, fig_dir, formats, unit)
    acc = [(i, r) for i, r in enumerate(steps["summary"]) if r["metric"] == "correct"]
    acc.sort(key=lambda ir: ir[1]["k"])
    (last, final) = acc[-1]
    first_full = next(i for i, r in acc if r["mean"] is not None and r["mean"] >= final["mean"] - 1e-9)
    at = ("steps", "early", "summary")
    finding = (
        f"After all {q.num(*at, last, 'k')} {unit} the accuracy is {q.ci(*at, last)}, and it first reaches "
        f"that value after k = {q.num(*at, first_full, 'k')} {unit}"
    )
    k = find_contrast(stats, "early", "all thoughts vs none")
    if k is not None:
        every = "every thought" if unit == "thoughts" else f"all {unit}"
        finding += f"; accuracy with {every} is " + q.compare(
            k, more="higher", less="lower", same="about the same as", than="with none"
        )
    return ExperimentSection(
        "early",
        finding + ".",
        figures=figure(fig_dir, "early_answers", f"Accuracy and P(final answer) after k {unit}, mean and 95% CI."),
        table=_table(summary, ["k"], ["correct", "p_final", "answer_logit_diff"]),
        method=METHOD,
    )


def _influence_finding(stats: dict[str, Any]) -> str:
    q = Quote(stats)
    reps = list(stats["steps"]["influence"]["matrices"])
    pooled = find_contrast(stats, "influence", "next vs later thoughts")
    if pooled is None:
        return (
            "With fewer than three thoughts there is no thought two steps after an intervention, "
            "so locality is not tested; see the matrices."
        )
    found = [(rep, find_contrast(stats, "influence", "next vs later thoughts", replacement=rep)) for rep in reps]
    per = [(rep, k) for rep, k in found if k is not None]
    claims = [contrast_claim(stats["contrasts"][k]) for _, k in per]
    if all(c == "more" for c in claims):
        verdict, word = "local", "influence is local (a band above the diagonal) after every intervention"
    elif any(c == "more" for c in claims):
        local = [rep for (rep, _), c in zip(per, claims) if c == "more"]
        verdict, word = "mixed", f"influence is local only after {', '.join(local)}"
    else:
        verdict, word = "not local", "influence is not local: later thoughts change as much as the next one"
    indices = ",".join(str(k) for _, k in per)
    each = "; ".join(f"{escape(rep)}: {q.compare(k)}" for rep, k in per)
    return (
        "An intervention at step i changes the next thought (relative L2, per pair the mean over steps, pooled "
        f"over interventions) {q.compare(pooled, than='the thoughts two steps later or after')}; per intervention, "
        f'{each}; so <span class="claim" data-claim="{verdict}" data-contrasts="{indices}">{word}</span>.'
    )


def _answer_pivot(answer: pd.DataFrame) -> str:
    """Flip rate of the answer [CI] per replacement (rows) and step i (columns)."""
    flips = answer[answer["metric"] == "flipped"]
    steps = sorted(flips["step"].unique())
    rows = []
    for rep, g in flips.groupby("replacement", sort=False):
        at = g.set_index("step")
        rows.append([escape(str(rep))] + [_ci(at.loc[s]) if s in at.index else "–" for s in steps])
    return table(["replacement"] + [f"step {int(s)}" for s in steps], rows, left=1)


def influence_section(stats: dict[str, Any], fig_dir: Path, formats) -> ExperimentSection | None:
    """The K x K influence matrix per intervention (hover: mean, CI, n), the answer's flip rate per step,
    the full tables folded."""
    steps = (stats.get("steps") or {}).get("influence")
    if not steps:
        return None
    mats = {rep: np.array(m, dtype=float) for rep, m in steps["matrices"].items()}
    influence_figures(mats, fig_dir, formats)
    later, answer = _frame(steps["later"]), _frame(steps["answer"])
    maps = "".join(
        grid_hover_figure(
            fig_dir,
            f"influence_{rep}",
            f"Influence matrix, intervention {rep}: mean over pairs; hover a cell for its CI and n.",
            influence_tips(later, rep),
        )
        for rep in mats
    )
    return ExperimentSection(
        "influence",
        _influence_finding(stats),
        figures=f'<div class="row figs">{maps}</div>',
        table="<h3>Answer flip rate after an intervention at step i</h3>" + _answer_pivot(answer),
        folded=(
            (
                "Answer after an intervention at step i: KL and flip rate",
                _table(answer, ["replacement", "step"], ["kl", "flipped"]),
            ),
            _full(later, ["replacement", "step", "later"], ["thought_rel_l2", "thought_cos"]),
        ),
        method=METHOD,
    )


def _intermediate_finding(stats: dict[str, Any]) -> str:
    q = Quote(stats)
    k = find_contrast_any(stats, "intermediate", "different vs same donor")
    if k is None:
        return (
            "No thought separates the donors: the run has no thought where a different-value donor flips more "
            "answers than a same-value one for any intermediate (or no pair right on both sides)."
        )
    cells = stats["contrasts"][k]["where"]["cells"]
    where = ", ".join(
        f"intermediate {q.num('contrasts', k, 'where', 'cells', j, 0)} at thought "
        f"{q.num('contrasts', k, 'where', 'cells', j, 1)}"
        for j in range(len(cells))
    )
    return (
        f"At the thought where the donors differ most for each intermediate ({where}; chosen on these pairs), "
        "a donor with a different value flips answers "
        + q.compare(
            k, more="more often", less="less often", same="about as often as", than="a donor with the same value"
        )
        + "."
    )


def find_contrast_any(stats: dict[str, Any], experiment: str, name: str) -> int | None:
    """The first contrast of ``experiment``/``name`` wherever it is placed."""
    return next(
        (i for i, c in enumerate(stats.get("contrasts") or []) if (c["experiment"], c["name"]) == (experiment, name)),
        None,
    )


def intermediate_section(stats: dict[str, Any]) -> ExperimentSection | None:
    """Same vs different intermediate donors at thought p: the paired contrast, flip rates per (s, p)."""
    steps = (stats.get("steps") or {}).get("intermediate")
    if not steps:
        return None
    summary = _frame(steps["summary"])
    flips = summary[summary["metric"] == "flipped"].pivot_table(
        index=["intermediate", "position"], columns="replacement", values="mean"
    )
    rows = [[str(s), str(p)] + [fmt(flips.loc[(s, p), c]) for c in flips.columns] for s, p in flips.index]
    compact = "<h3>Flip rate per donor</h3>" + table(
        ["intermediate", "thought"] + [f"{c} donor" for c in flips.columns], rows, left=0
    )
    return ExperimentSection(
        "intermediate",
        _intermediate_finding(stats),
        table=compact,
        folded=(_full(summary, ["intermediate", "position", "replacement"], ["flipped", "kl"]),),
        method=METHOD,
    )


def steps_sections(run_dir: Path, stats: dict[str, Any], formats=("png", "svg")) -> list[ExperimentSection]:
    """The sections of the step-level experiments the run has (figures drawn into ``figures/``)."""
    fig_dir = RunPaths(run_dir).figures
    made = (
        thought_section(stats, fig_dir, formats),
        early_section(stats, fig_dir, formats, early_unit(run_dir)),
        influence_section(stats, fig_dir, formats),
        intermediate_section(stats),
    )
    return [s for s in made if s is not None]


def early_unit(run_dir: Path) -> str:
    """What the early answers' k counts: ``thoughts``, or on a PCCoT model (``--model pccot:...``)
    ``Jacobi rounds`` (docs/method.md "Every experiment on the rounds").

    >>> early_unit(Path("/nonexistent"))
    'thoughts'
    """
    try:
        model = str(read_manifest(run_dir).get("config", {}).get("model", ""))
    except LatentPatchError:
        return "thoughts"
    return "Jacobi rounds" if model.startswith("pccot:") else "thoughts"
