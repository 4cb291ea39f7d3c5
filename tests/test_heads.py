"""Per-head sites (docs/method.md §14) against plain computations written here."""

from __future__ import annotations

import pytest
import torch

from latentpatch.model.heads import head_shape
from latentpatch.model.loaders import random_model
from latentpatch.model.sites import ATTN_OUT_PROJ, Write, hooked_module
from latentpatch.names import head_component
from latentpatch.patching.heads import expand_heads, head_acts
from latentpatch.patching.specs import layer_specs

PROMPT = [5, 6, 7, 8, 9, 10]


def _proj(model, layer: int):
    attn, _ = hooked_module(model.lm, "attn_out", layer)
    return getattr(attn, ATTN_OUT_PROJ[model.family])


def _head_contribution(model, layer: int, x_head: torch.Tensor, h: int) -> torch.Tensor:
    """[..., d]: head h's d_head-vector through its slice of the output projection (no bias)."""
    _, _, d_head = head_shape(model.lm)
    w = _proj(model, layer).weight  # llama Linear: [d, H*dh]; GPT-2 Conv1D: [H*dh, d]
    if model.family == "gpt2":
        return x_head @ w[h * d_head : (h + 1) * d_head]
    return x_head @ w[:, h * d_head : (h + 1) * d_head].T


def _bias(model, layer: int) -> torch.Tensor | float:
    b = getattr(_proj(model, layer), "bias", None)
    return 0.0 if b is None else b


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_heads_sum_to_attn_out(family: str) -> None:
    model = random_model(family, num_latent=3)
    n_heads, _, _ = head_shape(model.lm)
    r = model.rollout([PROMPT], record=[("attn_out", layer) for layer in range(model.n_layers)])
    heads = head_acts(model, PROMPT)
    lat = slice(r.prompt_len, r.prompt_len + model.num_latent)
    for layer in range(model.n_layers):
        total = sum(_head_contribution(model, layer, heads[head_component(h)][layer], h) for h in range(n_heads))
        attn = r.hooks.recorded("attn_out", layer)[0, lat]
        torch.testing.assert_close(total + _bias(model, layer), attn, atol=1e-5, rtol=1e-5)


def _writes_all_latent(component: str, layer: int, values: torch.Tensor, prompt_len: int) -> list[Write]:
    """One write per latent position of ``values`` [K, w] (batch of one)."""
    return [
        Write(component, layer, torch.tensor([prompt_len + p]), torch.tensor([True]), values[p][None])
        for p in range(values.shape[0])
    ]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_head_equals_attn_out(family: str) -> None:
    model = random_model(family, num_latent=3)
    n_heads, _, _ = head_shape(model.lm)
    source, target = PROMPT, [9, 8, 7, 6, 5, 4]
    layer, T_q = 1, len(target)  # a list prompt is used as given (no separator added)
    src = model.rollout([source], record=[("attn_out", layer)])
    lat = slice(src.prompt_len, src.prompt_len + model.num_latent)
    attn_vals = src.hooks.recorded("attn_out", layer)[0, lat]
    heads = head_acts(model, source)
    writes = [
        w
        for h in range(n_heads)
        for w in _writes_all_latent(head_component(h), layer, heads[head_component(h)][layer], T_q)
    ]
    by_heads = model.rollout([target], writes=writes)
    by_attn = model.rollout([target], writes=_writes_all_latent("attn_out", layer, attn_vals, T_q))
    torch.testing.assert_close(by_heads.answer_logits, by_attn.answer_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(by_heads.thoughts, by_attn.thoughts, atol=1e-4, rtol=1e-4)
    plain = model.rollout([target])
    assert not torch.allclose(plain.answer_logits, by_heads.answer_logits, atol=1e-4)  # the patch did something


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_head_write_is_its_contribution(family: str) -> None:
    """Writing v into head h at (layer, p) = adding W_h (v − x_h) to attn_out there."""
    model = random_model(family, num_latent=3)
    layer, h, p = 0, 1, 1
    T_q = len(PROMPT)
    r = model.rollout([PROMPT], record=[("attn_out", layer)])
    own = head_acts(model, PROMPT)[head_component(h)][layer, p]  # [d_head]
    v = torch.randn(own.shape, generator=torch.Generator().manual_seed(0))
    attn = r.hooks.recorded("attn_out", layer)[0, T_q + p]
    expected = attn + _head_contribution(model, layer, v - own, h)
    one = Write(head_component(h), layer, torch.tensor([T_q + p]), torch.tensor([True]), v[None])
    by_head = model.rollout([PROMPT], writes=[one], record=[("attn_out", layer)])
    torch.testing.assert_close(by_head.hooks.recorded("attn_out", layer)[0, T_q + p], expected, atol=1e-5, rtol=1e-5)
    plain = Write("attn_out", layer, torch.tensor([T_q + p]), torch.tensor([True]), expected[None])
    by_attn = model.rollout([PROMPT], writes=[plain])
    torch.testing.assert_close(by_head.answer_logits, by_attn.answer_logits, atol=1e-4, rtol=1e-4)


def test_expand_heads() -> None:
    specs = expand_heads(layer_specs(2, 3, "head_out"), 4)
    assert [s.component for s in specs[:5]] == [f"head_out.{h}" for h in range(4)] + ["head_out.0"]
    assert len(specs) == 8 and expand_heads(layer_specs(2, 3), 4) == layer_specs(2, 3)
