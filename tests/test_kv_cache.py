"""The KV-cache adapter (model/kv_cache.py): a real ``DynamicCache`` filled by a tiny LLaMA / GPT-2
forward goes to (keys, values) tensors and back without a copy, and a forward continued on the
rebuilt cache gives the same bits as on the original one."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, tiny_lm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from latentpatch.model.kv_cache import cache_from, layer_keys_values, layers_of
from latentpatch.model.sites import cache_keyword

FAMILIES = ["llama", "gpt2"]
N_LAYERS = 3


def _ids(seed: int, b: int, t: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _filled(family: str) -> tuple[torch.nn.Module, str, DynamicCache]:
    """A tiny LM, its cache keyword and the DynamicCache of a forward on 2 rows of 6 tokens."""
    lm = tiny_lm(family, n_layers=N_LAYERS)
    kw = cache_keyword(lm)
    out = lm(input_ids=_ids(0, 2, 6), use_cache=True, **{kw: DynamicCache()})
    cache = getattr(out, kw)
    assert isinstance(cache, DynamicCache)
    return lm, kw, cache


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_shares_the_tensors(family):
    lm, _, cache = _filled(family)
    layers = layers_of(cache)
    heads = 2 if family == "llama" else 4  # LLaMA: the key/value heads of grouped-query attention
    assert len(layers) == N_LAYERS
    for (k, v), layer in zip(layers, cache.layers):
        assert k.shape == v.shape == (2, heads, 6, 32 // 4)  # [B, heads, T, d_head]
        assert k is layer.keys and v is layer.values  # the cache's own tensors
    rebuilt = cache_from(layers)
    assert isinstance(rebuilt, DynamicCache) and rebuilt is not cache
    assert rebuilt.get_seq_length() == cache.get_seq_length() == 6
    for (k, v), (k2, v2) in zip(layers, layers_of(rebuilt)):
        assert k2.data_ptr() == k.data_ptr() and v2.data_ptr() == v.data_ptr()  # shared, not copied
        assert k2 is k and v2 is v
        assert k2.dtype == k.dtype and k2.device == k.device


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_on_the_rebuilt_cache_equals_the_original(family):
    lm, kw, cache = _filled(family)
    before = [(k.clone(), v.clone()) for k, v in layers_of(cache)]
    rebuilt = cache_from(layers_of(cache))
    nxt = _ids(1, 2, 3)
    with torch.no_grad():
        out_rebuilt = lm(input_ids=nxt, use_cache=True, **{kw: rebuilt})
        # the forward on the rebuilt cache did not write into the shared tensors
        for (k, v), (k0, v0) in zip(layers_of(cache), before):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        out = lm(input_ids=nxt, use_cache=True, **{kw: cache})
    assert torch.equal(out_rebuilt.logits, out.logits)
    for (k, v), (k2, v2) in zip(layers_of(getattr(out, kw)), layers_of(getattr(out_rebuilt, kw))):
        assert k.shape[2] == 9 and torch.equal(k, k2) and torch.equal(v, v2)


def test_a_prefix_cut_continues_like_a_shorter_forward():
    """cache_from on keys/values cut to the first T' tokens (what RolloutState.fork does) continues
    exactly like the cache of a forward on those T' tokens alone."""
    lm, kw, cache = _filled("llama")
    cut = cache_from([(k[:, :, :4], v[:, :, :4]) for k, v in layers_of(cache)])
    nxt = _ids(1, 2, 2)
    with torch.no_grad():
        short = getattr(lm(input_ids=_ids(0, 2, 6)[:, :4], use_cache=True, **{kw: DynamicCache()}), kw)
        a = lm(input_ids=nxt, use_cache=True, **{kw: cut}).logits
        b = lm(input_ids=nxt, use_cache=True, **{kw: short}).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_layer_that_is_not_a_filled_attention_layer_is_a_type_error():
    with pytest.raises(TypeError, match="cannot fork a DynamicLayer cache layer: only filled attention layers"):
        layer_keys_values(DynamicLayer())  # not filled yet
    with pytest.raises(TypeError, match="cannot fork a object cache layer"):
        layer_keys_values(object())
    _, _, cache = _filled("gpt2")
    cache.layers.append(DynamicLayer())  # one layer the forward did not fill
    with pytest.raises(TypeError, match="only filled attention layers are supported"):
        layers_of(cache)
