"""Tests for latentpatch.data.questions (labelled question sets) and latentpatch.data.gsm8k (worked solutions).

Files are written in ``tmp_path``. Expected intermediates are computed here by evaluating each
annotation's expression with Python (not with the parser); expected answers from the raw text.
The real 66-pair GSM8K file in ``../shared/data`` is used when present (skipped otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from latentpatch.data.gsm8k import UnparsedSolution, find_annotations, parse_cot, to_number
from latentpatch.data.pairs import load_pairs
from latentpatch.data.questions import (
    LabelledQuestion,
    QuestionSet,
    load_questions,
    questions_from_pairs,
    save_questions,
)
from latentpatch.data.synthetic import generate_pairs
from latentpatch.errors import LatentPatchError

SHARED_NAME = "gsm8k_clean_corrupted_pairs.json"

# Real-looking GSM8K records (worked solutions with calculator annotations and a #### line).
GSM8K = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {
        "id": "boxes",
        "question": "A shop has 2 boxes of 1,000 pens and sells 350 pens. How many pens are left?",
        "answer": "The boxes hold 2*1000 = <<2*1000=2,000>>2,000 pens.\n"
        "After the sale 2000-350 = <<2000-350=1650>>1,650 pens are left.\n#### 1,650",
        "difficulty": "easy",
    },
]
AUG = [
    {
        "question": "John has 600 dollars. He spends 30% on rent and 10% on food. How much is left?",
        "cot": "<<600*30/100=180>> <<600*10/100=60>> <<180+60=240>> <<600-240=360>>",
        "answer": "360",
    },
    {"question": "Half of 9 is?", "cot": "<<9/2=4.5>>", "answer": "4.5"},
]


def expected_steps(text: str) -> list[float]:
    """Evaluate every ``<<expr=...>>`` expression with Python (commas of thousands removed)."""
    return [eval(expr.replace(",", "")) for expr in re.findall(r"<<([^=>]*)=", text)]


def final_answer(solution: str) -> float:
    return float(solution.split("####")[1].strip().replace(",", ""))


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(LatentPatchError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "fix:" in message, message
    return message


# ---- question files (b) ------------------------------------------------------------------------

QUESTION_RECORDS = [
    {"id": "q1", "question": "What is 2*3+1?", "answer": 7, "intermediates": [6, 7], "operation": "mul"},
    {"id": 2, "group": "g", "question": "Cost of 1,234 pens at $1?", "answer": "1,234", "hard": True},
    {"question_id": "q3", "group": 5, "question": "Half of 5?", "answer": "$2.5", "intermediates": [2.5]},
    {"id": "q4", "question": "Two plus two?", "answer": 4.0, "intermediates": None, "note": None},
]


@pytest.mark.parametrize("layout", ["list", "wrapped", "jsonl"])
def test_question_file_loads(tmp_path, layout):
    path = tmp_path / "q.json"
    if layout == "jsonl":
        write_jsonl(path, QUESTION_RECORDS)
    else:
        write_json(path, QUESTION_RECORDS if layout == "list" else {"questions": QUESTION_RECORDS})
    qs = load_questions(path)
    assert qs.source == "questions" and qs.layout == "questions" and qs.path == path and qs.skipped == []
    assert [q.question_id for q in qs] == ["q1", "2", "q3", "q4"]
    assert qs.groups() == ["q1", "g", "5", "q4"]  # default group: the id
    assert [q.answer for q in qs] == [7, 1234, 2.5, 4]
    assert [q.intermediates for q in qs] == [(6, 7), None, (2.5,), None]
    assert [q.labels for q in qs] == [{"operation": "mul"}, {"hard": True}, {}, {}]
    assert all(q.source == "questions" for q in qs)
    assert qs.label_names() == ["answer", "intermediate_0", "intermediate_1", "operation", "hard"]
    assert qs.label_values("intermediate_1") == [7, None, None, None]
    assert qs.label_values("operation") == ["mul", None, None, None]
    assert qs.label_values("answer") == [7, 1234, 2.5, 4]


def test_single_object_and_text_cot_is_no_label(tmp_path):
    record = {"id": "a", "question": "q?", "answer": 3, "cot": "I add 1 and 2.", "intermediates": [3]}
    qs = load_questions(write_json(tmp_path / "one.json", record))
    assert len(qs) == 1 and qs.layout == "questions" and qs.questions[0].labels == {}


def test_unknown_label_is_an_error_naming_the_choices(tmp_path):
    qs = load_questions(write_json(tmp_path / "q.json", QUESTION_RECORDS))
    message = one_line_error(qs.label_values, "intermediate_5")
    assert "'intermediate_5'" in message and "operation" in message and str(tmp_path) in message


# ---- GSM8K worked solutions and GSM8k-Aug (c) ----------------------------------------------------


@pytest.mark.parametrize("jsonl", [False, True])
def test_gsm8k_worked_solutions(tmp_path, jsonl):
    path = tmp_path / "gsm8k.jsonl"
    write_jsonl(path, GSM8K) if jsonl else write_json(path, GSM8K)
    qs = load_questions(path)
    assert qs.source == "gsm8k" and qs.layout == "gsm8k"
    assert [q.question_id for q in qs] == ["gsm8k-0", "gsm8k-1", "boxes"]
    assert qs.groups() == ["gsm8k-0", "gsm8k-1", "boxes"]
    for q, record in zip(qs, GSM8K):
        assert q.question == record["question"]
        assert q.answer == final_answer(record["answer"])
        assert q.intermediates == pytest.approx(expected_steps(record["answer"]))
    assert qs.questions[1].intermediates == (0.2, 10) and isinstance(qs.questions[1].intermediates[0], float)
    assert qs.questions[2].intermediates == (2000, 1650) and qs.questions[2].labels == {"difficulty": "easy"}
    assert qs.label_names() == ["answer", "intermediate_0", "intermediate_1", "difficulty"]


def test_gsm8k_aug_cot(tmp_path):
    qs = load_questions(write_json(tmp_path / "aug.json", AUG))
    assert qs.source == "gsm8k" and qs.layout == "gsm8k-aug"
    assert [q.question_id for q in qs] == ["gsm8k-0", "gsm8k-1"]
    for q, record in zip(qs, AUG):
        assert q.answer == float(record["answer"])
        assert q.intermediates == pytest.approx(expected_steps(record["cot"]))
        assert q.labels == {}
    assert qs.questions[0].intermediates == (180, 60, 240, 360)


def test_annotation_reading():
    # the result is what follows the last '='; a leading $ and every comma of a result are dropped
    assert find_annotations("<<x=3*4=12>> and <<$5+$5=$10>>") == [("x=3*4", "12"), ("$5+$5", "$10")]
    assert parse_cot("<<x=3*4=12>> <<5+5=$10>> <<2*5000=10000,0>>") == [12, 10, 100000]
    assert to_number("-$3") == -3 and to_number(" $1,234.5 ") == 1234.5
    for bad in ("1,23", "$", "ten", None, True):
        with pytest.raises(ValueError):
            to_number(bad)
    with pytest.raises(UnparsedSolution) as info:
        parse_cot("")
    assert info.value.fix == "add the annotations of its calculations"


BAD_SOLUTIONS = [
    ("Natalia sold 48/2 = <<48/2>>24 clips.\n#### 24", "has no '='"),
    ("She has 5+2 = <<5+2=seven>>7.\n#### 7", "not a number"),
    ("She has 5 + 2 = 7 apples.\n#### 7", "no '<<expression=result>>' annotation"),
    ("She has 5+2 = <<5+2=7>>7 apples.", "no final '#### <answer>' line"),
    ("She has 5+2 = <<5+2=7>>7 apples.\n#### seven", "'####' answer 'seven' is not a number"),
    ("She has 5+2 = <<5+2=7 apples.\n#### 7", "not closed"),
]


@pytest.mark.parametrize("solution, problem", BAD_SOLUTIONS)
def test_unparseable_solution_names_file_record_and_fix(tmp_path, solution, problem):
    records = [GSM8K[0], {"id": "bad-one", "question": "How many apples?", "answer": solution}, GSM8K[1]]
    path = write_json(tmp_path / "gsm8k.json", records)
    message = one_line_error(load_questions, path)
    assert str(path) in message and "record [1]" in message and "'bad-one'" in message
    assert problem in message and "--skip-unparsed" in message

    qs = load_questions(path, skip_unparsed=True)
    assert [q.question_id for q in qs] == ["gsm8k-0", "gsm8k-2"]
    assert len(qs.skipped) == 1 and qs.skipped[0].startswith("record [1] (id 'bad-one')") and problem in qs.skipped[0]
    assert "1 unparseable record(s) skipped" in qs.describe()


def test_unparseable_count_and_aug_problems(tmp_path):
    records = [
        AUG[0],
        {"question": "a", "cot": "<<2+2>>", "answer": "4"},
        {"question": "b", "answer": "4"},  # no cot
        {"question": "c", "cot": "<<2+2=4>>", "answer": "four"},
    ]
    path = write_jsonl(tmp_path / "aug.jsonl", records)
    message = one_line_error(load_questions, path)
    assert "record [1] (line 2)" in message and "has no '='" in message and "(2 more unparseable record(s))" in message
    qs = load_questions(path, skip_unparsed=True)
    assert [q.question_id for q in qs] == ["gsm8k-0"] and len(qs.skipped) == 3
    assert "field 'cot'" in qs.skipped[1] and "'four', not a number" in qs.skipped[2]


def test_all_unparseable_is_an_error_even_when_skipping(tmp_path):
    path = write_json(tmp_path / "g.json", [{"question": "q", "answer": "no maths here\n#### 3"}])
    message = one_line_error(load_questions, path, skip_unparsed=True)
    assert "none of the 1 records could be parsed" in message


# ---- pair files (a) ------------------------------------------------------------------------------

PAIR_ENTRIES = [
    {"pair_id": 7, "variant": "clean", "question": "3*4+2?", "answer": 14, "intermediates": [12, 14], "op": "mul",
     "program": [["mul", 3, 4], ["add", "#0", 2]], "cot": "<<3*4=12>> <<12+2=14>>", "changed": {"param": "a"}},
    {"pair_id": 7, "variant": "corrupted", "question": "3*5+2?", "answer": 17, "intermediates": [15, 17], "op": "mul"},
    {"pair_id": "x", "variant": "clean", "question": "9-4?", "answer": "5", "steps": 1},
    {"pair_id": "x", "variant": "corrupted", "question": "9-3?", "answer": 6, "steps": 1},
]  # fmt: skip


def nested(entries: list[dict]) -> list[dict]:
    out: dict = {}
    for e in entries:
        rest = {k: v for k, v in e.items() if k not in ("pair_id", "variant")}
        out.setdefault(str(e["pair_id"]), {"pair_id": e["pair_id"]})[e["variant"]] = rest
    return list(out.values())


@pytest.mark.parametrize("layout", ["flat", "nested", "wrapped", "jsonl", "in-questions"])
def test_pair_file_loads_both_variants_in_one_group(tmp_path, layout):
    path = tmp_path / "pairs.json"
    if layout == "jsonl":
        write_jsonl(path, PAIR_ENTRIES)
    elif layout == "in-questions":
        write_json(path, {"questions": PAIR_ENTRIES})
    else:
        data = nested(PAIR_ENTRIES) if layout == "nested" else PAIR_ENTRIES
        write_json(path, {"pairs": data} if layout == "wrapped" else data)
    qs = load_questions(path)
    assert qs.source == "pairs" and qs.layout == "pairs"
    assert [q.question_id for q in qs] == ["7/clean", "7/corrupted", "x/clean", "x/corrupted"]
    assert [q.group for q in qs] == ["7", "7", "x", "x"] and qs.groups() == ["7", "x"]
    assert [q.answer for q in qs] == [14, 17, 5, 6]
    assert [q.intermediates for q in qs] == [(12, 14), (15, 17), None, None]
    # scalar extras are labels; lists, objects, cot and intermediates are not
    assert [q.labels for q in qs] == [{"op": "mul"}, {"op": "mul"}, {"steps": 1}, {"steps": 1}]


def test_nested_pair_level_intermediates(tmp_path):
    entry = {"pair_id": 1, "intermediates": [2, 4], "clean": {"question": "2*2?", "answer": 4},
             "corrupted": {"question": "2*3?", "answer": 6, "intermediates": [2, 6]}}  # fmt: skip
    qs = load_questions(write_json(tmp_path / "n.json", [entry]))
    assert [q.intermediates for q in qs] == [(2, 4), (2, 6)]


def test_questions_from_generated_pairs():
    pairs = generate_pairs(20, 0, intermediates=True)
    qs = questions_from_pairs(pairs)
    assert len(qs) == 40 and len(qs.groups()) == 20 and qs.path is None
    for i, pair in enumerate(pairs):
        for j, name in enumerate(("clean", "corrupted")):
            q, variant = qs.questions[2 * i + j], pair.variant(name)
            assert q.question_id == f"{pair.pair_id}/{name}" and q.group == pair.pair_id
            assert list(q.intermediates) == variant.extra["intermediates"] and q.answer == variant.answer
            assert q.labels == {"template": variant.extra["template"]}
    big = questions_from_pairs(generate_pairs(1000, 0, intermediates=True))
    assert len(big) == 2000 and len(big.groups()) == 1000


def test_pair_file_errors_are_load_pairs_errors(tmp_path):
    path = write_json(tmp_path / "p.json", PAIR_ENTRIES[:3])  # pair "x" lacks its corrupted entry
    message = one_line_error(load_questions, path)
    with pytest.raises(LatentPatchError) as info:
        load_pairs(path)
    assert message == str(info.value) and "pair_id 'x'" in message and "has no 'corrupted'" in message
    bad = [dict(PAIR_ENTRIES[0], intermediates=[12, "14"]), PAIR_ENTRIES[1]]
    message = one_line_error(load_questions, write_json(tmp_path / "b.json", bad))
    assert "pair_id 7 (clean)" in message and "'intermediates'" in message and "item [1]" in message


# ---- errors of question files ----------------------------------------------------------------------


def rec(**kw) -> dict:
    return {"id": "a", "question": "q?", "answer": 1, **kw}


@pytest.mark.parametrize(
    "content, where, problem",
    [
        ([rec(), rec(question="other")], "record [1] (id 'a')", "id 'a' is also used by record [0]"),
        ([rec(), 5], "record [1]", "expected an object, got int"),
        ([rec(intermediates=3)], "record [0] (id 'a')", "not a non-empty list of numbers"),
        ([rec(intermediates=[1, "2"])], "record [0] (id 'a')", "item [1] is '2', not a number"),
        ([rec(intermediates=[])], "record [0]", "not a non-empty list of numbers"),
        ([rec(answer="many")], "record [0] (id 'a')", "field 'answer' is 'many', not a number"),
        ([rec(answer=None)], "record [0]", "field 'answer' is null"),
        ([{"question": "q?", "answer": 1}], "record [0]", "missing field 'id'"),
        ([{"id": "a", "answer": 1}], "record [0] (id 'a')", "missing field 'question'"),
        ([rec(question_id="b")], "record [0]", "has both 'id' and 'question_id'"),
        ([rec(id=True)], "record [0]", "field 'id' is True"),
        ([rec(steps=[1, 2])], "record [0] (id 'a')", "field 'steps' is a list, not a scalar label"),
        ([rec(correct=True)], "record [0] (id 'a')", "'correct' is a label the question set derives itself"),
        ([], "", "the list has no records"),
        ({"data": []}, "", "expected a list of question records, got an object with keys ['data']"),
    ],
)
def test_question_file_errors(tmp_path, content, where, problem):
    path = write_json(tmp_path / "bad.json", content)
    message = one_line_error(load_questions, path)
    assert message.startswith(f"question file {path}: {where}"), message
    assert problem in message


def test_file_level_errors(tmp_path):
    for text, problem in [("", "empty"), ("  \n\n", "empty"), ('[{"id": 1,', "not valid JSON")]:
        path = tmp_path / "f.json"
        path.write_text(text, encoding="utf-8")
        assert problem in one_line_error(load_questions, path)
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(rec()) + "\n\n" + '{"id": "b", oops}\n', encoding="utf-8")
    message = one_line_error(load_questions, path)
    assert f"question file {path}: line 3: not valid JSON" in message
    path.write_text(json.dumps(rec()) + "\n" + "[1, 2]\n", encoding="utf-8")
    assert "record [1] (line 2): expected an object, got list" in one_line_error(load_questions, path)
    assert "does not exist" in one_line_error(load_questions, tmp_path / "missing.json")


# ---- helpers, writing and the real file --------------------------------------------------------------


def test_label_values_match_a_plain_computation():
    questions = [
        LabelledQuestion("a", "g1", "q", 3, (1, 2, 3), {"op": "add"}),
        LabelledQuestion("b", "g1", "q", 5.5, None, {"level": 2}),
        LabelledQuestion("c", "g2", "q", 8, (8,), {"op": "mul", "level": 1, "intermediate_kind": "x"}),
    ]
    qs = QuestionSet(questions, "questions")
    assert qs.groups() == ["g1", "g2"]
    names = ["answer", "intermediate_0", "intermediate_1", "intermediate_2", "op", "level", "intermediate_kind"]
    assert qs.label_names() == names
    assert qs.label_values("intermediate_kind") == [None, None, "x"]
    for k in range(3):
        want = [q.intermediates[k] if q.intermediates and len(q.intermediates) > k else None for q in questions]
        assert qs.label_values(f"intermediate_{k}") == want
    assert qs.label_values("level") == [None, 2, 1]
    with pytest.raises(ValueError):
        LabelledQuestion("d", "g", "q", 1, None, {"group": "x"})


def test_round_trip(tmp_path):
    original = load_questions(write_json(tmp_path / "q.json", QUESTION_RECORDS))
    path = save_questions(original, tmp_path / "out" / "q.jsonl")
    again = load_questions(path)
    assert again.questions == original.questions and again.layout == "questions"
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(original)

    from_pairs = questions_from_pairs(generate_pairs(5, 3, intermediates=True))
    again = load_questions(save_questions(from_pairs, tmp_path / "pairs.jsonl"))
    assert again.questions == [dataclasses.replace(q, source="questions") for q in from_pairs]
    gsm = load_questions(write_json(tmp_path / "g.json", GSM8K))
    again = load_questions(save_questions(gsm, tmp_path / "g.jsonl"))
    assert again.questions == [dataclasses.replace(q, source="questions") for q in gsm]


def _shared_file() -> Path | None:
    env = os.environ.get("LATENTPATCH_SHARED_DATA")
    candidates = [Path(env), Path(env) / SHARED_NAME] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data" / SHARED_NAME)
    return next((p for p in candidates if p.is_file()), None)


def test_real_gsm8k_pair_file():
    """The 66-pair GSM8K file has no worked solutions or intermediates, but its flags are labels."""
    path = _shared_file()
    if path is None:
        pytest.skip(f"shared data {SHARED_NAME} not found (set LATENTPATCH_SHARED_DATA)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    qs = load_questions(path)
    assert len(qs) == len(raw) == 132 and len(qs.groups()) == 66
    by_id = {f"{e['pair_id']}/{e['variant']}": e for e in raw}
    assert {q.question_id for q in qs} == set(by_id)
    for q in qs:
        entry = by_id[q.question_id]
        assert q.group == str(entry["pair_id"]) and q.answer == entry["answer"] and q.question == entry["question"]
        assert q.labels == {k: v for k, v in entry.items() if k not in ("pair_id", "variant", "question", "answer")}
        assert q.intermediates is None
    assert qs.label_values("reasoning_steps") == [by_id[q.question_id]["reasoning_steps"] for q in qs]
