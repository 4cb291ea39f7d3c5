"""The latentpatch model directory: the one format this project writes models in.

A directory holds::

    latentpatch.json     format tag, family, the LatentConfig fields, prj_dim, prj_ln, feedback (+ extra keys)
    config.json          the final LM's transformers config (vocabulary incl. the special tokens)
    model.safetensors    codi.<hf keys> (CODI layout without LoRA) + prj.* ; a tied lm_head is omitted
    tokenizer files      optional

:func:`save_latent_dir` writes it and :func:`load_latent_dir` reads it back strictly (every key
and shape checked by :func:`latentpatch.model.checkpoint.load_weights_strict`). The shipped
default model is such a directory. ``latentpatch.json`` <-> :class:`LatentConfig` is
:func:`latent_meta` / :func:`read_latent_meta` + :func:`config_from_meta`, and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import torch

from latentpatch.errors import LatentPatchError
from latentpatch.files import atomic_path, atomic_write_text
from latentpatch.model.checkpoint import load_weights_strict, read_state_dict
from latentpatch.model.config import LatentConfig
from latentpatch.model.feedback import FEEDBACK_NAMES, Feedback, ProjectionFeedback, feedback_by_name
from latentpatch.model.hf import build_lm, check_device, check_special_ids, local_tokenizer, move_to, parse_dtype
from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import embedding_matrix
from latentpatch.names import MODEL_FORMAT  # the format tag in latentpatch.json; a reader refuses any other

#: the file name of the metadata
LATENT_JSON = "latentpatch.json"
#: keys ``latentpatch.json`` must hold as integers (the rest have LatentConfig's defaults)
REQUIRED_KEYS = ("num_latent", "pad_id", "bot_id", "eot_id", "eos_id")
#: the file key prefix of the LM's weights (the projection's is ``prj.``)
LM_PREFIX = "codi."


def latent_meta(
    config: LatentConfig,
    *,
    family: str,
    prj_dim: int | None,
    prj_ln: bool,
    extra: dict[str, Any] | None = None,
    feedback: str | None = None,
) -> dict[str, Any]:
    """The ``latentpatch.json`` object: format, family, every LatentConfig field, prj_dim, prj_ln,
    the feedback's name (:mod:`latentpatch.model.feedback`; left out when None), ``extra``."""
    return {
        "format": MODEL_FORMAT,
        "family": family,
        **config.to_dict(),
        "prj_dim": prj_dim,
        "prj_ln": bool(prj_ln),
        **({"feedback": feedback} if feedback is not None else {}),
        **(extra or {}),
    }


def feedback_name(meta: dict[str, Any]) -> str:
    """The feedback a ``latentpatch.json`` object records; a directory written before the key
    existed: ``"projection"`` when ``prj_dim`` is set, else ``"identity"`` (as it was read then)."""
    name = meta.get("feedback")
    if name is None:
        return "projection" if meta.get("prj_dim") else "identity"
    if name not in FEEDBACK_NAMES:
        raise LatentPatchError(
            f"{LATENT_JSON}: feedback {name!r}, expected one of {', '.join(FEEDBACK_NAMES)}; fix: correct the field"
        )
    return str(name)


def read_latent_meta(path: str | Path) -> dict[str, Any]:
    """``latentpatch.json`` of model directory ``path``, checked: format tag and :data:`REQUIRED_KEYS`."""
    path = Path(path)
    meta_file = path / LATENT_JSON
    if not path.is_dir():
        raise LatentPatchError(f"{path}: no such directory; fix: pass a latentpatch model directory")
    if not meta_file.is_file():
        raise LatentPatchError(
            f"{path}: not a latentpatch model directory (no {LATENT_JSON}); fix: for an "
            "official CODI checkpoint use codi:DIR with --base/--preset"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise LatentPatchError(f"{meta_file}: not valid JSON ({err}); fix: repair or re-save the model") from None
    if not isinstance(meta, dict):
        raise LatentPatchError(f"{meta_file}: expected a JSON object; fix: repair or re-save the model")
    fmt = meta.get("format")
    if fmt != MODEL_FORMAT:
        raise LatentPatchError(
            f"{meta_file}: format {fmt!r}, expected {MODEL_FORMAT!r}; fix: re-save the "
            "model with this version of latentpatch"
        )
    absent = [k for k in REQUIRED_KEYS if not isinstance(meta.get(k), int)]
    if absent:
        raise LatentPatchError(f"{meta_file}: missing or non-integer field(s) {', '.join(absent)}; fix: add them")
    return meta


def config_from_meta(meta: dict[str, Any], num_latent: int | None = None) -> LatentConfig:
    """The :class:`LatentConfig` a ``latentpatch.json`` object describes (absent optional keys take
    LatentConfig's defaults); ``num_latent`` overrides the file's."""
    types = get_type_hints(LatentConfig)
    values = {}
    for f in fields(LatentConfig):
        if f.name in meta:
            value = meta[f.name]
            values[f.name] = types[f.name](value) if types[f.name] in (int, bool) else value
    if num_latent is not None:
        values["num_latent"] = int(num_latent)
    try:
        return LatentConfig(**values)
    except ValueError as err:
        raise LatentPatchError(f"{LATENT_JSON}: {err}; fix: correct the field") from None


def save_latent_dir(
    model: LatentModel,
    path: str | Path,
    *,
    prj_dim: int | None = None,
    prj_ln: bool | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``model`` as a latentpatch model directory (the format :func:`load_latent_dir` reads).

    ``prj_dim``/``prj_ln`` default to the projection's own (None and False for an identity);
    ``extra`` keys are added to ``latentpatch.json`` (e.g. the training recipe).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm = model.lm
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    sd = {}
    for k, v in lm.state_dict().items():
        if tied and k == "lm_head.weight":
            continue
        sd[LM_PREFIX + k] = v.detach().contiguous().clone()
    feedback: Feedback = model.feedback
    for k, v in feedback.state_dict().items():
        sd["prj." + k] = v.detach().contiguous().clone()
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    lm.config.save_pretrained(str(path))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path))
    if prj_dim is None and isinstance(feedback, ProjectionFeedback):
        prj_dim = feedback.prj_dim
    if prj_ln is None:
        prj_ln = isinstance(feedback, ProjectionFeedback) and feedback.layer_norm
    meta = latent_meta(
        model.config, family=model.family, prj_dim=prj_dim, prj_ln=prj_ln, extra=extra, feedback=feedback.name
    )
    # written last: a directory whose save was interrupted has no valid latentpatch.json and is refused
    atomic_write_text(path / LATENT_JSON, json.dumps(meta, indent=2) + "\n")
    return path


def load_latent_dir(
    path: str | Path,
    *,
    num_latent: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> LatentModel:
    """Load a directory with ``latentpatch.json`` + ``config.json`` + ``model.safetensors`` (CODI
    layout without LoRA: ``codi.<hf keys>``, ``prj.*``) + optional tokenizer, strictly.

    ``config.json`` is the final model's config (vocabulary incl. the special tokens, whose ids come
    from ``latentpatch.json``). The feedback is the one ``"feedback"`` names; a directory without
    the key (written before it existed, e.g. the shipped default model) is read as then:
    ``prj_dim`` null = identity, else CODI's projection (:func:`feedback_name`).
    """
    from transformers import AutoConfig

    path = Path(path)
    meta = read_latent_meta(path)
    meta_file = path / LATENT_JSON
    if not (path / "config.json").is_file():
        raise LatentPatchError(f"{path}: no config.json; fix: save the LM config next to {LATENT_JSON}")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LatentPatchError(f"{path}: no model.safetensors; fix: save the weights next to {LATENT_JSON}")
    dtype = parse_dtype(dtype)
    dev = check_device(device)
    lm = build_lm(AutoConfig.from_pretrained(str(path)), dtype)
    d = embedding_matrix(lm).shape[1]
    prj_dim = meta.get("prj_dim")
    name = feedback_name(meta)
    if name == "projection" and not prj_dim:
        raise LatentPatchError(f"{meta_file}: feedback 'projection' needs prj_dim; fix: add it")
    prj = feedback_by_name(name, d, int(prj_dim) if prj_dim else None, layer_norm=bool(meta.get("prj_ln", True))).to(
        dtype
    )
    sd, file = read_state_dict(weights)
    load_weights_strict(
        lm,
        prj,
        sd,
        file=file,
        prefix=LM_PREFIX,
        hint=f"{meta_file} does not match the weights (prj_dim, prj_ln, config.json)",
    )
    cfg = config_from_meta(meta, num_latent)
    check_special_ids(cfg, lm, str(meta_file))
    move_to(lm, dev)
    return LatentModel(lm, prj.to(dev).eval(), cfg, local_tokenizer(path), name=str(path))
