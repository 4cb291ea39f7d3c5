"""On-disk activation cache: unpatched runs, keyed by model + prompt content, reused across runs.

One safetensors file per (model, prompt ids): the thoughts [K, d] and the states they were made
from (``thought_pre`` [K, d]), the latent activations of every component [n_layers, K, d], and the
greedy answer. A file without ``thought_pre`` (written before it was recorded) is a miss. A layer
run, a position run and an iterative run on the same model and pairs all read the same files.
A random feedback's run also depends on its draw stream (its pair's key, docs/method.md §21): its
file is keyed by (model, prompt ids, stream) and stores the key, so a question recorded for one
pair is never read back for another; deterministic families keep the (model, prompt) key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from latentpatch.files import atomic_path
from latentpatch.model.latent import LatentModel
from latentpatch.patching.baselines import RunRecord, record_run


def default_cache_dir() -> Path:
    root = os.environ.get("LATENTPATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "latentpatch"
    )
    return Path(root) / "activations"


@torch.no_grad()
def model_key(model: LatentModel) -> str:
    """A fingerprint of the weights, config, dtype and device type (cheap: one pass of sums)."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    h.update(f"{model.dtype}|{model.device.type}|{model.num_latent}".encode())
    # what a model family adds to its rollout beyond config and weights (PCCoT: rounds, site round);
    # "" for the others, which leaves their keys as they were
    h.update(str(getattr(model, "cache_identity", "")).encode())
    h.update(model.feedback.cache_identity().encode())  # a mixture's kind, settings and seed ("" else)
    for name, p in list(model.lm.named_parameters()) + list(model.prj.named_parameters()):
        x = p.detach().float()
        h.update(f"{name}|{tuple(p.shape)}|{float(x.sum()):.6e}|{float(x.abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


class ActivationCache:
    """``get``/``put`` of :class:`~latentpatch.patching.baselines.RunRecord` by prompt ids for one model."""

    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key
        self.hits = 0
        self.misses = 0

    def _path(self, prompt: list[int], stream: int | None = None) -> Path:
        key = list(prompt) if stream is None else {"prompt": list(prompt), "stream": int(stream)}
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
        return self.dir / f"{digest}.safetensors"

    def get(self, prompt: list[int], stream: int | None = None) -> RunRecord | None:
        """The record of ``prompt`` run with draw stream ``stream`` (None: a deterministic run's)."""
        path = self._path(prompt, stream)
        if not path.exists():
            self.misses += 1
            return None
        try:
            t = load_file(str(path))
        except Exception:  # a torn or foreign file: recompute
            self.misses += 1
            return None
        if t["prompt"].tolist() != list(prompt) or "thought_pre" not in t:  # (a file from before thought_pre)
            self.misses += 1
            return None
        if (None if "stream" not in t else int(t["stream"][0])) != stream:  # recorded with another stream
            self.misses += 1
            return None
        self.hits += 1
        acts = {k[len("acts.") :]: v for k, v in t.items() if k.startswith("acts.")}
        pred = float(t["pred"][0]) if t["has_pred"][0] else None
        return RunRecord(
            list(prompt), t["thoughts"], acts, t["answer_ids"].tolist(), pred, thought_pre=t["thought_pre"]
        )

    def put(self, record: RunRecord, stream: int | None = None) -> None:
        """Store ``record`` under its prompt and ``stream`` (what :meth:`get` is asked with)."""
        tensors = {
            "prompt": torch.tensor(record.prompt, dtype=torch.long),
            "thoughts": record.thoughts.contiguous().cpu(),
            "answer_ids": torch.tensor(record.answer_ids, dtype=torch.long),
            "pred": torch.tensor([record.pred if record.pred is not None else 0.0], dtype=torch.float64),
            "has_pred": torch.tensor([record.pred is not None]),
        }
        if record.thought_pre is not None:
            tensors["thought_pre"] = record.thought_pre.contiguous().cpu()
        if stream is not None:
            tensors["stream"] = torch.tensor([int(stream)], dtype=torch.long)
        tensors.update({f"acts.{c}": a.contiguous().cpu() for c, a in record.acts.items()})
        with atomic_path(self._path(record.prompt, stream)) as tmp:  # a concurrent reader never sees half a file
            save_file(tensors, str(tmp))


def recorded_run(
    model: LatentModel,
    cache: ActivationCache | None,
    question: str,
    keep_rollout: bool = False,
    guess: float | int | None = None,
    stream: int | None = None,
) -> RunRecord:
    """The unpatched run of one question, from ``cache`` when it holds it (and stored there if not).

    ``keep_rollout``: a record computed here keeps its rollout (:func:`record_run`); a cached one has none.
    ``stream``: the pair's draw-stream key (:func:`~latentpatch.model.streams.pair_stream`), part of
    the cache key when the feedback draws (a deterministic run is the same for every stream)."""
    prompt = model.prompt_ids(question)
    key = stream if model.feedback.random else None
    record = cache.get(prompt, key) if cache is not None else None
    if record is None:
        record = record_run(model, prompt, keep_rollout=keep_rollout, guess=guess, stream=stream)
        if cache is not None:
            cache.put(record, key)
    record.stream = stream
    return record
