"""The feedback object (model/feedback.py) and the one latent loop (LatentModel.run_thoughts)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_latent_model, tiny_text_model
from torch import nn

from latentpatch.errors import LatentPatchError
from latentpatch.model.config import build_prj
from latentpatch.model.feedback import IdentityFeedback, ProjectionFeedback, as_feedback, feedback_by_name
from latentpatch.model.latent import override_hook
from latentpatch.model.latent_dir import LATENT_JSON, load_latent_dir, save_latent_dir
from latentpatch.patching.engine import _early_rollout
from latentpatch.patching.steps import thought_sites

FAMILIES = ["llama", "gpt2"]


def test_projection_feedback_is_prj_by_hand():
    """ProjectionFeedback(h) = Linear -> exact GELU -> Linear -> LayerNorm(eps 1e-5), written out."""
    torch.manual_seed(0)
    prj = build_prj(16, 24, layer_norm=True)
    f = as_feedback(prj)
    assert isinstance(f, ProjectionFeedback) and f.name == "projection" and f.has_pre_site
    assert f[1] is prj[1] and f[3] is prj[3] and f.ln is prj.ln  # the same modules, nothing copied
    assert sorted(f.state_dict()) == sorted(prj.state_dict())  # prj.1.*, prj.3.*, prj.ln.* in files
    assert (f.prj_dim, f.layer_norm) == (24, True)
    h = torch.randn(5, 16)
    x = h @ prj[1].weight.T + prj[1].bias
    x = 0.5 * x * (1 + torch.erf(x / 2**0.5))
    x = x @ prj[3].weight.T + prj[3].bias
    want = F.layer_norm(x, (16,), prj.ln.weight, prj.ln.bias, eps=1e-5)
    assert torch.allclose(f(h), want, atol=1e-6)
    no_ln = as_feedback(build_prj(16, 8, layer_norm=False))
    assert not no_ln.layer_norm and no_ln.prj_dim == 8  # type: ignore[attr-defined]


def test_identity_feedback_returns_h():
    f = as_feedback(nn.Identity())
    assert isinstance(f, IdentityFeedback) and isinstance(f, nn.Identity)
    assert f.name == "identity" and not f.has_pre_site and not list(f.state_dict())
    h = torch.randn(3, 8)
    assert f(h) is h
    assert feedback_by_name("identity", 8).name == "identity"
    with pytest.raises(ValueError):
        feedback_by_name("projection", 8)
    with pytest.raises(TypeError):
        as_feedback(nn.Linear(2, 2))


def test_model_feedback_is_model_prj():
    """model.prj and model.feedback are one module; assigning either sets both; the sites follow it."""
    m = tiny_latent_model("llama")
    assert m.prj is m.feedback and isinstance(m.feedback, ProjectionFeedback)
    assert thought_sites(m) == ("thought", "thought_pre")
    assert any(k.startswith("feedback.1.") for k in m.state_dict())
    m.prj = nn.Identity()
    assert isinstance(m.feedback, IdentityFeedback) and m.prj is m.feedback
    assert thought_sites(m) == ("thought",)


@pytest.mark.parametrize("prj_dim", [48, None])
def test_model_dir_records_and_restores_the_feedback(tmp_path, prj_dim):
    m = tiny_latent_model("llama", prj_dim=prj_dim)
    save_latent_dir(m, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / LATENT_JSON).read_text())
    name = "projection" if prj_dim else "identity"
    assert meta["feedback"] == name
    back = load_latent_dir(tmp_path / "m")
    assert back.feedback.name == name
    for k, v in m.feedback.state_dict().items():
        assert torch.equal(back.feedback.state_dict()[k], v)
    prompt = [[3, 4, 5, m.config.bot_id]]
    with torch.no_grad():
        assert torch.equal(m.rollout(prompt).answer_logits, back.rollout(prompt).answer_logits)


@pytest.mark.parametrize("prj_dim", [48, None])
def test_model_dir_without_the_key_loads_as_before(tmp_path, prj_dim):
    m = tiny_latent_model("llama", prj_dim=prj_dim)
    save_latent_dir(m, tmp_path / "m")
    meta_file = tmp_path / "m" / LATENT_JSON
    meta = json.loads(meta_file.read_text())
    del meta["feedback"]
    meta_file.write_text(json.dumps(meta))
    back = load_latent_dir(tmp_path / "m")
    assert back.feedback.name == ("projection" if prj_dim else "identity")
    meta["feedback"] = "gaussian"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(LatentPatchError, match="feedback 'gaussian'"):
        load_latent_dir(tmp_path / "m")


def test_shipped_default_model_has_no_key_and_loads():
    from latentpatch.model.load import DEFAULT_MODEL_DIR, load_model

    meta = json.loads((DEFAULT_MODEL_DIR / LATENT_JSON).read_text())
    assert "feedback" not in meta  # the shipped files are not rewritten: the reader infers it
    default = load_model("default")
    assert isinstance(default.feedback, ProjectionFeedback) and default.feedback.prj_dim == meta["prj_dim"]
    assert default.prj is default.feedback and default.feedback.layer_norm == meta["prj_ln"]


@pytest.mark.parametrize("family", FAMILIES)
def test_step_hook_equals_thought_override(family):
    m = tiny_text_model(family, num_latent=4)
    prompts = [m.prompt_ids("1+2=3"), m.prompt_ids("20 minus 7")]
    K, d = m.num_latent, m.d_model
    torch.manual_seed(0)
    override = torch.randn(2, K, d)
    mask = torch.tensor([[False, True, False, True], [True, False, False, False]])
    with torch.no_grad():
        ref = m.rollout(prompts, thought_override=override, override_mask=mask)
        state, h = m.prefill(prompts)
        thoughts, hidden, nxt = m.run_thoughts(state, m.feedback(h), 0, step_hook=override_hook(override, mask))
        # by hand: a hook written here, no override keywords
        state2, h2 = m.prefill(prompts)

        def hook(step, thought):
            return torch.where(mask[:, step, None], override[:, step], thought)

        thoughts2, _, _ = m.run_thoughts(state2, m.feedback(h2), 0, step_hook=hook)
    assert torch.equal(thoughts, ref.thoughts) and torch.equal(hidden, ref.latent_hidden)
    assert torch.equal(nxt, ref.next_thought) and torch.equal(thoughts2, ref.thoughts)
    assert torch.equal(thoughts[mask], override[mask])


def old_early_rollout(model, prompt, k):
    """The engine's former copy of the loop, verbatim: prompt, k thoughts, [EOT]."""
    state, h = model.prefill([prompt])
    thought = model.prj(h)
    for _ in range(k):
        thought = model.prj(model.advance(state, inputs_embeds=thought[:, None])[:, -1])
    end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), 1))
    return state, model.logits(end[:, -1])


@pytest.mark.parametrize("family", FAMILIES)
def test_early_rollout_through_the_one_loop_is_the_old_copy(family):
    m = tiny_text_model(family, num_latent=4)
    prompt = m.prompt_ids("3 apples and 4 more")
    with torch.no_grad():
        for k in range(m.num_latent + 1):
            state, logits = _early_rollout(m, prompt, k)
            ref_state, ref = old_early_rollout(m, prompt, k)
            assert torch.equal(logits, ref), k
            assert state.length == ref_state.length == len(prompt) + k + len(m.answer_start_ids())
        full = m.rollout([prompt]).answer_logits
    assert torch.equal(_early_rollout(m, prompt, m.num_latent)[1], full)


def test_thought_swap_is_a_step_hook():
    """ThoughtSwap.apply on [B, d] (the loop's hook) equals it on [B, 1, d] (as training called it)."""
    from functools import partial

    from latentpatch.training.interchange import ThoughtSwap

    torch.manual_seed(0)
    B, d = 4, 6
    embed = nn.Embedding(10, d)
    rows = torch.tensor([True, False, True, True])
    swap = ThoughtSwap(
        1,
        rows,
        torch.tensor([1, 0, 3, 0]),
        None,
        None,
        None,
        None,
        rows & torch.tensor([1, 0, 0, 1]).bool(),
        torch.tensor([2, 3, 4, 5]),
    )
    t = torch.randn(B, d)
    hook = partial(swap.apply, embed=embed)
    assert torch.equal(hook(0, t), t)
    assert torch.equal(hook(1, t), swap.apply(1, t[:, None], embed)[:, 0])
    assert torch.equal(swap.apply(1, t)[2], t[3]) and torch.equal(swap.apply(1, t)[1], t[1])


def old_student_loop(model, q_ids, q_mask, a_ids, a_mask, blind_rows, swap, latent_hide):
    """training/objective.py's former copy of the latent loop, verbatim (before the one loop)."""
    from transformers import DynamicCache

    from latentpatch.training.objective import positions

    lm = model.lm
    kv = model.cache_keyword
    mask = q_mask
    out = lm(
        input_ids=q_ids,
        attention_mask=mask,
        position_ids=positions(mask),
        use_cache=True,
        output_hidden_states=True,
        **{kv: DynamicCache()},
    )
    h = out.hidden_states[-1][:, -1]
    thoughts, latent_hidden = [], []
    for step in range(model.num_latent):
        emb = model.prj(h).unsqueeze(1)
        if swap is not None:
            emb = swap.apply(step, emb, lm.get_input_embeddings())
        thoughts.append(emb[:, 0])
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], 1)
        step_mask = mask
        if latent_hide is not None:
            step_mask = mask.masked_fill(latent_hide[:, step, : mask.size(1)], 0)
        out = lm(
            inputs_embeds=emb,
            attention_mask=step_mask,
            position_ids=positions(mask)[:, -1:],
            use_cache=True,
            output_hidden_states=True,
            **{kv: getattr(out, kv)},
        )
        h = out.hidden_states[-1][:, -1]
        latent_hidden.append(h)
    mask = torch.cat([mask, a_mask], 1)
    answer_mask = mask
    if blind_rows is not None:
        hide = torch.zeros_like(mask, dtype=torch.bool)
        hide[:, : q_ids.size(1) - 1] = blind_rows[:, None]
        answer_mask = mask.masked_fill(hide, 0)
    out = lm(
        input_ids=a_ids,
        attention_mask=answer_mask,
        position_ids=positions(mask)[:, -a_ids.size(1) :],
        use_cache=True,
        output_hidden_states=True,
        **{kv: getattr(out, kv)},
    )
    return out.logits, out.hidden_states, torch.stack(thoughts, 1), torch.stack(latent_hidden, 1)


def test_student_forward_through_the_one_loop_is_the_old_copy():
    """Training's student pass (run_thoughts with the swap as step hook, latent_hide,
    next_thought=False) gives the old loop's bits: logits, every hidden state, thoughts, and the
    gradients, with a swap (token rows too), blind rows and hidden latent columns."""
    from latentpatch.data.synthetic import generate_problems
    from latentpatch.model.load import DEFAULT_MODEL_DIR, load_model
    from latentpatch.training.data import Codec, make_batch
    from latentpatch.training.interchange import plan_swap
    from latentpatch.training.objective import latent_hide_mask, student_forward

    model = load_model("default")
    codec = Codec.from_dir(DEFAULT_MODEL_DIR)
    b = make_batch(generate_problems(6, seed=5), codec, num_latent=model.num_latent)
    torch.manual_seed(0)
    swap = plan_swap(b, codec, 1.0, model.num_latent, token_rate=0.5)
    assert swap is not None and swap.token_rows is not None and swap.token_rows.any()
    assert (swap.rows & ~swap.token_rows).any()  # donor thoughts and donor tokens both fed
    blind = torch.tensor([True, False, True, True, False, True])
    hide = latent_hide_mask(b, torch.tensor([True, True, False, True, False, False]), model.num_latent)
    for args in [(None, None, None), (blind, swap, hide)]:
        a_ids = b.a_ids if args[1] is None else swap.answer_ids
        results = []
        for fn in (student_forward, old_student_loop):
            model.zero_grad()
            logits, hidden, thoughts, latent = fn(model, b.q_ids, b.q_mask, a_ids, b.a_mask, *args)
            (logits.float().square().mean() + latent.square().mean()).backward()
            grads = [p.grad.clone() for p in model.feedback.parameters()] + [model.lm.lm_head.weight.grad.clone()]
            results.append((logits, hidden, thoughts, latent, grads))
        new, old = results
        assert torch.equal(new[0], old[0]) and torch.equal(new[2], old[2]) and torch.equal(new[3], old[3])
        assert all(torch.equal(x, y) for x, y in zip(new[1], old[1], strict=True))
        assert all(torch.equal(x, y) for x, y in zip(new[4], old[4], strict=True))
