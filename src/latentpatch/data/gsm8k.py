"""GSM8K-style worked solutions: calculator annotations ``<<expr=result>>`` and the ``#### N`` answer line.

Two layouts carry them (docs/method.md §9.6):

- **GSM8K** (``openai/gsm8k``): ``answer`` is the worked solution, e.g. ::

      Natalia sold 48/2 = <<48/2=24>>24 clips in May.
      Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.
      #### 72

- **GSM8k-Aug** (``zen-E/GSM8k-Aug``, the data CODI was trained on): ``cot`` holds only the
  annotations (``"<<600*30/100=180>> <<600*10/100=60>> <<180+60=240>> <<600-240=360>>"``) and
  ``answer`` is a plain number string.

The *intermediates* of a solution are the results of its annotations in order: the text after the
last ``=`` of each annotation, read as a number (a leading ``$`` and every comma dropped; integral
values become ``int``, others ``float``, as :func:`~latentpatch.data.answers.parse_answer` does).
The expressions are not evaluated. Anything that cannot be read raises :class:`UnparsedSolution`,
whose message says what is wrong; the question reader adds the file, the record and the fix.
"""

from __future__ import annotations

import re
from typing import Any

from latentpatch.data.answers import parse_answer

_ANNOTATION = re.compile(r"<<(.*?)>>", re.DOTALL)
_DOLLAR = re.compile(r"^([+-]?)\$")


class UnparsedSolution(ValueError):
    """A worked solution or ``cot`` that cannot be read: ``problem`` says what is wrong, ``fix`` how to
    repair the record (both one line; the message is the problem)."""

    def __init__(self, problem: str, fix: str = "fix the annotation"):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def to_number(value: Any, drop_commas: bool = False) -> int | float:
    """A number from a JSON number or a numeric string; ``"$18"`` is 18. ``ValueError`` otherwise.

    Commas must be thousands separators (:func:`~latentpatch.data.answers.parse_answer`) unless
    ``drop_commas``, which removes every comma first (annotation results are read that way).

    >>> to_number("$1,234"), to_number("0.5"), to_number("1000,0", drop_commas=True)
    (1234, 0.5, 10000)
    """
    if isinstance(value, str):
        text = _DOLLAR.sub(r"\1", value.strip())
        if drop_commas:
            text = text.replace(",", "")
        return parse_answer(text)
    return parse_answer(value)


def find_annotations(text: str) -> list[tuple[str, str]]:
    """The ``(expression, result)`` strings of every ``<<expression=result>>`` in ``text``, in order.

    The result is what follows the last ``=``. Raises :class:`UnparsedSolution` for an annotation
    without ``=`` or one opened with ``<<`` and never closed.

    >>> find_annotations("He pays 3*4 = <<3*4=12>>12 and has <<20-12=8>>8 left.")
    [('3*4', '12'), ('20-12', '8')]
    """
    found = _ANNOTATION.findall(text)
    if text.count("<<") != len(found):
        raise UnparsedSolution("an annotation opened with '<<' is not closed with '>>'", "close the annotation")
    out = []
    for inner in found:
        if "=" not in inner:
            raise UnparsedSolution(f"annotation '<<{inner}>>' has no '='", "write it as <<expression=result>>")
        expression, _, result = inner.rpartition("=")
        out.append((expression.strip(), result.strip()))
    return out


def annotation_results(text: str) -> list[int | float]:
    """The results of the annotations of ``text`` as numbers (see :func:`find_annotations`).

    Raises :class:`UnparsedSolution` when there is none or a result is not a number.

    >>> annotation_results("<<600*30/100=180>> <<180/360=0.5>> <<2*500=1,000>>")
    [180, 0.5, 1000]
    """
    pairs = find_annotations(text)
    if not pairs:
        raise UnparsedSolution("no '<<expression=result>>' annotation", "add the annotations of its calculations")
    results = []
    for expression, result in pairs:
        try:
            results.append(to_number(result, drop_commas=True))
        except ValueError:
            problem = f"annotation '<<{expression}={result}>>' has a result that is not a number"
            raise UnparsedSolution(problem, "make the result after '=' a number") from None
    return results


def parse_worked_solution(solution: str) -> tuple[list[int | float], int | float]:
    """``(intermediates, answer)`` of a GSM8K worked solution: the annotation results and the number after ``####``.

    Raises :class:`UnparsedSolution` (no annotation, an annotation without ``=`` or with a
    non-numeric result, a missing or non-numeric ``####`` answer).

    >>> parse_worked_solution("Half: 48/2 = <<48/2=24>>24.\\nIn all: 48+24 = <<48+24=72>>72.\\n#### 72")
    ([24, 72], 72)
    """
    head, marker, _ = solution.rpartition("####")
    if not marker:
        raise UnparsedSolution("the solution has no final '#### <answer>' line", "end it with '#### <answer>'")
    raw = solution[len(head) + len(marker) :].strip()
    try:
        answer = to_number(raw)
    except ValueError:
        raise UnparsedSolution(f"the '####' answer {raw!r} is not a number", "put a number after '####'") from None
    return annotation_results(head), answer


def parse_cot(cot: str) -> list[int | float]:
    """The intermediates of a GSM8k-Aug ``cot`` string (its annotation results, in order).

    Raises :class:`UnparsedSolution` as :func:`annotation_results` does.

    >>> parse_cot("<<600*30/100=180>> <<600*10/100=60>> <<180+60=240>> <<600-240=360>>")
    [180, 60, 240, 360]
    """
    return annotation_results(cot)


def record_solution(record: dict, layout: str) -> tuple[int | float, list[int | float]]:
    """``(answer, intermediates)`` of a GSM8K record (``layout`` ``"gsm8k"``: a worked solution in
    ``answer``) or a GSM8k-Aug record (``"gsm8k-aug"``: ``cot`` and a numeric ``answer``).

    Raises :class:`UnparsedSolution` when they cannot be read.

    >>> record_solution({"question": "q", "cot": "<<2*3=6>> <<6+1=7>>", "answer": "7"}, "gsm8k-aug")
    (7, [6, 7])
    """
    answer = record.get("answer")
    if layout == "gsm8k":
        if not isinstance(answer, str):
            problem = f"field 'answer' is {answer!r:.40}, not a worked solution ending in '#### <answer>'"
            raise UnparsedSolution(problem, "give the worked solution as a string")
        intermediates, number = parse_worked_solution(answer)
        return number, intermediates
    cot = record.get("cot")
    if not isinstance(cot, str):
        raise UnparsedSolution(f"field 'cot' is {cot!r:.40}", "give the cot as a string of <<expression=result>>")
    intermediates = parse_cot(cot)
    try:
        return to_number(answer), intermediates
    except ValueError:
        raise UnparsedSolution(f"field 'answer' is {answer!r:.40}, not a number", 'give "answer": "<number>"') from None


def record_annotations(record: dict, layout: str) -> list[tuple[str, str]]:
    """The ``(expression, result)`` annotations of a record :func:`record_solution` reads (the worked
    solution before ``####``, or the ``cot``), for recomputing its chain (:mod:`latentpatch.data.chain`).

    >>> record_annotations({"answer": "2*3 = <<2*3=6>>6 and <<6+1=7>>7\\n#### 7"}, "gsm8k")
    [('2*3', '6'), ('6+1', '7')]
    """
    text = record.get("answer") if layout == "gsm8k" else record.get("cot")
    if not isinstance(text, str):
        raise UnparsedSolution(f"no solution text in {layout} record", "give the worked solution as a string")
    return find_annotations(text.rpartition("####")[0] if layout == "gsm8k" else text)
