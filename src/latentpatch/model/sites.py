"""Sites: named places in the network, and hooks that read or overwrite them.

A :class:`Site` is ``(component, layer, position)`` (docs/method.md §3):

- ``resid_pre``  input of block ``layer`` (layer 0 = the embeddings, incl. GPT-2's position embeddings)
- ``resid_out``  output of block ``layer`` = residual stream after the block (the default)
- ``attn_out``   output of the attention sub-layer of block ``layer`` (before the residual add)
- ``mlp_out``    output of the MLP sub-layer of block ``layer`` (before the residual add)
- ``head_out.h`` attention head h's slice ``[h·d_head, (h+1)·d_head)`` of the input of the attention
  output projection (docs/method.md §14); ``head_out`` alone is the whole input (every head)

``position`` counts within a ``segment``: ``"latent"`` (thought p, 0..K-1; the sequence position
whose input embedding is the p-th continuous thought) or ``"prompt"`` (index into that row's
prompt tokens, question + separators, not counting left padding).

All activations are ``[batch, seq, d_model]`` tensors in the model's dtype. Hooks work on *absolute*
sequence indices of the (left-padded) rollout; :class:`ActivationHooks` knows the index of the
first token of the forward call in flight (``offset``), so the same hook serves a full prompt pass
and a one-token KV-cached step.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from latentpatch.names import COMPONENTS, HEAD_COMPONENT, SITE_COMPONENTS, parse_head

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SEGMENTS: tuple[str, ...] = ("latent", "prompt")


@dataclass(frozen=True, order=True)
class Site:
    """A place in the network: ``component`` at block ``layer`` at ``position`` of ``segment``."""

    component: str
    layer: int
    position: int
    segment: str = "latent"

    def __post_init__(self) -> None:
        if not is_site_component(self.component):
            raise ValueError(f"unknown component {self.component!r}; expected one of {SITE_COMPONENTS}")
        if self.segment not in SEGMENTS:
            raise ValueError(f"unknown segment {self.segment!r}; expected one of {SEGMENTS}")
        if self.layer < 0 or self.position < 0:
            raise ValueError(f"layer and position must be >= 0, got {self}")

    def __str__(self) -> str:
        return f"{self.component}.L{self.layer}.{self.segment}{self.position}"


@dataclass(frozen=True)
class FamilyLayout:
    """Where one model family keeps the modules that sites hook, as attribute names.

    ``backbone`` is the decoder stack inside the causal LM (no LM head), ``blocks`` the list of
    transformer blocks inside the backbone, ``attn``/``mlp`` the sub-layers inside a block.
    """

    backbone: str
    blocks: str
    attn: str
    mlp: str


#: family -> the attention output projection inside the attention sub-layer (input = concatenated heads).
ATTN_OUT_PROJ: dict[str, str] = {"llama": "o_proj", "gpt2": "c_proj"}

#: family -> layout. A new family is one entry here (the first whose backbone and blocks exist wins).
FAMILIES: dict[str, FamilyLayout] = {
    # LLaMA, Mistral, Qwen2, SmolLM2, ...: lm.model.layers[i].{self_attn, mlp}
    "llama": FamilyLayout(backbone="model", blocks="layers", attn="self_attn", mlp="mlp"),
    # GPT-2: lm.transformer.h[i].{attn, mlp}
    "gpt2": FamilyLayout(backbone="transformer", blocks="h", attn="attn", mlp="mlp"),
}

#: component -> (which module of a block: "block" itself or a FamilyLayout sub-layer field,
#: hook kind: "input" = forward pre-hook on the module's input, "output" = forward hook on its output)
COMPONENT_HOOKS: dict[str, tuple[str, str]] = {
    "resid_pre": ("block", "input"),
    "resid_out": ("block", "output"),
    "attn_out": ("attn", "output"),
    "mlp_out": ("mlp", "output"),
}


def is_site_component(component: str) -> bool:
    """A block component, ``head_out`` or ``head_out.<h>``."""
    return component in COMPONENTS or component == HEAD_COMPONENT or parse_head(component) is not None


def model_family(lm: nn.Module) -> str:
    """The :data:`FAMILIES` key whose layout matches ``lm``'s module tree."""
    for family, layout in FAMILIES.items():
        backbone = getattr(lm, layout.backbone, None)
        if isinstance(backbone, nn.Module) and isinstance(getattr(backbone, layout.blocks, None), nn.ModuleList):
            return family
    known = ", ".join(f"{f}: .{lay.backbone}.{lay.blocks}" for f, lay in FAMILIES.items())
    raise TypeError(f"unsupported model tree {type(lm).__name__}: expected one of {known}")


def backbone_of(lm: nn.Module) -> nn.Module:
    """The decoder stack of ``lm`` (the causal LM without its head)."""
    backbone = getattr(lm, FAMILIES[model_family(lm)].backbone)
    assert isinstance(backbone, nn.Module)
    return backbone


def transformer_blocks(lm: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM of a family in :data:`FAMILIES`."""
    blocks = getattr(backbone_of(lm), FAMILIES[model_family(lm)].blocks)
    assert isinstance(blocks, nn.ModuleList)
    return blocks


def hooked_module(lm: nn.Module, component: str, layer: int) -> tuple[nn.Module, str]:
    """(the module whose input or output is ``component`` at block ``layer``, ``"input"`` or ``"output"``)."""
    if component == HEAD_COMPONENT or parse_head(component) is not None:
        attn, _ = hooked_module(lm, "attn_out", layer)
        proj = getattr(attn, ATTN_OUT_PROJ[model_family(lm)], None)
        if not isinstance(proj, nn.Module):
            raise TypeError(f"attention {type(attn).__name__} has no output projection for {component}")
        return proj, "input"
    where, kind = COMPONENT_HOOKS[component]
    block = transformer_blocks(lm)[layer]
    if where == "block":
        return block, kind
    name = getattr(FAMILIES[model_family(lm)], where)
    sub = getattr(block, name, None)
    if not isinstance(sub, nn.Module):
        raise TypeError(f"block {type(block).__name__} has no sub-layer {name!r} for {component}")
    return sub, kind


def embedding_matrix(lm: PreTrainedModel) -> torch.Tensor:
    """[V, d] the input embedding matrix of a causal LM."""
    weight = lm.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight


def cache_keyword(backbone: nn.Module) -> str:
    """The name under which ``backbone`` takes and returns its KV cache.

    transformers 5.x calls it ``cache`` and warns on the older ``past_key_values``; asking the
    forward signature keeps older versions working without that warning in newer ones.
    """
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


@dataclass
class Write:
    """Overwrite ``component`` at ``layer`` at absolute index ``index[b]`` with ``value[b]``.

    Shapes: ``index`` [B] long, ``rows`` [B] bool (which rows are written), ``value`` [B, d]
    (``head_out.h``: [B, d_head], written to head h's slice of the projection input).
    """

    component: str
    layer: int
    index: torch.Tensor
    rows: torch.Tensor
    value: torch.Tensor

    def new_value(self, current: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The values [n, d] written at batch rows ``rows`` [n] (``current``: what is there now)."""
        return self.value.to(device=current.device, dtype=current.dtype)[rows]


@dataclass
class Edit:
    """A write whose new value is a function of the activation there: at ``component``/``layer``,
    absolute index ``index[b]`` of the rows where ``rows[b]``, the activation ``a`` [n, d] becomes
    ``fn(a, b)`` ([n, d]; ``b`` [n]: the batch rows edited, to index per-row parameters). The seam
    for interventions that are not a fixed value: adding a steering vector, rotating and
    interchanging a subspace (DAS). Gradients flow through ``fn``.

    >>> import torch
    >>> from latentpatch.model.load import load_model
    >>> model = load_model("default")
    >>> shift = torch.ones(model.d_model)
    >>> at = torch.tensor([model.prompt_ids([5, 6, 7]).__len__()])  # thought 0 of a batch of one
    >>> edit = Edit("resid_out", 1, at, torch.tensor([True]), lambda a, b: a + shift)
    >>> plain = model.rollout([[5, 6, 7]], record=[("resid_out", 1)])
    >>> edited = model.rollout([[5, 6, 7]], writes=[edit], record=[("resid_out", 1)])
    >>> before, after = (r.hooks.recorded("resid_out", 1)[0, at[0]] for r in (plain, edited))
    >>> torch.allclose(after, before + shift)
    True
    """

    component: str
    layer: int
    index: torch.Tensor
    rows: torch.Tensor
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def new_value(self, current: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``fn(current, rows)`` in the activation's dtype."""
        return self.fn(current, rows).to(dtype=current.dtype)


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    return new


class ActivationHooks:
    """Context manager that writes and/or records activations during forward passes.

    ``writes``: :class:`Write` objects applied whenever their absolute index falls in the call.
    ``record``: ``(component, layer)`` pairs whose full activation is kept; read them with
    :meth:`recorded` as ``[B, T_recorded, d]`` (concatenated over the calls made while active,
    starting at the ``offset`` of the first call). Recorded values are *after* any write.
    ``keep_graph``: keep the recorded tensors in the autograd graph (not detached), so a metric can
    be differentiated with respect to them (:meth:`recorded_parts`; attribution patching, docs/method.md §15).
    """

    def __init__(
        self,
        lm: nn.Module,
        writes: Iterable[Write | Edit] = (),
        record: Iterable[tuple[str, int]] = (),
        keep_graph: bool = False,
    ):
        self.lm = lm
        self.keep_graph = keep_graph
        self.blocks = transformer_blocks(lm)
        self.n_heads = int(getattr(getattr(lm, "config", None), "num_attention_heads", 1) or 1)
        self.writes: dict[tuple[str, int], list[Write | Edit]] = defaultdict(list)
        for w in writes:
            self.writes[(w.component, w.layer)].append(w)
        self.record_keys = set(record)
        self._recorded: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        self.offset = 0  # absolute index of the first token of the forward call in flight
        self._handles: list[RemovableHandle] = []
        for key in set(self.writes) | self.record_keys:
            component, layer = key
            if not is_site_component(component):
                raise ValueError(f"unknown component {component!r}")
            if not 0 <= layer < len(self.blocks):
                raise ValueError(f"layer {layer} out of range: the model has {len(self.blocks)} blocks")

    # -- hook bodies -------------------------------------------------------------------------
    def _apply(self, key: tuple[str, int], h: torch.Tensor) -> torch.Tensor:
        writes = self.writes.get(key)
        head = parse_head(key[0])
        if writes:
            h = h.clone()
            T = h.shape[1]
            for w in writes:
                local = w.index.to(h.device) - self.offset
                ok = w.rows.to(h.device) & (local >= 0) & (local < T)
                if bool(ok.any()):
                    b = ok.nonzero(as_tuple=True)[0]
                    if head is None:
                        h[b, local[b]] = w.new_value(h[b, local[b]], b)
                    else:  # one head's slice of the projection input
                        width = h.shape[-1] // self.n_heads
                        cols = slice(head * width, (head + 1) * width)
                        h[b, local[b], cols] = w.new_value(h[b, local[b], cols], b)
        if key in self.record_keys:
            kept = h if head is None else self._head_slice(h, head)
            self._recorded[key].append(kept if self.keep_graph else kept.detach())
        return h

    def _head_slice(self, h: torch.Tensor, head: int) -> torch.Tensor:
        """[B, T, d_head] head ``head``'s slice of a projection input [B, T, n_heads·d_head]."""
        width = h.shape[-1] // self.n_heads
        return h[..., head * width : (head + 1) * width]

    def _make_pre_hook(self, key: tuple[str, int]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            if args:
                return (self._apply(key, args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._apply(key, kwargs["hidden_states"])
            return args, kwargs

        return hook

    def _make_out_hook(self, key: tuple[str, int]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            return _replace_first(output, self._apply(key, _first_tensor(output)))

        return hook

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> ActivationHooks:
        for key in sorted(set(self.writes) | self.record_keys):
            module, kind = hooked_module(self.lm, *key)
            if kind == "input":
                handle = module.register_forward_pre_hook(self._make_pre_hook(key), with_kwargs=True)
            else:
                handle = module.register_forward_hook(self._make_out_hook(key))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def recorded(self, component: str, layer: int) -> torch.Tensor:
        """``[B, T_recorded, d]``: the activation over every call made while the hooks were active."""
        parts = self._recorded.get((component, layer))
        if not parts:
            raise KeyError(f"({component}, {layer}) was not recorded")
        return torch.cat(parts, dim=1)

    def recorded_parts(self, component: str, layer: int) -> list[torch.Tensor]:
        """The recordings of ``(component, layer)`` one per forward call, each ``[B, T_call, d]``: with
        ``keep_graph`` these are the very tensors the forward used, so gradients can be taken
        with respect to them (the concatenation of :meth:`recorded` is a new tensor outside the graph)."""
        parts = self._recorded.get((component, layer))
        if not parts:
            raise KeyError(f"({component}, {layer}) was not recorded")
        return list(parts)
