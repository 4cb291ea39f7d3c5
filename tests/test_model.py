"""The model layer: real latent rollout vs an independent plain loop, sites, batch invariance."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, tiny_latent_model

from latentpatch.model.config import extract_number
from latentpatch.model.sites import COMPONENTS, ActivationHooks, Site, Write, hooked_module, model_family
from latentpatch.model.sites import FAMILIES as LAYOUTS

FAMILIES = ["llama", "gpt2"]


def plain_rollout(m, prompt: list[int]):
    """Independent reference: no KV cache, the whole sequence re-run at every step, through the
    LM's own forward and ``hidden_states[-1]``. Returns (thoughts [K, d], answer logits [V])."""
    lm = m.lm
    emb = lm.get_input_embeddings()
    seq = emb(torch.tensor([prompt]))
    thoughts = []
    for _ in range(m.num_latent):
        out = lm(inputs_embeds=seq, output_hidden_states=True)
        t = m.prj(out.hidden_states[-1][:, -1])
        thoughts.append(t[0])
        seq = torch.cat([seq, t[:, None]], 1)
    seq = torch.cat([seq, emb(torch.tensor([m.answer_start_ids()]))], 1)
    logits = lm(inputs_embeds=seq).logits[0, -1]
    return torch.stack(thoughts), logits, seq


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("remove_eos", [True, False])
@torch.no_grad()
def test_rollout_equals_plain_loop(family, remove_eos):
    m = tiny_latent_model(family, remove_eos=remove_eos)
    prompts = [m.prompt_ids([5, 6, 7, 8, 9]), m.prompt_ids([11, 12])]
    r = m.rollout(prompts)
    for b, p in enumerate(prompts):
        thoughts, logits, _ = plain_rollout(m, p)
        assert torch.allclose(r.thoughts[b], thoughts, atol=1e-5), (r.thoughts[b] - thoughts).abs().max()
        assert torch.allclose(r.answer_logits[b], logits, atol=1e-5), (r.answer_logits[b] - logits).abs().max()
    # thoughts really change from step to step (a pad-token "rollout" would not produce these)
    assert (r.thoughts[:, 1:] - r.thoughts[:, :-1]).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_batch_invariance(family):
    m = tiny_latent_model(family)
    a, b, c = [5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]
    alone = m.rollout([m.prompt_ids(a)])
    for batch in ([a, b], [c, a, b], [b, c, a]):
        r = m.rollout([m.prompt_ids(x) for x in batch])
        i = batch.index(a)
        assert torch.allclose(r.thoughts[i], alone.thoughts[0], atol=1e-5)
        assert torch.allclose(r.answer_logits[i], alone.answer_logits[0], atol=1e-5)
    g_alone = m.generate(alone.state, alone.answer_logits, 6)
    r = m.rollout([m.prompt_ids(x) for x in (b, a)])
    assert m.generate(r.state, r.answer_logits, 6)[1] == g_alone[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("component", COMPONENTS)
@torch.no_grad()
def test_writing_own_values_changes_nothing(family, component):
    m = tiny_latent_model(family)
    prompts = [m.prompt_ids([5, 6, 7, 8]), m.prompt_ids([9, 10])]
    keys = [(component, layer) for layer in range(m.n_layers)]
    base = m.rollout(prompts, record=keys)
    T = base.prompt_len
    writes = []
    for layer in range(m.n_layers):
        act = base.hooks.recorded(component, layer)  # [B, T_total, d]
        for pos in range(T + m.num_latent):
            idx = torch.full((2,), pos)
            writes.append(Write(component, layer, idx, torch.ones(2, dtype=torch.bool), act[:, pos]))
    patched = m.rollout(prompts, writes=writes)
    assert torch.allclose(patched.answer_logits, base.answer_logits, atol=1e-6)
    assert torch.allclose(patched.thoughts, base.thoughts, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_resid_pre_layer0_everywhere_reproduces_source(family):
    m = tiny_latent_model(family)
    clean, corrupted = m.prompt_ids([5, 6, 7, 8]), m.prompt_ids([5, 6, 17, 8])  # same length
    src = m.rollout([clean], record=[("resid_pre", 0)])
    act = src.hooks.recorded("resid_pre", 0)[0]  # [T_total, d]
    tgt = m.rollout([corrupted])
    assert (tgt.answer_logits - src.answer_logits).abs().max() > 1e-3  # they differ to begin with
    writes = [
        Write("resid_pre", 0, torch.tensor([pos]), torch.tensor([True]), act[pos][None]) for pos in range(act.shape[0])
    ]
    patched = m.rollout([corrupted], writes=writes)
    assert (patched.answer_logits - src.answer_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_recorded_sites_match_model_internals(family):
    """resid_out of the last block, after the final norm, is the hidden state the thought comes from;
    resid_out = resid_pre + attn_out + mlp_out for a pre-norm block (LLaMA and GPT-2 both)."""
    m = tiny_latent_model(family)
    L = m.n_layers - 1
    keys = [(c, layer) for c in COMPONENTS for layer in range(m.n_layers)]
    r = m.rollout([m.prompt_ids([5, 6, 7])], record=keys)
    norm = m.backbone.norm if family == "llama" else m.backbone.ln_f
    lat = slice(r.prompt_len, r.prompt_len + m.num_latent)
    out_last = r.hooks.recorded("resid_out", L)[0, lat]
    assert torch.allclose(norm(out_last), r.latent_hidden[0], atol=1e-5)
    for layer in range(m.n_layers):
        pre, attn, mlp, out = (r.hooks.recorded(c, layer)[0] for c in ("resid_pre", "attn_out", "mlp_out", "resid_out"))
        assert torch.allclose(pre + attn + mlp, out, atol=1e-5)
        if layer + 1 < m.n_layers:
            assert torch.allclose(out, r.hooks.recorded("resid_pre", layer + 1)[0], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_last_layer_latent_patch_reaches_later_thoughts_only_through_recurrence(family):
    """resid_out of the last block at latent p is attended by nothing; it changes thought p+1."""
    m = tiny_latent_model(family)
    prompt = m.prompt_ids([5, 6, 7])
    base = m.rollout([prompt])
    L, p = m.n_layers - 1, 1
    w = Write("resid_out", L, torch.tensor([base.latent_index(p)]), torch.tensor([True]), torch.randn(1, m.d_model))
    r = m.rollout([prompt], writes=[w])
    assert torch.allclose(r.thoughts[0, : p + 1], base.thoughts[0, : p + 1], atol=1e-6)  # up to p untouched
    assert (r.thoughts[0, p + 1] - base.thoughts[0, p + 1]).abs().max() > 1e-3  # next thought changed
    # and with the recurrent path frozen at the baseline's thoughts, nothing downstream changes
    mask = torch.zeros(1, m.num_latent, dtype=torch.bool)
    mask[0, p + 1 :] = True
    frozen = m.rollout([prompt], writes=[w], thought_override=base.thoughts, override_mask=mask)
    assert torch.allclose(frozen.answer_logits, base.answer_logits, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_score_equals_full_sequence_logits(family):
    m = tiny_latent_model(family)
    prompt = m.prompt_ids([5, 6, 7, 8])
    r = m.rollout([prompt, m.prompt_ids([3, 4])])
    conts = [[[20, 21, 22], [23]], [[24, 25], [26, 27, 28, 29]]]
    scored = m.score(r.state, r.answer_logits, conts)
    _, _, seq = plain_rollout(m, prompt)
    for c, cont in enumerate(conts[0]):
        full = torch.cat([seq, m.lm.get_input_embeddings()(torch.tensor([cont[:-1]], dtype=torch.long))], 1)
        ref = m.lm(inputs_embeds=full).logits[0, -len(cont) :]
        assert scored[0][c].shape == (len(cont), m.vocab_size)
        assert torch.allclose(scored[0][c], ref, atol=1e-5)
    # the state is not consumed: scoring twice gives the same numbers
    again = m.score(r.state, r.answer_logits, conts)
    assert torch.equal(again[1][1], scored[1][1])


@torch.no_grad()
def test_generate_is_greedy_and_stops_at_eos():
    m = tiny_latent_model("llama")
    r = m.rollout([m.prompt_ids([5, 6, 7])])
    ids = m.generate(r.state, r.answer_logits, 5)[0]
    # greedy: re-score the generated ids and check every one is the argmax (with specials banned)
    logits = m.score(r.state, r.answer_logits, [[ids]])[0][0]
    banned = [VOCAB, VOCAB + 1, VOCAB + 2]
    logits[:, banned] = float("-inf")
    assert logits.argmax(-1).tolist() == ids
    assert m.config.eos_id not in ids


def test_extract_number():
    assert extract_number("The answer is: 1,234") == 1234.0
    assert extract_number("The answer is: -3.5") == -3.5
    assert extract_number("no number") is None


def test_site_validation():
    assert str(Site("resid_out", 2, 3)) == "resid_out.L2.latent3"
    with pytest.raises(ValueError):
        Site("resid_mid", 0, 0)
    m = tiny_latent_model("llama")
    with pytest.raises(ValueError):
        ActivationHooks(m.lm, record=[("resid_out", m.n_layers)])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_table_names_the_hooked_modules(family):
    m = tiny_latent_model(family)
    assert model_family(m.lm) == m.family == family
    layout, block = LAYOUTS[family], m.blocks[1]
    expected = {
        "resid_pre": (block, "input"),
        "resid_out": (block, "output"),
        "attn_out": (getattr(block, layout.attn), "output"),
        "mlp_out": (getattr(block, layout.mlp), "output"),
    }
    for component in COMPONENTS:
        module, kind = hooked_module(m.lm, component, 1)
        assert module is expected[component][0] and kind == expected[component][1], component


def test_unknown_model_tree_is_refused():
    with pytest.raises(TypeError, match="unsupported model tree"):
        model_family(torch.nn.Linear(2, 2))


def test_every_component_has_a_hook_and_every_family_its_modules():
    """The component names of the run directory (names.COMPONENTS) are exactly the hookable ones,
    and each family's layout names modules that exist in a model of that family."""
    from latentpatch.model.loaders import random_model
    from latentpatch.model.sites import COMPONENT_HOOKS, FAMILIES
    from latentpatch.names import COMPONENTS as RUN_COMPONENTS

    assert set(COMPONENT_HOOKS) == set(RUN_COMPONENTS)
    for family in FAMILIES:
        lm = random_model(family).lm
        assert model_family(lm) == family
        for component in RUN_COMPONENTS:
            module, kind = hooked_module(lm, component, 0)
            assert isinstance(module, torch.nn.Module) and kind in ("input", "output")
