"""Synthetic problems and pairs: answers checked independently of the generator."""

from __future__ import annotations

import operator
import re

import pytest

from latentpatch.data.synthetic import (
    MAX_VALUE,
    check_cot,
    evaluate_program,
    generate_pairs,
    generate_problems,
)

_OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}


def _independent_eval(program) -> float:
    """Re-evaluate a program with Python's float ops (not the generator's code)."""
    vals = []
    for op, a, b in program:
        x = vals[int(a[1:])] if isinstance(a, str) else a
        y = vals[int(b[1:])] if isinstance(b, str) else b
        vals.append(_OPS[op](x, y))
    assert all(v >= 0 and float(v).is_integer() and v <= MAX_VALUE for v in vals), (program, vals)
    return vals[-1]


def _cot_by_regex(cot: str) -> float:
    steps = re.findall(r"<<(\d+)([-+*/])(\d+)=(\d+)>>", cot)
    assert steps
    for x, op, y, r in steps:
        assert eval(f"{x}{op}{y}") == int(r), cot  # noqa: S307 - digits and one operator only
    return int(steps[-1][3])


def test_problems_answers_independently_checked():
    probs = generate_problems(400, seed=3)
    templates = set()
    for p in probs:
        templates.add(p.template)
        assert 3 <= len(p.program) <= 4
        assert _independent_eval(p.program) == p.answer
        assert _cot_by_regex(p.cot) == p.answer
        assert check_cot(p.cot) == p.answer
        assert evaluate_program(p.program) == p.answer
        # every literal operand of the program appears as a number in the question
        nums = set(int(n) for n in re.findall(r"\d+", p.question))
        for _, a, b in p.program:
            for x in (a, b):
                if isinstance(x, int):
                    assert x in nums, (x, p.question)
    assert len(templates) >= 6


def test_evaluate_program_rejects_invalid():
    assert evaluate_program([("sub", 16, 3), ("mul", "#0", 2)]) == 26
    with pytest.raises(ValueError):
        evaluate_program([("div", 7, 2)])
    with pytest.raises(ValueError):
        evaluate_program([("sub", 3, 7)])


def test_determinism_by_seed():
    a = generate_problems(50, seed=11)
    b = generate_problems(50, seed=11)
    c = generate_problems(50, seed=12)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    pa = generate_pairs(10, seed=4)
    pb = generate_pairs(10, seed=4)
    assert [(p.clean.question, p.corrupted.question) for p in pa] == [
        (p.clean.question, p.corrupted.question) for p in pb
    ]


def test_pairs_differ_in_one_number_and_answer():
    pairs = generate_pairs(60, seed=0)
    assert len(pairs) == 60
    assert len({p.pair_id for p in pairs}) == 60
    for p in pairs:
        c, k = p.clean, p.corrupted
        assert c.answer != k.answer
        assert _independent_eval(c.extra["program"]) == c.answer
        assert _independent_eval(k.extra["program"]) == k.answer
        cn = re.findall(r"\d+", c.question)
        kn = re.findall(r"\d+", k.question)
        assert len(cn) == len(kn)
        diff = [(x, y) for x, y in zip(cn, kn) if x != y]
        assert len(diff) == 1, (c.question, k.question)
        x, y = diff[0]
        assert len(x) == len(y) and 1 <= abs(int(x) - int(y)) <= 3
        # only the number changed: the texts agree once numbers are masked
        assert re.sub(r"\d+", "N", c.question) == re.sub(r"\d+", "N", k.question)


def test_default_pairs_file_matches_generator():
    from pathlib import Path

    import latentpatch
    from latentpatch.data.pairs import load_pairs

    path = Path(latentpatch.__file__).parent / "default_data" / "pairs.json"
    stored = load_pairs(path)
    gen = generate_pairs(57, seed=0)
    assert len(stored) == 57
    assert [(p.clean.question, p.clean.answer, p.corrupted.question, p.corrupted.answer) for p in stored] == [
        (p.clean.question, p.clean.answer, p.corrupted.question, p.corrupted.answer) for p in gen
    ]


def test_intermediates_are_every_step_result_and_off_by_default():
    """--intermediates adds each step's result (recomputed here from the program, plainly); without
    it the pairs are exactly those of before."""
    plain = generate_pairs(12, seed=3)
    with_steps = generate_pairs(12, seed=3, intermediates=True)
    for a, b in zip(plain, with_steps):
        for name in ("clean", "corrupted"):
            va, vb = a.variant(name), b.variant(name)
            assert "intermediates" not in va.extra
            assert {k: v for k, v in vb.extra.items() if k != "intermediates"} == va.extra
            results: list[int] = []
            for op, x, y in vb.extra["program"]:
                x = results[int(x[1:])] if isinstance(x, str) else x
                y = results[int(y[1:])] if isinstance(y, str) else y
                results.append({"add": x + y, "sub": x - y, "mul": x * y, "div": x // max(y, 1)}[op])
            assert vb.extra["intermediates"] == results
            assert results[-1] == vb.answer
