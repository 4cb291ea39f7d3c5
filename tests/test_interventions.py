"""Typed interventions: every spec maps to one intervention type, replacements parse and print back,
and a function-valued write (``Edit``) does what a plain hook written here does."""

from __future__ import annotations

import torch
from helpers import tiny_latent_model

from latentpatch.model.sites import Edit, Write, transformer_blocks
from latentpatch.patching.interventions import ActivationPatch, EarlyExit, Replacement, ThoughtReplacement
from latentpatch.patching.specs import iterative_specs, layer_specs, position_specs
from latentpatch.patching.steps import early_specs, influence_specs, intermediate_specs, thought_specs

PROMPT = [5, 6, 7, 8, 9]


def test_every_generated_spec_has_one_intervention():
    L, K = 3, 4
    site_specs = layer_specs(L, K) + position_specs(L, K) + iterative_specs(L, K)
    assert all(isinstance(s.intervention, ActivationPatch) for s in site_specs)
    assert {(s.intervention.component, s.intervention.layer) for s in site_specs} == {
        ("resid_out", layer) for layer in range(L)
    }
    thoughts = thought_specs(K) + influence_specs(K) + intermediate_specs(K, 2)
    assert all(isinstance(s.intervention, ThoughtReplacement) for s in thoughts)
    assert {s.intervention.through_feedback for s in thought_specs(K)} == {True, False}
    early = early_specs(K)
    assert [s.intervention for s in early] == [EarlyExit(k) for k in range(K + 1)]


def test_replacements_round_trip():
    for spec in thought_specs(4) + influence_specs(4) + intermediate_specs(4, 3):
        rep = spec.replacement_value
        assert rep.label == spec.replacement
        assert rep.is_donor == spec.replacement.startswith(("same:", "diff:"))
    assert Replacement.parse("diff:2") == Replacement("diff", 2)


def _plain_hooked_rollout(model, layer: int, index: int, fn):
    """The same edit as a plain forward hook on the block's output, written here."""

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] > index:  # the prompt pass holds every position; a step holds one
            h = h.clone()
            h[:, index] = fn(h[:, index])
        elif h.shape[1] == 1 and hook.position == index:
            h = fn(h[:, 0])[:, None]
        hook.position += h.shape[1]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    hook.position = 0
    handle = transformer_blocks(model.lm)[layer].register_forward_hook(hook)
    try:
        return model.rollout([model.prompt_ids(PROMPT)])
    finally:
        handle.remove()


def test_an_edit_adds_a_vector_as_a_plain_hook_does():
    model = tiny_latent_model("llama")
    T = len(model.prompt_ids(PROMPT))
    shift = torch.linspace(-1, 1, model.d_model)
    at = T + 1  # thought 1
    edit = Edit("resid_out", 1, torch.tensor([at]), torch.tensor([True]), lambda a, rows: a + shift)
    ours = model.rollout([model.prompt_ids(PROMPT)], writes=[edit])
    plain = _plain_hooked_rollout(model, 1, at, lambda a: a + shift)
    assert torch.allclose(ours.thoughts, plain.thoughts, atol=1e-6)
    assert torch.allclose(ours.answer_logits, plain.answer_logits, atol=1e-5)
    untouched = model.rollout([model.prompt_ids(PROMPT)])
    assert torch.equal(ours.thoughts[:, :2], untouched.thoughts[:, :2])  # before the edited position
    assert not torch.allclose(ours.thoughts[:, 2:], untouched.thoughts[:, 2:])  # it reaches later thoughts


def test_an_edit_returning_a_fixed_value_equals_the_write():
    model = tiny_latent_model("gpt2")
    prompt = model.prompt_ids(PROMPT)
    value = torch.randn(1, model.d_model, generator=torch.Generator().manual_seed(0))
    at, rows = torch.tensor([len(prompt) + 2]), torch.tensor([True])
    written = model.rollout([prompt], writes=[Write("attn_out", 0, at, rows, value)])
    edited = model.rollout([prompt], writes=[Edit("attn_out", 0, at, rows, lambda a, b: value[b])])
    assert torch.equal(written.answer_logits, edited.answer_logits)


def test_gradients_flow_through_an_edit():
    model = tiny_latent_model("llama")
    prompt = model.prompt_ids(PROMPT)
    scale = torch.tensor(1.5, requires_grad=True)
    edit = Edit("resid_out", 0, torch.tensor([len(prompt)]), torch.tensor([True]), lambda a, b: a * scale)
    r = model.rollout([prompt], writes=[edit], grad=True)  # gradients through the latent loop (§15)
    r.answer_logits.sum().backward()
    assert scale.grad is not None and scale.grad.abs() > 0
