"""The strict checkpoint core: read a state dict, check every key and shape, merge LoRA, load.

One strict loader serves every layout the loaders know (:mod:`latentpatch.model.loaders`):

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
the checkpoint; they are never re-initialised. Nothing here knows about model families or
``LatentModel``: it works on any ``nn.Module`` with ``get_input_embeddings``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from latentpatch.errors import LatentPatchError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("latentpatch.model.checkpoint")

#: a peft LoRA key: ``<module>.lora_A[.<adapter>].weight`` (groups: module, ab, adapter)
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?P<adapter>\.[^.]+)?\.weight$")


def preview(items: Sequence[str], n: int = 4) -> str:
    """The first ``n`` items joined by commas, and how many more there are (for error messages)."""
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _dims(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


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

            sd: Any = load_file(str(file), device="cpu")
        else:
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, not a tensor file, ...
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise LatentPatchError(
            f"{file}: cannot read the checkpoint ({type(err).__name__}: {first_line}); fix: re-download or re-save it"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LatentPatchError(
            f"{file}: not a state dict of tensors; fix: save the model with "
            "torch.save(model.state_dict()) or safetensors"
        )
    return dict(sd), file


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer that stores its weight as [in, out]."""
    return type(module).__name__ == "Conv1D"


def targeted(name: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of target names: the module name equals one or ends with ``.name``."""
    return any(name == t or name.endswith("." + t) for t in targets)


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
    """One key the file must hold: what it is, where it goes, its shape."""

    kind: str  # "param" | "lora_A" | "lora_B" | "prj" | "copy"
    target: str  # canonical HF param name (param/copy), module name (lora), prj key (prj)
    shape: tuple[int, ...]


@dataclass
class _Layout:
    """Facts about the LM that the strict core needs: its state dict, modules, tied keys."""

    canon: dict[str, torch.Tensor]
    modules: dict[str, nn.Module]
    emb_key: str  # the input embedding's parameter name
    head_key: str | None  # the LM head's parameter name (None: no separate head module)
    tied: bool  # the head's weight is the input embedding's
    lora_modules: list[str]  # modules LoRA wraps (empty without LoRA)


def _layout(lm: PreTrainedModel, lora: LoraSpec | None, file: str) -> _Layout:
    modules = dict(lm.named_modules())
    in_emb = lm.get_input_embeddings()
    out_emb = lm.get_output_embeddings()
    lora_modules: list[str] = []
    if lora is not None:
        lora_modules = [
            n
            for n, m in modules.items()
            if n and targeted(n, lora.targets) and (isinstance(m, nn.Linear) or is_conv1d(m))
        ]
        if not lora_modules:
            raise LatentPatchError(
                f"{file}: none of the LoRA targets {list(lora.targets)} names a linear layer of "
                f"this {type(lm).__name__}; fix: wrong --base, --lora-targets or --preset?"
            )
    return _Layout(
        canon=lm.state_dict(),
        modules=modules,
        emb_key=next(n + ".weight" for n, m in modules.items() if m is in_emb),
        head_key=next((n + ".weight" for n, m in modules.items() if m is out_emb and n), None),
        tied=out_emb is not None and out_emb.weight is in_emb.weight,
        lora_modules=lora_modules,
    )


def _expected_keys(
    lay: _Layout, prj: nn.Module, prefix: str, lora: LoraSpec | None, tied_copies: Sequence[str]
) -> dict[str, _Expected]:
    """Every key the file must hold (file key -> what it is)."""
    expected: dict[str, _Expected] = {}
    lora_set = set(lay.lora_modules)
    for key, tensor in lay.canon.items():
        module, _, pname = key.rpartition(".")
        if lora is not None and module in lora_set and lora.base_layer:
            fkey = f"{prefix}{module}.base_layer.{pname}"
        else:
            fkey = prefix + key
        expected[fkey] = _Expected("param", key, tuple(tensor.shape))
    if lora is not None:
        for module in lay.lora_modules:
            w = lay.modules[module].weight
            assert isinstance(w, torch.Tensor)
            rows, cols = int(w.shape[0]), int(w.shape[1])
            in_f, out_f = (rows, cols) if is_conv1d(lay.modules[module]) else (cols, rows)  # Conv1D: [in, out]
            expected[f"{prefix}{module}.lora_A{lora.adapter}.weight"] = _Expected("lora_A", module, (lora.r, in_f))
            expected[f"{prefix}{module}.lora_B{lora.adapter}.weight"] = _Expected("lora_B", module, (out_f, lora.r))
    for key, tensor in prj.state_dict().items():
        expected["prj." + key] = _Expected("prj", key, tuple(tensor.shape))
    for key in tied_copies:
        expected[key] = _Expected("copy", lay.emb_key, tuple(lay.canon[lay.emb_key].shape))
    return expected


def _check_keys_and_shapes(
    sd: dict[str, torch.Tensor],
    expected: dict[str, _Expected],
    lay: _Layout,
    *,
    file: str,
    prefix: str,
    lora: LoraSpec | None,
    hint: str,
) -> None:
    """Raise on any missing or unexpected key (a tied ``lm_head`` may be absent), then on any wrong shape."""
    head_fkey = prefix + lay.head_key if lay.head_key else None
    missing = [k for k in expected if k not in sd and not (lay.tied and k == head_fkey)]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({preview(unexpected)})")
        fix = _key_hint(missing, unexpected, prefix, lora, hint, len(expected))
        raise LatentPatchError(f"{file}: {' and '.join(parts)}; fix: {fix}")
    bad = [(k, tuple(sd[k].shape), e) for k, e in expected.items() if k in sd and tuple(sd[k].shape) != e.shape]
    if bad:
        shown = "; ".join(f"{k} is {_dims(s)}, expected {_dims(e.shape)}" for k, s, e in bad[:3])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise LatentPatchError(
            f"{file}: shape mismatch for {len(bad)} key(s): {shown}{more}; fix: {_shape_hint(bad, lora, hint)}"
        )


def _assemble(
    sd: dict[str, torch.Tensor],
    expected: dict[str, _Expected],
    lay: _Layout,
    *,
    file: str,
    prefix: str,
    lora: LoraSpec | None,
    tied_copies: Sequence[str],
) -> dict[str, torch.Tensor]:
    """The LM's canonical state dict from the file: LoRA merged in fp32, tied weights resolved."""
    new = {e.target: sd[fkey] for fkey, e in expected.items() if e.kind == "param" and fkey in sd}
    if lora is not None:
        for module in lay.lora_modules:
            A = sd[f"{prefix}{module}.lora_A{lora.adapter}.weight"].float()  # [r, in]
            B = sd[f"{prefix}{module}.lora_B{lora.adapter}.weight"].float()  # [out, r]
            delta = lora.scaling * (B @ A)  # [out, in]
            if is_conv1d(lay.modules[module]):
                delta = delta.T  # Conv1D stores [in, out] (fan-in-fan-out)
            key = module + ".weight"
            new[key] = new[key].float() + delta
    emb_key, head_key = lay.emb_key, lay.head_key
    if lay.tied:
        emb = new[emb_key]
        if head_key in new:
            head = new[head_key]
            if not torch.equal(head.float(), emb.float()):
                log.warning(
                    "%s: lm_head and the input embeddings differ in the file but the config ties them; "
                    "the file's lm_head serves both (as in the reference, max |diff| %.3g)",
                    file,
                    float((head.float() - emb.float()).abs().max()),
                )
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
    return new


def load_weights_strict(
    lm: PreTrainedModel,
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
    embedding (Coconut's ``embedding.weight``). A LoRA module's weight becomes
    ``W + (alpha / r) B A`` (transposed for GPT-2's Conv1D). ``lm`` may be any ``nn.Module`` with
    transformers' ``get_input_embeddings``/``get_output_embeddings``.
    """
    file = str(file)
    lay = _layout(lm, lora, file)
    expected = _expected_keys(lay, prj, prefix, lora, tied_copies)
    _check_keys_and_shapes(sd, expected, lay, file=file, prefix=prefix, lora=lora, hint=hint)
    new = _assemble(sd, expected, lay, file=file, prefix=prefix, lora=lora, tied_copies=tied_copies)
    result = lm.load_state_dict(new, strict=False)
    leftover = [k for k in result.missing_keys if k in lay.canon] + list(result.unexpected_keys)
    if leftover:  # cannot happen if the tables above are right; keep the promise of strictness anyway
        raise LatentPatchError(f"{file}: internal key mapping left {preview(leftover)} unset; please report this")
    prj.load_state_dict({e.target: sd[k] for k, e in expected.items() if e.kind == "prj"}, strict=True)


def _key_hint(
    missing: list[str], unexpected: list[str], prefix: str, lora: LoraSpec | None, hint: str, n_expected: int
) -> str:
    """The likely fix for missing/unexpected keys."""
    if len(missing) > n_expected // 2 and unexpected:
        return (
            "most keys differ, the file's architecture does not match the model built from the base; "
            "wrong --base or --preset?"
        )
    miss_lora = [k for k in missing if LORA_KEY.match(k)]
    unexp_lora = [k for k in unexpected if LORA_KEY.match(k)]
    if unexp_lora and lora is None:
        return "the file has LoRA weights; load it with its LoRA settings (--preset, or --lora-r/--lora-alpha)"
    if unexp_lora or len(miss_lora) > 2:  # a target list naming modules the file has no LoRA for
        return "the LoRA targets do not match the file's; wrong --lora-targets or --preset?"
    if (
        missing
        and not unexpected
        and len(missing) <= 2
        and not all(k.startswith("prj.ln.") or k.startswith("prj.") for k in missing)
    ):
        # a key or two gone from an otherwise complete file: not a settings problem
        return (
            f"{preview(missing, 2)} is missing from the file itself (the rest matches): the file is "
            "incomplete (a truncated download or an edited state dict); re-download or re-save it"
        )
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


def _shape_hint(bad: list[tuple[str, tuple[int, ...], _Expected]], lora: LoraSpec | None, hint: str) -> str:
    """The likely fix for wrong shapes: LoRA rank, projection width or vocabulary size."""
    for _, s, e in bad:
        if e.kind == "lora_A" and lora is not None:
            return f"the file's LoRA rank is {s[0]}, not {lora.r}; wrong --lora-r or --preset?"
        if e.kind == "lora_B" and lora is not None:
            return f"the file's LoRA rank is {s[1]}, not {lora.r}; wrong --lora-r or --preset?"
        if e.kind == "prj" and e.target in ("1.weight", "3.weight"):
            dim = s[0] if e.target == "1.weight" else s[1]
            want = e.shape[0] if e.target == "1.weight" else e.shape[1]
            return f"the file's projection has prj_dim {dim}, not {want}; wrong --prj-dim or --preset?"
    for _, s, e in bad:
        if (
            e.kind in ("param", "copy")
            and len(s) == 2
            and len(e.shape) == 2
            and s[1] == e.shape[1]
            and e.target.endswith(("wte.weight", "embed_tokens.weight", "lm_head.weight"))
        ):
            if s[0] == e.shape[0] - 3:
                return (
                    f"the file's vocabulary has {s[0]} rows, the base's own size: saved before CODI's +3 resize "
                    "([PAD]/[BOT]/[EOT] rows absent), so not a CODI checkpoint of this base; wrong --base or kind?"
                )
            return (
                f"the file's vocabulary has {s[0]} rows, the model {e.shape[0]} (the base's vocabulary + 3 "
                f"special tokens: [PAD]/[BOT]/[EOT]); wrong --base? (a base of {s[0] - 3} tokens fits)"
            )
    return hint


def split_known_unused(
    sd: dict[str, torch.Tensor], prefixes: Sequence[str], *, file: Path | str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``sd`` without the keys under ``prefixes`` (parts of a checkpoint that inference never uses,
    e.g. SIM-CoT's training-only decoder), and those keys, sorted. Never a blanket ``strict=False``:
    only the named prefixes leave; every other key still meets the strict check. One log line
    names what was left out.

    >>> sd = {"codi.w": torch.zeros(1), "decoder.a": torch.zeros(1), "decoder.b": torch.zeros(1)}
    >>> kept, unused = split_known_unused(sd, ("decoder.",), file="f")
    >>> sorted(kept), unused
    (['codi.w'], ['decoder.a', 'decoder.b'])
    """
    if not prefixes:
        return sd, []
    unused = sorted(k for k in sd if k.startswith(tuple(prefixes)))
    if unused:
        log.info(
            "%s: %d key(s) under %s are known and unused at inference (training-only parts): %s",
            file,
            len(unused),
            ", ".join(f"{p}*" for p in prefixes),
            preview(unused),
        )
    gone = set(unused)
    return {k: v for k, v in sd.items() if k not in gone}, unused
