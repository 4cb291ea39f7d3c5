"""Per-pair latent counts on a family whose latent phase ends by a rule (docs/method.md §22).

CoLaR (a sampled ``###``) and Soft Thinking (``</think>``, the cold stop) end the latent phase by
a rule (:mod:`latentpatch.model.stops`), so two questions run different numbers of latents. With
``--latent-count target`` (the default) each pair runs its *target* run's own count K (the run that
is patched: corrupted when denoising), at most the model's ``--num-latent`` (the cap); the source
run is rolled out with the same K, so every site of the pair exists on both sides. With ``fixed``
every pair runs the cap. Patched runs keep their pair's K (``--patched-stop keep``: sites stay
comparable) and record where the rule would stop them; ``--patched-stop rule`` answers the cells
whose rule fires elsewhere where it fires (:func:`~latentpatch.patching.engine.rule_stopped_cells`).

The one engine runs each K separately: :func:`count_groups` keeps the pairs of one K together and
:func:`at_count` runs a block with the model at that K (:meth:`~latentpatch.model.latent.LatentModel.latent_count`)
and that K's spec list (:func:`specs_for`). Fixed-count families (CODI, Coconut) have no rule and
none of this runs: their runs are byte for byte what they were.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from latentpatch.errors import LatentPatchError
from latentpatch.model.latent import LatentModel
from latentpatch.model.stops import rule_latent_counts, stop_rule_of
from latentpatch.model.streams import pair_stream
from latentpatch.names import GLOBAL_REPLACEMENTS, HEAD_COMPONENT
from latentpatch.patching.engine import group_pairs
from latentpatch.patching.experiments import SpecShape, experiment_specs, stage_experiments
from latentpatch.patching.specs import PatchSpec
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.manifest import RunContext


def per_pair_counts(model: LatentModel, config: RunConfig) -> bool:
    """Do the pairs of this run get their own latent counts (a stop rule and ``--latent-count target``)?"""
    return stop_rule_of(model) is not None and config.latent_count == "target"


def check_latent_stops(model: LatentModel, config: RunConfig) -> None:
    """Refuse, in one line before anything runs, what per-pair latent counts cannot do: experiments
    outside the layer/position/iterative sweeps (their stages pool values or activations of one K),
    pooled replacement values, per-head patching; and ``--patched-stop rule`` without a rule."""
    if stop_rule_of(model) is None:
        if config.patched_stop == "rule":
            raise LatentPatchError(
                f"--patched-stop rule: {model.name or config.model} has no stop rule (a fixed latent count); "
                "fix: drop --patched-stop"
            )
        return
    if not per_pair_counts(model, config):
        return
    other = [e for e in config.experiments if e not in stage_experiments(config.experiments, "sweep")]
    fix = "fix: add --latent-count fixed (every pair runs --num-latent)"
    if other:
        raise LatentPatchError(
            f"--experiments {','.join(other)}: with per-pair latent counts (--latent-count target on a family "
            f"with a stop rule) only layer, position and iterative run; {fix}, or leave them out"
        )
    if config.replacement in GLOBAL_REPLACEMENTS or config.component == HEAD_COMPONENT:
        flag = (
            f"--replacement {config.replacement}"
            if config.replacement in GLOBAL_REPLACEMENTS
            else "--component head_out"
        )
        raise LatentPatchError(f"{flag}: pools values over pairs of one latent count; {fix}")


def record_latent_counts(ctx: RunContext) -> None:
    """Each pair's latent count by the family's rule (``ctx.latent_counts``, the target run's) and
    the manifest's ``latent_stops``: the rule, the modes, the cap and how the counts fall. Nothing
    when the model has no rule."""
    model, config = ctx.model, ctx.config
    rule = stop_rule_of(model)
    if rule is None:
        return
    cap = model.num_latent
    summary: dict[str, Any] = {
        "rule": rule.describe(),
        "latent_count": config.latent_count,
        "patched_stop": config.patched_stop,
        "cap": cap,
    }
    if config.latent_count == "target":
        keys = [pair_stream(p.pair_id) for p in ctx.pairs]  # each pair's own draws (docs/method.md §21)
        target = _counts(model, [model.prompt_ids(p.variant(_target(config)).question) for p in ctx.pairs], cap, keys)
        source = _counts(model, [model.prompt_ids(p.variant(_source(config)).question) for p in ctx.pairs], cap, keys)
        zero = [p.pair_id for p, t in zip(ctx.pairs, target) if t == 0]
        if zero:  # thinking ended at the prompt: no thought to patch, so the pair runs one (stated)
            summary["zero_latent_pairs"] = zero
            ctx.progress.warn(
                f"{len(zero)} pair(s) whose target run ends thinking at the prompt (0 latents) run 1 latent: "
                f"{', '.join(zero[:5])}{' ...' if len(zero) > 5 else ''}; manifest.json: latent_stops"
            )
        target = [max(t, 1) for t in target]
        ctx.latent_counts = target
        summary["target_counts"] = {str(k): n for k, n in sorted(Counter(target).items())}
        summary["source_differs"] = [p.pair_id for p, t, s in zip(ctx.pairs, target, source) if t != s]
    else:
        ctx.latent_counts = [cap] * len(ctx.pairs)
    ctx.latent_stops = summary


def _target(config: RunConfig) -> str:
    return "corrupted" if config.direction == "denoise" else "clean"


def _source(config: RunConfig) -> str:
    return "clean" if config.direction == "denoise" else "corrupted"


def _counts(
    model: LatentModel, prompts: Sequence[list[int]], cap: int, streams: Sequence[int], batch: int = 16
) -> list[int]:
    """:func:`~latentpatch.model.stops.rule_latent_counts` in batches of ``batch`` prompts (``streams``:
    each prompt's pair's draw-stream key)."""
    out: list[int] = []
    for i in range(0, len(prompts), batch):
        out += rule_latent_counts(model, prompts[i : i + batch], cap, streams[i : i + batch])
    return out


def pair_count(ctx: RunContext, i: int) -> int:
    """The latent count of this process's pair ``i`` (the model's own without a rule)."""
    return ctx.latent_counts[i] if ctx.latent_counts is not None else ctx.model.latent_cap


@contextmanager
def at_count(ctx: RunContext, k: int) -> Iterator[list[PatchSpec]]:
    """The model at ``k`` latents inside the block; yields the sweep's specs for ``k``."""
    if k == ctx.model.latent_cap:
        yield ctx.specs
        return
    with ctx.model.latent_count(k):
        yield specs_for(ctx.config, ctx.model.n_layers, k)


def specs_for(config: RunConfig, n_layers: int, num_latent: int) -> list[PatchSpec]:
    """The specs of the run's layer/position/iterative sweeps at ``num_latent`` latents."""
    shape = SpecShape(n_layers, num_latent, config.component)
    return [s for name in stage_experiments(config.experiments, "sweep") for s in experiment_specs(name, shape)]


def count_groups(ctx: RunContext, todo: Sequence[int], pairs_per_group: int) -> list[list[int]]:
    """:func:`~latentpatch.patching.engine.group_pairs` within each latent count, counts in order of
    their first pair: a group's pairs share one K."""
    by_count: dict[int, list[int]] = {}
    for i in todo:
        by_count.setdefault(pair_count(ctx, i), []).append(i)
    eos = ctx.model.config.eos_id
    return [g for same in by_count.values() for g in group_pairs(ctx.bases, same, pairs_per_group, eos)]


def first_count_pairs(ctx: RunContext) -> tuple[int, list[int]]:
    """The latent count of the first pair and this process's pairs of that count (the built-in
    checks run on them)."""
    k = pair_count(ctx, 0)
    return k, [i for i in range(len(ctx.bases)) if pair_count(ctx, i) == k]
