"""A worked solution's ``<<expression=result>>`` chain as a small program, recomputed with one step
forced (the GSM8K high-level model of the ``das`` experiment, docs/method.md §20.1). No torch.

:func:`parse_chain` reads the annotations of one solution (``find_annotations`` of
:mod:`latentpatch.data.gsm8k`) into a :class:`Chain`, or says why it cannot (:data:`ISSUES`):

- **expression**: after dropping ``$`` and commas and reading ``x``/``×`` as ``*`` and ``÷`` as ``/``,
  an arithmetic expression of number literals, ``+ - * /``, unary minus and parentheses
  (``unparsed`` otherwise). Every literal and result is an exact :class:`~fractions.Fraction`.
- **consistent**: the expression evaluates exactly to the stated result (``inconsistent`` otherwise:
  a rounded ``<<10/3=3.33>>`` cannot be recomputed faithfully).
- **references**: a literal of step i *references* step j < i when it equals step j's stated result.
  It is *ambiguous* (the whole problem is skipped and counted as ``ambiguous``) when it equals the
  results of two or more earlier steps, or when it also occurs as a number in the question text
  (it may be the given quantity rather than the result). A literal equal to no earlier result is a
  constant. (A constant that happens to equal an earlier result and is not written in the question,
  e.g. "twice" after a step giving 2, is read as a reference: the rule cannot see it.)
- **answer step**: the last step whose stated result equals the final answer (``no_answer_step``
  when none does).

:meth:`Chain.forced` recomputes: step s takes the forced value, each later step that references a
changed step is re-evaluated with the new values (exactly; a division by zero gives None), every
other step keeps its stated result; the counterfactual answer is the answer step's new value.

>>> chain = parse_chain([("16-3-4", "9"), ("9*2", "18")], 18, "Janet's ducks lay 16 eggs ... $2 per egg.")
>>> chain.refs, chain.forced(0, 10)
(((), ((0, 0),)), 20)
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

#: Why a chain cannot be used, in the order :func:`parse_chain` checks.
ISSUES = ("unparsed", "inconsistent", "ambiguous", "no_answer_step")
_QUESTION_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_OPS = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y}


def exact(value: int | float | str | Fraction) -> Fraction:
    """``value`` as an exact fraction (a float by its shortest decimal form: 0.1 is 1/10).

    >>> exact(0.1), exact("1,000")
    (Fraction(1, 10), Fraction(1000, 1))
    """
    if isinstance(value, float):
        return Fraction(repr(value))
    if isinstance(value, str):
        return Fraction(value.replace(",", "").replace("$", "").strip())
    return Fraction(value)


def number(value: Fraction) -> int | float:
    """An integral fraction as ``int``, another as ``float`` (as answers are read)."""
    return int(value) if value.denominator == 1 else float(value)


def _tree(expression: str) -> ast.expr:
    text = expression.replace("$", "").replace(",", "").replace("×", "*").replace("÷", "/")
    text = re.sub(r"(?<=[\d)])\s*[xX]\s*(?=[\d(.])", "*", text)
    return ast.parse(text.strip(), mode="eval").body


def _literals(node: ast.expr) -> list[Fraction]:
    """The number literals of ``node`` in evaluation order (ValueError for anything else)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return [exact(node.value)]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _literals(node.operand)
    if isinstance(node, ast.BinOp) and (type(node.op) in _OPS or isinstance(node.op, ast.Div)):
        return _literals(node.left) + _literals(node.right)
    raise ValueError("not + - * / of numbers")


def _evaluate(node: ast.expr, values: list[Fraction]) -> Fraction:
    """``node`` with its literals replaced, in order, by ``values`` (consumed from the front)."""
    if isinstance(node, ast.Constant):
        return values.pop(0)
    if isinstance(node, ast.UnaryOp):
        inner = _evaluate(node.operand, values)
        return -inner if isinstance(node.op, ast.USub) else inner
    assert isinstance(node, ast.BinOp)
    x, y = _evaluate(node.left, values), _evaluate(node.right, values)
    if isinstance(node.op, ast.Div):
        return x / y  # ZeroDivisionError: the caller's invalid recomputation
    return _OPS[type(node.op)](x, y)


@dataclass(frozen=True)
class Chain:
    """A parsed chain: per step its expression, literals and stated result; ``refs[i]``: the
    (literal index, earlier step) references of step i; ``answer_step``: the step that is the answer."""

    expressions: tuple[str, ...]
    literals: tuple[tuple[Fraction, ...], ...]
    results: tuple[Fraction, ...]
    refs: tuple[tuple[tuple[int, int], ...], ...]
    answer_step: int

    def forced(self, step: int, value: int | float | Fraction) -> int | float | None:
        """The answer with step ``step`` forced to ``value`` (module docstring); None when a recomputed
        division divides by zero or ``step`` is not a step of the chain."""
        values = self.recompute(step, value)
        return None if values is None else number(values[self.answer_step])

    def recompute(self, step: int, value: int | float | Fraction) -> list[Fraction] | None:
        """Every step's value with ``step`` forced to ``value`` (None: as :meth:`forced`).

        >>> c = parse_chain([("2+3", "5"), ("5*4", "20"), ("20-7", "13")], 13)
        >>> [number(v) for v in c.recompute(0, 6)]
        [6, 24, 17]
        """
        if not 0 <= step < len(self.results):
            return None
        new = list(self.results)
        new[step] = exact(value)
        changed = {step} if new[step] != self.results[step] else set()
        for i in range(step + 1, len(new)):
            if not any(j in changed for _, j in self.refs[i]):
                continue
            operands = list(self.literals[i])
            for at, j in self.refs[i]:
                operands[at] = new[j]
            try:
                new[i] = _evaluate(_tree(self.expressions[i]), operands)
            except ZeroDivisionError:
                return None
            if new[i] != self.results[i]:
                changed.add(i)
        return new


def question_numbers(question: str) -> set[Fraction]:
    """The numbers written with digits in a question's text.

    >>> sorted(question_numbers("She has 1,200 eggs and sells 3.5 dozen on day 2."))
    [Fraction(2, 1), Fraction(7, 2), Fraction(1200, 1)]
    """
    return {exact(m.rstrip(",")) for m in _QUESTION_NUMBER.findall(question)}


def parse_chain(annotations: Sequence[tuple[str, str]], answer: int | float, question: str = "") -> Chain | str:
    """The :class:`Chain` of ``(expression, result)`` annotations, or the name of its issue
    (:data:`ISSUES`; the module docstring states each rule). ``question``: the question text, whose
    numbers make an equal reference ambiguous.

    >>> parse_chain([("3*4", "12"), ("12+12", "24")], 24).refs  # both 12s reference step 0
    ((), ((0, 0), (1, 0)))
    >>> two_sixes = parse_chain([("2*3", "6"), ("3+3", "6"), ("6+1", "7")], 7)
    >>> two_sixes, parse_chain([("2*3", "6"), ("6+1", "7")], 7, "6 boxes")
    ('ambiguous', 'ambiguous')
    >>> parse_chain([("10/3", "3.33")], 3.33), parse_chain([("2^3", "8")], 8), parse_chain([("2*3", "6")], 7)
    ('inconsistent', 'unparsed', 'no_answer_step')
    """
    expressions, literals, results = [], [], []
    try:
        for expression, result in annotations:
            tree = _tree(expression)
            found = _literals(tree)
            stated = exact(result)
            expressions.append(expression)
            literals.append(tuple(found))
            results.append(stated)
            if _evaluate(tree, list(found)) != stated:
                return "inconsistent"
    except (SyntaxError, ValueError, ZeroDivisionError, ArithmeticError):
        return "unparsed"
    given = question_numbers(question)
    refs = []
    for i, operands in enumerate(literals):
        step_refs = []
        for at, v in enumerate(operands):
            earlier = [j for j in range(i) if results[j] == v]
            if len(earlier) > 1 or (earlier and v in given):
                return "ambiguous"
            step_refs += [(at, j) for j in earlier]
        refs.append(tuple(step_refs))
    final = exact(answer)
    matching = [i for i, r in enumerate(results) if r == final]
    if not matching:
        return "no_answer_step"
    return Chain(tuple(expressions), tuple(literals), tuple(results), tuple(refs), matching[-1])
