"""Clean/corrupted pair files: the :class:`Pair` data model and the one reader and writer of the format.

A *pair* is two versions of one question that differ in a detail (e.g. one number) and so have
different answers; activation patching copies activations from the clean run into the corrupted
run (or back) and asks how much of the clean answer comes back.

The format is docs/method.md §9: a flat JSON list with one entry per variant::

    [{"pair_id": 0, "variant": "clean",     "question": "...", "answer": 18, ...extra},
     {"pair_id": 0, "variant": "corrupted", "question": "...", "answer": 20, ...extra}, ...]

:func:`load_pairs` also reads the nested layout ``[{"pair_id", "clean": {...}, "corrupted": {...}}]``
and either layout wrapped as ``{"pairs": [...]}``; it is strict (§9.3): the first problem raises
:class:`~latentpatch.errors.LatentPatchError`, one line naming the file, the entry and the fix.
:func:`scan_pairs` is the single pass behind it and behind :mod:`latentpatch.data.validate`; it
collects every problem as an :class:`Issue` instead. :func:`save_pairs` always writes the flat
layout; its bytes are a run's ``pairs.json``, so they must not change.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentpatch.data.answers import parse_answer
from latentpatch.errors import LatentPatchError
from latentpatch.files import atomic_write_text

VARIANTS = ("clean", "corrupted")
#: Keys with a fixed meaning in a flat entry; every other key is kept verbatim in ``Variant.extra``.
RESERVED_KEYS = ("pair_id", "variant", "question", "answer")

PathLike = str | os.PathLike[str]


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


# ---- Answers and filtering ------------------------------------------------------------------


def same_answer(pair: Pair) -> bool:
    """Whether the clean and corrupted answers are equal (numerically, so ``18 == 18.0``)."""
    return math.isclose(pair.clean.answer, pair.corrupted.answer, rel_tol=1e-9, abs_tol=1e-9)


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


# ---- Writing ------------------------------------------------------------------------------


def pairs_to_entries(pairs: Sequence[Pair]) -> list[dict]:
    """The flat §9.1 entries for ``pairs``: clean then corrupted, in the order given."""
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


# ---- Reading: one scan of the raw JSON, shared by load_pairs (strict) and validate_pairs (collecting) ---


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
class PairScan:
    """What one pass over the raw JSON found (:func:`scan_pairs`)."""

    n_entries: int = 0
    issues: list[Issue] = field(default_factory=list)  # in file order
    order: list[str] = field(default_factory=list)  # pair ids by first appearance
    raw_ids: dict[str, int | str] = field(default_factory=dict)
    # pair_id -> variant -> Variant, or None when the entry exists but is invalid
    slots: dict[str, dict[str, Variant | None]] = field(default_factory=dict)
    # (pair_id, variant) -> question text, for every entry with a non-empty question
    questions: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(
        self, kind: str, where: str, problem: str, fix: str, pid: str | None = None, variant: str | None = None
    ) -> None:
        """Record one :class:`Issue` (``pid``/``variant``: the pair and side it concerns, if known)."""
        self.issues.append(Issue(kind, where, problem, fix, pid, variant))

    def register(self, pid: str, raw_id: int | str) -> None:
        """Note ``pid`` (first appearance fixes its order and its raw id)."""
        if pid not in self.slots:
            self.order.append(pid)
            self.raw_ids[pid] = raw_id
            self.slots[pid] = {}

    def complete_pairs(self) -> list[Pair]:
        """Pairs whose two entries are both present and valid, in file order."""
        out = []
        for pid in self.order:
            clean, corrupted = self.slots[pid].get("clean"), self.slots[pid].get("corrupted")
            if clean is not None and corrupted is not None:
                out.append(Pair(pid, clean, corrupted, raw_id=self.raw_ids[pid]))
        return out


#: Reports an issue of one entry: ``(kind, problem, fix)``; the entry's location is bound in.
_Report = Callable[[str, str, str], None]


def _entry_label(index: int, pid: Any = None, variant: Any = None) -> str:
    parts = [f"pair_id {pid!r}"] if pid is not None else []
    if variant is not None:
        parts.append(str(variant))
    return f"entry [{index}]" + (f" ({', '.join(parts)})" if parts else "")


def _check_pair_id(scan: PairScan, entry: dict, where: str) -> str | None:
    """The normalised pair id of ``entry``, or None (and an issue) if it is missing/invalid."""
    if "pair_id" not in entry:
        scan.add("missing_field", where, "missing field 'pair_id'", 'add "pair_id": <int or string> to the entry')
        return None
    raw = entry["pair_id"]
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or (isinstance(raw, str) and not raw.strip()):
        scan.add("bad_pair_id", where, f"field 'pair_id' is {raw!r}", "use a non-empty string or an integer as pair_id")
        return None
    return str(raw)


def _read_question(data: dict, report: _Report) -> str | None:
    """The non-empty question string of ``data``, or None (and an issue)."""
    question = data.get("question")
    if "question" not in data:
        report("missing_field", "missing field 'question'", 'add "question": "<text>"')
    elif not isinstance(question, str):
        report("bad_question", f"field 'question' is {question!r}, not a string", "make the question a string")
    elif not question.strip():
        report("empty_question", "field 'question' is empty", "fill in the question text or remove the pair")
    else:
        return question
    return None


def _read_answer(data: dict, report: _Report) -> int | float | None:
    """The numeric answer of ``data`` (:func:`parse_answer`), or None (and an issue)."""
    if "answer" not in data:
        report("missing_field", "missing field 'answer'", 'add "answer": <number>')
    elif data["answer"] is None:
        report("null_answer", "field 'answer' is null", "give a number (e.g. 18) or remove the pair")
    else:
        try:
            return parse_answer(data["answer"])
        except ValueError:
            fix = 'use a number or a numeric string such as "1,234" (or remove the pair)'
            report("non_numeric_answer", f"field 'answer' is {data['answer']!r}, not a number", fix)
    return None


def _read_variant(scan: PairScan, pid: str, name: str, data: dict, extra: dict, where: str) -> None:
    """Check one variant's question/answer and store it (or None, if invalid) in ``scan.slots``."""

    def report(kind: str, problem: str, fix: str) -> None:
        scan.add(kind, where, problem, fix, pid, name)

    scan.n_entries += 1
    if name in scan.slots[pid]:
        fix = "give each pair_id exactly one clean and one corrupted entry (rename or delete the duplicate)"
        report("duplicate_id", f"pair_id {scan.raw_ids[pid]!r} already has a '{name}' entry", fix)
        return
    scan.slots[pid][name] = None
    question = _read_question(data, report)
    if question is not None:
        scan.questions[(pid, name)] = question
    answer = _read_answer(data, report)  # checked even when the question is bad: report both
    if question is not None and answer is not None:
        scan.slots[pid][name] = Variant(question, answer, extra)


def _scan_flat(scan: PairScan, i: int, pid: str, entry: dict) -> None:
    """A flat entry ``{pair_id, variant, question, answer, ...extra}``."""
    where = _entry_label(i, entry["pair_id"], entry.get("variant"))
    if "variant" not in entry:
        fix = 'add "variant": "clean" or "corrupted" (or use the nested {pair_id, clean, corrupted} format)'
        scan.add("missing_field", where, "missing field 'variant'", fix, pid)
        return
    name = entry["variant"]
    if name not in VARIANTS:
        scan.add("unknown_variant", where, f"unknown variant {name!r}", 'use "variant": "clean" or "corrupted"', pid)
        return
    scan.register(pid, entry["pair_id"])
    extra = {k: v for k, v in entry.items() if k not in RESERVED_KEYS}
    _read_variant(scan, pid, name, entry, extra, where)


def _scan_nested(scan: PairScan, i: int, pid: str, entry: dict) -> None:
    """A nested entry ``{pair_id, clean: {...}, corrupted: {...}, ...}``.

    Pair-level extra fields are copied into both variants' ``extra`` (variant-level values win).
    """
    raw_id = entry["pair_id"]
    if pid in scan.slots:
        fix = "give each pair a unique pair_id (rename or delete the duplicate)"
        scan.add("duplicate_id", _entry_label(i, raw_id), f"pair_id {raw_id!r} appears more than once", fix, pid)
        return
    scan.register(pid, raw_id)
    # a pair-level "question"/"answer"/"variant" cannot be shared by both sides: one issue, not a crash
    clash = [k for k in RESERVED_KEYS if k != "pair_id" and k in entry]
    if clash:
        fix = f'move {", ".join(repr(k) for k in clash)} into the "clean" and "corrupted" objects'
        problem = f"pair-level field(s) {', '.join(repr(k) for k in clash)} in the nested format"
        scan.add("reserved_key", _entry_label(i, raw_id), problem, fix, pid)
    shared = {k: v for k, v in entry.items() if k not in VARIANTS and k not in RESERVED_KEYS}
    for name in (n for n in VARIANTS if n in entry):  # a missing one is reported as missing_variant
        where, data = _entry_label(i, raw_id, name), entry[name]
        issue = _nested_variant_issue(name, data)
        if issue is None:
            extra = {**shared, **{k: v for k, v in data.items() if k not in RESERVED_KEYS}}
            _read_variant(scan, pid, name, data, extra, where)
        else:  # an entry that exists but is invalid
            kind, problem, fix = issue
            scan.n_entries += 1
            scan.slots[pid][name] = None
            scan.add(kind, where, problem, fix, pid, name)


def _nested_variant_issue(name: str, data: Any) -> tuple[str, str, str] | None:
    """``(kind, problem, fix)`` if a nested ``clean``/``corrupted`` value is not a usable object."""
    if not isinstance(data, dict):
        fix = f'make "{name}" an object {{"question": ..., "answer": ...}}'
        return "bad_entry", f"field '{name}' is {type(data).__name__}, not an object", fix
    reserved = [k for k in ("pair_id", "variant") if k in data]
    if reserved:
        fix = f"remove '{reserved[0]}' from the '{name}' object"
        return "reserved_key", f"field '{reserved[0]}' inside '{name}' is not allowed", fix
    return None


def _top_level_issue(raw: Any) -> tuple[str, str, str] | None:
    """``(kind, problem, fix)`` if ``raw`` (after unwrapping) is not a non-empty list."""
    if not isinstance(raw, list):
        got = f"an object with keys {sorted(raw)[:5]}" if isinstance(raw, dict) else f"a {type(raw).__name__}"
        fix = 'write a list [{"pair_id", "variant", "question", "answer"}, ...] or {"pairs": [...]}'
        return "not_a_list", f"expected a JSON list of pair entries, got {got}", fix
    if not raw:
        return "empty", "the list has no entries", "add at least one clean/corrupted pair"
    return None


def scan_pairs(raw: Any) -> PairScan:
    """Walk parsed JSON (flat or nested, optionally wrapped in ``{"pairs": [...]}``), collecting every problem.

    >>> scan = scan_pairs([{"pair_id": 1, "variant": "clean", "question": "q", "answer": None}])
    >>> [issue.kind for issue in scan.issues]
    ['null_answer', 'missing_variant']
    """
    scan = PairScan()
    if isinstance(raw, dict) and "pairs" in raw:
        raw = raw["pairs"]
    top = _top_level_issue(raw)
    if top is not None:
        kind, problem, fix = top
        scan.add(kind, "top level", problem, fix)
        return scan
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            problem = f"expected an object, got {type(entry).__name__} {entry!r:.40}"
            fix = 'make each entry an object {"pair_id", "variant", "question", "answer"}'
            scan.add("bad_entry", f"entry [{i}]", problem, fix)
            continue
        nested = "variant" not in entry and ("clean" in entry or "corrupted" in entry)
        pid = _check_pair_id(scan, entry, _entry_label(i))
        if pid is not None and nested:
            _scan_nested(scan, i, pid, entry)
        elif pid is not None:
            _scan_flat(scan, i, pid, entry)
    for pid in scan.order:
        for name in (n for n in VARIANTS if n not in scan.slots[pid]):
            fix = f"add the '{name}' entry or remove the pair (a pair needs both clean and corrupted)"
            scan.add("missing_variant", f"pair_id {scan.raw_ids[pid]!r}", f"has no '{name}' variant", fix, pid, name)
    return scan


def read_pair_json(path: PathLike) -> Any:
    """Parsed JSON of ``path``; LatentPatchError if it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise LatentPatchError(f"pair file {path} {what}; fix: pass the path of a JSON pair file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except (OSError, UnicodeDecodeError) as err:
        raise LatentPatchError(
            f"pair file {path} cannot be read ({err}); fix: pass a readable UTF-8 JSON file"
        ) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LatentPatchError(
            f"pair file {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; "
            "fix: correct the JSON syntax there"
        ) from None


def load_pairs(path: PathLike) -> list[Pair]:
    """Load a pair file (flat or nested format, docs/method.md §9.1), strictly (§9.3).

    Returns the pairs in file order (by first appearance of each pair_id). Any problem, such as a
    missing field, an unknown variant, a null or non-numeric answer, a duplicate (pair_id,
    variant), a pair with one variant or an empty question, raises
    :class:`~latentpatch.errors.LatentPatchError` with a one-line message naming the file, the
    entry and the fix. Use :func:`latentpatch.data.validate.validate_pairs` to list every problem at once.
    """
    scan = scan_pairs(read_pair_json(path))
    if scan.issues:
        more = len(scan.issues) - 1
        tail = f" ({more} more problem(s); list them with `latentpatch pairs validate {path}`)" if more else ""
        raise LatentPatchError(f"pair file {path}: {scan.issues[0].line()}{tail}")
    return scan.complete_pairs()
