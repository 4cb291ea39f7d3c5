"""Reading the network without patching it (docs/method.md §14): head shapes, the final norm for the
logit lens, and attention weights computed from queries and cached keys.

The attention weights are computed outside the attention kernel so a rollout stays on its fast
path (SDPA/flash return no weights): :class:`QueryRecorder` keeps each attention sub-layer's input
(and, for rotary models, the ``(cos, sin)`` it was given) during the rollout; afterwards
:func:`attention_weights` forms the queries at the positions asked for and reads the keys from the
rollout's KV cache (LLaMA caches keys after the rotary embedding; GPT-2 has none), so
``softmax(q·kᵀ·scaling + mask)`` is the kernel's own attention pattern.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from latentpatch.model.kv_cache import layers_of
from latentpatch.model.sites import backbone_of, hooked_module, model_family, transformer_blocks
from latentpatch.model.state import RolloutState

#: family -> the final norm inside the backbone (applied before the LM head).
FINAL_NORM: dict[str, str] = {"llama": "norm", "gpt2": "ln_f"}


def head_shape(lm: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dimension) of a causal LM's attention."""
    cfg: Any = lm.config
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return n_heads, n_kv, d_head


def final_norm(lm: nn.Module) -> nn.Module:
    """The norm the backbone applies to the last block's output before the LM head."""
    norm = getattr(backbone_of(lm), FINAL_NORM[model_family(lm)], None)
    if not isinstance(norm, nn.Module):
        raise TypeError(f"{type(lm).__name__}: no final norm {FINAL_NORM[model_family(lm)]!r}")
    return norm


def lens_logits(lm: nn.Module, resid: torch.Tensor) -> torch.Tensor:
    """[..., V] fp32: residual-stream vectors [..., d] through the final norm and the LM head."""
    head: Any = lm.get_output_embeddings()  # type: ignore[operator]
    return head(final_norm(lm)(resid)).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class QueryRecorder:
    """Context manager: records every attention sub-layer's input during the forward calls it spans.

    ``inputs[layer]``: list of ``(hidden [B, T, d], (cos, sin) or None)`` per call, in call order;
    the calls of a rollout cover absolute indices 0..length-1 in order.
    """

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.inputs: dict[int, list[tuple[torch.Tensor, Any]]] = defaultdict(list)
        self._handles: list[RemovableHandle] = []

    def _hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rope = kwargs.get("position_embeddings")
            if rope is None and len(args) > 1 and isinstance(args[1], tuple):
                rope = args[1]
            self.inputs[layer].append((hidden.detach(), rope))

        return hook

    def __enter__(self) -> QueryRecorder:
        for layer in range(len(transformer_blocks(self.lm))):
            module, _ = hooked_module(self.lm, "attn_out", layer)
            self._handles.append(module.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def queries(self, layer: int, index: Sequence[int]) -> torch.Tensor:
        """[B, n_heads, Q, d_head]: the queries of ``layer`` at absolute indices ``index``."""
        attn: Any = hooked_module(self.lm, "attn_out", layer)[0]  # family-specific submodules
        hidden = torch.cat([h for h, _ in self.inputs[layer]], dim=1)[:, list(index)]  # [B, Q, d]
        n_heads, _, d_head = head_shape(self.lm)
        B, Q = hidden.shape[:2]
        if model_family(self.lm) == "gpt2":
            q = attn.c_attn(hidden)[..., : n_heads * d_head]
            return q.view(B, Q, n_heads, d_head).transpose(1, 2)
        q = attn.q_proj(hidden).view(B, Q, -1, d_head)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head query norm
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        ropes = [r for _, r in self.inputs[layer]]
        if ropes[0] is not None:
            cos = torch.cat([r[0] for r in ropes], dim=1)[:, list(index)].unsqueeze(1)  # [B, 1, Q, d_head]
            sin = torch.cat([r[1] for r in ropes], dim=1)[:, list(index)].unsqueeze(1)
            q = q * cos + _rotate_half(q) * sin
        return q


@torch.no_grad()
def attention_weights(
    lm: nn.Module, recorder: QueryRecorder, state: RolloutState, layer: int, index: Sequence[int]
) -> torch.Tensor:
    """[B, n_heads, Q, T] fp32 attention weights of ``layer`` at query indices ``index`` over every
    key of the finished rollout ``state`` (0 on later keys and on padding); each row sums to 1.

    Grouped-query attention: query head h reads key head ``h // (n_heads / n_kv)``."""
    n_heads, n_kv, _ = head_shape(lm)
    attn, _ = hooked_module(lm, "attn_out", layer)
    q = recorder.queries(layer, index).float()  # [B, H, Q, d_head]
    k, _ = layers_of(state.cache)[layer]
    k = k.float().repeat_interleave(n_heads // n_kv, dim=1)  # [B, H, T, d_head]
    scaling = float(getattr(attn, "scaling", q.shape[-1] ** -0.5))
    scores = torch.einsum("bhqd,bhtd->bhqt", q, k) * scaling  # [B, H, Q, T]
    T = k.shape[2]
    idx = torch.tensor(list(index), device=k.device)
    causal = torch.arange(T, device=k.device)[None, :] <= idx[:, None]  # [Q, T]
    keep = causal[None, None] & state.attention_mask[:, None, None, :T].bool()  # [B, 1, Q, T]
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1)
