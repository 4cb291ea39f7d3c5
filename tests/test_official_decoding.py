"""Greedy decoding and question text as the official code does them, per family (docs/checkpoints.md).

Each test builds a tiny checkpoint in the official layout where the family's rule decides the
output, and compares ``LatentModel.generate`` with a plain loop written here from the official
procedure (CODI: ``test.py``; Coconut: ``Coconut.generate``)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import tiny_text_model
from test_loading import V, base_lm, load, make_codi, save_base, save_ckpt

from latentpatch.model.config import LatentConfig
from latentpatch.model.load import load_model
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference
from latentpatch.patching.specs import EngineConfig, layer_specs, position_specs

EOS = 2  # the tiny bases' eos id
N_NEW = 12


@torch.no_grad()
def codi_official_tokens(module, prompt: list[int], k: int, eot: int, n: int) -> list[int]:
    """CODI ``test.py`` (greedy, remove_eos): cached prompt pass, ``prj`` of the last hidden state
    K times, [EOT], then ``argmax(logits[:, -1, :vocab_size - 1])`` until [EOS] (kept in the list)."""
    lm = module.codi
    out = lm(input_ids=torch.tensor([prompt]), use_cache=True, output_hidden_states=True)
    pkv, latent = out.past_key_values, module.prj(out.hidden_states[-1][:, -1:])
    for _ in range(k):
        out = lm(inputs_embeds=latent, use_cache=True, output_hidden_states=True, past_key_values=pkv)
        pkv, latent = out.past_key_values, module.prj(out.hidden_states[-1][:, -1:])
    emb = lm.get_input_embeddings()
    step_in = emb(torch.tensor([[eot]]))
    tokens: list[int] = []
    for _ in range(n):
        out = lm(inputs_embeds=step_in, use_cache=True, past_key_values=pkv)
        pkv = out.past_key_values
        nxt = int(out.logits[:, -1, : lm.config.vocab_size - 1].argmax(-1))
        tokens.append(nxt)
        if nxt == EOS:
            break
        step_in = emb(torch.tensor([[nxt]]))
    return tokens


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_codi_bans_only_the_last_row(tmp_path, family):
    """A row whose argmax is [PAD]: CODI emits it (only [EOT] = the last row is removed)."""
    module, _ = make_codi(family, tie=False)
    lm = module.codi.base_model.model
    prompt = [5, 6, 7, 8, V + 1]
    first = codi_official_tokens(module, prompt, 3, V + 2, 1)[0]
    with torch.no_grad():  # [PAD]'s head row: a scaled copy of the first answer token's
        lm.get_output_embeddings().weight[V] = 4.0 * lm.get_output_embeddings().weight[first]
        lm.get_output_embeddings().weight[EOS] *= 1.5
    want = codi_official_tokens(module, prompt, 3, V + 2, N_NEW)
    assert V in want, "the test must make [PAD] the greedy choice somewhere"
    m = load(family, save_ckpt(module.state_dict(), tmp_path / "ckpt"), save_base(tmp_path, family))
    assert m.config.decoding == "codi" and m.config.question_text == "codi"
    r = m.rollout([prompt])
    got = m.generate(r.state, r.answer_logits, N_NEW)[0]
    assert got == [t for t in want if t != EOS]  # ours leaves the stopping [EOS] out
    legacy = dataclasses.replace(m.config, decoding="latentpatch")  # the old rule bans [PAD] and differs
    m.config = legacy
    assert V not in m.generate(r.state, r.answer_logits, N_NEW)[0]


@torch.no_grad()
def coconut_official_tokens(lm, prompt: list[int], k: int, end: int, n: int) -> list[int]:
    """Coconut ``generate``: latent positions take the previous position's last hidden state, then
    the first token is ``argmax`` (kept whatever it is); later ones stop at [EOS]. No id is banned."""
    emb = lm.get_input_embeddings()
    seq = emb(torch.tensor([prompt]))
    for _ in range(k):
        seq = torch.cat([seq, lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][:, -1:]], 1)
    seq = torch.cat([seq, emb(torch.tensor([[end]]))], 1)
    tokens = [int(lm(inputs_embeds=seq).logits[0, -1].argmax())]
    for _ in range(n - 1):
        seq = torch.cat([seq, emb(torch.tensor([[tokens[-1]]]))], 1)
        nxt = int(lm(inputs_embeds=seq).logits[0, -1].argmax())
        if nxt == EOS:
            break
        tokens.append(nxt)
    return tokens


@torch.no_grad()
def last_hidden(lm, prompt: list[int], k: int, end: int, tokens: list[int]) -> torch.Tensor:
    """[d] final hidden state after the Coconut sequence (prompt, K latents, end, tokens)."""
    emb = lm.get_input_embeddings()
    seq = emb(torch.tensor([prompt]))
    for _ in range(k):
        seq = torch.cat([seq, lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][:, -1:]], 1)
    seq = torch.cat([seq, emb(torch.tensor([[end] + tokens]))], 1)
    return lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][0, -1]


def test_coconut_stops_at_eos_and_never_bans_it(tmp_path):
    """pad == eos in Coconut: [EOS] must stay choosable and stop decoding where the official loop does."""
    prompt, K = [5, 6, 7, V], 3
    lm = base_lm("llama")  # untied head: [EOS]'s output row can change without moving its input row
    lm.resize_token_embeddings(V + 3, mean_resizing=False)
    first = coconut_official_tokens(lm, prompt, K, V + 1, 1)
    h0, h1 = last_hidden(lm, prompt, K, V + 1, []), last_hidden(lm, prompt, K, V + 1, first)
    orth = h1 - (h1 @ h0) / (h0 @ h0) * h0  # zero logit at step 0, a large one at step 1
    with torch.no_grad():
        lm.get_output_embeddings().weight[EOS] = 50.0 * orth / (orth @ orth).sqrt()
    want = coconut_official_tokens(lm, prompt, K, V + 1, N_NEW)
    assert want == first, "the test must make the greedy path reach [EOS] at step 1"
    sd = {"base_causallm." + k: v for k, v in lm.state_dict().items()}
    sd["embedding.weight"] = lm.get_input_embeddings().weight
    torch.save(sd, tmp_path / "checkpoint_3")
    m = load_model(f"coconut:{tmp_path / 'checkpoint_3'}", base=str(save_base(tmp_path, "llama")), num_latent=K)
    assert m.config.pad_id == m.config.eos_id == EOS and m.config.banned_ids(V + 3) == []
    r = m.rollout([prompt])
    assert m.generate(r.state, r.answer_logits, N_NEW)[0] == want
    m.config = dataclasses.replace(m.config, decoding="latentpatch")  # the old rule: pad (= eos) banned
    assert len(m.generate(r.state, r.answer_logits, N_NEW)[0]) == N_NEW  # runs to the token limit


def test_coconut_keeps_a_first_eos():
    cfg = LatentConfig(2, 0, 1, 2, 0, decoding="coconut")
    assert not cfg.eos_stops(0) and cfg.eos_stops(1)
    assert LatentConfig(2, 0, 1, 2, 0).eos_stops(0)


def test_rules_and_their_defaults():
    base = LatentConfig(2, 10, 11, 12, 3)
    assert base.banned_ids(13) == [10, 11, 12] and "decoding" not in base.to_dict()
    codi = dataclasses.replace(base, decoding="codi", question_text="codi")
    assert codi.banned_ids(13) == [12] and codi.to_dict()["decoding"] == "codi"
    with pytest.raises(ValueError, match="decoding"):
        LatentConfig(2, 10, 11, 12, 3, decoding="nucleus")


def test_question_text_per_family():
    q = "  Tom has\t16  eggs,   eats 3.\n "
    assert LatentConfig(2, 0, 1, 2, 0).question_string(q) == "Tom has 16 eggs, eats 3."
    # CODI's test.py: strip, then each double space -> one (three spaces leave two; tabs stay)
    assert LatentConfig(2, 0, 1, 2, 0, question_text="codi").question_string(q) == "Tom has\t16 eggs,  eats 3."
    assert LatentConfig(2, 0, 1, 2, 0, question_text="raw").question_string(q) == q


@pytest.mark.parametrize("rule", ["codi", "coconut"])
def test_engine_shortcut_follows_the_rule(rule):
    """The fast engine's teacher-forced shortcut agrees with step-by-step decoding under each rule."""
    m = tiny_text_model("llama")
    m.config = dataclasses.replace(m.config, decoding=rule, max_answer_tokens=8)
    if rule == "coconut":
        m.config.pad_id = m.config.eos_id
    with torch.no_grad():  # make the special rows attractive so the rule matters
        head = m.lm.get_output_embeddings().weight
        head[m.config.pad_id] = head[m.config.pad_id] * 3.0
    qc, ac, qr, ar = "Tom has 16 eggs and eats 3.", 13, "Tom has 17 eggs and eats 3.", 14
    clean, corr = record_run(m, m.prompt_ids(qc)), record_run(m, m.prompt_ids(qr))
    base = prepare_pair(m, "0", clean, corr, ac, ar, "denoise")
    specs = layer_specs(m.n_layers, m.num_latent, "resid_out") + position_specs(m.n_layers, m.num_latent, "resid_out")
    values = replacement_values(base, EngineConfig())
    fast = sweep_fast(m, base, specs, values, EngineOptions(batch_size=5))
    ref = sweep_reference(m, base, specs, values)
    for x, y in zip(fast, ref):
        assert x["pred_answer"] == y["pred_answer"] or (
            isinstance(x["pred_answer"], float) and math.isnan(x["pred_answer"]) and math.isnan(y["pred_answer"])
        )
