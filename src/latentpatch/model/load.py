"""The front door: :func:`load_model` turns a ``--model`` spec string into a :class:`LatentModel`.

Specs: ``default``, ``codi:DIR``, ``coconut:FILE``, ``dir:PATH``, ``gguf:PATH``,
``config:llama|gpt2``, or a plain path whose kind is guessed. The loaders themselves are in
:mod:`latentpatch.model.codi`, :mod:`latentpatch.model.loaders` and :mod:`latentpatch.model.latent_dir`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from latentpatch.errors import LatentPatchError
from latentpatch.model.codi import get_preset, load_codi_checkpoint
from latentpatch.model.hub import resolve_repo, split_hub_name
from latentpatch.model.latent import LatentModel
from latentpatch.model.latent_dir import LATENT_JSON, load_latent_dir
from latentpatch.model.loaders import load_coconut_checkpoint, load_gguf, random_model
from latentpatch.model.mixture import MIXTURE_KINDS, mixture_model
from latentpatch.model.mixture_stops import parse_mixture_kind
from latentpatch.model.simcot import get_coconut_preset

#: the shipped default model (a latentpatch model directory); the one definition of its path
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"

#: overrides that only ``codi:`` checkpoints accept (``num_latent`` applies to every kind)
CODI_ONLY_OPTIONS = (
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "prj_dim",
    "prj_ln",
    "remove_eos",
    "eos_id",
    "answer_prefix",
)
SPEC_KINDS = (
    "default, codi:DIR|ORG/NAME[@REV], coconut:FILE|ORG/NAME[:FILE][@REV], dir:PATH, gguf:PATH or config:llama|gpt2"
    ", pccot:DIR|ORG/NAME[@REV], soft:BASE, multiplex:BASE, colar:FILE.ckpt"
)
#: ``coconut:ORG/NAME[:FILE][@REV]`` (a hub repository, the checkpoint file in it, a revision)
COCONUT_HUB = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<file>[^@:]+))?(?:@(?P<rev>[\w./-]+))?$")


def codi_location(rest: str, preset: str | None) -> tuple[str, str]:
    """(local checkpoint directory, model name) of ``codi:REST``: a local path, else a hub name
    ``ORG/NAME[@REV]`` (from the cache or downloaded); an empty REST takes the preset's repository."""
    if not rest and preset is not None:
        rest = get_preset(preset).get("repo", "")
    if not rest:
        raise LatentPatchError(
            "--model codi: needs a directory or hub name, e.g. --model codi:zen-E/CODI-gpt2 --preset codi-gpt2"
        )
    hub = None if Path(rest).exists() else split_hub_name(rest)
    if hub is None:
        return rest, f"codi:{rest}"
    return str(resolve_repo(hub[0], hub[1], what=f"--model codi:{rest}")), f"codi:{rest}"


def coconut_location(rest: str) -> tuple[str, str]:
    """(local checkpoint file or directory, model name) of ``coconut:REST``: a local path, else
    ``ORG/NAME[:FILE][@REV]`` on the hub (only FILE is fetched when given)."""
    m = None if Path(rest).exists() else COCONUT_HUB.match(rest)
    if m is None:
        return rest, f"coconut:{rest}"
    file = m.group("file")
    snap = resolve_repo(m.group("repo"), m.group("rev"), what=f"--model coconut:{rest}", allow_patterns=file and [file])
    return str(snap / file if file else snap), f"coconut:{rest}"


def pccot_location(rest: str) -> tuple[str, str]:
    """(local adapter directory, model name) of ``pccot:REST``: a local path, else a hub name
    ``ORG/NAME[@REV]`` (from the cache or downloaded)."""
    hub = None if Path(rest).exists() else split_hub_name(rest)
    if hub is None:
        return rest, f"pccot:{rest}"
    return str(resolve_repo(hub[0], hub[1], what=f"--model pccot:{rest}")), f"pccot:{rest}"


def _reject(spec: str, overrides: dict[str, Any], allowed: Iterable[str]) -> None:
    extra = [k for k in overrides if k not in set(allowed)]
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise LatentPatchError(f"{flags} only apply to codi: checkpoints, not to --model {spec}; fix: drop them")


def _guess_kind(p: Path, spec: str) -> str:
    """The kind of a plain path: a latentpatch dir, a CODI checkpoint dir or a GGUF file."""
    if p.is_dir() and (p / LATENT_JSON).is_file():
        return "dir"
    if p.is_dir() and ((p / "pytorch_model.bin").is_file() or (p / "model.safetensors").is_file()):
        return "codi"
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.exists():
        raise LatentPatchError(
            f"--model {spec}: cannot tell the checkpoint kind; fix: prefix it with codi:, coconut:, dir: or gguf:"
        )
    raise LatentPatchError(
        f"--model {spec}: no such file or directory; fix: use default, codi:DIR, "
        "coconut:FILE, dir:PATH, gguf:PATH or config:llama"
    )


def load_model(
    spec: str,
    *,
    base: str | None = None,
    preset: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> LatentModel:
    """Load a model from a spec string:

    - ``default``: the shipped model (``latentpatch/default_model``)
    - ``codi:DIR`` or ``codi:ORG/NAME[@REV]`` (hub): an official CODI checkpoint (with
      ``base``/``preset``/overrides; ``codi:`` alone takes the preset's released repository)
    - ``coconut:FILE`` or ``coconut:ORG/NAME[:FILE][@REV]`` (hub): a Coconut checkpoint (``base`` default gpt2)
    - ``dir:PATH`` or a plain path to a directory with ``latentpatch.json``
    - ``gguf:PATH`` (or a plain ``*.gguf`` path): a GGUF LM with identity projection
    - ``config:llama`` / ``config:gpt2``: a small random model (demo)
    - ``pccot:DIR`` or ``pccot:ORG/NAME[@REV]``: a PCCoT adapter (:mod:`latentpatch.model.pccot_loader`;
      ``base``: the base with weights, default the adapter's; ``pccot:`` alone: whynlp/pccot-gpt2)
    - ``soft:BASE`` / ``multiplex:BASE`` (BASE a ``gguf:`` or ``config:`` spec): Soft Thinking or
      Multiplex Thinking on that LM (:mod:`latentpatch.model.mixture`); ``soft,KEY=VALUE,...:BASE``
      sets fields of ``MixtureSettings`` (stops, noise, filters: :mod:`latentpatch.model.mixture_stops`)
    - ``colar:FILE.ckpt`` (with ``base``): a CoLaR Lightning checkpoint (:mod:`latentpatch.model.colar`)

    ``overrides``: ``num_latent`` for every kind; ``lora_r``, ``lora_alpha``, ``lora_targets``,
    ``prj_dim``, ``prj_ln``, ``remove_eos``, ``eos_id``, ``answer_prefix`` for ``codi:``. None
    values are ignored.

    >>> from latentpatch.model.load import load_model
    >>> model = load_model("default")
    >>> model.family, model.n_layers, model.num_latent
    ('llama', 4, 6)
    >>> q = ("A farmer plants 2 rows with 3 trees in each row. 1 of the trees die, "
    ...      "and the farmer plants 3 new trees. How many trees does the farmer have now?")
    >>> model.answer([q])
    [8.0]
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = [k for k in overrides if k not in CODI_ONLY_OPTIONS + ("num_latent", "pccot_round")]
    if unknown:
        raise TypeError(f"load_model got unexpected override(s) {unknown}")
    spec = str(spec).strip()
    kind, sep, rest = spec.partition(":")
    if spec in ("default", "config"):
        kind, rest = spec, ""
    elif not sep or len(kind) == 1:  # a plain path (or a Windows drive letter): guess its kind
        kind, rest = _guess_kind(Path(spec), spec), spec
    num_latent = overrides.get("num_latent")
    pccot_round = overrides.pop("pccot_round", None)
    if pccot_round is not None and kind != "pccot":
        raise LatentPatchError(f"--pccot-round only applies to pccot: models, not to --model {spec}; fix: drop it")
    if num_latent is not None and int(num_latent) < 1:
        raise LatentPatchError(f"--num-latent {num_latent}: must be at least 1")
    coconut_preset = preset is not None and kind == "coconut"  # an unknown one: get_coconut_preset says so
    if kind != "codi":
        if preset is not None and not coconut_preset:
            raise LatentPatchError(f"--preset only applies to codi: checkpoints, not to --model {spec}; fix: drop it")
        _reject(spec, overrides, ("num_latent",))
        if base is not None and kind not in ("coconut", "pccot", "colar"):
            raise LatentPatchError(f"--base only applies to codi: and coconut: checkpoints, not to --model {spec}")
    if kind == "default":
        if not (DEFAULT_MODEL_DIR / LATENT_JSON).is_file():
            raise LatentPatchError(
                f"the shipped default model is not in this installation ({DEFAULT_MODEL_DIR} "
                f"has no {LATENT_JSON}); fix: pass --model codi:DIR or dir:PATH, or "
                "--model config:llama for a random demo model"
            )
        return load_latent_dir(DEFAULT_MODEL_DIR, num_latent=num_latent, dtype=dtype, device=device)
    if kind == "codi":
        get_preset(preset)  # an unknown preset is named before any download
        where, name = codi_location(rest, preset)
        return load_codi_checkpoint(where, base, preset=preset, dtype=dtype, device=device, name=name, **overrides)
    if kind == "coconut":
        cp = get_coconut_preset(preset) if coconut_preset and preset is not None else {}
        where, name = coconut_location(rest or cp.get("repo", ""))
        return load_coconut_checkpoint(
            where,
            base or cp.get("base", "gpt2"),
            num_latent=num_latent if num_latent is not None else cp.get("num_latent"),
            dtype=dtype,
            device=device,
            name=name + (f" ({preset})" if cp else ""),
            known_unused=cp.get("known_unused", ()),
        )
    if kind == "pccot":
        from latentpatch.model.pccot_loader import PCCOT_PRESETS, load_pccot

        where, name = pccot_location(rest or PCCOT_PRESETS["pccot-gpt2"]["repo"])
        return load_pccot(
            where, base, num_latent=num_latent, site_round=pccot_round, dtype=dtype, device=device, name=name
        )
    if kind == "dir":
        return load_latent_dir(rest, num_latent=num_latent, dtype=dtype, device=device)
    if kind == "gguf":
        return load_gguf(rest, num_latent=num_latent, dtype=dtype, device=device)
    if kind == "config":
        return random_model(rest or "llama", num_latent=num_latent, dtype=dtype, device=device)
    if kind == "colar":
        from latentpatch.model.colar import load_colar_checkpoint

        return load_colar_checkpoint(rest, base, num_latent=num_latent, dtype=dtype, device=device)
    if kind.partition(",")[0] in MIXTURE_KINDS:  # soft[,KEY=VALUE...]:BASE, BASE a plain LM (gguf:, config:)
        if not rest or rest.partition(":")[0].partition(",")[0] in MIXTURE_KINDS:
            raise LatentPatchError(
                f"--model {spec}: needs a plain LM after {kind}:; fix: e.g. --model {kind}:gguf:PATH"
            )
        kind, settings = parse_mixture_kind(kind, spec)  # the settings are read before the LM loads
        return mixture_model(load_model(rest, dtype=dtype, device=device, num_latent=num_latent), kind, settings)
    raise LatentPatchError(f"--model {spec}: unknown kind {kind!r}; fix: use {SPEC_KINDS}")
