"""The checks of the probe and steering options (docs/method.md §16), which :meth:`RunConfig.validate
<latentpatch.pipeline.config.RunConfig.validate>` runs; the options themselves are defined once, in
:class:`~latentpatch.pipeline.config.RunConfig`.

>>> component_list("resid_out, attn_out"), component_list(None)
(('resid_out', 'attn_out'), ('resid_out',))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from latentpatch.errors import LatentPatchError
from latentpatch.names import COMPONENTS, DAS_EXPERIMENT, HEAD_COMPONENT, PROBE_EXPERIMENT, STEER_EXPERIMENT

if TYPE_CHECKING:
    from latentpatch.pipeline.config import RunConfig


def component_list(text: str | None) -> tuple[str, ...]:
    """``--probe-components`` as names (default ``resid_out``)."""
    return tuple(c.strip() for c in (text or "resid_out").split(",") if c.strip())


def check_probe_options(cfg: RunConfig) -> None:
    """The probe options: only with ``--experiments probe``, with valid values (with ``--shard`` each
    shard records its activation files and ``merge`` fits the probes: ``pipeline/probing.py``)."""
    given = [
        n.replace("_", "-")
        for n in (
            "questions",
            "skip_unparsed",
            "probe_components",
            "probe_min_count",
            "probe_regression",
            "activation_dtype",
        )
        if getattr(cfg, n) is not None
    ]
    if DAS_EXPERIMENT in cfg.experiments:  # das reads --questions too (docs/method.md §20.1)
        given = [g for g in given if g not in ("questions", "skip-unparsed")]
        check_question_path(cfg)
    if PROBE_EXPERIMENT not in cfg.experiments:
        if given:
            both = given[0] in ("questions", "skip-unparsed")  # das reads --questions too
            which, add = ("probe and das experiments", "probe or das") if both else ("probe experiment", "probe")
            raise LatentPatchError(
                f"--{given[0]} applies to the {which} only; fix: add {add} to --experiments, or drop it"
            )
        return
    check_question_path(cfg)
    if cfg.probe_min_count is not None and cfg.probe_min_count < 2:
        raise LatentPatchError(f"--probe-min-count must be >= 2 (got {cfg.probe_min_count})")
    if cfg.activation_dtype not in (None, "float32", "float16"):
        raise LatentPatchError(f"--activation-dtype {cfg.activation_dtype!r}: use float32 or float16")
    bad = [c for c in component_list(cfg.probe_components) if c not in COMPONENTS]
    if bad:
        raise LatentPatchError(f"--probe-components: unknown {bad[0]!r}; use a comma list of {', '.join(COMPONENTS)}")


def check_steer_options(cfg: RunConfig) -> None:
    """The steering options: only with ``--experiments steer``, parseable, layers and counts in range."""
    given = [
        n.replace("_", "-")
        for n in ("steer_alphas", "steer_layers", "steer_controls", "steer_vector", "steer_direction")
        if getattr(cfg, n) is not None
    ]
    if STEER_EXPERIMENT not in cfg.experiments:
        if given:
            raise LatentPatchError(
                f"--{given[0]} applies to the steer experiment only; fix: add steer to --experiments, or drop it"
            )
        return
    if cfg.component == HEAD_COMPONENT:
        raise LatentPatchError(f"--experiments steer with --component {HEAD_COMPONENT}: fix: steer a block component")
    for name, parse in (("steer-alphas", float), ("steer-layers", int)):
        text = getattr(cfg, name.replace("-", "_"))
        try:
            [parse(x) for x in (text or "0").split(",")]
        except ValueError:
            raise LatentPatchError(f"--{name} {text!r}: use a comma list of numbers, e.g. -2,-1,1,2") from None
    if cfg.steer_controls is not None and cfg.steer_controls < 1:
        raise LatentPatchError(f"--steer-controls must be >= 1 (got {cfg.steer_controls}): a direction needs a control")
    if cfg.steer_vector is not None and not Path(cfg.steer_vector).is_file():
        raise LatentPatchError(f"--steer-vector {cfg.steer_vector}: no such file; fix: give a .npy or .pt file")
    if cfg.steer_direction is not None:
        from latentpatch.probing.directions import parse_direction

        kind, _, _ = parse_direction(cfg.steer_direction)
        if cfg.steer_vector is not None:
            raise LatentPatchError("--steer-direction and --steer-vector both name the direction; fix: give one")
        if kind != "meandiff" and PROBE_EXPERIMENT not in cfg.experiments:
            raise LatentPatchError(
                f"--steer-direction {cfg.steer_direction}: reads the probe experiment's activations; fix: add probe "
                "to --experiments"
            )
        if kind != "meandiff" and cfg.shard is not None:
            raise LatentPatchError(
                f"--shard with --steer-direction {cfg.steer_direction}: the direction reads every question's probe "
                "activations, which a shard records only its part of; fix: run it unsharded, or pass the direction "
                "as --steer-vector (a file)"
            )
        if kind != "meandiff" and cfg.component not in component_list(cfg.probe_components):
            raise LatentPatchError(
                f"--steer-direction {cfg.steer_direction}: --component {cfg.component} is not recorded by the "
                "probes; fix: add it to --probe-components"
            )


def check_question_path(cfg: RunConfig) -> None:
    """``--questions`` names a file (probe and das read it)."""
    if cfg.questions is not None and not Path(cfg.questions).is_file():
        raise LatentPatchError(
            f"--questions {cfg.questions}: no such file; fix: give a pair, question or GSM8K file (docs/method.md §16)"
        )
