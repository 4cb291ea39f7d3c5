"""Synthetic GSM8K-style multi-step arithmetic word problems and clean/corrupted pairs.

Every problem comes from a *template*: a story with named integer parameters (the numbers that
appear, as digits, in the question) and a *program* over them. A program is a list of steps
``(op, a, b)`` with ``op`` in ``add | sub | mul | div`` and operands that are either integers
(literal question numbers) or references ``"#i"`` to the result of step ``i``. The answer is the
result of the last step. All results are exact non-negative integers no larger than
:data:`MAX_VALUE` (divisions are exact), which keeps the task learnable for a small model.

The chain of thought is written in the GSM8k-Aug style: ``<<16-3=13>> <<13*2=26>>``.

Pairs (:func:`generate_pairs`) change exactly one number of the question by a small amount that
keeps its number of digits (so, with digit-level tokenization, the token length is unchanged),
recompute the answer with the program and keep the pair only if both answers are valid and differ.

Everything is deterministic given ``seed`` (a private :class:`random.Random`, no global state).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from latentpatch.data.pairs import Pair, Variant

MAX_VALUE = 40
"""Upper bound for every intermediate and final result (small enough that a 4-layer model trained
for 45 CPU minutes learns every arithmetic fact the templates need; see the default model card)."""

Operand = int | str
Step = tuple  # (op, Operand, Operand)

OPS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


@dataclass(frozen=True)
class Problem:
    """One word problem: question text, program, exact answer and CoT text."""

    question: str
    program: tuple  # tuple of (op, a, b)
    answer: int
    cot: str
    template: str
    params: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "answer": self.answer,
            "cot": self.cot,
            "program": [list(s) for s in self.program],
            "template": self.template,
            "params": dict(self.params),
        }


# --------------------------------------------------------------------------------------------
# program evaluation


def program_results(program, forced: dict[int, int] | None = None) -> list[int] | None:
    """Results of every step, or None if any step is invalid (negative, inexact, too large).

    ``forced`` {step: value} sets those steps' results instead of computing them (a counterfactual:
    later steps that reference them are recomputed from the forced value).

    >>> program_results([("add", 2, 3), ("mul", "#0", 4)])
    [5, 20]
    >>> program_results([("add", 2, 3), ("mul", "#0", 4)], forced={0: 6})
    [6, 24]
    """
    results: list[int] = []
    for i, (op, a, b) in enumerate(program):
        if forced and i in forced:
            results.append(int(forced[i]))
            continue
        x = results[int(a[1:])] if isinstance(a, str) else int(a)
        y = results[int(b[1:])] if isinstance(b, str) else int(b)
        if op == "add":
            r = x + y
        elif op == "sub":
            r = x - y
        elif op == "mul":
            r = x * y
        elif op == "div":
            if y == 0 or x % y:
                return None
            r = x // y
        else:
            raise ValueError(f"unknown op {op!r}")
        if r < 0 or r > MAX_VALUE:
            return None
        results.append(r)
    return results


def evaluate_program(program) -> int:
    """Evaluate a program ``[(op, a, b), ...]`` and return the last step's result.

    Operands are ints or ``"#i"`` references to earlier steps. Raises :class:`ValueError` if a
    division is inexact or a result is negative or larger than :data:`MAX_VALUE`.
    """
    res = program_results(program)
    if res is None:
        raise ValueError(f"invalid program (negative, inexact or too large): {program!r}")
    return res[-1]


def cot_text(program) -> str:
    """GSM8k-Aug style chain of thought: ``<<16-3=13>> <<13*2=26>>``."""
    res = program_results(program)
    if res is None:
        raise ValueError(f"invalid program: {program!r}")
    parts = []
    for i, (op, a, b) in enumerate(program):
        x = res[int(a[1:])] if isinstance(a, str) else int(a)
        y = res[int(b[1:])] if isinstance(b, str) else int(b)
        parts.append(f"<<{x}{OPS[op]}{y}={res[i]}>>")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# templates

NAMES = [
    "Tom",
    "Anna",
    "Ben",
    "Lucy",
    "Sam",
    "Maria",
    "Jack",
    "Emma",
    "Leo",
    "Mia",
    "Noah",
    "Olivia",
    "Ravi",
    "Sofia",
    "Omar",
    "Grace",
    "Ivan",
    "Chloe",
    "Kenji",
    "Nora",
]
PRONOUNS = {
    "Tom": "he",
    "Ben": "he",
    "Sam": "he",
    "Jack": "he",
    "Leo": "he",
    "Noah": "he",
    "Ravi": "he",
    "Omar": "he",
    "Ivan": "he",
    "Kenji": "he",
}
ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "cookies",
    "pencils",
    "cards",
    "books",
    "shells",
    "stamps",
    "candies",
    "oranges",
    "toys",
]
SHOP_ITEMS = [
    ("notebook", "notebooks"),
    ("pen", "pens"),
    ("ticket", "tickets"),
    ("sandwich", "sandwiches"),
    ("shirt", "shirts"),
    ("toy car", "toy cars"),
]


def _pron(name: str) -> str:
    return PRONOUNS.get(name, "she")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


@dataclass(frozen=True)
class Template:
    name: str
    ranges: dict  # param -> (lo, hi) inclusive
    render: Callable[[dict, dict], str]  # (params, words) -> question
    program: Callable[[dict], list]
    words: Callable[[random.Random], dict]


def _w_person(rng: random.Random) -> dict:
    n = rng.choice(NAMES)
    friend = rng.choice([x for x in NAMES if x != n])
    return {"name": n, "p": _pron(n), "friend": friend, "items": rng.choice(ITEMS)}


def _w_shop(rng: random.Random) -> dict:
    w = _w_person(rng)
    w["item"], w["items2"] = rng.choice(SHOP_ITEMS)
    return w


TEMPLATES: list[Template] = [
    Template(
        "give_buy_share",
        {"a": (10, 40), "b": (1, 10), "c": (1, 10), "d": (2, 5)},
        lambda q, w: (
            f"{w['name']} has {q['a']} {w['items']}. {_cap(w['p'])} gives {q['b']} of them "
            f"to {w['friend']} and then buys {q['c']} more. {_cap(w['p'])} puts them into "
            f"{q['d']} boxes with the same number in each box. How many {w['items']} are "
            f"in each box?"
        ),
        lambda q: [("sub", q["a"], q["b"]), ("add", "#0", q["c"]), ("div", "#1", q["d"])],
        _w_person,
    ),
    Template(
        "shop_coupon",
        {"a": (2, 8), "b": (2, 5), "c": (1, 10), "d": (1, 15)},
        lambda q, w: (
            f"A {w['item']} costs {q['a']} dollars. {w['name']} buys {q['b']} {w['items2']} "
            f"and uses a coupon worth {q['c']} dollars. Then {w['p']} pays {q['d']} dollars "
            f"for lunch. How many dollars does {w['name']} spend in total?"
        ),
        lambda q: [("mul", q["a"], q["b"]), ("sub", "#0", q["c"]), ("add", "#1", q["d"])],
        _w_shop,
    ),
    Template(
        "class_groups",
        {"a": (10, 30), "b": (1, 10), "c": (1, 10), "d": (2, 5), "e": (2, 5)},
        lambda q, w: (
            f"There are {q['a']} students in a class. {q['b']} students leave and {q['c']} "
            f"new students join. The teacher makes groups of {q['d']} students, and each "
            f"group gets {q['e']} {w['items']}. How many {w['items']} does the teacher "
            f"give out?"
        ),
        lambda q: [("sub", q["a"], q["b"]), ("add", "#0", q["c"]), ("div", "#1", q["d"]), ("mul", "#2", q["e"])],
        _w_person,
    ),
    Template(
        "reading",
        {"a": (3, 15), "b": (3, 15), "c": (2, 3)},
        lambda q, w: (
            f"{w['name']} reads {q['a']} pages on Monday and {q['b']} pages on Tuesday. "
            f"On Wednesday {w['p']} reads {q['c']} times as many pages as on Monday. "
            f"How many pages does {w['name']} read in the three days?"
        ),
        lambda q: [("add", q["a"], q["b"]), ("mul", q["a"], q["c"]), ("add", "#0", "#1")],
        _w_person,
    ),
    Template(
        "farm_rows",
        {"a": (2, 6), "b": (2, 6), "c": (1, 10), "d": (1, 15)},
        lambda q, w: (
            f"A farmer plants {q['a']} rows with {q['b']} trees in each row. {q['c']} of "
            f"the trees die, and the farmer plants {q['d']} new trees. How many trees "
            f"does the farmer have now?"
        ),
        lambda q: [("mul", q["a"], q["b"]), ("sub", "#0", q["c"]), ("add", "#1", q["d"])],
        _w_person,
    ),
    Template(
        "bake_sell",
        {"a": (10, 40), "b": (1, 10), "c": (2, 5), "d": (2, 5), "e": (1, 10)},
        lambda q, w: (
            f"{w['name']} bakes {q['a']} cookies and eats {q['b']} of them. {_cap(w['p'])} "
            f"packs the rest in bags of {q['c']} and sells each bag for {q['d']} dollars. "
            f"Then {w['p']} spends {q['e']} dollars on flour. How many dollars does "
            f"{w['name']} have left?"
        ),
        lambda q: [("sub", q["a"], q["b"]), ("div", "#0", q["c"]), ("mul", "#1", q["d"]), ("sub", "#2", q["e"])],
        _w_person,
    ),
    Template(
        "bus_stops",
        {"a": (10, 40), "b": (1, 10), "c": (1, 10), "d": (1, 10), "e": (1, 10)},
        lambda q, w: (
            f"A bus leaves with {q['a']} passengers. At the first stop {q['b']} people get "
            f"off and {q['c']} get on. At the second stop {q['d']} people get off and "
            f"{q['e']} get on. How many passengers are on the bus now?"
        ),
        lambda q: [("sub", q["a"], q["b"]), ("add", "#0", q["c"]), ("sub", "#1", q["d"]), ("add", "#2", q["e"])],
        _w_person,
    ),
    Template(
        "savings",
        {"a": (2, 8), "b": (2, 5), "c": (1, 10), "d": (3, 5)},
        lambda q, w: (
            f"{w['name']} saves {q['a']} dollars every week for {q['b']} weeks. "
            f"{_cap(w['p'])} spends {q['c']} dollars on a gift and shares the rest equally "
            f"with {q['d'] - 1} friends, so {q['d']} people get the same amount. How many "
            f"dollars does each person get?"
        ),
        lambda q: [("mul", q["a"], q["b"]), ("sub", "#0", q["c"]), ("div", "#1", q["d"])],
        _w_person,
    ),
]
TEMPLATE_BY_NAME = {t.name: t for t in TEMPLATES}

# Parameters that must stay unchanged by corruption because they also appear as words/derived
# numbers (savings: "d - 1 friends" appears as a number too, so d is never the changed one).
_FROZEN = {"savings": {"d"}}


def _render(t: Template, params: dict, words: dict) -> Problem | None:
    prog = t.program(params)
    res = program_results(prog)
    if res is None:
        return None
    prog_t = tuple(tuple(s) for s in prog)
    return Problem(
        question=t.render(params, words),
        program=prog_t,
        answer=res[-1],
        cot=cot_text(prog_t),
        template=t.name,
        params={**params, "_words": dict(words)},
    )


def _sample(rng: random.Random, t: Template) -> Problem:
    while True:
        params = {k: rng.randint(lo, hi) for k, (lo, hi) in t.ranges.items()}
        words = t.words(rng)
        p = _render(t, params, words)
        if p is not None:
            return p


def generate_problems(n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems, template chosen uniformly at random, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [_sample(rng, rng.choice(TEMPLATES)) for _ in range(n)]


def problem_stream(seed: int):
    """Endless deterministic stream of problems (same order as :func:`generate_problems`)."""
    rng = random.Random(seed)
    while True:
        yield _sample(rng, rng.choice(TEMPLATES))


# --------------------------------------------------------------------------------------------
# pairs


def _deltas(value: int) -> list[int]:
    out = []
    for d in (1, -1, 2, -2, 3, -3):
        v = value + d
        if v >= 1 and len(str(v)) == len(str(value)):
            out.append(d)
    return out


def corrupt(problem: Problem, rng: random.Random) -> Problem | None:
    """A corrupted copy: one question number changed by a small digit-count-preserving amount."""
    t = TEMPLATE_BY_NAME[problem.template]
    params = {k: v for k, v in problem.params.items() if not k.startswith("_")}
    words = problem.params["_words"]
    keys = [k for k in params if k not in _FROZEN.get(t.name, set())]
    rng.shuffle(keys)
    for k in keys:
        ds = _deltas(params[k])
        rng.shuffle(ds)
        ds.sort(key=abs)  # smallest change first, random sign
        for d in ds:
            new = dict(params)
            new[k] = params[k] + d
            lo, hi = t.ranges[k]
            if not lo <= new[k] <= hi:
                continue
            c = _render(t, new, words)
            if c is not None and c.answer != problem.answer:
                return c
    return None


def generate_pairs(n: int, seed: int = 0, intermediates: bool = False) -> list[Pair]:
    """``n`` clean/corrupted :class:`latentpatch.data.pairs.Pair` objects, deterministic in ``seed``.

    ``extra`` of each variant holds ``program``, ``cot``, ``template`` and ``changed``
    (the one question number changed: ``{"param", "from", "to"}``); with ``intermediates``, also
    ``intermediates``: the result of every program step in order (the last is the answer), which
    the ``intermediate`` experiment reads (docs/method.md §13). Off by default, so existing pair
    files stay byte-identical.

    >>> p = generate_pairs(1, seed=0, intermediates=True)[0]
    >>> p.clean.extra["intermediates"][-1] == p.clean.answer
    True
    """
    rng = random.Random(seed)
    pairs: list[Pair] = []
    seen: set[str] = set()
    while len(pairs) < n:
        clean = _sample(rng, rng.choice(TEMPLATES))
        if clean.question in seen:
            continue
        corr = corrupt(clean, rng)
        if corr is None or corr.question in seen:
            continue
        seen.update((clean.question, corr.question))
        changed = [k for k in clean.params if not k.startswith("_") and clean.params[k] != corr.params[k]]
        ch = {"param": changed[0], "from": clean.params[changed[0]], "to": corr.params[changed[0]]}
        pid = f"syn-{seed}-{len(pairs):04d}"
        sides = (_as_variant(clean, ch, intermediates), _as_variant(corr, ch, intermediates))
        pairs.append(Pair(pair_id=pid, clean=sides[0], corrupted=sides[1]))
    return pairs


def _as_variant(p: Problem, changed: dict, intermediates: bool = False) -> Variant:
    """``p`` as one side of a pair; ``changed`` (the pair's changed number) goes into ``extra``,
    and with ``intermediates`` every step's result."""
    extra: dict[str, Any] = {
        "program": [list(s) for s in p.program],
        "cot": p.cot,
        "template": p.template,
        "changed": changed,
    }
    if intermediates:
        extra["intermediates"] = program_results(p.program)
    return Variant(question=p.question, answer=p.answer, extra=extra)


_COT_RE = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>")


def check_cot(cot: str) -> int | None:
    """Independently re-check a CoT text; return its final value or None if any step is wrong."""
    steps = _COT_RE.findall(cot)
    if not steps:
        return None
    for x, op, y, r in steps:
        x, y, r = int(x), int(y), int(r)
        val = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
        if val != r:
            return None
    return int(steps[-1][3])
