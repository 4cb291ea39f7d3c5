"""Tests for latentpatch.data (answers, pairs, validate) and the `latentpatch pairs ...` CLI commands.

The real 66-pair GSM8K file lives in ``../shared/data`` (or ``$LATENTPATCH_SHARED_DATA``); tests
that need it skip when it is absent. Malformed files are built in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentpatch.cli import main
from latentpatch.data.answers import parse_answer
from latentpatch.data.pairs import Pair, Variant, filter_pairs, load_pairs, pairs_to_entries, save_pairs
from latentpatch.data.validate import validate_pairs
from latentpatch.errors import LatentPatchError

SHARED_NAME = "gsm8k_clean_corrupted_pairs.json"
SAME_ANSWER_IDS = {"12", "55", "229", "287", "334", "397", "465", "475", "555"}


def _shared_file() -> Path | None:
    env = os.environ.get("LATENTPATCH_SHARED_DATA")
    candidates = [Path(env), Path(env) / SHARED_NAME] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / SHARED_NAME)
    return next((p for p in candidates if p.is_file()), None)


@pytest.fixture
def real_file() -> Path:
    path = _shared_file()
    if path is None:
        pytest.skip(f"shared data {SHARED_NAME} not found (set LATENTPATCH_SHARED_DATA)")
    return path


def small_entries() -> list[dict]:
    """Two valid pairs in the flat format (one with the same answer on both sides)."""
    return [
        {
            "pair_id": 1,
            "variant": "clean",
            "question": "Tom has 3 apples and buys 2. How many?",
            "answer": 5,
            "program": "3+2",
        },
        {
            "pair_id": 1,
            "variant": "corrupted",
            "question": "Tom has 4 apples and buys 2. How many?",
            "answer": 6,
            "program": "4+2",
        },
        {"pair_id": "b", "variant": "clean", "question": "What is 2 times 3?", "answer": "6"},
        {"pair_id": "b", "variant": "corrupted", "question": "What is 3 times 2?", "answer": 6.0},
    ]


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def to_nested(entries: list[dict]) -> list[dict]:
    nested: dict = {}
    for e in entries:
        rest = {k: v for k, v in e.items() if k not in ("pair_id", "variant")}
        nested.setdefault(json.dumps(e["pair_id"]), {"pair_id": e["pair_id"]})[e["variant"]] = rest
    return list(nested.values())


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``latentpatch ARGS`` in-process: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (18, 18),
        ("18", 18),
        ("18.0", 18),
        (18.0, 18),
        ("1,234", 1234),
        ("-3", -3),
        (" 7 ", 7),
        ("2.5", 2.5),
        (-0.25, -0.25),
        ("1,234.5", 1234.5),
        ("12345678901234567890", 12345678901234567890),
    ],
)
def test_parse_answer_numbers(raw, expected):
    value = parse_answer(raw)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("raw", [None, True, "abc", "", "1,23", "12,34,5", "1_000", "nan", "inf", float("nan"), [1]])
def test_parse_answer_rejects(raw):
    with pytest.raises(ValueError):
        parse_answer(raw)


# ---- the real GSM8K file ---------------------------------------------------------------------


def test_real_file_loads(real_file):
    pairs = load_pairs(real_file)
    assert len(pairs) == 66
    assert all(isinstance(p.raw_id, int) and p.pair_id == str(p.raw_id) for p in pairs)
    assert {p.pair_id for p in pairs if p.clean.answer == p.corrupted.answer} == SAME_ANSWER_IDS
    first = pairs[0]
    assert first.pair_id == "0" and first.clean.answer == 18 and first.corrupted.answer == 20
    assert set(first.clean.extra) == {"reasoning_steps", "baseline_correct", "ablated_correct", "needs_cot"}


def test_real_file_validates(real_file):
    report = validate_pairs(real_file)
    assert report.usable and report.blocking_reasons == []
    assert (report.n_entries, report.n_pairs, report.n_complete_pairs) == (132, 66, 66)
    assert set(report.same_answer_ids) == SAME_ANSWER_IDS
    assert report.null_answers == report.non_numeric_answers == report.duplicate_ids == []
    assert report.missing_variants == []
    diff = report.answer_diff
    assert diff["n"] == 66 and diff["min"] == 0 and diff["max"] >= diff["median"] >= diff["min"]
    assert sum(count for _, count in diff["histogram"]) == 66
    assert diff["histogram"][0] == ("[0, 1)", 9)  # the same-answer pairs
    assert report.n_same_token_length + len(report.different_token_length_ids) == 66
    json.dumps(report.to_dict())  # serialisable


def test_real_file_filter(real_file):
    pairs = load_pairs(real_file)
    kept, removed = filter_pairs(pairs)
    assert len(kept) == 57
    assert {pid for pid, _ in removed} == SAME_ANSWER_IDS
    assert all("same answer" in reason for _, reason in removed)
    assert [p.pair_id for p in kept] == [p.pair_id for p in pairs if p.pair_id not in SAME_ANSWER_IDS]
    kept_all, removed_none = filter_pairs(pairs, drop_same_answer=False)
    assert len(kept_all) == 66 and removed_none == []


def test_real_file_round_trip(real_file, tmp_path):
    original = json.loads(real_file.read_text(encoding="utf-8"))
    pairs = load_pairs(real_file)
    out = save_pairs(pairs, tmp_path / "sub" / "pairs.json")
    # byte-for-byte the same data: ids stay ints, key order and every extra field kept
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved == original
    assert [list(e) for e in saved] == [list(e) for e in original]
    assert load_pairs(out) == pairs
    assert [p.name for p in out.parent.iterdir()] == ["pairs.json"]  # no temp file left behind


def test_real_file_nested_format(real_file, tmp_path):
    original = json.loads(real_file.read_text(encoding="utf-8"))
    nested = write(tmp_path / "nested.json", to_nested(original))
    assert load_pairs(nested) == load_pairs(real_file)
    wrapped = write(tmp_path / "wrapped.json", {"pairs": to_nested(original)})
    assert load_pairs(wrapped) == load_pairs(real_file)
    assert validate_pairs(nested).n_entries == 132


def test_real_file_with_a_null_answer(real_file, tmp_path):
    data = json.loads(real_file.read_text(encoding="utf-8"))
    data[9]["answer"] = None  # pair 55, corrupted
    path = write(tmp_path / "broken.json", data)
    with pytest.raises(LatentPatchError) as exc:
        load_pairs(path)
    assert str(path) in str(exc.value) and "entry [9]" in str(exc.value) and "pair_id 55" in str(exc.value)
    report = validate_pairs(path)
    assert not report.usable and report.null_answers == [("55", "corrupted")]
    assert report.n_complete_pairs == 65


# ---- the small file, formats and the data model ----------------------------------------------


def test_numeric_strings_and_string_ids(tmp_path):
    pairs = load_pairs(write(tmp_path / "p.json", small_entries()))
    assert [p.pair_id for p in pairs] == ["1", "b"]
    assert pairs[1].clean.answer == 6 and type(pairs[1].clean.answer) is int
    assert type(pairs[1].corrupted.answer) is int
    assert pairs[0].clean.extra == {"program": "3+2"}
    saved = json.loads(save_pairs(pairs, tmp_path / "out.json").read_text())
    assert [e["pair_id"] for e in saved] == [1, 1, "b", "b"]
    assert [e["variant"] for e in saved] == ["clean", "corrupted"] * 2


def test_nested_pair_level_fields_go_to_both_variants(tmp_path):
    nested = [
        {
            "pair_id": 3,
            "source": "gsm8k",
            "clean": {"question": "q1", "answer": 1, "cot": "a"},
            "corrupted": {"question": "q2", "answer": "2"},
        }
    ]
    (pair,) = load_pairs(write(tmp_path / "n.json", nested))
    assert pair.raw_id == 3 and pair.clean.extra == {"source": "gsm8k", "cot": "a"}
    assert pair.corrupted.extra == {"source": "gsm8k"} and pair.corrupted.answer == 2


def test_pair_id_normalisation():
    v = Variant("q", 1)
    assert Pair(7, v, v).pair_id == "7" and Pair(7, v, v).raw_id == 7
    assert Pair("x", v, v).raw_id == "x"
    with pytest.raises(ValueError):
        Pair("7", v, v, raw_id=8)
    with pytest.raises(TypeError):
        Variant("q", "1")
    with pytest.raises(ValueError):
        Variant("q", 1, {"answer": 2})
    assert pairs_to_entries([Pair(7, Variant("a", 1, {"k": 0}), v)])[0] == {
        "pair_id": 7,
        "variant": "clean",
        "question": "a",
        "answer": 1,
        "k": 0,
    }


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(small_entries()).encode())
    assert len(load_pairs(path)) == 2


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "p.json"
    pairs = load_pairs(write(path, small_entries()))
    save_pairs(pairs[:1], path)
    assert len(load_pairs(path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


# ---- malformed files -------------------------------------------------------------------------


def _mutate(fn):
    def build(tmp_path: Path) -> Path:
        data = small_entries()
        fn(data)  # mutates in place
        return write(tmp_path / "pairs.json", data)

    return build


def _raw(text: str):
    def build(tmp_path: Path) -> Path:
        path = tmp_path / "pairs.json"
        path.write_text(text, encoding="utf-8")
        return path

    return build


MALFORMED = {
    # name: (build, substrings that the message must contain besides the file name)
    "missing file": (lambda tmp_path: tmp_path / "pairs.json", ["does not exist"]),
    "bad json": (_raw('[{"pair_id": 1,\n  "variant": }]'), ["not valid JSON", "line 2", "column"]),
    "not a list": (_raw('{"pair_id": 1}'), ["expected a JSON list"]),
    "empty list": (_raw("[]"), ["no entries"]),
    "entry not an object": (_mutate(lambda d: d.insert(0, "oops")), ["entry [0]", "expected an object"]),
    "missing pair_id": (_mutate(lambda d: d[2].pop("pair_id")), ["entry [2]", "'pair_id'"]),
    "bad pair_id": (_mutate(lambda d: d[0].update(pair_id=1.5)), ["entry [0]", "'pair_id'"]),
    "missing variant": (_mutate(lambda d: d[1].pop("variant")), ["entry [1]", "pair_id 1", "'variant'"]),
    "unknown variant": (_mutate(lambda d: d[1].update(variant="Corrupt")), ["entry [1]", "'Corrupt'", "variant"]),
    "missing question": (_mutate(lambda d: d[3].pop("question")), ["entry [3]", "pair_id 'b'", "'question'"]),
    "question not a string": (_mutate(lambda d: d[0].update(question=5)), ["entry [0]", "'question'"]),
    "empty question": (_mutate(lambda d: d[0].update(question="  ")), ["entry [0]", "'question' is empty"]),
    "missing answer": (_mutate(lambda d: d[0].pop("answer")), ["entry [0]", "'answer'"]),
    "null answer": (_mutate(lambda d: d[1].update(answer=None)), ["entry [1]", "pair_id 1", "'answer' is null"]),
    "non-numeric answer": (_mutate(lambda d: d[2].update(answer="six")), ["entry [2]", "'answer'", "'six'"]),
    "duplicate id": (_mutate(lambda d: d.append(dict(d[0]))), ["entry [4]", "pair_id 1", "already has a 'clean'"]),
    "one variant only": (_mutate(lambda d: d.pop(3)), ["pair_id 'b'", "no 'corrupted'"]),
    "nested one variant": (
        _raw('[{"pair_id": 1, "clean": {"question": "q", "answer": 1}}]'),
        ["pair_id 1", "no 'corrupted'"],
    ),
    "nested duplicate": (_raw(json.dumps(to_nested(small_entries()) * 2)), ["entry [2]", "more than once"]),
    "nested null answer": (
        _raw(
            '[{"pair_id": 4, "clean": {"question": "q", "answer": null}, "corrupted": {"question": "r", "answer": 2}}]'
        ),
        ["entry [0]", "pair_id 4, clean", "'answer' is null"],
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_raise_one_line(case, tmp_path):
    build, needles = MALFORMED[case]
    path = build(tmp_path)
    with pytest.raises(LatentPatchError) as exc:
        load_pairs(path)
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    assert "fix:" in message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("case", [c for c in MALFORMED if c not in ("missing file", "bad json")])
def test_validate_collects_instead_of_raising(case, tmp_path):
    report = validate_pairs(MALFORMED[case][0](tmp_path))
    assert not report.usable
    assert report.blocking_reasons and all("\n" not in r and "fix:" in r for r in report.blocking_reasons)


def test_validate_lists_every_problem(tmp_path):
    data = small_entries() + [
        {"pair_id": 9, "variant": "clean", "question": "Tom has 3 apples and buys 2. How many?", "answer": None},
        {"pair_id": 9, "variant": "corrupted", "question": "x y", "answer": "lots"},
        {"pair_id": 10, "variant": "clean", "question": "q10", "answer": 1},
        {"pair_id": 10, "variant": "clean", "question": "q10 again", "answer": 1},
    ]
    report = validate_pairs(data)  # raw entries work too
    assert report.source == "<entries>"
    assert report.null_answers == [("9", "clean")]
    assert report.non_numeric_answers == [("9", "corrupted")]
    assert report.duplicate_ids == [("10", "clean")]
    assert report.missing_variants == [("10", "corrupted")]
    assert report.duplicate_questions == [[("1", "clean"), ("9", "clean")]]
    assert (report.n_entries, report.n_pairs, report.n_complete_pairs) == (8, 4, 2)
    assert report.same_answer_ids == ["b"]
    assert report.different_token_length_ids == [] and report.n_same_token_length == 2
    assert not report.usable and len(report.blocking_reasons) == 4


def test_validate_token_lengths_and_all_same_answer(tmp_path):
    data = [
        {"pair_id": 0, "variant": "clean", "question": "a b c", "answer": 1},
        {"pair_id": 0, "variant": "corrupted", "question": "a b", "answer": 1},
    ]
    report = validate_pairs(data)
    assert report.different_token_length_ids == ["0"] and report.n_same_token_length == 0
    assert not report.usable and "same clean and corrupted answer" in report.blocking_reasons[0]


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_validate_real_file(real_file, capsys):
    code, out, err = run_cli(["pairs", "validate", str(real_file)], capsys)
    assert code == 0 and err == ""
    assert "132" in out and "usable" in out and "555" in out
    code, out, _ = run_cli(["pairs", "validate", str(real_file), "--json"], capsys)
    assert code == 0 and json.loads(out)["n_complete_pairs"] == 66


def test_cli_validate_unusable_exits_2(tmp_path, capsys):
    path = MALFORMED["null answer"][0](tmp_path)
    code, out, err = run_cli(["pairs", "validate", str(path)], capsys)
    assert code == 2
    assert "not usable" in out and "'answer' is null" in out
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err
    code, out, _ = run_cli(["pairs", "validate", str(path), "--json"], capsys)
    assert code == 2 and json.loads(out)["usable"] is False


@pytest.mark.parametrize("command", ["validate", "filter"])
@pytest.mark.parametrize("case", ["missing file", "bad json", "not a list", "duplicate id"])
def test_cli_malformed_one_line_exit_2(command, case, tmp_path, capsys):
    path = MALFORMED[case][0](tmp_path)
    args = ["pairs", command, str(path)] + (["--out", str(tmp_path / "out.json")] if command == "filter" else [])
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.json").exists()


def test_cli_filter_real_file(real_file, tmp_path, capsys):
    out_path = tmp_path / "filtered.json"
    code, out, _ = run_cli(["pairs", "filter", str(real_file), "--out", str(out_path)], capsys)
    assert code == 0
    assert "kept 57 of 66" in out
    for pid in SAME_ANSWER_IDS:
        assert f"removed pair {pid}: same answer" in out
    assert len(load_pairs(out_path)) == 57
    code, out, _ = run_cli(["pairs", "filter", str(real_file), "--out", str(out_path), "--keep-same-answer"], capsys)
    assert code == 0 and "kept 66 of 66" in out and len(load_pairs(out_path)) == 66


def test_cli_filter_everything_removed(tmp_path, capsys):
    path = write(tmp_path / "same.json", small_entries()[2:])  # pair "b": 6 vs 6.0
    code, out, err = run_cli(["pairs", "filter", str(path), "--out", str(tmp_path / "o.json")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--keep-same-answer" in err
    assert not (tmp_path / "o.json").exists()


def test_cli_generate(tmp_path, capsys):
    pytest.importorskip("latentpatch.data.synthetic")
    out_path = tmp_path / "gen.json"
    code, out, _ = run_cli(["pairs", "generate", "--n", "5", "--seed", "3", "--out", str(out_path)], capsys)
    assert code == 0 and "wrote 5 pairs" in out
    pairs = load_pairs(out_path)
    assert len(pairs) == 5 and validate_pairs(out_path).n_complete_pairs == 5
    again = tmp_path / "again.json"
    run_cli(["pairs", "generate", "--n", "5", "--seed", "3", "--out", str(again)], capsys)
    assert again.read_text() == out_path.read_text()  # deterministic in the seed


def test_cli_generate_bad_n(tmp_path, capsys):
    code, _, err = run_cli(["pairs", "generate", "--n", "0", "--out", str(tmp_path / "g.json")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--n" in err


def test_cli_subprocess_no_traceback(tmp_path):
    path = MALFORMED["non-numeric answer"][0](tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "latentpatch.cli", "pairs", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "'six'" in proc.stderr and str(path) in proc.stderr
