"""Clean/corrupted pair files: the :class:`Pair` data model, loading, validation, filtering, saving.

A *pair* is two versions of one question that differ in a detail (e.g. one number) and so have
different answers; activation patching copies activations from the clean run into the corrupted
run (or back) and asks how much of the clean answer comes back.

On disk (docs/method.md §9) a pair file is a flat JSON list with one entry per variant::

    [{"pair_id": 0, "variant": "clean",     "question": "...", "answer": 18, ...extra},
     {"pair_id": 0, "variant": "corrupted", "question": "...", "answer": 20, ...extra}, ...]

:func:`load_pairs` also reads the nested "prepared pairs" format
``[{"pair_id": 0, "clean": {"question", "answer", ...}, "corrupted": {...}}, ...]``, and either
format wrapped as ``{"pairs": [...]}``. :func:`save_pairs` always writes the flat format.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from latentpatch.errors import LatentPatchError
from latentpatch.rundir import atomic_write_text

VARIANTS = ("clean", "corrupted")
#: Keys with a fixed meaning in a flat entry; every other key is kept verbatim in ``Variant.extra``.
RESERVED_KEYS = ("pair_id", "variant", "question", "answer")

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Variant:
    """One side of a pair: a question, its numeric answer, and any other fields kept verbatim."""

    question: str
    answer: float | int  # numeric; integral answers are ints
    extra: dict = field(default_factory=dict)  # e.g. program, cot, reasoning_steps

    def __post_init__(self) -> None:
        if isinstance(self.answer, bool) or not isinstance(self.answer, (int, float)):
            raise TypeError(f"Variant.answer must be an int or float, got {self.answer!r}")
        clash = [k for k in RESERVED_KEYS if k in self.extra]
        if clash:
            raise ValueError(f"Variant.extra may not contain the reserved keys {clash}")


@dataclass(frozen=True)
class Pair:
    """A clean/corrupted pair. ``pair_id`` is always a str; ``raw_id`` is the id as written in the
    file (int or str), so that saving writes back the same JSON type.

    ``Pair(pair_id=7, ...)`` is accepted too: it becomes ``pair_id="7", raw_id=7``.
    """

    pair_id: str
    clean: Variant
    corrupted: Variant
    raw_id: int | str | None = None

    def __post_init__(self) -> None:
        pid = self.pair_id
        if isinstance(pid, bool) or not isinstance(pid, (int, str)):
            raise TypeError(f"Pair.pair_id must be an int or str, got {pid!r}")
        raw = pid if self.raw_id is None else self.raw_id
        if isinstance(raw, bool) or not isinstance(raw, (int, str)) or str(raw) != str(pid):
            raise ValueError(f"Pair.raw_id {raw!r} does not match pair_id {pid!r}")
        object.__setattr__(self, "pair_id", str(pid))
        object.__setattr__(self, "raw_id", raw)

    def variant(self, name: str) -> Variant:
        """The ``"clean"`` or ``"corrupted"`` variant."""
        if name not in VARIANTS:
            raise KeyError(name)
        return self.clean if name == "clean" else self.corrupted


def pairs_to_entries(pairs: Sequence[Pair]) -> list[dict]:
    """The flat §7 entries for ``pairs``: clean then corrupted, in the order given."""
    entries = []
    for pair in pairs:
        for name in VARIANTS:
            v = pair.variant(name)
            entries.append(
                {"pair_id": pair.raw_id, "variant": name, "question": v.question, "answer": v.answer, **v.extra}
            )
    return entries


def save_pairs(pairs: Sequence[Pair], path: PathLike) -> Path:
    """Write ``pairs`` to ``path`` in the flat format (docs/method.md §9), atomically (temp file + ``os.replace``).

    Returns the path written. Parent directories are created.
    """
    path = Path(path)
    text = json.dumps(pairs_to_entries(pairs), indent=2, ensure_ascii=False) + "\n"
    atomic_write_text(path, text, fsync=True)
    return path


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def parse_answer(value: Any) -> int | float:
    """A numeric answer from a JSON number or a numeric string ("1,234", "18.0", "-3").

    Integral values become ``int`` (``"18.0"`` -> ``18``), others ``float``. Raises ``ValueError``
    for anything else (``None``, booleans, text, NaN/infinity).
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean, not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if "," in text:
            if not _THOUSANDS.match(text):
                raise ValueError(f"{value!r} is not a number")
            text = text.replace(",", "")
        if "_" in text:
            raise ValueError(f"{value!r} is not a number")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    else:
        raise ValueError(f"{value!r} is not a number")
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return int(number) if number.is_integer() else number


def same_answer(pair: Pair) -> bool:
    """Whether the clean and corrupted answers are equal (numerically, so ``18 == 18.0``)."""
    return math.isclose(pair.clean.answer, pair.corrupted.answer, rel_tol=1e-9, abs_tol=1e-9)


# ---------------------------------------------------------------------------------------------
# Scanning raw JSON: one pass shared by load_pairs (strict) and validate_pairs (collecting)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    """A problem in a pair file that stops :func:`load_pairs` from loading it."""

    kind: str  # not_a_list, empty, bad_entry, missing_field, bad_pair_id, unknown_variant,
    #            null_answer, non_numeric_answer, bad_question, empty_question, duplicate_id,
    #            reserved_key, missing_variant
    where: str  # e.g. "entry [3] (pair_id 12, clean)"
    problem: str
    fix: str
    pair_id: str | None = None
    variant: str | None = None

    def line(self) -> str:
        """``where: problem; fix: ...`` on one line."""
        return f"{self.where}: {self.problem}; fix: {self.fix}"


@dataclass
class _Scan:
    """What one pass over the raw JSON found."""

    n_entries: int = 0
    issues: list[Issue] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # pair ids by first appearance
    raw_ids: dict[str, int | str] = field(default_factory=dict)
    # pair_id -> variant -> Variant, or None when the entry exists but is invalid
    slots: dict[str, dict[str, Variant | None]] = field(default_factory=dict)
    # (pair_id, variant) -> question text, for every entry with a non-empty question
    questions: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(
        self, kind: str, where: str, problem: str, fix: str, pid: str | None = None, variant: str | None = None
    ) -> None:
        self.issues.append(Issue(kind, where, problem, fix, pid, variant))

    def complete_pairs(self) -> list[Pair]:
        """Pairs whose two entries are both present and valid, in file order."""
        out = []
        for pid in self.order:
            clean, corrupted = self.slots[pid].get("clean"), self.slots[pid].get("corrupted")
            if clean is not None and corrupted is not None:
                out.append(Pair(pid, clean, corrupted, raw_id=self.raw_ids[pid]))
        return out


def _entry_label(index: int, pid: Any = None, variant: Any = None) -> str:
    parts = [f"pair_id {pid!r}"] if pid is not None else []
    if variant is not None:
        parts.append(str(variant))
    return f"entry [{index}]" + (f" ({', '.join(parts)})" if parts else "")


def _check_pair_id(scan: _Scan, entry: dict, where: str) -> str | None:
    """The normalised pair id of ``entry``, or None (and an issue) if it is missing/invalid."""
    if "pair_id" not in entry:
        scan.add("missing_field", where, "missing field 'pair_id'", 'add "pair_id": <int or string> to the entry')
        return None
    raw = entry["pair_id"]
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or (isinstance(raw, str) and not raw.strip()):
        scan.add("bad_pair_id", where, f"field 'pair_id' is {raw!r}", "use a non-empty string or an integer as pair_id")
        return None
    return str(raw)


def _register(scan: _Scan, pid: str, raw_id: int | str) -> None:
    if pid not in scan.slots:
        scan.order.append(pid)
        scan.raw_ids[pid] = raw_id
        scan.slots[pid] = {}


def _read_variant(scan: _Scan, pid: str, name: str, data: dict, extra: dict, where: str) -> None:
    """Check one variant's question/answer and store it (or None, if invalid) in ``scan.slots``."""
    scan.n_entries += 1
    if name in scan.slots[pid]:
        scan.add(
            "duplicate_id",
            where,
            f"pair_id {scan.raw_ids[pid]!r} already has a '{name}' entry",
            "give each pair_id exactly one clean and one corrupted entry (rename or delete the duplicate)",
            pid,
            name,
        )
        return
    scan.slots[pid][name] = None
    ok = True
    question = data.get("question")
    if "question" not in data:
        scan.add("missing_field", where, "missing field 'question'", 'add "question": "<text>"', pid, name)
        ok = False
    elif not isinstance(question, str):
        scan.add(
            "bad_question",
            where,
            f"field 'question' is {question!r}, not a string",
            "make the question a string",
            pid,
            name,
        )
        ok = False
    elif not question.strip():
        scan.add(
            "empty_question",
            where,
            "field 'question' is empty",
            "fill in the question text or remove the pair",
            pid,
            name,
        )
        ok = False
    else:
        scan.questions[(pid, name)] = question
    if "answer" not in data:
        scan.add("missing_field", where, "missing field 'answer'", 'add "answer": <number>', pid, name)
        ok = False
    elif data["answer"] is None:
        scan.add(
            "null_answer", where, "field 'answer' is null", "give a number (e.g. 18) or remove the pair", pid, name
        )
        ok = False
    else:
        try:
            answer = parse_answer(data["answer"])
        except ValueError:
            scan.add(
                "non_numeric_answer",
                where,
                f"field 'answer' is {data['answer']!r}, not a number",
                'use a number or a numeric string such as "1,234" (or remove the pair)',
                pid,
                name,
            )
            ok = False
    if ok:
        scan.slots[pid][name] = Variant(question, answer, extra)


def _scan(raw: Any) -> _Scan:
    """Walk parsed JSON (flat or nested, optionally wrapped in ``{"pairs": [...]}``)."""
    scan = _Scan()
    if isinstance(raw, dict) and "pairs" in raw:
        raw = raw["pairs"]
    if not isinstance(raw, list):
        got = f"an object with keys {sorted(raw)[:5]}" if isinstance(raw, dict) else f"a {type(raw).__name__}"
        scan.add(
            "not_a_list",
            "top level",
            f"expected a JSON list of pair entries, got {got}",
            'write a list [{"pair_id", "variant", "question", "answer"}, ...] or {"pairs": [...]}',
        )
        return scan
    if not raw:
        scan.add("empty", "top level", "the list has no entries", "add at least one clean/corrupted pair")
        return scan
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            scan.add(
                "bad_entry",
                f"entry [{i}]",
                f"expected an object, got {type(entry).__name__} {entry!r:.40}",
                'make each entry an object {"pair_id", "variant", "question", "answer"}',
            )
            continue
        nested = "variant" not in entry and ("clean" in entry or "corrupted" in entry)
        pid = _check_pair_id(scan, entry, _entry_label(i))
        if pid is None:
            continue
        if nested:
            _scan_nested(scan, i, pid, entry)
            continue
        where = _entry_label(i, entry["pair_id"], entry.get("variant"))
        if "variant" not in entry:
            scan.add(
                "missing_field",
                where,
                "missing field 'variant'",
                'add "variant": "clean" or "corrupted" (or use the nested {pair_id, clean, corrupted} format)',
                pid,
            )
            continue
        name = entry["variant"]
        if name not in VARIANTS:
            scan.add(
                "unknown_variant", where, f"unknown variant {name!r}", 'use "variant": "clean" or "corrupted"', pid
            )
            continue
        _register(scan, pid, entry["pair_id"])
        extra = {k: v for k, v in entry.items() if k not in RESERVED_KEYS}
        _read_variant(scan, pid, name, entry, extra, where)
    for pid in scan.order:
        for name in VARIANTS:
            if name not in scan.slots[pid]:
                scan.add(
                    "missing_variant",
                    f"pair_id {scan.raw_ids[pid]!r}",
                    f"has no '{name}' variant",
                    f"add the '{name}' entry or remove the pair (a pair needs both clean and corrupted)",
                    pid,
                    name,
                )
    return scan


def _scan_nested(scan: _Scan, i: int, pid: str, entry: dict) -> None:
    """A nested entry ``{pair_id, clean: {...}, corrupted: {...}, ...}``.

    Pair-level extra fields are copied into both variants' ``extra`` (variant-level values win).
    """
    raw_id = entry["pair_id"]
    if pid in scan.slots:
        scan.add(
            "duplicate_id",
            _entry_label(i, raw_id),
            f"pair_id {raw_id!r} appears more than once",
            "give each pair a unique pair_id (rename or delete the duplicate)",
            pid,
        )
        return
    _register(scan, pid, raw_id)
    shared = {k: v for k, v in entry.items() if k not in VARIANTS and k != "pair_id"}
    for name in VARIANTS:
        if name not in entry:
            continue  # reported as missing_variant at the end of the scan
        where = _entry_label(i, raw_id, name)
        data = entry[name]
        if not isinstance(data, dict):
            scan.n_entries += 1
            scan.slots[pid][name] = None
            scan.add(
                "bad_entry",
                where,
                f"field '{name}' is {type(data).__name__}, not an object",
                f'make "{name}" an object {{"question": ..., "answer": ...}}',
                pid,
                name,
            )
            continue
        reserved = [k for k in ("pair_id", "variant") if k in data]
        if reserved:
            scan.n_entries += 1
            scan.slots[pid][name] = None
            scan.add(
                "reserved_key",
                where,
                f"field '{reserved[0]}' inside '{name}' is not allowed",
                f"remove '{reserved[0]}' from the '{name}' object",
                pid,
                name,
            )
            continue
        extra = {**shared, **{k: v for k, v in data.items() if k not in RESERVED_KEYS}}
        _read_variant(scan, pid, name, data, extra, where)


def _read_json(path: PathLike) -> Any:
    """Parsed JSON of ``path``; LatentPatchError if it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise LatentPatchError(f"pair file {path} {what}; fix: pass the path of a JSON pair file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except (OSError, UnicodeDecodeError) as err:
        raise LatentPatchError(f"pair file {path} cannot be read ({err}); fix: pass a readable UTF-8 JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LatentPatchError(
            f"pair file {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; "
            "fix: correct the JSON syntax there"
        ) from None


# ---------------------------------------------------------------------------------------------
# Public API: load, validate, filter
# ---------------------------------------------------------------------------------------------


def load_pairs(path: PathLike) -> list[Pair]:
    """Load a pair file (flat §7 or nested format), strictly.

    Returns the pairs in file order (by first appearance of each pair_id). Any problem, such as a
    missing field, an unknown variant, a null or non-numeric answer, a duplicate (pair_id,
    variant), a pair with one variant or an empty question, raises
    :class:`~latentpatch.errors.LatentPatchError` with a one-line message naming the file, the
    entry and the fix. Use :func:`validate_pairs` to list every problem at once.
    """
    scan = _scan(_read_json(path))
    if scan.issues:
        more = len(scan.issues) - 1
        tail = f" ({more} more problem(s); list them with `latentpatch pairs validate {path}`)" if more else ""
        raise LatentPatchError(f"pair file {path}: {scan.issues[0].line()}{tail}")
    return scan.complete_pairs()


#: Bin edges of the |clean - corrupted| answer-difference histogram.
DIFF_BIN_EDGES = (0, 1, 2, 5, 10, 20, 50, 100, 1000, math.inf)


@dataclass
class ValidationReport:
    """Everything :func:`validate_pairs` found. ``usable`` is True when :func:`load_pairs` would
    load the file and at least one pair survives :func:`filter_pairs`; otherwise
    ``blocking_reasons`` says why not. Same-answer pairs, duplicate questions and different question
    lengths are reported but do not block."""

    source: str
    n_entries: int
    n_pairs: int  # distinct pair ids
    n_complete_pairs: int  # both variants present and valid
    issues: list[Issue]  # every blocking problem, in file order
    null_answers: list[tuple[str, str]]  # (pair_id, variant)
    non_numeric_answers: list[tuple[str, str]]
    duplicate_ids: list[tuple[str, str]]  # (pair_id, variant) seen more than once
    missing_variants: list[tuple[str, str]]  # (pair_id, missing variant)
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
    """
    if isinstance(source, (list, dict)):
        raw, label = source, "<entries>"
    else:
        raw, label = _read_json(source), str(source)
    scan = _scan(raw)
    pairs = scan.complete_pairs()

    def of(kind: str) -> list[tuple[str, str]]:
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


def filter_pairs(pairs: Sequence[Pair], drop_same_answer: bool = True) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Split ``pairs`` into ``(kept, removed)``; ``removed`` holds ``(pair_id, reason)``.

    Same-answer pairs (clean answer == corrupted answer) are removed by default: patching cannot
    move the prediction between two equal answers, so they carry no signal.
    """
    kept, removed = [], []
    for pair in pairs:
        if drop_same_answer and same_answer(pair):
            removed.append((pair.pair_id, f"same answer for clean and corrupted ({pair.clean.answer})"))
        else:
            kept.append(pair)
    return kept, removed


def print_report(report: ValidationReport, console: Any = None) -> None:
    """Print ``report`` as readable rich tables (used by ``latentpatch pairs validate``)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    counts = Table(title=f"Pair file {report.source}", show_header=False)
    counts.add_column("", style="bold")
    counts.add_column("")
    d = report.answer_diff

    def ids(items: Sequence[Any], limit: int = 12) -> str:
        shown = [("/".join(x) if isinstance(x, tuple) else str(x)) for x in items[:limit]]
        return ", ".join(shown) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")

    rows = [
        ("entries", report.n_entries),
        ("pairs (distinct ids)", report.n_pairs),
        ("complete pairs", report.n_complete_pairs),
        ("null answers", len(report.null_answers)),
        ("non-numeric answers", len(report.non_numeric_answers)),
        ("duplicate ids", len(report.duplicate_ids)),
        ("missing variants", len(report.missing_variants)),
        ("duplicate questions (groups)", len(report.duplicate_questions)),
        ("same-answer pairs", f"{len(report.same_answer_ids)}  [{ids(report.same_answer_ids)}]"),
        ("same question length (tokens)", f"{report.n_same_token_length} / {report.n_complete_pairs}"),
    ]
    if d["n"]:
        rows.append(
            ("answer diff min/median/max/mean", f"{d['min']:g} / {d['median']:g} / {d['max']:g} / {d['mean']:.3g}")
        )
    for name, value in rows:
        counts.add_row(name, str(value))
    console.print(counts)

    if d["n"]:
        hist = Table(title="|clean - corrupted| answer difference")
        hist.add_column("range")
        hist.add_column("pairs", justify="right")
        hist.add_column("")
        top = max(c for _, c in d["histogram"]) or 1
        for label, count in d["histogram"]:
            hist.add_row(label, str(count), "#" * round(20 * count / top))
        console.print(hist)

    if report.issues:
        problems = Table(title="Problems (each stops load_pairs)")
        for col in ("where", "problem", "fix"):
            problems.add_column(col, overflow="fold")
        for issue in report.issues:
            problems.add_row(issue.where, issue.problem, issue.fix)
        console.print(problems)
    for group in report.duplicate_questions[:10]:
        console.print(f"[yellow]duplicate question:[/] {ids(group)}")
    if report.usable:
        console.print(
            f"[green]usable[/]: {report.n_complete_pairs} pairs, "
            f"{report.n_complete_pairs - len(report.same_answer_ids)} after dropping same-answer pairs"
        )
    else:
        console.print(f"[red]not usable[/]: {len(report.blocking_reasons)} blocking problem(s)")
