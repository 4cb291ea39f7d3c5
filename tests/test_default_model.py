"""The shipped default model loads with the tool's loader and reproduces stored answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import latentpatch

MODEL_DIR = Path(latentpatch.__file__).parent / "default_model"
pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(), reason="default model not shipped")

# question -> answer the shipped model generated (computed once from the shipped weights with
# LatentModel.answer, fp32 CPU). Regenerate if the model is retrained.
EXPECTED: dict = {
    (
        "A bus leaves with 34 passengers. "
        "At the first stop 7 people get off and 1 get on. "
        "At the second stop 5 people get off and 9 get on. "
        "How many passengers are on the bus now?"
    ): 32.0,  # ground truth 32
    (
        "A notebook costs 6 dollars. "
        "Nora buys 4 notebooks and uses a coupon worth 9 dollars. "
        "Then she pays 12 dollars for lunch. "
        "How many dollars does Nora spend in total?"
    ): 27.0,  # ground truth 27
    (
        "Leo bakes 29 cookies and eats 4 of them. "
        "He packs the rest in bags of 5 and sells each bag for 5 dollars. "
        "Then he spends 9 dollars on flour. "
        "How many dollars does Leo have left?"
    ): 16.0,  # ground truth 16
    (
        "Sam bakes 32 cookies and eats 2 of them. "
        "He packs the rest in bags of 3 and sells each bag for 2 dollars. "
        "Then he spends 4 dollars on flour. "
        "How many dollars does Sam have left?"
    ): 16.0,  # ground truth 16
    (
        "A ticket costs 6 dollars. "
        "Nora buys 4 tickets and uses a coupon worth 8 dollars. "
        "Then she pays 4 dollars for lunch. "
        "How many dollars does Nora spend in total?"
    ): 20.0,  # ground truth 20
}


def _load():
    from latentpatch.model.load import load_model

    return load_model("default")


def test_layout_and_size():
    from safetensors.torch import load_file

    total = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert total <= 20 * 2**20
    meta = json.loads((MODEL_DIR / "latentpatch.json").read_text())
    for k in (
        "format",
        "family",
        "num_latent",
        "pad_id",
        "bot_id",
        "eot_id",
        "eos_id",
        "remove_eos",
        "answer_prefix",
        "question_template",
        "add_special_tokens",
        "max_answer_tokens",
        "prj_dim",
        "prj_ln",
    ):
        assert k in meta
    assert meta["format"] == "latentpatch-codi/1" and meta["family"] == "llama"
    keys = set(load_file(str(MODEL_DIR / "model.safetensors")))
    assert {"prj.1.weight", "prj.1.bias", "prj.3.weight", "prj.3.bias", "prj.ln.weight", "prj.ln.bias"} <= keys
    assert all(k.startswith(("codi.model.", "prj.")) for k in keys)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (MODEL_DIR / f).is_file()


def test_readme_example_prints_the_models_answer():
    """The README's Python example shows the shipped model's actual output for its question."""
    import ast
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    m = re.search(
        r"question = (\(.*?\))\nprint\(model\.answer\(\[question\]\)\)  # the shipped model prints: (\[.*?\])",
        readme,
        re.S,
    )
    assert m, "README: the Python example's question and printed answer not found"
    question, shown = ast.literal_eval(m.group(1)), ast.literal_eval(m.group(2))
    assert _load().answer([question]) == shown


def test_reproduces_stored_answers():
    if not EXPECTED:
        pytest.skip("no stored answers")
    lm = _load()
    qs = list(EXPECTED)
    got = lm.answer(qs)
    assert got == [EXPECTED[q] for q in qs]


# thought_signature (docs/method.md §13) of the shipped model on the first SIGNATURE_PAIRS default
# pairs with their intermediates, stored once from the shipped weights (fp32 CPU, one thread).
SIGNATURE_PAIRS = 20
EXPECTED_SIGNATURE: dict = {
    "n_pairs": 19,
    "source_answer": 1.0,
    "same_flip": 0.09803921568627451,
    "diff_flip": 0.9692307692307692,
    "cells": [[0, 1], [1, 2], [2, 3], [3, 4]],
}


def test_answers_follow_the_thoughts(tmp_path):
    """The shipped model's answers follow its thoughts (issue target: clean thoughts give the clean
    answer, a different-value donor flips the answer and a same-value one does not)."""
    import torch

    from latentpatch.analysis.step_stats import read_steps, thought_signature
    from latentpatch.data.pairs import save_pairs
    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    pairs = generate_pairs(57, seed=0, intermediates=True)[:SIGNATURE_PAIRS]
    save_pairs(pairs, tmp_path / "pairs.json")
    cfg = RunConfig(
        pairs=str(tmp_path / "pairs.json"),
        experiments=("thought", "intermediate"),
        out=str(tmp_path / "run"),
        use_cache=False,
        threads=1,
    )
    sig = thought_signature(read_steps(run_experiments(cfg, progress=False, command="test"))[0])
    # plain computation of the first number: one rollout per pair, every thought fed from the clean run
    lm = _load()
    right, follows = 0, 0
    with torch.no_grad():
        for p in pairs:
            clean = lm.rollout([p.clean.question])
            if lm.answer([p.clean.question]) != [p.clean.answer]:
                continue
            if lm.answer([p.corrupted.question]) != [p.corrupted.answer]:
                continue
            right += 1
            got = lm.answer([p.corrupted.question], **lm.thought_ablation(clean.thoughts, 1))
            follows += got == [p.clean.answer]
    assert sig["n_pairs"] == right and sig["source_answer"] == pytest.approx(follows / right)
    assert sig.pop("cells") == EXPECTED_SIGNATURE["cells"]
    assert sig == pytest.approx({k: v for k, v in EXPECTED_SIGNATURE.items() if k != "cells"})
    # the signature of thoughts that hold values, met on these pairs (all 57: the model card);
    # each intermediate s is held at thought s + 1, where the training puts it
    assert sig["source_answer"] >= 0.7 and sig["same_flip"] < 0.10 and sig["diff_flip"] > 0.50
