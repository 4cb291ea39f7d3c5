"""Sites: named places in the network, and hooks that read or overwrite them.

A :class:`Site` is ``(component, layer, position)`` (design.md §2):

- ``resid_pre``  input of block ``layer`` (layer 0 = the embeddings, incl. GPT-2's position embeddings)
- ``resid_out``  output of block ``layer`` = residual stream after the block (the default)
- ``attn_out``   output of the attention sub-layer of block ``layer`` (before the residual add)
- ``mlp_out``    output of the MLP sub-layer of block ``layer`` (before the residual add)

``position`` counts within a ``segment``: ``"latent"`` (thought p, 0..K-1; the sequence position
whose input embedding is the p-th continuous thought) or ``"prompt"`` (index into that row's
prompt tokens, question + separators, not counting left padding).

All activations are ``[batch, seq, d_model]`` tensors in the model's dtype. Hooks work on *absolute*
sequence indices of the (left-padded) rollout; :class:`ActivationHooks` knows the index of the
first token of the forward call in flight (``offset``), so the same hook serves a full prompt pass
and a one-token KV-cached step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

COMPONENTS: tuple[str, ...] = ("resid_pre", "resid_out", "attn_out", "mlp_out")
SEGMENTS: tuple[str, ...] = ("latent", "prompt")


@dataclass(frozen=True, order=True)
class Site:
    """A place in the network: ``component`` at block ``layer`` at ``position`` of ``segment``."""

    component: str
    layer: int
    position: int
    segment: str = "latent"

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown component {self.component!r}; expected one of {COMPONENTS}")
        if self.segment not in SEGMENTS:
            raise ValueError(f"unknown segment {self.segment!r}; expected one of {SEGMENTS}")
        if self.layer < 0 or self.position < 0:
            raise ValueError(f"layer and position must be >= 0, got {self}")

    def __str__(self) -> str:
        return f"{self.component}.L{self.layer}.{self.segment}{self.position}"


def transformer_blocks(lm: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a LLaMA-family or GPT-2-family causal LM."""
    base = getattr(lm, "model", None) or getattr(lm, "transformer", None)
    if base is not None and hasattr(base, "layers"):  # LLaMA, Mistral, Qwen2, ...
        return base.layers
    if base is not None and hasattr(base, "h"):  # GPT-2
        return base.h
    raise TypeError(f"unsupported model tree {type(lm).__name__}: expected .model.layers or .transformer.h")


def _sublayer(block: nn.Module, component: str) -> nn.Module:
    if component == "attn_out":
        for name in ("self_attn", "attn"):
            if hasattr(block, name):
                return getattr(block, name)
    if component == "mlp_out" and hasattr(block, "mlp"):
        return block.mlp
    raise TypeError(f"block {type(block).__name__} has no sub-layer for {component}")


@dataclass
class Write:
    """Overwrite ``component`` at ``layer`` at absolute index ``index[b]`` with ``value[b]``.

    Shapes: ``index`` [B] long, ``rows`` [B] bool (which rows are written), ``value`` [B, d].
    """

    component: str
    layer: int
    index: torch.Tensor
    rows: torch.Tensor
    value: torch.Tensor


def _first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, new):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    return new


class ActivationHooks:
    """Context manager that writes and/or records activations during forward passes.

    ``writes``: :class:`Write` objects applied whenever their absolute index falls in the call.
    ``record``: ``(component, layer)`` pairs whose full activation is kept; read them with
    :meth:`recorded` as ``[B, T_recorded, d]`` (concatenated over the calls made while active,
    starting at the ``offset`` of the first call). Recorded values are *after* any write.
    """

    def __init__(self, lm: nn.Module, writes: Iterable[Write] = (), record: Iterable[tuple[str, int]] = ()):
        self.lm = lm
        self.blocks = transformer_blocks(lm)
        self.writes: dict[tuple[str, int], list[Write]] = defaultdict(list)
        for w in writes:
            self.writes[(w.component, w.layer)].append(w)
        self.record_keys = set(record)
        self._recorded: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        self.offset = 0  # absolute index of the first token of the forward call in flight
        self._handles: list = []
        for key in set(self.writes) | self.record_keys:
            component, layer = key
            if component not in COMPONENTS:
                raise ValueError(f"unknown component {component!r}")
            if not 0 <= layer < len(self.blocks):
                raise ValueError(f"layer {layer} out of range: the model has {len(self.blocks)} blocks")

    # -- hook bodies -------------------------------------------------------------------------
    def _apply(self, key: tuple[str, int], h: torch.Tensor) -> torch.Tensor:
        writes = self.writes.get(key)
        if writes:
            h = h.clone()
            T = h.shape[1]
            for w in writes:
                local = w.index.to(h.device) - self.offset
                ok = w.rows.to(h.device) & (local >= 0) & (local < T)
                if bool(ok.any()):
                    b = ok.nonzero(as_tuple=True)[0]
                    h[b, local[b]] = w.value.to(device=h.device, dtype=h.dtype)[b]
        if key in self.record_keys:
            self._recorded[key].append(h.detach())
        return h

    def _make_pre_hook(self, key):
        def hook(module, args, kwargs):
            if args:
                return (self._apply(key, args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._apply(key, kwargs["hidden_states"])
            return args, kwargs

        return hook

    def _make_out_hook(self, key):
        def hook(module, args, output):
            return _replace_first(output, self._apply(key, _first_tensor(output)))

        return hook

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> "ActivationHooks":
        for key in sorted(set(self.writes) | self.record_keys):
            component, layer = key
            block = self.blocks[layer]
            if component == "resid_pre":
                handle = block.register_forward_pre_hook(self._make_pre_hook(key), with_kwargs=True)
            elif component == "resid_out":
                handle = block.register_forward_hook(self._make_out_hook(key))
            else:
                handle = _sublayer(block, component).register_forward_hook(self._make_out_hook(key))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def recorded(self, component: str, layer: int) -> torch.Tensor:
        """``[B, T_recorded, d]``: the activation over every call made while the hooks were active."""
        parts = self._recorded.get((component, layer))
        if not parts:
            raise KeyError(f"({component}, {layer}) was not recorded")
        return torch.cat(parts, dim=1)
