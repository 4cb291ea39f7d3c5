"""Per-head patching (docs/method.md §14): ``--component head_out`` as one spec per attention head.

:func:`expand_heads` turns every spec of component ``head_out`` into one spec per head
(component ``head_out.<h>``, :func:`latentpatch.names.head_component`); the engine writes them like
any other component (:class:`latentpatch.model.sites.ActivationHooks` writes head h's slice of the
attention output projection's input). :func:`add_head_acts` adds the per-head activations
``acts["head_out.<h>"]`` [n_layers, K, d_head] to a run record, so every replacement (source, zero,
mean, resample) and the built-in checks read them as they read the block components.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from latentpatch.model.heads import head_shape
from latentpatch.model.latent import LatentModel
from latentpatch.names import HEAD_COMPONENT, head_component
from latentpatch.patching.baselines import RunRecord
from latentpatch.patching.specs import PatchSpec


def expand_heads(specs: Sequence[PatchSpec], n_heads: int) -> list[PatchSpec]:
    """Each ``head_out`` spec as ``n_heads`` specs (heads 0..n_heads-1 in order); others unchanged."""
    out: list[PatchSpec] = []
    for s in specs:
        if s.component != HEAD_COMPONENT:
            out.append(s)
            continue
        out += [dataclasses.replace(s, component=head_component(h)) for h in range(n_heads)]
    return out


@torch.no_grad()
def head_acts(model: LatentModel, prompt: Sequence[int], stream: int | None = None) -> dict[str, torch.Tensor]:
    """``{"head_out.<h>": [n_layers, K, d_head]}``: each head's output at the latent positions of the
    unpatched rollout of ``prompt`` (``stream``: its pair's draw-stream key, docs/method.md §21)."""
    n_heads, _, d_head = head_shape(model.lm)
    record = [(HEAD_COMPONENT, layer) for layer in range(model.n_layers)]
    r = model.rollout([list(prompt)], record=record, streams=[stream])
    assert r.hooks is not None
    lat = slice(r.prompt_len, r.prompt_len + model.num_latent)
    full = torch.stack([r.hooks.recorded(HEAD_COMPONENT, layer)[0, lat] for layer in range(model.n_layers)])
    return {head_component(h): full[..., h * d_head : (h + 1) * d_head].contiguous() for h in range(n_heads)}


def add_head_acts(model: LatentModel, records: Sequence[RunRecord]) -> None:
    """Add :func:`head_acts` to each record's ``acts`` (in place; records that have them are skipped)."""
    for rec in records:
        if head_component(0) not in rec.acts:
            rec.acts.update(head_acts(model, rec.prompt, rec.stream))
