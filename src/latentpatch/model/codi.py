"""Official CODI checkpoints (``codi:``): LoRA merged into the base LM, the projection, the
special ids; :data:`PRESETS` hold the released checkpoints' settings (docs/method.md §11.1).

Every weight goes through the strict core of :mod:`latentpatch.model.checkpoint`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentpatch.errors import LatentPatchError
from latentpatch.model.checkpoint import (
    LORA_KEY,
    LoraSpec,
    load_weights_strict,
    preview,
    read_state_dict,
    split_known_unused,
)
from latentpatch.model.config import LatentConfig, build_prj
from latentpatch.model.hf import (
    base_config_and_tokenizer,
    build_lm,
    check_device,
    check_special_ids,
    move_to,
    parse_dtype,
    resolve_eos_id,
)
from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import embedding_matrix

log = logging.getLogger("latentpatch.model.codi")

_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")

#: The released CODI checkpoints (github zhenyi4/codi README: huggingface.co/zen-E) and the
#: settings of the official scripts (scripts/test_gpt2.sh, test_llama1b.sh, train_*_gsm8k-aug.sh):
#: LoRA r 128 / alpha 32 on every linear layer (test.py's target lists), prj_dim = d_model with its
#: LayerNorm (prj_no_ln False), 6 latent iterations, --remove_eos True. ``repo``: the hub name
#: ``--model codi:`` may omit; ``about``: one line for ``latentpatch models``. docs/checkpoints.md.
PRESETS: dict[str, dict[str, Any]] = {
    "codi-gpt2": dict(
        repo="zen-E/CODI-gpt2",
        base="gpt2",
        lora_r=128,
        lora_alpha=32,
        lora_targets=("c_attn", "c_proj", "c_fc"),
        prj_dim=768,
        prj_ln=True,
        num_latent=6,
        remove_eos=True,
        eos_id=50256,
        answer_prefix="The answer is: ",
        about="CODI GPT-2 (124M) on GSM8k-Aug; as scripts/test_gpt2.sh",
    ),
    "codi-llama1b": dict(
        repo="zen-E/CODI-llama3.2-1b-Instruct",
        base="meta-llama/Llama-3.2-1B-Instruct",
        lora_r=128,
        lora_alpha=32,
        lora_targets=_LLAMA_TARGETS,
        prj_dim=2048,
        prj_ln=True,
        num_latent=6,
        remove_eos=True,
        eos_id=128001,
        answer_prefix="The answer is: ",
        about="CODI LLaMA-3.2-1B-Instruct; stops at <|end_of_text|> 128001 as scripts/test_llama1b.sh "
        "(whose tokenizer is Llama-3.2-1B's)",
    ),
}
# the same checkpoint and settings; only the stop token differs
PRESETS["codi-llama1b-instruct"] = {
    **PRESETS["codi-llama1b"],
    "eos_id": 128009,
    "about": "the same checkpoint, stopping at the Instruct tokenizer's eos <|eot_id|> 128009 "
    "(the token its training appended)",
}

#: SIM-CoT's CODI side (github InternLM/SIM-CoT CODI/src/model.py): the training-only step decoder
#: (``decoder.*``, a copy of the base) and its optional width adapters (``pj_in.*``, ``pj_out.*``)
#: are saved with the model and never used at inference; the official test.py drops them silently
#: with ``strict=False``; here they are named as known and unused (docs/method.md "SIM-CoT and PCCoT")
SIMCOT_CODI_UNUSED = ("decoder.", "pj_in.", "pj_out.")
#: the released SIM-CoT CODI checkpoints (huggingface.co/internlm; test scripts of CODI/scripts:
#: test_gpt2.sh, test_llama1b-copy.sh, test_llama8b-copy.sh): CODI's settings, prj_dim per base,
#: eos = the Instruct tokenizer's eos (test.py stops at ``tokenizer.eos_token_id``)
PRESETS["simcot-codi-gpt2"] = {
    **PRESETS["codi-gpt2"],
    "repo": "internlm/SIM_COT-GPT2-CODI",
    "known_unused": SIMCOT_CODI_UNUSED,
    "about": "SIM-CoT (CODI variant) GPT-2; as CODI/scripts/test_gpt2.sh (repository name unverified)",
}
PRESETS["simcot-codi-llama1b"] = {
    **PRESETS["codi-llama1b"],
    "repo": "internlm/SIM_COT-LLaMA3-CODI-1B",
    "eos_id": 128009,
    "known_unused": SIMCOT_CODI_UNUSED,
    "about": "SIM-CoT (CODI variant) LLaMA-3.2-1B-Instruct; as CODI/scripts/test_llama1b-copy.sh, "
    "stopping at the Instruct tokenizer's eos <|eot_id|> 128009",
}
PRESETS["simcot-codi-llama8b"] = {
    **PRESETS["codi-llama1b"],
    "repo": "internlm/SIM_COT-LLaMA3-CODI-8B",
    "base": "meta-llama/Llama-3.1-8B-Instruct",
    "prj_dim": 4096,
    "eos_id": 128009,
    "known_unused": SIMCOT_CODI_UNUSED,
    "about": "SIM-CoT (CODI variant) LLaMA-3.1-8B-Instruct; as CODI/scripts/test_llama8b-copy.sh "
    "(prj_dim 4096), stopping at <|eot_id|> 128009",
}

#: preset keys that are not load_codi_checkpoint settings
PRESET_INFO_KEYS = ("repo", "about")

# ------------------------------------------------------------------------------------------------
# CODI checkpoints


def get_preset(name: str | None) -> dict[str, Any]:
    """A copy of :data:`PRESETS` ``[name]`` (``{}`` for None), ``repo`` and ``about`` included."""
    if name is None:
        return {}
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise LatentPatchError(f"--preset {name!r} is unknown; fix: use one of {', '.join(PRESETS)}") from None


def _resolve(value: Any, preset: dict[str, Any], key: str, default: Any = None) -> Any:
    """An explicit argument, else the preset's value, else ``default``."""
    if value is not None:
        return value
    return preset.get(key, default)


def _normalise_targets(targets: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [t for t in re.split(r"[,\s]+", targets) if t]
    return tuple(targets)


def _codi_lora(
    sd: dict[str, torch.Tensor],
    file: Path,
    peft_layout: bool,
    *,
    r: int | None,
    alpha: float | None,
    targets: tuple[str, ...] | None,
    targets_given: bool,
) -> LoraSpec | None:
    """The LoRA of a CODI file: settings given (or from a preset) checked against the file's layout,
    unset rank and targets read from the file. None for a file without LoRA."""
    if not peft_layout:
        if r not in (None, 0) or targets_given:
            raise LatentPatchError(
                f"{file}: the checkpoint has no LoRA (keys codi.<model> without peft's "
                "base_model wrapper) but LoRA settings were given; fix: pass --lora-r 0 "
                "(or drop --preset/--lora-*)"
            )
        return None
    lora_keys = [m for m in (LORA_KEY.match(k) for k in sd) if m]
    if r == 0:
        raise LatentPatchError(
            f"{file}: the checkpoint holds LoRA weights (peft layout) but --lora-r 0 was "
            "given; fix: pass its LoRA rank/alpha or a --preset"
        )
    if not lora_keys:
        raise LatentPatchError(
            f"{file}: peft layout (codi.base_model.model.*) but no lora_A/lora_B keys; fix: "
            "re-save the checkpoint, or check it is not truncated"
        )
    if targets is None:
        targets = tuple(sorted({m.group("module").rpartition(".")[2] for m in lora_keys}))
        log.info("%s: LoRA targets read from the file: %s", file, ", ".join(targets))
    if r is None:
        first = next(m for m in lora_keys if m.group("ab") == "A")
        r = int(sd[first.group(0)].shape[0])
        log.info("%s: LoRA rank read from the file: %d", file, r)
    if alpha is None:
        raise LatentPatchError(
            f"{file}: the checkpoint has LoRA (rank {r}) but its alpha is unknown; fix: pass "
            f"--lora-alpha (released CODI: 32) or --preset"
        )
    if int(r) <= 0 or float(alpha) <= 0:
        raise LatentPatchError(f"--lora-r {r} / --lora-alpha {alpha}: must be positive")
    return LoraSpec(
        r=int(r),
        alpha=float(alpha),
        targets=targets,
        base_layer=any(".base_layer." in k for k in sd),
        adapter=lora_keys[0].group("adapter") or "",
    )


def _codi_prj_dim(sd: dict[str, torch.Tensor], file: Path) -> int:
    """The projection width stored in a CODI file."""
    if "prj.1.weight" in sd:
        return int(sd["prj.1.weight"].shape[0])
    if "prj.3.weight" in sd:
        return int(sd["prj.3.weight"].shape[1])
    raise LatentPatchError(
        f"{file}: no projection keys (prj.1.weight, prj.1.bias, prj.3.weight, prj.3.bias "
        "missing): a CODI checkpoint stores its prj; fix: for Coconut (identity projection) "
        "use coconut:FILE"
    )


def load_codi_checkpoint(
    ckpt_dir: str | Path,
    base: str | None = None,
    *,
    preset: str | None = None,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | str | None = None,
    prj_dim: int | None = None,
    prj_ln: bool | None = None,
    num_latent: int | None = None,
    remove_eos: bool | None = None,
    eos_id: int | None = None,
    answer_prefix: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
    known_unused: Sequence[str] | None = None,
) -> LatentModel:
    """Load an official CODI checkpoint (``pytorch_model.bin`` or ``model.safetensors``) strictly.

    ``base`` is the base model (local dir or hub name) the checkpoint was trained from; its config
    builds the LM, its vocabulary V gives pad/bot/eot = V, V+1, V+2 (CODI's +3 resize) and its
    tokenizer (if any) is used. Explicit arguments override the ``preset``. Unset LoRA settings are
    read from the file where possible (targets and rank; ``lora_alpha`` must be given or come from a
    preset); ``lora_r=0`` asserts a checkpoint without LoRA. ``prj_dim``/``prj_ln`` unset: read
    from the file. LoRA is merged into the base weights. ``name``: the model's name (default
    ``codi:<ckpt_dir>``). ``known_unused``: key prefixes the file may hold that inference never
    uses (SIM-CoT's training-only decoder, :data:`SIMCOT_CODI_UNUSED`; from the preset): they are
    named in a log line and left out; any other key outside the layout is still an error.
    """
    p = get_preset(preset)
    dtype = parse_dtype(dtype)
    dev = check_device(device)
    base = base if base is not None else p.get("base")
    if base is None:
        raise LatentPatchError(
            f"{ckpt_dir}: which base model was this checkpoint trained from? fix: pass --base "
            f"(a local dir or hub name) or --preset ({', '.join(PRESETS)})"
        )
    sd, file = read_state_dict(ckpt_dir)
    unused_prefixes = tuple(_resolve(known_unused, p, "known_unused", ()))
    if not unused_prefixes and any(k.startswith("decoder.") for k in sd):
        raise LatentPatchError(
            f"{file}: decoder.* keys (SIM-CoT's training-only step decoder) in a CODI checkpoint; fix: "
            "pass its SIM-CoT preset (--preset simcot-codi-gpt2, simcot-codi-llama1b or simcot-codi-llama8b)"
        )
    sd, _ = split_known_unused(sd, unused_prefixes, file=file)
    peft_prefix, plain_prefix = "codi.base_model.model.", "codi."  # with LoRA (peft-wrapped) / plain
    if any(k.startswith(peft_prefix) for k in sd):
        prefix = peft_prefix
    elif any(k.startswith(plain_prefix) for k in sd):
        prefix = plain_prefix
    else:
        raise LatentPatchError(
            f"{file}: no codi.* keys (keys look like {preview(sorted(sd), 3)}): not a CODI "
            "checkpoint; fix: for Coconut use coconut:FILE, for a latentpatch dir use dir:PATH"
        )
    lora = _codi_lora(
        sd,
        file,
        prefix == peft_prefix,
        r=_resolve(lora_r, p, "lora_r"),
        alpha=_resolve(lora_alpha, p, "lora_alpha"),
        targets=_normalise_targets(_resolve(lora_targets, p, "lora_targets")),
        targets_given=lora_targets is not None,
    )
    prj_dim = _resolve(prj_dim, p, "prj_dim")
    if prj_dim is None:
        prj_dim = _codi_prj_dim(sd, file)
    prj_ln = _resolve(prj_ln, p, "prj_ln")
    if prj_ln is None:
        prj_ln = any(k.startswith("prj.ln.") for k in sd)

    config, tokenizer = base_config_and_tokenizer(str(base))
    V = int(config.vocab_size)
    config.vocab_size = V + 3  # CODI's resize: pad/bot/eot = V, V+1, V+2
    lm = build_lm(config, dtype)
    prj = build_prj(embedding_matrix(lm).shape[1], int(prj_dim), layer_norm=bool(prj_ln)).to(dtype)
    load_weights_strict(
        lm,
        prj,
        sd,
        file=file,
        prefix=prefix,
        lora=lora,
        hint="wrong --base, --lora-r/--lora-targets, --prj-dim or --preset?",
    )
    eos = resolve_eos_id(tokenizer, config, explicit=_resolve(eos_id, p, "eos_id"), where=f"--base {base}")
    cfg = LatentConfig(
        num_latent=int(_resolve(num_latent, p, "num_latent", 6)),
        pad_id=V,
        bot_id=V + 1,
        eot_id=V + 2,
        eos_id=eos,
        remove_eos=bool(_resolve(remove_eos, p, "remove_eos", True)),
        answer_prefix=_resolve(answer_prefix, p, "answer_prefix", "The answer is: "),
        max_answer_tokens=256,  # CODI's test.py: max_new_tokens 256
        decoding="codi",
        question_text="codi",
    )
    check_special_ids(cfg, lm, str(file))
    move_to(lm, dev)
    name = (name or f"codi:{ckpt_dir}") + (f" ({preset})" if preset else "")
    return LatentModel(lm, prj.to(dev).eval(), cfg, tokenizer, name=name)
