"""The one module that touches transformers' KV-cache internals: a cache as plain (keys, values) tensors and back.

:mod:`latentpatch.model.state` forks and stacks KV caches (``RolloutState.fork``, ``stack_states``)
and :mod:`latentpatch.model.heads` reads cached keys; both go through this adapter, so a
transformers release that changes ``DynamicCache``/``DynamicLayer`` changes this file only.

- :func:`layers_of`: a ``DynamicCache`` -> one ``(keys, values)`` per layer, each
  [B, heads, T, d_head], the cache's own tensors (no copy).
- :func:`cache_from`: such a list -> a new ``DynamicCache`` holding exactly those tensors (no copy).

Written for the layered cache of transformers 5.x (``DynamicCache.layers``, ``CacheLayerMixin``,
``DynamicLayer.lazy_initialization(keys, values)``); see docs/ARCHITECTURE.md, "Dependencies".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

KV = tuple[torch.Tensor, torch.Tensor]
"""(keys, values) of one attention layer, each [B, heads, T, d_head]."""


def layer_keys_values(layer: object) -> KV:
    """(keys, values), each [B, heads, T, d_head], of one filled attention layer of a KV cache:
    the layer's own tensors. Anything else (a layer not filled yet, a non-attention layer such as a
    linear-attention or SSM state) raises ``TypeError``."""
    if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
        raise TypeError(f"cannot fork a {type(layer).__name__} cache layer: only filled attention layers are supported")
    return layer.keys, layer.values


def layers_of(cache: DynamicCache) -> list[KV]:
    """One (keys, values) per layer of ``cache``, each [B, heads, T, d_head]: the cache's own tensors,
    not copies. ``TypeError`` (:func:`layer_keys_values`) on a layer that is not a filled attention layer."""
    return [layer_keys_values(layer) for layer in cache.layers]


def cache_from(layers: Sequence[KV]) -> DynamicCache:
    """A ``DynamicCache`` holding ``layers`` ((keys, values) [B, heads, T, d_head] per layer) as
    they are: no copy (``DynamicCache(ddp_cache_data=...)`` would concatenate each into new storage).
    Sharing tensors is safe: a ``DynamicLayer`` never writes into its tensors, each update
    concatenates into new ones."""
    cache = DynamicCache()
    for k, v in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)  # dtype and device
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache
