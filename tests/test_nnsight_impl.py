"""bench/nnsight_impl.py (the nnsight position sweep) equals a plain rollout-with-writes computation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nnsight")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import VOCAB, tiny_latent_model  # noqa: E402

from bench.nnsight_impl import TokenPair, nnsight_position_sweep  # noqa: E402
from latentpatch.data.pairs import Pair, Variant  # noqa: E402
from latentpatch.model.latent import extract_number  # noqa: E402
from latentpatch.model.sites import Write  # noqa: E402
from latentpatch.patching.metrics import AnswerLogits, answer_logit_diff, answer_metrics  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: threads only add contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


KEYS = ("kl", "logit_l2", "answer_logit_diff", "answer_logprob_diff", "recovery")


class CharTokenizer:
    """Test-only tokenizer: digits '0'..'9' -> 3..12, 'a'..'z' -> 13..38, ' ' -> 39."""

    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz "

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + self.alphabet.index(ch) for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i - 3] if 3 <= i < VOCAB else "" for i in ids)


def _logits(model, rollout, strings):
    (base, bs), (clean, cs), (corr, ks) = strings
    scored = model.score(rollout.state, rollout.answer_logits, [[base, clean, corr]])[0]
    gen = model.generate(rollout.state, rollout.answer_logits)[0]
    pred = extract_number(model.decode(gen)) if model.tokenizer is not None else None
    return AnswerLogits(*scored, base, clean, corr, bs, cs, ks, pred), gen


@torch.no_grad()
def reference_cell(model, tp: TokenPair, component: str, layer: int, p: int) -> dict:
    """Plain computation: model.rollout with a Write at latent p, then score + generate."""
    clean = model.rollout([tp.clean_prompt], record=[(component, layer)])
    value = clean.hooks.recorded(component, layer)[:, clean.prompt_len + p]
    corrupted = model.rollout([tp.corrupted_prompt])
    base_ids = model.generate(corrupted.state, corrupted.answer_logits)[0] or [model.config.eos_id]
    start = model.number_start(base_ids) if model.tokenizer is not None else 0
    strings = [(base_ids, start), tp.clean_ids, tp.corr_ids]
    baseline, _ = _logits(model, corrupted, strings)
    ld_source = answer_logit_diff(_logits(model, clean, strings)[0])
    write = Write(component, layer, torch.tensor([corrupted.prompt_len + p]), torch.tensor([True]), value)
    patched, gen = _logits(model, model.rollout([tp.corrupted_prompt], writes=[write]), strings)
    m = answer_metrics(patched, baseline, answer_logit_diff(baseline), ld_source, tp.clean_answer, tp.corrupted_answer)
    m["answer_ids"] = gen
    return m


def assert_same(got: dict, want: dict) -> None:
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-4, nan_ok=True), k
    for k in ("pred_answer", "pred_is_clean", "pred_is_corrupted", "answer_ids"):
        assert got[k] == want[k], k


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "component", ["resid_out"] + [pytest.param(c, marks=pytest.mark.slow) for c in ("resid_pre", "attn_out", "mlp_out")]
)
def test_nnsight_sweep_equals_plain_writes(family, component):
    m = tiny_latent_model(family)
    tp = TokenPair(
        "p0", m.prompt_ids([5, 6, 7, 8, 9]), m.prompt_ids([30, 21, 17, 28]), 7.0, 9.0, ([10, 11], 0), ([12, 13, 14], 0)
    )
    layers, positions = [0, 2], [0, 1, 3]
    got = nnsight_position_sweep(m, [tp], component, layers=layers, positions=positions)
    assert set(got) == {("p0", layer, p) for layer in layers for p in positions}
    for layer, p in [(0, 0), (2, 1), (0, 3)]:
        assert_same(got[("p0", layer, p)], reference_cell(m, tp, component, layer, p))
    # the patches do something (a no-op implementation would give KL = 0 everywhere)
    assert max(r["logit_l2"] for r in got.values()) > 1e-4


def test_pairs_with_tokenizer():
    m = tiny_latent_model("llama")
    m.tokenizer = CharTokenizer()
    m.config.answer_prefix = "a "
    pair = Pair("7", Variant("abc 12 de", 12), Variant("abc 15 de", 15))
    got = nnsight_position_sweep(m, [pair], layers=[1], positions=[0, 2])
    tp = TokenPair(
        "7", m.prompt_ids("abc 12 de"), m.prompt_ids("abc 15 de"), 12.0, 15.0, m.answer_ids(12), m.answer_ids(15)
    )
    assert tp.clean_ids == ([13, 39, 4, 5], 2)
    for p in (0, 2):
        assert_same(got[("7", 1, p)], reference_cell(m, tp, "resid_out", 1, p))
