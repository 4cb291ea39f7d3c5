"""Loading continuous-thought models: strict CODI checkpoints, latentpatch dirs, Coconut, GGUF.

One strict loader serves every layout (codi_format.md):

- CODI with LoRA (peft): ``codi.base_model.model.<hf keys>``, LoRA-wrapped linears as
  ``<module>.base_layer.weight`` (current peft) or ``<module>.weight`` (older peft), plus
  ``<module>.lora_A.default.weight`` / ``lora_B``; the LoRA is merged into the base weights.
- CODI without LoRA (and the latentpatch model directory): ``codi.<hf keys>``.
- ``prj.1.*``, ``prj.3.*`` and (unless the projection has no LayerNorm) ``prj.ln.*``.
- Coconut: ``base_causallm.<hf keys>`` + ``embedding.weight`` (identity projection).

Every missing or unexpected key, and every shape mismatch, is a :class:`LatentPatchError` that
names the file and suggests the fix. The one allowed absence is ``lm_head`` when the config ties
it to the input embeddings. When the file holds both and the config ties them, the file's
``lm_head`` serves both roles, as in the reference (which loads keys in order, so ``lm_head``
overwrites the tied embedding); a log line says so if the two tensors differ.

Special-token embedding rows (pad/bot/eot = V, V+1, V+2 after CODI's +3 resize) always come from
the checkpoint; they are never re-initialised.

Front door: :func:`load_model` with a spec string (``default``, ``codi:DIR``, ``coconut:FILE``,
``dir:PATH``, ``gguf:PATH``, ``config:llama|gpt2`` or a plain path).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from latentpatch.errors import LatentPatchError
from latentpatch.model.latent import LatentConfig, LatentModel, build_prj

log = logging.getLogger("latentpatch.model.loading")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"
LATENT_FORMAT = "latentpatch-codi/1"

_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")

#: Released CODI hyper-parameters (codi_format.md, "Released hyper-parameters").
PRESETS: dict[str, dict[str, Any]] = {
    "codi-gpt2": dict(
        base="gpt2", lora_r=128, lora_alpha=32, lora_targets=("c_attn", "c_proj", "c_fc"),
        prj_dim=768, prj_ln=True, num_latent=6, remove_eos=True, eos_id=50256,
        answer_prefix="The answer is: ",
    ),
    "codi-llama1b": dict(
        base="meta-llama/Llama-3.2-1B", lora_r=128, lora_alpha=32, lora_targets=_LLAMA_TARGETS,
        prj_dim=2048, prj_ln=True, num_latent=6, remove_eos=True, eos_id=128001,
        answer_prefix="The answer is: ",
    ),
    "codi-llama1b-instruct": dict(
        base="meta-llama/Llama-3.2-1B-Instruct", lora_r=128, lora_alpha=32, lora_targets=_LLAMA_TARGETS,
        prj_dim=2048, prj_ln=True, num_latent=6, remove_eos=True, eos_id=128009,
        answer_prefix="The answer is: ",
    ),
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?P<adapter>\.[^.]+)?\.weight$")


# ------------------------------------------------------------------------------------------------
# small helpers


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise LatentPatchError(f"--dtype {dtype!r} is not supported; fix: use float32 or bfloat16") from None


def check_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a LatentPatchError naming ``--device``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise LatentPatchError(f"--device {device!r} is not a device ({err}); fix: use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LatentPatchError(f"--device {device}: CUDA is not available here; fix: use --device cpu")
    return dev


def _few(items: Sequence[str], n: int = 4) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t) + "]"


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Read a checkpoint: a directory with ``model.safetensors`` or ``pytorch_model.bin``, or such a
    file itself. Returns (state dict on CPU, the file read)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            listing = sorted(p.name for p in path.iterdir())[:8]
            raise LatentPatchError(
                f"{path}: no model.safetensors or pytorch_model.bin in this directory (it holds: "
                f"{', '.join(listing) or 'nothing'}); fix: point to the CODI checkpoint directory"
            )
        if len(found) > 1:
            log.info("%s: both model.safetensors and pytorch_model.bin present; reading model.safetensors", path)
        file = found[0]
    elif path.is_file():
        file = path
    else:
        raise LatentPatchError(f"{path}: no such file or directory; fix: check the path given to --model")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(file), device="cpu")
        else:
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, not a tensor file, ...
        raise LatentPatchError(f"{file}: cannot read the checkpoint ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); fix: re-download or re-save it") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LatentPatchError(f"{file}: not a state dict of tensors; fix: save the model with "
                               "torch.save(model.state_dict()) or safetensors")
    return dict(sd), file


def _build_lm(config, dtype: torch.dtype) -> nn.Module:
    """An HF causal LM from a config, without spending time on random init (weights are loaded next)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        lm = AutoModelForCausalLM.from_config(config)
    lm.tie_weights()  # no_init_weights also skips the tying done by init_weights
    return lm.to(dtype).eval()


def _local_tokenizer(path: Path, **kwargs):
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


def _base_config_and_tokenizer(base: str):
    """(config, tokenizer or None) of a base model: a local directory or a hub name."""
    from transformers import AutoConfig, AutoTokenizer

    p = Path(base)
    if p.exists():
        if not (p / "config.json").is_file():
            raise LatentPatchError(f"--base {base}: no config.json in this directory; fix: pass the directory of "
                                   "the base model the checkpoint was trained from (or its hub name)")
        return AutoConfig.from_pretrained(str(p)), _local_tokenizer(p)
    try:
        config = AutoConfig.from_pretrained(base)
    except Exception as err:
        raise LatentPatchError(f"--base {base}: cannot load its config ({type(err).__name__}); fix: pass a local "
                               "directory with config.json, or a hub name reachable from here") from None
    try:
        tok = AutoTokenizer.from_pretrained(base)
    except Exception as err:
        log.warning("--base %s: no tokenizer (%s); continuing with token ids only", base, err)
        tok = None
    return config, tok


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _targeted(name: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of target names: the module name equals one or ends with ``.name``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _normalise_targets(targets) -> tuple[str, ...] | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [t for t in re.split(r"[,\s]+", targets) if t]
    return tuple(targets)


# ------------------------------------------------------------------------------------------------
# the strict core


@dataclass
class LoraSpec:
    """LoRA as saved by peft: rank ``r``, ``alpha`` (scaling = alpha / r), target module names,
    key spelling (``base_layer`` = current peft) and adapter name part (``".default"``)."""

    r: int
    alpha: float
    targets: tuple[str, ...]
    base_layer: bool = True
    adapter: str = ".default"

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass
class _Expected:
    kind: str  # "param" | "lora_A" | "lora_B" | "prj" | "copy"
    target: str  # canonical HF param name (param/copy), module name (lora), prj key (prj)
    shape: tuple[int, ...]


def load_weights_strict(
    lm: nn.Module,
    prj: nn.Module,
    sd: dict[str, torch.Tensor],
    *,
    file: Path | str,
    prefix: str,
    lora: LoraSpec | None = None,
    tied_copies: Sequence[str] = (),
    hint: str = "wrong --base, --lora-r/--lora-targets or --preset?",
) -> None:
    """Load ``sd`` into ``lm`` and ``prj`` strictly, merging LoRA. Raises LatentPatchError on any
    missing/unexpected key or shape mismatch (only a tied ``lm_head`` may be absent).

    ``prefix`` is the file's prefix of the HF keys (``codi.base_model.model.``, ``codi.``,
    ``base_causallm.``); ``tied_copies`` are extra file keys holding another copy of the input
    embedding (Coconut's ``embedding.weight``).
    """
    file = str(file)
    canon = lm.state_dict()
    modules = dict(lm.named_modules())
    in_emb = lm.get_input_embeddings()
    out_emb = lm.get_output_embeddings()
    emb_key = next(n + ".weight" for n, m in modules.items() if m is in_emb)
    head_key = next((n + ".weight" for n, m in modules.items() if m is out_emb and n), None)
    tied = out_emb is not None and out_emb.weight is in_emb.weight

    # 1. the expected file keys
    expected: dict[str, _Expected] = {}
    lora_modules: list[str] = []
    if lora is not None:
        lora_modules = [n for n, m in modules.items()
                        if n and _targeted(n, lora.targets) and (isinstance(m, nn.Linear) or _is_conv1d(m))]
        if not lora_modules:
            raise LatentPatchError(f"{file}: none of the LoRA targets {list(lora.targets)} names a linear layer of "
                                   f"this {type(lm).__name__}; fix: wrong --base, --lora-targets or --preset?")
    lora_set = set(lora_modules)
    for key, tensor in canon.items():
        module, _, pname = key.rpartition(".")
        if lora is not None and module in lora_set and lora.base_layer:
            fkey = f"{prefix}{module}.base_layer.{pname}"
        else:
            fkey = prefix + key
        expected[fkey] = _Expected("param", key, tuple(tensor.shape))
    for module in lora_modules:
        w = modules[module].weight
        in_f, out_f = (w.shape[0], w.shape[1]) if _is_conv1d(modules[module]) else (w.shape[1], w.shape[0])
        expected[f"{prefix}{module}.lora_A{lora.adapter}.weight"] = _Expected("lora_A", module, (lora.r, in_f))
        expected[f"{prefix}{module}.lora_B{lora.adapter}.weight"] = _Expected("lora_B", module, (out_f, lora.r))
    for key, tensor in prj.state_dict().items():
        expected["prj." + key] = _Expected("prj", key, tuple(tensor.shape))
    for key in tied_copies:
        expected[key] = _Expected("copy", emb_key, tuple(canon[emb_key].shape))

    # 2. missing / unexpected keys
    head_fkey = prefix + head_key if head_key else None
    missing = [k for k in expected if k not in sd and not (tied and k == head_fkey)]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        fix = _key_hint(missing, unexpected, prefix, lora, hint, len(expected))
        raise LatentPatchError(f"{file}: {' and '.join(parts)}; fix: {fix}")

    # 3. shapes
    bad = [(k, tuple(sd[k].shape), e) for k, e in expected.items() if k in sd and tuple(sd[k].shape) != e.shape]
    if bad:
        shown = "; ".join(f"{k} is {_shape(s)}, expected {_shape(e.shape)}" for k, s, e in bad[:3])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise LatentPatchError(f"{file}: shape mismatch for {len(bad)} key(s): {shown}{more}; fix: "
                               f"{_shape_hint(bad, lora, hint)}")

    # 4. assemble the canonical state dict, merging LoRA in fp32
    new: dict[str, torch.Tensor] = {}
    for fkey, e in expected.items():
        if e.kind == "param" and fkey in sd:
            new[e.target] = sd[fkey]
    if lora is not None:
        s = lora.scaling
        for module in lora_modules:
            A = sd[f"{prefix}{module}.lora_A{lora.adapter}.weight"].float()
            B = sd[f"{prefix}{module}.lora_B{lora.adapter}.weight"].float()
            delta = s * (B @ A)  # [out, in]
            if _is_conv1d(modules[module]):
                delta = delta.T  # Conv1D stores [in, out] (fan-in-fan-out)
            key = module + ".weight"
            new[key] = new[key].float() + delta
    if tied:
        emb = new[emb_key]
        if head_key in new:
            head = new[head_key]
            if not torch.equal(head.float(), emb.float()):
                log.warning("%s: lm_head and the input embeddings differ in the file but the config ties them; "
                            "the file's lm_head serves both (as in the reference, max |diff| %.3g)",
                            file, float((head.float() - emb.float()).abs().max()))
            emb = head
        for key in tied_copies:
            if not torch.equal(sd[key].float(), emb.float()):
                log.warning("%s: %s differs from the LM's embedding; the LM's tied weight is used", file, key)
        new[emb_key] = emb
        if head_key:
            new[head_key] = emb
    else:
        for key in tied_copies:
            if not torch.equal(sd[key].float(), new[emb_key].float()):
                log.warning("%s: %s differs from the LM's embedding; the LM's weight is used", file, key)
    result = lm.load_state_dict(new, strict=False)
    leftover = [k for k in result.missing_keys if k in canon] + list(result.unexpected_keys)
    if leftover:  # cannot happen if the tables above are right; keep the promise of strictness anyway
        raise LatentPatchError(f"{file}: internal key mapping left {_few(leftover)} unset; please report this")
    prj.load_state_dict({e.target: sd[k] for k, e in expected.items() if e.kind == "prj"}, strict=True)


def _key_hint(missing, unexpected, prefix, lora, hint, n_expected: int) -> str:
    if len(missing) > n_expected // 2 and unexpected:
        return "most keys differ, the file's architecture does not match the model built from the base; wrong --base or --preset?"
    miss_lora = [k for k in missing if _LORA_KEY.match(k)]
    unexp_lora = [k for k in unexpected if _LORA_KEY.match(k)]
    if unexp_lora and lora is None:
        return "the file has LoRA weights; load it with its LoRA settings (--preset, or --lora-r/--lora-alpha)"
    if miss_lora or unexp_lora:
        return "the LoRA targets do not match the file's; wrong --lora-targets or --preset?"
    if any(k.startswith("prj.ln.") for k in missing) and all(k.startswith("prj.") for k in missing) and not unexpected:
        return "the file has no prj.ln (projection without LayerNorm); pass --no-prj-ln or fix --preset"
    if any(k.startswith("prj.ln.") for k in unexpected) and not missing:
        return "the file's projection has a LayerNorm (prj.ln); drop --no-prj-ln"
    if any(k.startswith("prj.") for k in missing) and not any(k.startswith("prj.") for k in unexpected):
        return "the file lacks the projection prj.*; is this the right checkpoint (Coconut: use coconut:FILE)?"
    if unexpected and all(not k.startswith(prefix) and not k.startswith("prj.") for k in unexpected):
        return f"keys outside '{prefix}' and 'prj.': not this checkpoint layout; {hint}"
    if any(".base_layer." in k for k in unexpected + missing):
        return "the file mixes or differs in peft key spellings (base_layer); re-save it with one peft version"
    return hint


def _shape_hint(bad, lora, hint) -> str:
    for k, s, e in bad:
        if e.kind == "lora_A" and lora is not None:
            return f"the file's LoRA rank is {s[0]}, not {lora.r}; wrong --lora-r or --preset?"
        if e.kind == "lora_B" and lora is not None:
            return f"the file's LoRA rank is {s[1]}, not {lora.r}; wrong --lora-r or --preset?"
        if e.kind == "prj" and e.target in ("1.weight", "3.weight"):
            dim = s[0] if e.target == "1.weight" else s[1]
            want = e.shape[0] if e.target == "1.weight" else e.shape[1]
            return f"the file's projection has prj_dim {dim}, not {want}; wrong --prj-dim or --preset?"
    for k, s, e in bad:
        if e.kind in ("param", "copy") and len(s) == 2 and len(e.shape) == 2 and s[1] == e.shape[1] \
                and e.target.endswith(("wte.weight", "embed_tokens.weight", "lm_head.weight")):
            return (f"the file's vocabulary has {s[0]} rows, the model {e.shape[0]} (the base's vocabulary + 3 "
                    "special tokens); wrong --base?")
    return hint


# ------------------------------------------------------------------------------------------------
# CODI checkpoints


def _resolve(value, preset: dict, key: str, default=None):
    if value is not None:
        return value
    return preset.get(key, default)


def get_preset(name: str | None) -> dict[str, Any]:
    if name is None:
        return {}
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise LatentPatchError(f"--preset {name!r} is unknown; fix: use one of {', '.join(PRESETS)}") from None


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
) -> LatentModel:
    """Load an official CODI checkpoint (``pytorch_model.bin`` or ``model.safetensors``) strictly.

    ``base`` is the base model (local dir or hub name) the checkpoint was trained from; its config
    builds the LM, its vocabulary V gives pad/bot/eot = V, V+1, V+2 (CODI's +3 resize) and its
    tokenizer (if any) is used. Explicit arguments override the ``preset``. Unset LoRA settings are
    read from the file where possible (targets and rank; ``lora_alpha`` must be given or come from a
    preset); ``lora_r=0`` asserts a checkpoint without LoRA. ``prj_dim``/``prj_ln`` unset: read
    from the file. LoRA is merged into the base weights.
    """
    p = get_preset(preset)
    dtype = parse_dtype(dtype)
    dev = check_device(device)
    base = base if base is not None else p.get("base")
    if base is None:
        raise LatentPatchError(f"{ckpt_dir}: which base model was this checkpoint trained from? fix: pass --base "
                               f"(a local dir or hub name) or --preset ({', '.join(PRESETS)})")
    sd, file = read_state_dict(ckpt_dir)

    # layout: peft-wrapped (LoRA) or plain
    peft_prefix, plain_prefix = "codi.base_model.model.", "codi."
    if any(k.startswith(peft_prefix) for k in sd):
        prefix = peft_prefix
    elif any(k.startswith(plain_prefix) for k in sd):
        prefix = plain_prefix
    else:
        raise LatentPatchError(f"{file}: no codi.* keys (keys look like {_few(sorted(sd), 3)}): not a CODI "
                               "checkpoint; fix: for Coconut use coconut:FILE, for a latentpatch dir use dir:PATH")

    # LoRA settings
    r = _resolve(lora_r, p, "lora_r")
    alpha = _resolve(lora_alpha, p, "lora_alpha")
    targets = _normalise_targets(_resolve(lora_targets, p, "lora_targets"))
    lora_keys = [m for m in (_LORA_KEY.match(k) for k in sd) if m]
    lora = None
    if prefix == plain_prefix:
        if r not in (None, 0) or (lora_targets is not None):
            raise LatentPatchError(f"{file}: the checkpoint has no LoRA (keys codi.<model> without peft's "
                                   "base_model wrapper) but LoRA settings were given; fix: pass --lora-r 0 "
                                   "(or drop --preset/--lora-*)")
    else:
        if r == 0:
            raise LatentPatchError(f"{file}: the checkpoint holds LoRA weights (peft layout) but --lora-r 0 was "
                                   "given; fix: pass its LoRA rank/alpha or a --preset")
        if not lora_keys:
            raise LatentPatchError(f"{file}: peft layout (codi.base_model.model.*) but no lora_A/lora_B keys; fix: "
                                   "re-save the checkpoint, or check it is not truncated")
        if targets is None:
            targets = tuple(sorted({m.group("module").rpartition(".")[2] for m in lora_keys}))
            log.info("%s: LoRA targets read from the file: %s", file, ", ".join(targets))
        if r is None:
            first = next(m for m in lora_keys if m.group("ab") == "A")
            r = int(sd[first.group(0)].shape[0])
            log.info("%s: LoRA rank read from the file: %d", file, r)
        if alpha is None:
            raise LatentPatchError(f"{file}: the checkpoint has LoRA (rank {r}) but its alpha is unknown; fix: pass "
                                   f"--lora-alpha (released CODI: 32) or --preset")
        if int(r) <= 0 or float(alpha) <= 0:
            raise LatentPatchError(f"--lora-r {r} / --lora-alpha {alpha}: must be positive")
        lora = LoraSpec(
            r=int(r), alpha=float(alpha), targets=targets,
            base_layer=any(".base_layer." in k for k in sd),
            adapter=lora_keys[0].group("adapter") or "",
        )

    # projection
    prj_dim = _resolve(prj_dim, p, "prj_dim")
    if prj_dim is None:
        if "prj.1.weight" in sd:
            prj_dim = int(sd["prj.1.weight"].shape[0])
        elif "prj.3.weight" in sd:
            prj_dim = int(sd["prj.3.weight"].shape[1])
        else:
            raise LatentPatchError(f"{file}: no projection keys (prj.1.weight, prj.1.bias, prj.3.weight, "
                                   "prj.3.bias missing): a CODI checkpoint stores its prj; fix: for Coconut "
                                   "(identity projection) use coconut:FILE")
    prj_ln = _resolve(prj_ln, p, "prj_ln")
    if prj_ln is None:
        prj_ln = any(k.startswith("prj.ln.") for k in sd)

    # the model
    config, tokenizer = _base_config_and_tokenizer(str(base))
    V = int(config.vocab_size)
    config.vocab_size = V + 3  # CODI's resize: pad/bot/eot = V, V+1, V+2
    lm = _build_lm(config, dtype)
    prj = build_prj(lm.get_input_embeddings().weight.shape[1], int(prj_dim), layer_norm=bool(prj_ln)).to(dtype)
    load_weights_strict(lm, prj, sd, file=file, prefix=prefix, lora=lora,
                        hint="wrong --base, --lora-r/--lora-targets, --prj-dim or --preset?")

    eos = _resolve(eos_id, p, "eos_id")
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, (list, tuple)) else config.eos_token_id
    if eos is None:
        raise LatentPatchError(f"--base {base}: no eos id in its config or tokenizer; fix: pass --eos-id")
    cfg = LatentConfig(
        num_latent=int(_resolve(num_latent, p, "num_latent", 6)),
        pad_id=V, bot_id=V + 1, eot_id=V + 2, eos_id=int(eos),
        remove_eos=bool(_resolve(remove_eos, p, "remove_eos", True)),
        answer_prefix=_resolve(answer_prefix, p, "answer_prefix", "The answer is: "),
    )
    _check_latent_config(cfg, lm, str(file))
    name = f"codi:{ckpt_dir}" + (f" ({preset})" if preset else "")
    return LatentModel(lm.to(dev), prj.to(dev).eval(), cfg, tokenizer, name=name)


def _check_latent_config(cfg: LatentConfig, lm: nn.Module, where: str) -> None:
    V = lm.get_input_embeddings().weight.shape[0]
    for field in ("pad_id", "bot_id", "eot_id", "eos_id"):
        v = getattr(cfg, field)
        if not 0 <= v < V:
            raise LatentPatchError(f"{where}: {field} {v} is outside the vocabulary (size {V}); fix: check {field}")
    if cfg.num_latent < 1:
        raise LatentPatchError(f"--num-latent {cfg.num_latent}: must be at least 1")


# ------------------------------------------------------------------------------------------------
# latentpatch model directory (the shipped default model's format)

_LATENT_REQUIRED = ("num_latent", "pad_id", "bot_id", "eot_id", "eos_id")


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
    from ``latentpatch.json``). ``prj_dim`` null in ``latentpatch.json`` = identity projection.
    """
    from transformers import AutoConfig

    path = Path(path)
    meta_file = path / "latentpatch.json"
    if not path.is_dir():
        raise LatentPatchError(f"{path}: no such directory; fix: pass a latentpatch model directory")
    if not meta_file.is_file():
        raise LatentPatchError(f"{path}: not a latentpatch model directory (no latentpatch.json); fix: for an "
                               "official CODI checkpoint use codi:DIR with --base/--preset")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise LatentPatchError(f"{meta_file}: not valid JSON ({err}); fix: repair or re-save the model") from None
    if not isinstance(meta, dict):
        raise LatentPatchError(f"{meta_file}: expected a JSON object; fix: repair or re-save the model")
    fmt = meta.get("format")
    if fmt != LATENT_FORMAT:
        raise LatentPatchError(f"{meta_file}: format {fmt!r}, expected {LATENT_FORMAT!r}; fix: re-save the model "
                               "with this version of latentpatch")
    absent = [k for k in _LATENT_REQUIRED if not isinstance(meta.get(k), int)]
    if absent:
        raise LatentPatchError(f"{meta_file}: missing or non-integer field(s) {', '.join(absent)}; fix: add them")
    if not (path / "config.json").is_file():
        raise LatentPatchError(f"{path}: no config.json; fix: save the LM config next to latentpatch.json")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LatentPatchError(f"{path}: no model.safetensors; fix: save the weights next to latentpatch.json")
    dtype = parse_dtype(dtype)
    dev = check_device(device)
    config = AutoConfig.from_pretrained(str(path))
    lm = _build_lm(config, dtype)
    d = lm.get_input_embeddings().weight.shape[1]
    prj_dim = meta.get("prj_dim")
    prj = build_prj(d, int(prj_dim) if prj_dim else None, layer_norm=bool(meta.get("prj_ln", True))).to(dtype)
    sd, file = read_state_dict(weights)
    load_weights_strict(lm, prj, sd, file=file, prefix="codi.",
                        hint=f"{meta_file} does not match the weights (prj_dim, prj_ln, config.json)")
    cfg = LatentConfig(
        num_latent=int(num_latent if num_latent is not None else meta["num_latent"]),
        pad_id=meta["pad_id"], bot_id=meta["bot_id"], eot_id=meta["eot_id"], eos_id=meta["eos_id"],
        remove_eos=bool(meta.get("remove_eos", True)),
        answer_prefix=meta.get("answer_prefix", "The answer is: "),
        question_template=meta.get("question_template", "{question}"),
        add_special_tokens=bool(meta.get("add_special_tokens", True)),
        max_answer_tokens=int(meta.get("max_answer_tokens", 32)),
    )
    _check_latent_config(cfg, lm, str(meta_file))
    return LatentModel(lm.to(dev), prj.to(dev).eval(), cfg, _local_tokenizer(path), name=str(path))


def save_latent_dir(model: LatentModel, path: str | Path, *, prj_dim: int | None = None, prj_ln: bool | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``model`` as a latentpatch model directory (the format :func:`load_latent_dir` reads)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm = model.lm
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    sd = {}
    for k, v in lm.state_dict().items():
        if tied and k == "lm_head.weight":
            continue
        sd["codi." + k] = v.detach().contiguous().clone()
    for k, v in model.prj.state_dict().items():
        sd["prj." + k] = v.detach().contiguous().clone()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    lm.config.save_pretrained(str(path))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path))
    if prj_dim is None and isinstance(model.prj, nn.Sequential):
        prj_dim = model.prj[1].out_features
    if prj_ln is None:
        prj_ln = isinstance(model.prj, nn.Sequential) and hasattr(model.prj, "ln")
    c = model.config
    meta = {
        "format": LATENT_FORMAT, "family": model.family, "num_latent": c.num_latent,
        "pad_id": c.pad_id, "bot_id": c.bot_id, "eot_id": c.eot_id, "eos_id": c.eos_id,
        "remove_eos": c.remove_eos, "answer_prefix": c.answer_prefix, "question_template": c.question_template,
        "add_special_tokens": c.add_special_tokens, "max_answer_tokens": c.max_answer_tokens,
        "prj_dim": prj_dim, "prj_ln": bool(prj_ln), **(extra or {}),
    }
    (path / "latentpatch.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Coconut


def load_coconut_checkpoint(
    path: str | Path,
    base: str | None = "gpt2",
    *,
    num_latent: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> LatentModel:
    """Load a Coconut checkpoint (facebookresearch/coconut): ``torch.save`` of the full state dict,
    keys ``base_causallm.<hf keys>`` + ``embedding.weight`` (three tied copies of the embedding),
    identity projection. Tokens ``<|start-latent|>`` = V, ``<|end-latent|>`` = V+1, ``<|latent|>`` =
    V+2 (V = base vocabulary); bot = start-latent, eot = end-latent, pad = eos (as in Coconut).
    Prompt ``question\\n`` + start-latent, answer ``### N``.
    """
    dtype = parse_dtype(dtype)
    dev = check_device(device)
    if base is None:
        raise LatentPatchError(f"{path}: which base model? fix: pass --base (Coconut's released code uses gpt2)")
    sd, file = read_state_dict(path)
    if not any(k.startswith("base_causallm.") for k in sd):
        raise LatentPatchError(f"{file}: no base_causallm.* keys (keys look like {_few(sorted(sd), 3)}): not a "
                               "Coconut checkpoint; fix: for CODI use codi:DIR")
    config, tokenizer = _base_config_and_tokenizer(str(base))
    V = int(config.vocab_size)
    config.vocab_size = V + 3
    lm = _build_lm(config, dtype)
    prj = nn.Identity()
    load_weights_strict(lm, prj, sd, file=file, prefix="base_causallm.", tied_copies=("embedding.weight",),
                        hint="wrong --base?")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, (list, tuple)) else config.eos_token_id
    if eos is None:
        raise LatentPatchError(f"--base {base}: no eos id in its config or tokenizer")
    cfg = LatentConfig(num_latent=6 if num_latent is None else int(num_latent), pad_id=int(eos), bot_id=V, eot_id=V + 1, eos_id=int(eos),
                       remove_eos=True, answer_prefix="### ", question_template="{question}\n")
    _check_latent_config(cfg, lm, str(file))
    return LatentModel(lm.to(dev), prj, cfg, tokenizer, name=f"coconut:{path}")


# ------------------------------------------------------------------------------------------------
# GGUF (a real pretrained LM, untrained for latent reasoning: identity projection, Coconut-style)


def load_gguf(
    path: str | Path,
    *,
    num_latent: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> LatentModel:
    """A GGUF causal LM (dequantised by transformers) as a Coconut-style LatentModel: identity
    ``prj``, ``num_latent`` default 6.

    Special ids follow CODI's convention: the embeddings are resized by +3 and pad/bot/eot =
    V, V+1, V+2 (V = the GGUF vocabulary). Those rows (input and, if untied, output) are set
    deterministically to the mean of the existing embedding rows; the model was never trained
    with them, so this is a structural (not a reasoning) model. eos = the tokenizer's eos.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    dev = check_device(device)
    path = Path(path)
    if not path.is_file():
        raise LatentPatchError(f"{path}: no such GGUF file; fix: check the path after gguf:")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LatentPatchError("reading GGUF files needs the gguf package; fix: pip install 'latentpatch[gguf]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as err:
        raise LatentPatchError(f"{path}: cannot load this GGUF file ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); fix: use a LLaMA- or GPT-2-family "
                               "GGUF model") from None
    V = int(lm.get_input_embeddings().weight.shape[0])
    with torch.no_grad():
        mean = lm.get_input_embeddings().weight.mean(0)
        out_mean = lm.get_output_embeddings().weight.mean(0)
        lm.resize_token_embeddings(V + 3, mean_resizing=False)
        lm.get_input_embeddings().weight[V:] = mean
        if lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight:
            lm.get_output_embeddings().weight[V:] = out_mean
    lm = lm.to(dtype).eval()
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else lm.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    cfg = LatentConfig(num_latent=6 if num_latent is None else int(num_latent), pad_id=V, bot_id=V + 1,
                       eot_id=V + 2, eos_id=int(eos), remove_eos=True, answer_prefix="")
    _check_latent_config(cfg, lm, str(path))
    return LatentModel(lm.to(dev), nn.Identity(), cfg, tokenizer, name=f"gguf:{path.name}")


# ------------------------------------------------------------------------------------------------
# a small random model from a config (demos without any checkpoint)


def byte_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens, ``<eos>`` = 256, then ``<pad>``,
    ``<bot>``, ``<eot>`` = 257, 258, 259 (CODI's V, V+1, V+2 with V = 257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<pad>", "<bot>", "<eot>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=["<bot>", "<eot>"])


def random_model(family: str = "llama", *, num_latent: int | None = None, seed: int = 0,
                 dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu") -> LatentModel:
    """A small random CODI-shaped model (2 layers, d=64, byte tokenizer) built from a config.

    For demos and smoke tests before a trained model is at hand: its thoughts and answers are noise.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    dtype = parse_dtype(dtype)
    dev = check_device(device)
    tok = byte_tokenizer()
    V = 257  # bytes + <eos>
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family == "llama":
            cfg = LlamaConfig(vocab_size=V + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              tie_word_embeddings=True, bos_token_id=256, eos_token_id=256, pad_token_id=257)
            lm = LlamaForCausalLM(cfg)
        elif family == "gpt2":
            cfg = GPT2Config(vocab_size=V + 3, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                             bos_token_id=256, eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            lm = GPT2LMHeadModel(cfg)
        else:
            raise LatentPatchError(f"--model config:{family}: unknown family; fix: use config:llama or config:gpt2")
        prj = build_prj(64, 128, layer_norm=True)
    cfg = LatentConfig(num_latent=6 if num_latent is None else int(num_latent), pad_id=V, bot_id=V + 1,
                       eot_id=V + 2, eos_id=256, remove_eos=True, add_special_tokens=False)
    _check_latent_config(cfg, lm, f"config:{family}")
    return LatentModel(lm.to(dtype).to(dev).eval(), prj.to(dtype).to(dev).eval(), cfg, tok, name=f"config:{family}")


# ------------------------------------------------------------------------------------------------
# the front door

_CODI_ONLY = ("lora_r", "lora_alpha", "lora_targets", "prj_dim", "prj_ln", "remove_eos", "eos_id", "answer_prefix")


def _reject(spec: str, overrides: dict, allowed: Iterable[str]) -> None:
    extra = [k for k in overrides if k not in set(allowed)]
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise LatentPatchError(f"{flags} only apply to codi: checkpoints, not to --model {spec}; fix: drop them")


def _guess_kind(p: Path, spec: str) -> str:
    if p.is_dir() and (p / "latentpatch.json").is_file():
        return "dir"
    if p.is_dir() and ((p / "pytorch_model.bin").is_file() or (p / "model.safetensors").is_file()):
        return "codi"
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.exists():
        raise LatentPatchError(f"--model {spec}: cannot tell the checkpoint kind; fix: prefix it with codi:, "
                               "coconut:, dir: or gguf:")
    raise LatentPatchError(f"--model {spec}: no such file or directory; fix: use default, codi:DIR, "
                           "coconut:FILE, dir:PATH, gguf:PATH or config:llama")


def load_model(
    spec: str,
    *,
    base: str | None = None,
    preset: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    **overrides,
) -> LatentModel:
    """Load a model from a spec string:

    - ``default``: the shipped model (``latentpatch/default_model``)
    - ``codi:DIR``: an official CODI checkpoint (with ``base``/``preset``/overrides)
    - ``coconut:FILE``: a Coconut checkpoint (``base`` default gpt2)
    - ``dir:PATH`` or a plain path to a directory with ``latentpatch.json``
    - ``gguf:PATH`` (or a plain ``*.gguf`` path): a GGUF LM with identity projection
    - ``config:llama`` / ``config:gpt2``: a small random model (demo)

    ``overrides``: ``num_latent`` for every kind; ``lora_r``, ``lora_alpha``, ``lora_targets``,
    ``prj_dim``, ``prj_ln``, ``remove_eos``, ``eos_id``, ``answer_prefix`` for ``codi:``. None
    values are ignored.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = [k for k in overrides if k not in _CODI_ONLY + ("num_latent",)]
    if unknown:
        raise TypeError(f"load_model got unexpected override(s) {unknown}")
    spec = str(spec).strip()
    kind, sep, rest = spec.partition(":")
    if spec in ("default", "config"):
        kind, rest = spec, ""
    elif not sep or len(kind) == 1:  # a plain path (or a Windows drive letter): guess its kind
        kind, rest = _guess_kind(Path(spec), spec), spec
    num_latent = overrides.get("num_latent")
    if num_latent is not None and int(num_latent) < 1:
        raise LatentPatchError(f"--num-latent {num_latent}: must be at least 1")
    common = dict(dtype=dtype, device=device)
    if kind != "codi":
        if preset is not None:
            raise LatentPatchError(f"--preset only applies to codi: checkpoints, not to --model {spec}; fix: drop it")
        _reject(spec, overrides, ("num_latent",))
        if base is not None and kind not in ("coconut",):
            raise LatentPatchError(f"--base only applies to codi: and coconut: checkpoints, not to --model {spec}")
    if kind == "default":
        if not (DEFAULT_MODEL_DIR / "latentpatch.json").is_file():
            raise LatentPatchError(f"the shipped default model is not in this installation ({DEFAULT_MODEL_DIR} "
                                   "has no latentpatch.json); fix: pass --model codi:DIR or dir:PATH, or "
                                   "--model config:llama for a random demo model")
        return load_latent_dir(DEFAULT_MODEL_DIR, num_latent=num_latent, **common)
    if kind == "codi":
        if not rest:
            raise LatentPatchError("--model codi: needs a directory, e.g. --model codi:path/to/checkpoint")
        return load_codi_checkpoint(rest, base, preset=preset, dtype=dtype, device=device, **overrides)
    if kind == "coconut":
        return load_coconut_checkpoint(rest, base or "gpt2", num_latent=num_latent, **common)
    if kind == "dir":
        return load_latent_dir(rest, num_latent=num_latent, **common)
    if kind == "gguf":
        return load_gguf(rest, num_latent=num_latent, **common)
    if kind == "config":
        return random_model(rest or "llama", num_latent=num_latent, **common)
    raise LatentPatchError(f"--model {spec}: unknown kind {kind!r}; fix: use default, codi:DIR, coconut:FILE, "
                           "dir:PATH, gguf:PATH or config:llama|gpt2")
