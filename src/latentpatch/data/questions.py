"""Labelled question sets for probes and lenses: :class:`LabelledQuestion`, :class:`QuestionSet`,
:func:`load_questions` and :func:`save_questions` (docs/method.md §9.6).

A probe needs many questions, each with labels to predict: the answer, the result of every
reasoning step (*intermediates*) and any column the user gives (``"operation": "mul"``). Each
question belongs to a *group*, the problem it comes from, which a train/test split keeps on one
side (the two questions of a pair share their pair id as group).

:func:`load_questions` reads four layouts, told apart by the content, not the file name:

1. a **pair file** (any layout :func:`~latentpatch.data.pairs.load_pairs` reads): the top level is
   ``{"pairs": [...]}`` or the first record has ``pair_id``. Both variants become questions
   (:func:`questions_from_pairs`).
2. **GSM8K worked solutions**: the first record's ``answer`` is a string containing ``####``.
3. **GSM8k-Aug**: the first record's ``cot`` is a string containing ``<<`` and it has no
   ``intermediates`` field.
4. otherwise a **question file**: records ``{"id", "question", "answer", "group"?, "intermediates"?,
   ...labels}``; this is what :func:`save_questions` writes.

The records are a JSON list, ``{"questions": [...]}``, one JSON object, or JSONL (one object per
line). The first record that is an object decides the layout. Bad input raises
:class:`~latentpatch.errors.LatentPatchError`: one line naming the file, the record, the problem
and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentpatch.data.answers import parse_answer
from latentpatch.data.gsm8k import UnparsedSolution, record_annotations, record_solution, to_number
from latentpatch.data.pairs import VARIANTS, Pair, PathLike, scan_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.files import atomic_write_text

SOURCES = ("pairs", "questions", "gsm8k")
LAYOUTS = ("pairs", "gsm8k", "gsm8k-aug", "questions")
#: Fields of a question record with a fixed meaning: never label columns. ``cot`` is text (its
#: results are the intermediates), not a label.
RECORD_KEYS = ("id", "question_id", "group", "question", "answer", "intermediates", "cot")
#: Label names the set derives itself (``answer``, ``intermediate_<k>``) or a run adds (``correct``).
_DERIVED = re.compile(r"answer|correct|intermediate_\d+")

LabelValue = int | float | str | bool


def label_name_issue(name: str) -> str | None:
    """Why ``name`` cannot be a user label column, or None if it can.

    >>> label_name_issue("operation") is None, label_name_issue("intermediate_2")
    (True, "'intermediate_2' is a label the question set derives itself")
    """
    if name in RECORD_KEYS:
        return f"{name!r} is a field of the question format"
    if _DERIVED.fullmatch(name):
        return f"{name!r} is a label the question set derives itself"
    return None


def read_intermediates(value: Any) -> tuple[int | float, ...] | None:
    """``value`` (a list of numbers, or None) as a tuple; ``ValueError`` saying what is wrong otherwise.

    >>> read_intermediates([24, 72.0, 0.5])
    (24, 72, 0.5)
    """
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"is {value!r:.60}, not a non-empty list of numbers")
    out = []
    for k, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"item [{k}] is {item!r:.40}, not a number")
        try:
            out.append(parse_answer(item))
        except ValueError:
            raise ValueError(f"item [{k}] is {item!r}, not a finite number") from None
    return tuple(out)


@dataclass(frozen=True)
class LabelledQuestion:
    """One question with its labels. ``group``: the problem it belongs to (a split keeps a group on
    one side); ``intermediates``: every reasoning step's result in order, or None when unknown;
    ``labels``: the user's scalar columns; ``source``: ``"pairs"``, ``"questions"`` or ``"gsm8k"``;
    ``annotations``: a GSM8K record's ``(expression, result)`` annotations (None otherwise; not saved)."""

    question_id: str
    group: str
    question: str
    answer: int | float
    intermediates: tuple[float, ...] | None = None
    labels: dict[str, LabelValue] = field(default_factory=dict, hash=False)
    source: str = "questions"
    annotations: tuple[tuple[str, str], ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.answer, bool) or not isinstance(self.answer, (int, float)):
            raise TypeError(f"LabelledQuestion.answer must be an int or float, got {self.answer!r}")
        if self.source not in SOURCES:
            raise ValueError(f"LabelledQuestion.source must be one of {SOURCES}, got {self.source!r}")
        object.__setattr__(self, "intermediates", read_intermediates(self.intermediates))
        for name, value in self.labels.items():
            issue = label_name_issue(name)
            if issue is not None:
                raise ValueError(f"label {issue}")
            if not isinstance(value, (int, float, str, bool)):
                raise TypeError(f"label {name!r} must be a number, string or bool, got {value!r:.40}")


@dataclass
class QuestionSet:
    """Questions in file order, where they came from, and the records left out by ``skip_unparsed``.

    ``layout``: ``"pairs"``, ``"gsm8k"``, ``"gsm8k-aug"`` or ``"questions"`` (the detected format);
    ``skipped``: one ``"record [i] ...: problem"`` line per record left out.
    """

    questions: list[LabelledQuestion]
    source: str
    path: Path | None = None
    skipped: list[str] = field(default_factory=list)
    layout: str = ""

    def __len__(self) -> int:
        return len(self.questions)

    def __iter__(self) -> Iterator[LabelledQuestion]:
        return iter(self.questions)

    def groups(self) -> list[str]:
        """The distinct groups, in order of first appearance."""
        return list(dict.fromkeys(q.group for q in self.questions))

    def label_names(self) -> list[str]:
        """``answer``, ``intermediate_0`` .. ``intermediate_{S-1}`` (S: the most steps any question
        has), then the user's label columns in order of first appearance. (``correct`` is added by a run.)

        >>> qs = QuestionSet([LabelledQuestion("a", "a", "1+2*3?", 7, (6, 7), {"operation": "mul"})], "questions")
        >>> qs.label_names(), qs.label_values("intermediate_0")
        (['answer', 'intermediate_0', 'intermediate_1', 'operation'], [6])
        """
        n_steps = max((len(q.intermediates) for q in self.questions if q.intermediates), default=0)
        names = ["answer", *(f"intermediate_{k}" for k in range(n_steps))]
        names.extend(dict.fromkeys(name for q in self.questions for name in q.labels))
        return names

    def label_values(self, name: str) -> list[LabelValue | None]:
        """The value of label ``name`` for every question (None where a question lacks it)."""
        names = self.label_names()
        if name not in names:
            where = f"question file {self.path}" if self.path else "question set"
            raise LatentPatchError(f"{where}: no label {name!r}; fix: use one of {', '.join(names)}")
        if name == "answer":
            return [q.answer for q in self.questions]
        step = re.fullmatch(r"intermediate_(\d+)", name)  # never a user label (label_name_issue)
        if step:
            k = int(step.group(1))
            return [q.intermediates[k] if q.intermediates and k < len(q.intermediates) else None for q in self]
        return [q.labels.get(name) for q in self.questions]

    def describe(self) -> str:
        """One line for the user: how many questions and groups, from where, how many skipped."""
        text = f"{len(self)} questions in {len(self.groups())} groups ({self.layout or self.source})"
        text += f" from {self.path}" if self.path else ""
        return text + (f"; {len(self.skipped)} unparseable record(s) skipped" if self.skipped else "")


# ---- Pairs -> questions ------------------------------------------------------------------------


def questions_from_pairs(pairs: Sequence[Pair], *, path: PathLike | None = None) -> QuestionSet:
    """Both variants of every pair as questions: id ``"<pair_id>/<variant>"``, group the pair id,
    intermediates from ``extra["intermediates"]``, the variant's other scalar extra fields as labels
    (lists, objects, null and the fields in :data:`RECORD_KEYS` are left out). ``path`` is only
    for messages and ``QuestionSet.path``.

    >>> from latentpatch.data.synthetic import generate_pairs
    >>> qs = questions_from_pairs(generate_pairs(2, seed=0, intermediates=True))
    >>> len(qs), len(qs.groups()), qs.questions[0].question_id, qs.label_names()[-1]
    (4, 2, 'syn-0-0000/clean', 'template')
    """
    prefix = f"pair file {path}" if path is not None else "pairs"
    questions = []
    for pair in pairs:
        for name in VARIANTS:
            variant, where = pair.variant(name), f"pair_id {pair.raw_id!r} ({name})"
            try:
                intermediates = read_intermediates(variant.extra.get("intermediates"))
            except ValueError as err:
                fix = "give a list of numbers, one per reasoning step (or remove the field)"
                raise LatentPatchError(f"{prefix}: {where}: field 'intermediates' {err}; fix: {fix}") from None
            labels = {}
            for key, value in variant.extra.items():
                if key in RECORD_KEYS or not isinstance(value, (int, float, str, bool)):
                    continue
                issue = label_name_issue(key)
                if issue is not None:
                    fix = "rename the field"
                    raise LatentPatchError(f"{prefix}: {where}: field {issue}; fix: {fix}")
                labels[key] = value
            qid = f"{pair.pair_id}/{name}"
            questions.append(
                LabelledQuestion(qid, pair.pair_id, variant.question, variant.answer, intermediates, labels, "pairs")
            )
    return QuestionSet(questions, "pairs", Path(path) if path is not None else None, layout="pairs")


# ---- Reading -----------------------------------------------------------------------------------


def detect_layout(records: Sequence[Any]) -> str:
    """The layout of a list of records (the module docstring's rule; the first object decides).

    >>> detect_layout([{"question": "q", "answer": "<<2*3=6>>6\\n#### 6"}]), detect_layout([{"pair_id": 1}])
    ('gsm8k', 'pairs')
    """
    first = next((r for r in records if isinstance(r, dict)), {})
    if "pair_id" in first:
        return "pairs"
    if isinstance(first.get("answer"), str) and "####" in first["answer"]:
        return "gsm8k"
    if isinstance(first.get("cot"), str) and "<<" in first["cot"] and "intermediates" not in first:
        return "gsm8k-aug"
    return "questions"


class _File:
    """The file being read: builds its one-line errors."""

    def __init__(self, path: Path, kind: str = "question file"):
        self.path, self.kind = path, kind

    def error(self, where: str, problem: str, fix: str) -> LatentPatchError:
        place = f"{self.kind} {self.path}: " + (f"{where}: " if where else "")
        return LatentPatchError(f"{place}{problem}; fix: {fix}")


def _read_document(file: _File) -> tuple[Any, list[int] | None]:
    """The parsed JSON document, or (for JSONL) the list of records and their line numbers."""
    path = file.path
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise LatentPatchError(f"question file {path} {what}; fix: pass the path of a question, pair or GSM8K file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise file.error("", f"cannot be read ({err})", "pass a readable UTF-8 JSON or JSONL file") from None
    if not text.strip():
        raise file.error("", "the file is empty", "write a JSON list or JSONL of questions (docs/method.md §9.6)")
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        first_error = err
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        json.loads(lines[0][1])
    except json.JSONDecodeError:
        problem = f"not valid JSON: {first_error.msg} at line {first_error.lineno} column {first_error.colno}"
        raise file.error("", problem, "correct the JSON syntax there (or write JSONL, one object per line)") from None
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            problem = f"not valid JSON: {err.msg} at column {err.colno}"
            raise file.error(f"line {n}", problem, "write one JSON object per line") from None
    return records, [n for n, _ in lines]


def _records(file: _File, doc: Any, lines: list[int] | None) -> list[Any]:
    """The list of records of a (non-pair) document."""
    if isinstance(doc, dict):
        if "questions" in doc:
            doc = doc["questions"]
        elif "question" in doc:
            doc = [doc]
    if not isinstance(doc, list):
        got = f"an object with keys {sorted(doc)[:5]}" if isinstance(doc, dict) else f"a {type(doc).__name__}"
        fix = 'write a list of {"id", "question", "answer"} objects, {"questions": [...]} or JSONL'
        raise file.error("", f"expected a list of question records, got {got}", fix)
    if not doc:
        raise file.error("", "the list has no records", "add at least one question")
    return doc


def load_questions(path: PathLike, skip_unparsed: bool = False) -> QuestionSet:
    """Load a question set from a pair file, a question file or GSM8K / GSM8k-Aug data (module docstring).

    ``skip_unparsed``: GSM8K records whose solution cannot be parsed are left out (one line each in
    ``QuestionSet.skipped``) instead of raising. Every other problem raises
    :class:`~latentpatch.errors.LatentPatchError` naming the file, the record and the fix.
    """
    file = _File(Path(path))
    doc, lines = _read_document(file)
    wrapped_pairs = lines is None and isinstance(doc, dict) and "pairs" in doc
    records = [] if wrapped_pairs else _records(file, doc, lines)
    layout = "pairs" if wrapped_pairs else detect_layout(records)
    if layout == "pairs":
        scan = scan_pairs(doc if wrapped_pairs else records)  # scan_pairs unwraps {"pairs": [...]}
        if scan.issues:
            more = len(scan.issues) - 1
            tail = f" ({more} more problem(s); list them with `latentpatch pairs validate {path}`)" if more else ""
            raise LatentPatchError(f"pair file {path}: {scan.issues[0].line()}{tail}")
        return questions_from_pairs(scan.complete_pairs(), path=path)
    return _from_records(file, records, lines, layout, skip_unparsed)


def _where(index: int, lines: list[int] | None, qid: str | None) -> str:
    parts = ([f"line {lines[index]}"] if lines else []) + ([f"id {qid!r}"] if qid is not None else [])
    return f"record [{index}]" + (f" ({', '.join(parts)})" if parts else "")


def _read_id(file: _File, record: dict, where: str) -> str | None:
    keys = [k for k in ("id", "question_id") if k in record]
    if len(keys) == 2:
        raise file.error(where, "has both 'id' and 'question_id'", "keep one of them")
    if not keys:
        return None
    raw = record[keys[0]]
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or (isinstance(raw, str) and not raw.strip()):
        raise file.error(where, f"field {keys[0]!r} is {raw!r:.40}", "use a non-empty string or an integer as id")
    return str(raw)


def _read_text_field(file: _File, record: dict, key: str, where: str, fix: str) -> str | None:
    """A non-empty string field (``question``, ``group``), or None when absent (or null)."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and key == "group":
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise file.error(where, f"field {key!r} is {value!r:.40}, not a non-empty string", fix)
    return value


def _read_labels(file: _File, record: dict, where: str) -> dict[str, LabelValue]:
    labels: dict[str, LabelValue] = {}
    for key, value in record.items():
        if key in RECORD_KEYS or value is None:
            continue
        issue = label_name_issue(key)
        if issue is not None:
            raise file.error(where, f"field {issue}", "rename the field")
        if not isinstance(value, (int, float, str, bool)):
            fix = "labels are numbers, strings or booleans: remove the field or flatten it"
            raise file.error(where, f"field {key!r} is a {type(value).__name__}, not a scalar label", fix)
        labels[key] = value
    return labels


def _read_answer(file: _File, record: dict, where: str) -> int | float:
    if record.get("answer") is None:
        problem = "field 'answer' is null" if "answer" in record else "missing field 'answer'"
        raise file.error(where, problem, 'give "answer": <number>')
    try:
        return to_number(record["answer"])
    except ValueError:
        fix = 'use a number or a numeric string such as "1,234" or "$18"'
        raise file.error(where, f"field 'answer' is {record['answer']!r:.60}, not a number", fix) from None


def _from_records(
    file: _File, records: list[Any], lines: list[int] | None, layout: str, skip_unparsed: bool
) -> QuestionSet:
    """Questions from question-file (layout ``questions``) or GSM8K records."""
    source = "questions" if layout == "questions" else "gsm8k"
    questions: list[LabelledQuestion] = []
    unparsed: list[tuple[str, UnparsedSolution]] = []
    seen: dict[str, str] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            problem = f"expected an object, got {type(record).__name__} {record!r:.40}"
            raise file.error(_where(i, lines, None), problem, 'make each record an object {"question", "answer", ...}')
        explicit = _read_id(file, record, _where(i, lines, None))
        where = _where(i, lines, explicit)
        if explicit is None and layout == "questions":
            raise file.error(where, "missing field 'id'", 'add "id": <string or integer> (or "question_id")')
        qid = explicit if explicit is not None else f"gsm8k-{i}"
        if qid in seen:
            raise file.error(where, f"id {qid!r} is also used by {seen[qid]}", "give each question a unique id")
        seen[qid] = where
        question = _read_text_field(file, record, "question", where, "give the question text as a string")
        if question is None:
            raise file.error(where, "missing field 'question'", 'add "question": "<text>"')
        group = _read_text_field(file, record, "group", where, "use a non-empty string or an integer as group") or qid
        labels = _read_labels(file, record, where)
        annotations: tuple[tuple[str, str], ...] = ()
        if layout == "questions":
            answer = _read_answer(file, record, where)
            try:
                intermediates = read_intermediates(record.get("intermediates"))
            except ValueError as err:
                fix = "give a list of numbers, one per reasoning step (or null)"
                raise file.error(where, f"field 'intermediates' {err}", fix) from None
        elif "intermediates" in record:
            fix = "remove it (GSM8K intermediates are read from the <<expression=result>> annotations)"
            raise file.error(where, "field 'intermediates' in a GSM8K record", fix)
        else:
            try:
                answer, steps = record_solution(record, layout)
                annotations = tuple(record_annotations(record, layout))
            except UnparsedSolution as err:
                unparsed.append((where, err))
                continue
            intermediates = tuple(steps)
        questions.append(
            LabelledQuestion(qid, group, question, answer, intermediates, labels, source, annotations or None)
        )
    if unparsed and not skip_unparsed:
        where, first = unparsed[0]
        more = f" ({len(unparsed) - 1} more unparseable record(s))" if len(unparsed) > 1 else ""
        raise file.error(where, first.problem, f"skip it with --skip-unparsed or {first.fix}{more}")
    if not questions:
        where, first = unparsed[0]
        problem = f"none of the {len(records)} records could be parsed (the first, {where}: {first.problem})"
        raise file.error("", problem, first.fix)
    skipped = [f"{place}: {u.problem}" for place, u in unparsed]
    return QuestionSet(questions, source, file.path, skipped, layout)


# ---- Writing -----------------------------------------------------------------------------------


def question_record(q: LabelledQuestion) -> dict[str, Any]:
    """The question-file record of ``q`` (what :func:`save_questions` writes on one line)."""
    intermediates = list(q.intermediates) if q.intermediates is not None else None
    base = {"id": q.question_id, "group": q.group, "question": q.question, "answer": q.answer}
    return {**base, "intermediates": intermediates, **q.labels}


def save_questions(questions: QuestionSet | Sequence[LabelledQuestion], path: PathLike) -> Path:
    """Write ``questions`` as a JSONL question file (one :func:`question_record` per line), atomically.

    :func:`load_questions` reads it back to equal questions (with ``source`` ``"questions"``).
    Returns the path written.
    """
    items = list(questions)
    ids = [q.question_id for q in items]
    if len(set(ids)) != len(ids):
        raise ValueError("save_questions: question ids are not unique")
    if not items:
        raise LatentPatchError(f"no questions to write to {path}; fix: keep at least one question")
    text = "".join(json.dumps(question_record(q), ensure_ascii=False) + "\n" for q in items)
    atomic_write_text(Path(path), text, fsync=True)
    return Path(path)
