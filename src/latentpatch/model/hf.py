"""Hugging Face glue shared by the loaders and the model-directory format.

Turning ``--dtype``/``--device`` strings into torch objects, building an LM from a config without
spending time on random init, finding tokenizers, the one rule for the end-of-sequence id, and
the check that a :class:`LatentConfig`'s special ids fit the LM's vocabulary.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from latentpatch.errors import LatentPatchError
from latentpatch.model.config import LatentConfig
from latentpatch.model.hub import BASE_FILES, resolve_repo
from latentpatch.model.sites import embedding_matrix

log = logging.getLogger("latentpatch.model.hf")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise LatentPatchError(f"--dtype {dtype!r} is not supported; fix: use float32, bfloat16 or float16") from None


def check_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a LatentPatchError naming ``--device``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise LatentPatchError(f"--device {device!r} is not a device ({err}); fix: use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LatentPatchError(f"--device {device}: CUDA is not available here; fix: use --device cpu")
    return dev


def build_lm(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """An HF causal LM from a config, without spending time on random init (weights are loaded next)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5 keeps it in modeling_utils
        no_init_weights = importlib.import_module("transformers.modeling_utils").no_init_weights
    with no_init_weights():
        lm = AutoModelForCausalLM.from_config(config)
    lm.tie_weights()  # no_init_weights also skips the tying done by init_weights
    return lm.to(dtype).eval()


def move_to(lm: PreTrainedModel, where: torch.device | torch.dtype) -> None:
    """``lm.to(where)``, in place. (transformers wraps ``PreTrainedModel.to`` with ``functools.wraps``,
    which hides its signature from type checkers; the call through ``nn.Module`` is typed.)"""
    cast(nn.Module, lm).to(where)


def local_tokenizer(path: Path, **kwargs: Any) -> Any:
    """The tokenizer saved in a local directory, or None when the directory has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as err:
        log.warning("%s: could not load the tokenizer (%s); continuing with token ids only", path, err)
        return None


def base_config_and_tokenizer(base: str) -> tuple[PretrainedConfig, Any]:
    """(config, tokenizer or None) of a base model: a local directory, or a hub name ``ORG/NAME[@REV]``
    (or a bare legacy name such as ``gpt2``) whose config and tokenizer files come from the hub cache
    or a download (:func:`latentpatch.model.hub.resolve_repo`; never its weights)."""
    from transformers import AutoConfig

    p = Path(base)
    if not p.exists():
        repo, _, rev = base.partition("@")
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", repo):
            raise LatentPatchError(
                f"--base {base}: no such directory, and not a hub name (ORG/NAME[@REV]); fix: pass the "
                "base model's local directory or its hub name"
            )
        p = resolve_repo(repo, rev or None, what=f"--base {base}", allow_patterns=BASE_FILES)
    if not (p / "config.json").is_file():
        raise LatentPatchError(
            f"--base {base}: no config.json in {p}; fix: pass the directory of the base model the "
            "checkpoint was trained from (or its hub name)"
        )
    return AutoConfig.from_pretrained(str(p)), local_tokenizer(p)


def resolve_eos_id(
    tokenizer: Any, config: PretrainedConfig, *, explicit: int | None = None, where: str, fix: str = "pass --eos-id"
) -> int:
    """The end-of-sequence id: ``explicit`` if given, else the tokenizer's, else the LM config's
    (the first one when the config lists several). ``where`` and ``fix`` complete the error."""
    eos = explicit
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is None:
        raise LatentPatchError(f"{where}: no eos id in its config or tokenizer; fix: {fix}")
    return int(eos)


def check_special_ids(cfg: LatentConfig, lm: PreTrainedModel, where: str) -> None:
    """Raise unless pad/bot/eot/eos ids are rows of the LM's vocabulary and ``num_latent`` >= 1."""
    V = embedding_matrix(lm).shape[0]
    for field in ("pad_id", "bot_id", "eot_id", "eos_id"):
        v = getattr(cfg, field)
        if not 0 <= v < V:
            raise LatentPatchError(f"{where}: {field} {v} is outside the vocabulary (size {V}); fix: check {field}")
    if cfg.num_latent < 1:
        raise LatentPatchError(f"--num-latent {cfg.num_latent}: must be at least 1")
