"""Validating a pair file: every problem at once, plus the statistics that do not block loading.

Contract (docs/method.md §9.4): :func:`validate_pairs` runs the same scan as
:func:`~latentpatch.data.pairs.load_pairs` but collects the problems in a
:class:`ValidationReport` instead of raising (only a missing file or invalid JSON raises). The
report also lists what does not block loading: duplicate questions (after collapsing whitespace),
same-answer pairs, the ``|clean - corrupted|`` answer distribution and question token lengths. A
file is *usable* when it loads and at least one pair survives
:func:`~latentpatch.data.pairs.filter_pairs`. :func:`print_report` renders the report for
``latentpatch pairs validate``; ``ValidationReport.to_dict`` is its ``--json`` form, and both are
user-visible output.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from latentpatch.data.pairs import Issue, Pair, PathLike, read_pair_json, same_answer, scan_pairs

#: Bin edges of the |clean - corrupted| answer-difference histogram.
DIFF_BIN_EDGES = (0, 1, 2, 5, 10, 20, 50, 100, 1000, math.inf)


@dataclass
class ValidationReport:
    """Everything :func:`validate_pairs` found. ``usable`` is True when
    :func:`~latentpatch.data.pairs.load_pairs` would load the file and at least one pair survives
    :func:`~latentpatch.data.pairs.filter_pairs`; otherwise ``blocking_reasons`` says why not.
    Same-answer pairs, duplicate questions and different question lengths are reported but do not
    block."""

    source: str
    n_entries: int
    n_pairs: int  # distinct pair ids
    n_complete_pairs: int  # both variants present and valid
    issues: list[Issue]  # every blocking problem, in file order
    null_answers: list[tuple[str | None, str | None]]  # (pair_id, variant)
    non_numeric_answers: list[tuple[str | None, str | None]]
    duplicate_ids: list[tuple[str | None, str | None]]  # (pair_id, variant; None: a repeated pair_id) seen again
    missing_variants: list[tuple[str | None, str | None]]  # (pair_id, missing variant)
    duplicate_questions: list[list[tuple[str, str]]]  # groups of entries sharing one question text
    same_answer_ids: list[str]
    answer_diff: dict  # n, min, median, max, mean of |clean - corrupted|, histogram [(label, count)]
    n_same_token_length: int  # complete pairs whose questions have equal whitespace-token counts
    different_token_length_ids: list[str]
    usable: bool
    blocking_reasons: list[str]

    def to_dict(self) -> dict:
        """JSON-serialisable form (for ``pairs validate --json``)."""
        out = dict(self.__dict__)
        out["issues"] = [i.__dict__ | {"line": i.line()} for i in self.issues]
        return out


def _diff_stats(pairs: Sequence[Pair]) -> dict:
    """n/min/median/max/mean and a :data:`DIFF_BIN_EDGES` histogram of ``|clean - corrupted|``."""
    diffs = [abs(p.clean.answer - p.corrupted.answer) for p in pairs]
    hist = []
    for lo, hi in zip(DIFF_BIN_EDGES, DIFF_BIN_EDGES[1:]):
        label = f">={lo}" if hi == math.inf else f"[{lo}, {hi})"
        hist.append((label, sum(lo <= d < hi for d in diffs)))
    if not diffs:
        return {"n": 0, "min": None, "median": None, "max": None, "mean": None, "histogram": hist}
    return {
        "n": len(diffs),
        "min": min(diffs),
        "median": statistics.median(diffs),
        "max": max(diffs),
        "mean": statistics.fmean(diffs),
        "histogram": hist,
    }


def validate_pairs(source: PathLike | list | dict) -> ValidationReport:
    """Check a pair file (a path) or already-parsed JSON (a list, or ``{"pairs": [...]}``).

    Data problems are collected in the report, not raised; only a missing file or invalid JSON
    raises :class:`~latentpatch.errors.LatentPatchError`.

    >>> entries = [{"pair_id": 0, "variant": v, "question": "q " + v, "answer": a}
    ...            for v, a in (("clean", 18), ("corrupted", 20))]
    >>> report = validate_pairs(entries)
    >>> report.usable, report.n_complete_pairs, report.answer_diff["median"]
    (True, 1, 2)
    """
    if isinstance(source, (list, dict)):
        raw, label = source, "<entries>"
    else:
        raw, label = read_pair_json(source), str(source)
    scan = scan_pairs(raw)
    pairs = scan.complete_pairs()

    def of(kind: str) -> list[tuple[str | None, str | None]]:
        return [(i.pair_id, i.variant) for i in scan.issues if i.kind == kind]

    by_text: dict[str, list[tuple[str, str]]] = {}
    for key, text in scan.questions.items():
        by_text.setdefault(" ".join(text.split()), []).append(key)
    same_len = [p for p in pairs if len(p.clean.question.split()) == len(p.corrupted.question.split())]
    same_len_ids = {p.pair_id for p in same_len}

    reasons = [i.line() for i in scan.issues]
    if not scan.issues:
        if not pairs:
            reasons.append("no complete pair with numeric answers")
        elif all(same_answer(p) for p in pairs):
            reasons.append("every pair has the same clean and corrupted answer, so none survives filtering")
    return ValidationReport(
        source=label,
        n_entries=scan.n_entries,
        n_pairs=len(scan.order),
        n_complete_pairs=len(pairs),
        issues=scan.issues,
        null_answers=of("null_answer"),
        non_numeric_answers=of("non_numeric_answer"),
        duplicate_ids=of("duplicate_id"),
        missing_variants=of("missing_variant"),
        duplicate_questions=[keys for keys in by_text.values() if len(keys) > 1],
        same_answer_ids=[p.pair_id for p in pairs if same_answer(p)],
        answer_diff=_diff_stats(pairs),
        n_same_token_length=len(same_len),
        different_token_length_ids=[p.pair_id for p in pairs if p.pair_id not in same_len_ids],
        usable=not reasons,
        blocking_reasons=reasons,
    )


# ---- Printing (``latentpatch pairs validate``) --------------------------------------------------


def _ids(items: Sequence[Any], limit: int = 12) -> str:
    """``items`` (ids, or (pair_id, variant) tuples shown as ``id/variant``), at most ``limit``."""
    shown = [("/".join(x) if isinstance(x, tuple) else str(x)) for x in items[:limit]]
    return ", ".join(shown) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def _counts_table(report: ValidationReport) -> Table:
    """The summary table: one row per count."""
    table = Table(title=f"Pair file {report.source}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    d = report.answer_diff
    rows = [
        ("entries", report.n_entries),
        ("pairs (distinct ids)", report.n_pairs),
        ("complete pairs", report.n_complete_pairs),
        ("null answers", len(report.null_answers)),
        ("non-numeric answers", len(report.non_numeric_answers)),
        ("duplicate ids", len(report.duplicate_ids)),
        ("missing variants", len(report.missing_variants)),
        ("duplicate questions (groups)", len(report.duplicate_questions)),
        ("same-answer pairs", f"{len(report.same_answer_ids)}  [{_ids(report.same_answer_ids)}]"),
        ("same question length (tokens)", f"{report.n_same_token_length} / {report.n_complete_pairs}"),
    ]
    if d["n"]:
        rows.append(
            ("answer diff min/median/max/mean", f"{d['min']:g} / {d['median']:g} / {d['max']:g} / {d['mean']:.3g}")
        )
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def _histogram_table(answer_diff: dict) -> Table:
    """The ``|clean - corrupted|`` histogram with a bar of up to 20 ``#`` per bin."""
    table = Table(title="|clean - corrupted| answer difference")
    table.add_column("range")
    table.add_column("pairs", justify="right")
    table.add_column("")
    top = max(c for _, c in answer_diff["histogram"]) or 1
    for label, count in answer_diff["histogram"]:
        table.add_row(label, str(count), "#" * round(20 * count / top))
    return table


def _problems_table(issues: Sequence[Issue]) -> Table:
    """One row per blocking problem: where, problem, fix."""
    table = Table(title="Problems (each stops load_pairs)")
    for col in ("where", "problem", "fix"):
        table.add_column(col, overflow="fold")
    for issue in issues:
        table.add_row(issue.where, issue.problem, issue.fix)
    return table


def print_report(report: ValidationReport, console: Console | None = None) -> None:
    """Print ``report`` as readable rich tables (used by ``latentpatch pairs validate``)."""
    console = console or Console()
    console.print(_counts_table(report))
    if report.answer_diff["n"]:
        console.print(_histogram_table(report.answer_diff))
    if report.issues:
        console.print(_problems_table(report.issues))
    for group in report.duplicate_questions[:10]:
        console.print(f"[yellow]duplicate question:[/] {_ids(group)}")
    if report.usable:
        console.print(
            f"[green]usable[/]: {report.n_complete_pairs} pairs, "
            f"{report.n_complete_pairs - len(report.same_answer_ids)} after dropping same-answer pairs"
        )
    else:
        console.print(f"[red]not usable[/]: {len(report.blocking_reasons)} blocking problem(s)")
