"""DAS on question sets with GSM8K-style worked solutions (docs/method.md §20.1, issue #30 deliverable 2).

- the ``<<...>>`` chain recomputed with step s forced (``data/chain.py``) equals a plain computation of
  each solution written here, for several forced values, decimals included;
- on the real 66-pair GSM8K file (read from ../shared when present): hand-written solutions of a few
  pairs give the file's clean answer, and forcing the clean chain's step to the corrupted side's value
  gives the file's corrupted answer;
- ambiguous references (two earlier equal results, a result also written in the question) and the
  other issues skip the problem; the run counts them (``results/das_chains.json``) as the plain rule
  here does;
- ``--experiments das --questions`` on the shipped model writes das.parquet whose counterfactuals are
  the synthetic programs' (``program_results(..., forced=...)``, an independent evaluator);
- a set without a usable chain, or a column variable without pairs, is one line.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pandas as pd
import pytest

from latentpatch.data.chain import Chain, parse_chain
from latentpatch.data.gsm8k import parse_worked_solution, record_annotations
from latentpatch.data.synthetic import program_results
from latentpatch.errors import LatentPatchError

REAL_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_clean_corrupted_pairs.json"


def chain_of(question: str, solution: str) -> Chain | str:
    _, answer = parse_worked_solution(solution)
    return parse_chain(record_annotations({"answer": solution}, "gsm8k"), answer, question)


# ---- the recomputation against plain computations -----------------------------------------------
JANET = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
    "How much in dollars does she make every day at the farmers' market?",
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18",
    {0: lambda v: v * 2, 1: lambda v: v},
)
BETTY = (
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her "
    "parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How "
    "much more money does Betty need to buy the wallet?",
    "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her 15 * 2 = "
    "$<<15*2=30>>30.\nThis means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5",
    {0: lambda v: 100 - v - 30 - 15, 1: lambda v: 100 - 50 - v - 15, 2: lambda v: v},
)
JAMES = (
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "He writes each friend 3*2=<<3*2=6>>6 pages a week\nSo he writes 6*2=<<6*2=12>>12 pages every week\n"
    "That means he writes 12*52=<<12*52=624>>624 pages a year\n#### 624",
    {0: lambda v: v * 2 * 52, 1: lambda v: v * 52, 2: lambda v: v},
)
WENG = (
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
    "$<<0.2x50=10>>10.\n#### 10",
    {0: lambda v: v * 50, 1: lambda v: v},
)
#: Step 1 does not use step 0 (a side computation): forcing step 0 leaves the answer.
SIDE = (
    "Ann has 7 red and 5 blue pens, and 4 boxes of 3 pencils. How many pencils does she have?",
    "Pens: 7+5=<<7+5=12>>12.\nPencils: 4*3=<<4*3=12>>12.\n#### 12",
    None,
)


@pytest.mark.parametrize("case", [JANET, BETTY, JAMES, WENG], ids=["janet", "betty", "james", "weng"])
def test_forced_chain_equals_the_plain_computation(case):
    question, solution, plain = case
    chain = chain_of(question, solution)
    assert isinstance(chain, Chain)
    _, answer = parse_worked_solution(solution)
    for step, f in plain.items():
        for v in (1, 7, 30, 0.25):
            got = chain.forced(step, v)
            assert got == pytest.approx(f(v), abs=1e-12), (step, v, got)
        assert chain.forced(step, chain.results[step]) == answer  # forcing the stated value changes nothing
    assert chain.forced(len(plain), 3) is None  # not a step


def test_a_step_the_answer_does_not_use():
    question, solution, _ = SIDE
    # the two results are equal but neither step references the other (no earlier step for step 0,
    # and step 1's literals 4 and 3 equal no earlier result): not ambiguous
    chain = chain_of(question, solution)
    assert isinstance(chain, Chain) and chain.forced(0, 20) == 12 and chain.forced(1, 20) == 20


def test_ambiguous_and_unusable_chains_are_named():
    # 6 is the result of step 0 and of step 1: step 2's 6 cannot be placed
    assert parse_chain([("2*3", "6"), ("1+5", "6"), ("6*2", "12")], 12, "") == "ambiguous"
    # 24 is step 0's result and also a number of the question (the given quantity, or the result?)
    assert parse_chain([("6*4", "24"), ("24+1", "25")], 25, "6 boxes of 4, and 24 loose ones, plus 1") == "ambiguous"
    assert parse_chain([("6*4", "24"), ("24+1", "25")], 25, "6 boxes of 4 plus 1") != "ambiguous"
    assert parse_chain([("10/3", "3.33")], 3.33, "") == "inconsistent"  # a rounded result
    assert parse_chain([("2**3", "8")], 8, "") == "unparsed"
    assert parse_chain([("2*3", "6")], 5, "") == "no_answer_step"


# ---- the real GSM8K pairs (read-only, when the shared data is present) ----------------------------
#: Hand-written worked solutions of three pairs of the shared file, from the number that varies.
REAL_SOLUTIONS = {
    r"ducks lay (\d+) eggs": lambda n: (
        f"She sells {n}-3-4=<<{n}-3-4={n - 7}>>{n - 7} eggs.\n"
        f"She makes {n - 7}*2=<<{n - 7}*2={2 * (n - 7)}>>{2 * (n - 7)} dollars.\n#### {2 * (n - 7)}"
    ),
    r"Charleston has (\d+) times": lambda n: (
        f"Charleston has {n}*20=<<{n}*20={20 * n}>>{20 * n}.\n"
        f"Toulouse has 2*{20 * n}=<<2*{20 * n}={40 * n}>>{40 * n}.\n"
        f"Together 20+{40 * n}+{20 * n}=<<20+{40 * n}+{20 * n}={60 * n + 20}>>{60 * n + 20}.\n#### {60 * n + 20}"
    ),
    r"during his (\d+)-mile": lambda n: (
        f"The second stop is at {n}-15=<<{n}-15={n - 15}>>{n - 15} miles.\n"
        f"He travelled {n - 15}-20=<<{n - 15}-20={n - 35}>>{n - 35} miles.\n#### {n - 35}"
    ),
}


@pytest.mark.skipif(not REAL_PAIRS.is_file(), reason="the shared GSM8K pair file is absent")
def test_real_pairs_counterfactual_is_the_corrupted_answer():
    records = json.loads(REAL_PAIRS.read_text())
    by_pair: dict = {}
    for r in records:
        by_pair.setdefault(r["pair_id"], {})[r["variant"]] = r
    checked = 0
    for pattern, solve in REAL_SOLUTIONS.items():
        found = [p for p in by_pair.values() if re.search(pattern, p["clean"]["question"])]
        assert len(found) == 1, pattern
        clean, corrupted = found[0]["clean"], found[0]["corrupted"]
        chains = []
        for side in (clean, corrupted):
            n = int(re.search(pattern, side["question"]).group(1))
            chain = chain_of(side["question"], solve(n))
            assert isinstance(chain, Chain), (pattern, chain)
            assert chain.forced(0, chain.results[0]) == side["answer"]  # the chain's answer is the file's
            chains.append(chain)
        # interchanging step 0 (the value the corruption changes) gives the corrupted side's answer
        assert chains[0].forced(0, chains[1].results[0]) == corrupted["answer"] != clean["answer"]
        checked += 1
    assert checked == 3


# ---- the run: --experiments das --questions on the shipped model ---------------------------------
def _numbers(text: str) -> set[int]:
    return {int(x) for x in re.findall(r"\d+", text)}


def plain_issue(question: str, program) -> str | None:
    """The ambiguity rule on a synthetic program (its true references are the ``#i`` operands):
    an operand value equal to 2+ earlier results, or to one that the question also writes."""
    from latentpatch.data.synthetic import program_results

    results = program_results(program)
    for i, (_, a, b) in enumerate(program):
        for operand in (a, b):
            value = results[int(operand[1:])] if isinstance(operand, str) else operand
            equal = [j for j in range(i) if results[j] == value]
            if len(equal) > 1 or (equal and value in _numbers(question)):
                return "ambiguous"
    return None


def plain_forced(program, step: int, value: int) -> Fraction | None:
    """The program's last result with ``step`` forced (exact fractions; None if a step is negative)."""
    results: list[Fraction] = []
    for i, (op, a, b) in enumerate(program):
        x, y = (results[int(o[1:])] if isinstance(o, str) else Fraction(o) for o in (a, b))
        r = Fraction(value) if i == step else x + y if op == "add" else x - y if op == "sub" else x * y
        if op == "div" and i != step:
            r = x / y
        if r < 0:
            return None
        results.append(r)
    return results[-1]


def solution_file(root: Path, n_pairs: int) -> tuple[Path, list]:
    """A GSM8K-layout file of the shipped pairs' first ``n_pairs`` (each side's ``cot`` as its worked
    solution, its pair as group) and one unparseable record; the (group, question, program, answer) list."""
    from latentpatch.data.pairs import load_pairs
    from latentpatch.pipeline.selection import default_pairs_path

    problems, records = [], []
    for pair in load_pairs(default_pairs_path())[:n_pairs]:
        for name in ("clean", "corrupted"):
            v = pair.variant(name)
            solution = v.extra["cot"].replace("> <", ">\n<") + f"\n#### {v.answer}"
            records.append({"id": f"{pair.pair_id}/{name}", "group": pair.pair_id, "question": v.question})
            records[-1]["answer"] = solution
            problems.append((pair.pair_id, v.question, v.extra["program"], v.answer))
    records.append({"id": "odd", "question": "What is 2 to the 3?", "answer": "<<2**3=8>>8\n#### 8"})
    path = root / "solutions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, problems


@pytest.mark.parametrize("step", [0, 1, 2])
def test_drawn_examples_are_the_programs_counterfactuals(tmp_path, step):
    """Every example drawn from a GSM8K set (all 57 pairs, the model a stand-in whose prompt ids name the
    question) has the counterfactual of the synthetic program with that step forced, computed here."""
    from types import SimpleNamespace

    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.das import draw_examples
    from latentpatch.pipeline.das_questions import question_problems
    from latentpatch.pipeline.progress import RunProgress

    path, problems = solution_file(tmp_path, 57)
    index = {q: i for i, (_, q, _, _) in enumerate(problems)}
    model = SimpleNamespace(prompt_ids=lambda text: [index.get(text, -1)])
    ctx = SimpleNamespace(model=model, paths=SimpleNamespace(results=tmp_path), progress=RunProgress())
    ctx.config = RunConfig(experiments=("das",), questions=str(path))
    examples = draw_examples(question_problems(ctx), ("intermediate", str(step)), 200, 0)
    assert len(examples) >= 50
    for e in examples:
        (group, question, program, answer), source = problems[e.base[0]], problems[e.source[0]]
        assert plain_issue(question, program) is None and plain_issue(source[1], source[2]) is None
        forced = plain_forced(program, step, program_results(source[2])[step])
        assert forced is not None and e.counterfactual == float(forced) != answer and e.group == group != source[0]


@pytest.fixture(scope="module")
def question_run(tmp_path_factory):
    """One short das run on :func:`solution_file` of 24 pairs."""
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    root = tmp_path_factory.mktemp("dasq")
    path, problems = solution_file(root, 24)
    options = dict(experiments=("das",), das_sites="thought.t1", das_k="1", das_steps=2, das_pairs=8)
    out = run_experiments(
        RunConfig(out=str(root / "r"), questions=str(path), threads=1, use_cache=False, **options),
        progress=False,
        command="test",
    )
    return out, problems


def test_sharded_question_run_merges_to_the_unsharded_files(question_run, tmp_path):
    """A shard with sites counts every question's chain and fits its share of the sites (shard 0 the
    one site here, shard 1 none); merge copies the chain counts and joins the sites into the
    unsharded run's das.parquet."""
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.merge import merge_runs
    from latentpatch.pipeline.run import run_experiments

    full, _ = question_run
    config = json.loads((full / "manifest.json").read_text())["config"]
    options = dict(experiments=("das",), das_sites="thought.t1", das_k="1", das_steps=2, das_pairs=8, report=False)
    shards = [
        run_experiments(
            RunConfig(out=str(tmp_path / f"s{i}"), questions=config["questions"], shard=f"{i}/2", threads=1,
                      use_cache=False, **options),
            progress=False,
            command="test",
        )
        for i in range(2)
    ]  # fmt: skip
    merged = merge_runs(shards, tmp_path / "merged", report=False)
    for name in ("results/das_chains.json", "results/das.parquet", "results/das/thought.t1.k1.json"):
        assert (merged / name).read_bytes() == (full / name).read_bytes(), name


def test_run_with_questions_counts_chains(question_run):
    out, problems = question_run
    chains = json.loads((out / "results" / "das_chains.json").read_text())
    ambiguous = sum(plain_issue(q, p) == "ambiguous" for _, q, p, _ in problems)
    assert 0 < ambiguous < len(problems)
    assert chains["questions"] == len(problems) + 1
    assert chains["ambiguous"] == ambiguous and chains["unparsed"] == 1
    assert chains["usable"] == len(problems) - ambiguous


def test_run_with_questions_counterfactuals_are_the_programs(question_run):
    from latentpatch.data.synthetic import program_results

    out, problems = question_run
    table = pd.read_parquet(out / "results" / "das.parquet")
    das = table[table["method"] == "das"]
    assert len(das) >= 1 and set(table["variable"]) == {"intermediate:0"}
    usable = [(g, q, p, a) for g, q, p, a in problems if plain_issue(q, p) is None]
    for row in das.itertuples():
        bases = [(p, a) for g, _, p, a in usable if g == row.group]
        assert bases, row.group  # only usable chains are bases
        # some usable source of another group, its step 0 forced into a base program, gives this value
        possible = {
            plain_forced(p, 0, program_results(src)[0]) for p, _ in bases for g, _, src, _ in usable if g != row.group
        }
        assert row.counterfactual in possible


def test_bad_question_sets_are_one_line(tmp_path):
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    path = tmp_path / "q.jsonl"
    record = {"question": "2 times 3, and 6 more?", "answer": "<<2*3=6>>6 <<6+6=12>>12\n#### 12"}
    path.write_text(json.dumps(record) + "\n")
    options = dict(experiments=("das",), das_sites="thought.t1", das_k="1", das_steps=1, threads=1)
    with pytest.raises(LatentPatchError, match=r"--questions .*none of its 1 questions has a usable .*1 ambiguous"):
        run_experiments(RunConfig(out=str(tmp_path / "a"), questions=str(path), **options), progress=False)
    with pytest.raises(LatentPatchError, match="column:cf with --questions .*needs pairs"):
        config = RunConfig(out=str(tmp_path / "b"), questions=str(path), das_variable="column:cf", **options)
        run_experiments(config, progress=False)
    with pytest.raises(LatentPatchError, match="--questions .*no such file"):
        RunConfig(questions=str(tmp_path / "none.json"), **options).validate()


def test_pair_file_keeps_the_program_path(tmp_path):
    """A pair file given as --questions: both sides with their synthetic programs (the run's path) and the
    synthetic counterfactual (the model is a stand-in: only its prompt ids are read)."""
    from types import SimpleNamespace

    from latentpatch.data.synthetic import program_results
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.das import counterfactual
    from latentpatch.pipeline.das_questions import question_problems
    from latentpatch.pipeline.progress import RunProgress
    from latentpatch.pipeline.selection import default_pairs_path

    model = SimpleNamespace(prompt_ids=lambda text: [len(text)])
    ctx = SimpleNamespace(model=model, paths=SimpleNamespace(results=tmp_path), progress=RunProgress())
    ctx.config = RunConfig(experiments=("das",), questions=str(default_pairs_path()))
    problems = question_problems(ctx)
    assert all(p.program is not None for p in problems) and len({p.group for p in problems}) * 2 == len(problems)
    b, s = problems[0], problems[3]
    expected = program_results(b.program, forced={0: program_results(s.program)[0]})
    assert counterfactual("intermediate", "0", b, s) == (None if expected is None else float(expected[-1]))
    assert not (tmp_path / "das_chains.json").exists()  # only worked solutions are counted
