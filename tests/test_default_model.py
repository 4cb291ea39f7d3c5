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
    'Sofia saves 12 dollars every week for 3 weeks. She spends 18 dollars on a gift and shares the rest equally with 2 friends, so 3 people get the same amount. How many dollars does each person get?':
        6.0,
    'A bus leaves with 39 passengers. At the first stop 4 people get off and 5 get on. At the second stop 11 people get off and 13 get on. How many passengers are on the bus now?':
        40.0,
    'Emma bakes 36 cookies and eats 10 of them. She packs the rest in bags of 2 and sells each bag for 4 dollars. Then she spends 20 dollars on flour. How many dollars does Emma have left?':
        30.0,
    'Tom bakes 47 cookies and eats 11 of them. He packs the rest in bags of 2 and sells each bag for 2 dollars. Then he spends 6 dollars on flour. How many dollars does Tom have left?':
        30.0,
    'Jack reads 16 pages on Monday and 12 pages on Tuesday. On Wednesday he reads 2 times as many pages as on Monday. How many pages does Jack read in the three days?':
        60.0,
}


def _load():
    from latentpatch.evaluate import load_latent_model

    return load_latent_model("default")


def test_layout_and_size():
    from safetensors.torch import load_file

    total = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert total <= 20 * 2**20
    meta = json.loads((MODEL_DIR / "latentpatch.json").read_text())
    for k in ("format", "family", "num_latent", "pad_id", "bot_id", "eot_id", "eos_id", "remove_eos",
              "answer_prefix", "question_template", "add_special_tokens", "max_answer_tokens", "prj_dim", "prj_ln"):
        assert k in meta
    assert meta["format"] == "latentpatch-codi/1" and meta["family"] == "llama"
    keys = set(load_file(str(MODEL_DIR / "model.safetensors")))
    assert {"prj.1.weight", "prj.1.bias", "prj.3.weight", "prj.3.bias", "prj.ln.weight", "prj.ln.bias"} <= keys
    assert all(k.startswith(("codi.model.", "prj.")) for k in keys)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (MODEL_DIR / f).is_file()


def test_reproduces_stored_answers():
    if not EXPECTED:
        pytest.skip("no stored answers")
    lm = _load()
    qs = list(EXPECTED)
    got = lm.answer(qs)
    assert got == [EXPECTED[q] for q in qs]
