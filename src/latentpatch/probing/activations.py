"""Activations recorded once per question, for every trained reader (docs/method.md §16).

One batched rollout of a shard of questions records every site a probe (or a lens, or later a
subspace) reads: each component's activation at every layer at the K thought positions, the first
answer position and the question's last token, and the thought before and after the feedback
(``thought_pre``, ``thought``). Nothing is recomputed per probe: the probes read the shards.

A shard is ``results/activations/NNNNN.safetensors`` (NNNNN its index; :data:`~latentpatch.names.
ACTIVATION_SHARD` questions each, so a resumed run cuts the same shards), written atomically:

- ``<component>``: [n, L, K + 2, d], positions :func:`~latentpatch.names.probe_position_names`
  (``t0..t{K-1}``, ``ans``, ``question``);
- ``thought``, ``thought_pre``: [n, K, d] (``thought_pre`` only where the feedback has one);
- metadata ``latentpatch``: JSON ``{rows, positions, components, dtype}``, ``rows`` the list of
  ``{question_id, pred_answer, correct}`` in row order.

>>> from latentpatch.model.load import load_model
>>> model = load_model("default")
>>> shard = record_shard(model, [model.prompt_ids("Tom has 3 apples and buys 4 more. How many?")], ("resid_out",))
>>> tuple(shard.tensors["resid_out"].shape), tuple(shard.tensors["thought"].shape)
((1, 4, 8, 128), (1, 6, 128))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from latentpatch.files import atomic_write_bytes
from latentpatch.model.config import extract_number
from latentpatch.model.latent import LatentModel
from latentpatch.names import probe_position_names
from latentpatch.patching.reading import query_indices

#: The one metadata entry of a shard: JSON ``{rows, positions, components, dtype}``.
METADATA_KEY = "latentpatch"
#: Activation dtypes a run may store (``--activation-dtype``).
ACTIVATION_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class Shard:
    """One shard's tensors (name -> [n, ...]) and the model's greedy answer per question."""

    tensors: dict[str, torch.Tensor]
    pred_answers: list[float | None]


@torch.no_grad()
def record_shard(
    model: LatentModel,
    prompts: Sequence[Sequence[int]],
    components: Sequence[str],
    batch_size: int = 64,
    streams: Sequence[int | None] | None = None,
) -> Shard:
    """One batched rollout per ``batch_size`` prompts: every site of every question (fp32; see the module).
    ``streams``: each question's draw-stream key (its group's, docs/method.md §21; None: the run's)."""
    keys = [None] * len(prompts) if streams is None else list(streams)
    L, K = model.n_layers, model.num_latent
    parts: dict[str, list[torch.Tensor]] = {}
    preds: list[float | None] = []
    for start in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[start : start + batch_size]]
        record = [(c, layer) for c in components for layer in range(L)]
        r = model.rollout(batch, record=record, streams=keys[start : start + batch_size])
        assert r.hooks is not None
        # latent positions and the first answer position (as the lens reads them), then the question's last token
        idx = query_indices(r.prompt_len, K, r.state.length) + [r.prompt_len - 1]
        for c in components:
            stacked = torch.stack([r.hooks.recorded(c, layer)[:, idx] for layer in range(L)], dim=1)  # [B, L, K+2, d]
            parts.setdefault(c, []).append(stacked.float().cpu())
        parts.setdefault("thought", []).append(r.thoughts.float().cpu())
        if model.feedback.has_pre_site:
            parts.setdefault("thought_pre", []).append(r.thought_source_hidden().float().cpu())
        for ids in model.generate(r.state, r.answer_logits):
            preds.append(extract_number(model.decode(ids)) if model.tokenizer is not None else None)
    return Shard({name: torch.cat(ts) for name, ts in parts.items()}, preds)


def write_shard(
    path: Path,
    shard: Shard,
    rows: list[dict[str, Any]],
    num_latent: int,
    components: Sequence[str],
    dtype: str = "float32",
) -> None:
    """Write ``shard`` (cast to ``dtype``) with its ``rows`` (one dict per question) atomically."""
    tensors = {name: t.to(ACTIVATION_DTYPES[dtype]).contiguous() for name, t in shard.tensors.items()}
    info = {
        "rows": rows,
        "positions": probe_position_names(num_latent),
        "components": list(components),
        "dtype": dtype,
    }
    # one metadata key: safetensors keeps metadata in a hash map, whose key order varies between processes
    atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: json.dumps(info)}))


def read_shard_rows(path: Path) -> list[dict[str, Any]] | None:
    """The ``rows`` of a shard (None when the file is missing or damaged: it is recorded again)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return list(json.loads(meta[METADATA_KEY])["rows"])
    except Exception:  # missing, truncated or foreign: the caller records the shard again
        return None


def read_sites(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """Every shard's tensors concatenated over questions, in shard order, as float32."""
    out: dict[str, list[torch.Tensor]] = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out.setdefault(name, []).append(f.get_tensor(name).float())
    return {name: torch.cat(ts) for name, ts in out.items()}
