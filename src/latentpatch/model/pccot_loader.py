"""PCCoT checkpoints (``pccot:DIR`` or ``pccot:ORG/NAME``; github whyNLP/PCCoT at 2e32e3e,
``test_ccot.py`` and ``models/``; docs/method.md "SIM-CoT and PCCoT").

A released PCCoT model (``whynlp/pccot-gpt2``) is a peft adapter directory written by
``trainer.save_model()`` plus ``config.json`` and ``pccot_args.json``:

- ``adapter_config.json``: LoRA (r 128, alpha 32 in the scripts; targets c_attn/c_fc/c_proj with
  ``fan_in_fan_out`` for GPT-2's Conv1D, whose weights are [in, out]), ``trainable_token_indices``
  ``{"wte": [bot, eot, latent, pad, eos]}`` and ``base_model_name_or_path`` (the base weights).
- ``adapter_model.safetensors`` (or ``.bin``): ``base_model.model.<module>.lora_{A,B}.weight`` and
  ``base_model.model.transformer.wte.token_adapter.trainable_tokens_delta`` [n, d], the *values*
  of those rows (peft's name; measured with peft 0.22: the rows are replaced, and a tied LM head
  reads the same rows); optionally the whole ``transformer.wte.weight`` when peft saved the resized
  embedding.
- ``config.json``: the base's GPT-2 config with PCCoT's keys; ``num_iterations`` (the rounds T;
  3 in the scripts, 6 when the key is absent: ``PCCoTGPT2Config``'s default) and
  ``use_projection`` (False: the identity feedback; True is refused here, its layout is not known).
- ``pccot_args.json``: ``num_latent_tokens`` (N; 24 for the released model), the special ids, the
  ``answer_prompt`` ("The answer is:").

Every weight goes through the strict core (:func:`~latentpatch.model.checkpoint.load_weights_strict`):
the base's keys, the adapter's LoRA keys and nothing else; the attention-mask buffers some GPT-2
weight files carry (``attn.bias``, ``attn.masked_bias``) are named as known and unused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from latentpatch.errors import LatentPatchError
from latentpatch.model.checkpoint import LoraSpec, load_weights_strict, preview, read_state_dict
from latentpatch.model.config import LatentConfig
from latentpatch.model.feedback import IdentityFeedback
from latentpatch.model.hf import check_device, check_special_ids, local_tokenizer, move_to, parse_dtype
from latentpatch.model.pccot import PCCoTModel
from latentpatch.model.sites import embedding_matrix

log = logging.getLogger("latentpatch.model.pccot")

#: config.json keys PCCoTGPT2Config adds to GPT-2's (``models/configuration_gpt2.py``)
PCCOT_CONFIG_KEYS = ("loss_alpha", "loss_beta", "loss_gamma", "use_layerwise_std", "use_projection", "num_iterations")
#: ``PCCoTGPT2Config``'s default rounds when config.json has no ``num_iterations``
DEFAULT_ROUNDS = 6
TOKEN_DELTA = "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"
PEFT_PREFIX = "base_model.model."
#: what a base is fetched for: its config and weights (never its other formats)
BASE_WEIGHT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")

#: the released PCCoT model (whyNLP/PCCoT README, test_ccot.sh.template); ``latentpatch models``
PCCOT_PRESETS: dict[str, dict[str, Any]] = {
    "pccot-gpt2": dict(
        repo="whynlp/pccot-gpt2",
        base="gpt2",
        about="PCCoT GPT-2 on GSM8k-Aug: N 24 slots, T 3 Jacobi rounds (config.json num_iterations); "
        "peft LoRA r 128 alpha 32 on c_attn/c_fc/c_proj + trainable token rows",
    ),
}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise LatentPatchError(f"{path.parent}: no {path.name} ({what}); fix: point pccot: at the adapter directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LatentPatchError(f"{path}: not readable JSON ({type(err).__name__}); fix: re-download it") from None
    if not isinstance(data, dict):
        raise LatentPatchError(f"{path}: expected a JSON object; fix: re-download it")
    return data


def _gpt2_config(cfg: dict[str, Any], file: Path) -> tuple[Any, int, bool]:
    """(GPT2Config of the base, rounds T, use_projection) from PCCoT's config.json."""
    from transformers import GPT2Config

    if not str(cfg.get("model_type", "")).endswith("gpt2"):
        raise LatentPatchError(
            f"{file}: model_type {cfg.get('model_type')!r}: only PCCoT's GPT-2 (pccot-gpt2) is supported; "
            "fix: use a pccot-gpt2 checkpoint"
        )
    rounds = int(cfg.get("num_iterations", DEFAULT_ROUNDS))
    plain = {k: v for k, v in cfg.items() if k not in PCCOT_CONFIG_KEYS + ("model_type", "architectures")}
    return GPT2Config(**plain), rounds, bool(cfg.get("use_projection", False))


def _tokenizer(path: Path) -> Any:
    """The adapter directory's tokenizer (PCCoT's special tokens added), read without AutoConfig:
    config.json names model_type ``pccot-gpt2``, which transformers does not know."""
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return local_tokenizer(path)


def _base_weights(base_dir: Path) -> dict[str, torch.Tensor]:
    """The base GPT-2's weights as ``GPT2LMHeadModel`` keys: hub gpt2 files name them without the
    ``transformer.`` prefix; attention-mask buffers are named as known and unused."""
    sd, file = read_state_dict(base_dir)
    if not any(k.startswith("transformer.") for k in sd):
        sd = {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in sd.items()}
    buffers = sorted(k for k in sd if k.endswith((".attn.bias", ".attn.masked_bias")))
    if buffers:
        log.info("%s: %d attention-mask buffer(s) are known and unused: %s", file, len(buffers), preview(buffers))
    return {k: v for k, v in sd.items() if k not in set(buffers)}


def load_pccot(
    path: str | Path,
    base: str | None = None,
    *,
    rounds: int | None = None,
    num_latent: int | None = None,
    site_round: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
) -> PCCoTModel:
    """Load a PCCoT adapter directory strictly into a :class:`PCCoTModel` (LoRA and the trainable
    token rows merged into the base). ``base``: the base model directory (config and *weights*;
    default: the adapter's ``base_model_name_or_path``, resolved by :func:`resolve_base`).
    ``rounds`` / ``num_latent`` override config.json's ``num_iterations`` and pccot_args.json's
    ``num_latent_tokens``; ``site_round``: the round whose slots are the sites the engine patches
    (default the last; ``--pccot-round``).
    """
    from transformers import GPT2LMHeadModel

    dtype = parse_dtype(dtype)
    dev = check_device(device)
    path = Path(path)
    if not path.is_dir():
        raise LatentPatchError(f"--model pccot:{path}: no such directory; fix: point it at the adapter directory")
    acfg = _read_json(path / "adapter_config.json", "the peft adapter's settings")
    cfg, rounds_file, use_projection = _gpt2_config(_read_json(path / "config.json", "the model config"), path)
    args = _read_json(path / "pccot_args.json", "PCCoT's arguments")
    if use_projection:
        raise LatentPatchError(
            f"{path}/config.json: use_projection is true; a PCCoT projection head is not supported yet "
            "(its saved layout is unverified); fix: use a checkpoint trained without it"
        )
    if acfg.get("peft_type", "LORA") != "LORA" or not acfg.get("fan_in_fan_out", False):
        raise LatentPatchError(
            f"{path}/adapter_config.json: expected a LoRA adapter with fan_in_fan_out (GPT-2's Conv1D); "
            "fix: re-save the adapter with peft"
        )
    base = base or acfg.get("base_model_name_or_path")
    if not base:
        raise LatentPatchError(f"{path}: which base model? fix: pass --base (PCCoT's released model: gpt2)")
    base_dir = resolve_base(str(base))
    token_ids = [int(i) for i in (acfg.get("trainable_token_indices") or {}).get("wte", [])]
    tokenizer = _tokenizer(path)
    vocab = max([int(cfg.vocab_size), len(tokenizer) if tokenizer is not None else 0, *(i + 1 for i in token_ids)])

    weights = path / "adapter_model.safetensors"
    adapter, file = read_state_dict(weights if weights.is_file() else path / "adapter_model.bin")
    delta = adapter.pop(TOKEN_DELTA, None)
    if token_ids and (delta is None or tuple(delta.shape) != (len(token_ids), int(cfg.n_embd))):
        raise LatentPatchError(
            f"{file}: trainable_token_indices names {len(token_ids)} rows but {TOKEN_DELTA} is "
            f"{'missing' if delta is None else list(delta.shape)}; fix: re-download the adapter"
        )
    saved_emb = adapter.pop(PEFT_PREFIX + "transformer.wte.weight", None)
    base_sd = _base_weights(base_dir)
    if "transformer.wte.weight" in base_sd:  # the LM is built at the base's size, resized after the merge
        cfg.vocab_size = int(base_sd["transformer.wte.weight"].shape[0])
    lm = GPT2LMHeadModel(cfg)
    combined = {PEFT_PREFIX + k: v for k, v in base_sd.items()}
    combined.update(adapter)
    lora = LoraSpec(
        r=int(acfg["r"]),
        alpha=float(acfg["lora_alpha"]),
        targets=tuple(acfg["target_modules"]),
        base_layer=False,
        adapter="",
    )
    load_weights_strict(
        lm, IdentityFeedback(), combined, file=file, prefix=PEFT_PREFIX, lora=lora, hint="wrong --base?"
    )
    base_vocab = int(cfg.vocab_size)
    with torch.no_grad():
        lm.resize_token_embeddings(vocab, mean_resizing=False)
        emb = embedding_matrix(lm)
        if saved_emb is not None:
            if tuple(saved_emb.shape) != tuple(emb.shape):
                raise LatentPatchError(
                    f"{file}: transformer.wte.weight is {list(saved_emb.shape)}, expected {list(emb.shape)}; "
                    "fix: wrong --base?"
                )
            emb.copy_(saved_emb)
        new_rows = set(range(base_vocab, vocab)) - set(token_ids) if saved_emb is None else set()
        if new_rows:
            raise LatentPatchError(
                f"{file}: embedding rows {sorted(new_rows)} are added by the tokenizer but neither trained nor "
                "saved; fix: check the adapter's trainable_token_indices"
            )
        if delta is not None:
            emb[torch.tensor(token_ids)] = delta.to(emb.dtype)  # tied: the LM head reads the same rows
    move_to(lm, dtype)
    lm.eval()
    N = int(num_latent if num_latent is not None else args.get("num_latent_tokens", 6))
    eos = int(
        tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None else cfg.eos_token_id
    )
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else eos
    config = LatentConfig(
        num_latent=N,
        pad_id=int(pad),
        bot_id=int(args["bot_token_id"]),
        eot_id=int(args["eot_token_id"]),
        eos_id=eos,
        remove_eos=True,
        answer_prefix=" ",
        max_answer_tokens=64,
        decoding="coconut",  # the official generate: the first token any argmax, later ones stop at eos
        question_text="raw",
    )
    check_special_ids(config, lm, str(path))
    answer_prompt = str(args.get("answer_prompt", "The answer is:"))
    prompt_ids = list(tokenizer.encode(answer_prompt, add_special_tokens=False)) if tokenizer is not None else []
    move_to(lm, dev)
    return PCCoTModel(
        lm,
        IdentityFeedback(),
        config,
        tokenizer,
        name=name or f"pccot:{path}",
        rounds=int(rounds if rounds is not None else rounds_file),
        latent_id=int(args["latent_token_id"]),
        answer_prompt_ids=prompt_ids,
        site_round=site_round,
    )


def resolve_base(base: str) -> Path:
    """The local directory of the base model (its config and weights): a local path, else a hub
    name through the one hub cache (:func:`latentpatch.model.hub.resolve_repo`)."""
    from latentpatch.model.hub import resolve_repo, split_hub_name

    if Path(base).exists():
        return Path(base)
    hub = split_hub_name(base)
    if hub is None:  # a bare hub name such as "gpt2"
        hub = (base, None) if base and "/" not in base else None
    if hub is None:
        raise LatentPatchError(f"--base {base}: no such directory or hub name; fix: pass the base GPT-2 (gpt2)")
    return resolve_repo(hub[0], hub[1], what=f"--base {base}", allow_patterns=BASE_WEIGHT_FILES)
