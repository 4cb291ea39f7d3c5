"""The run's one value pool (:func:`run_value_pool`): the values patched in at each pair, for every
kind of patch (:class:`latentpatch.patching.values.ValuePool`), built once per run.

``mean``, ``step_mean`` and ``resample`` values depend on every pair of the run; a shard computes
them over every shard's pairs (:func:`global_pool`), so merged shards equal the unsharded run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from latentpatch.data.pairs import Pair
from latentpatch.model.latent import LatentModel
from latentpatch.model.streams import pair_stream
from latentpatch.names import GLOBAL_REPLACEMENTS, STEER_EXPERIMENT, STEP_EXPERIMENTS
from latentpatch.patching.baselines import PairBaseline
from latentpatch.patching.specs import EngineConfig
from latentpatch.patching.values import ValuePool, pool_of
from latentpatch.pipeline.cache import ActivationCache, recorded_run
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.selection import pairs_to_run

if TYPE_CHECKING:
    from latentpatch.pipeline.manifest import RunContext


def run_value_pool(ctx: RunContext, all_pairs: Sequence[Pair]) -> ValuePool:
    """The run's value pool, built on first use and kept on ``ctx`` (the patching sweep, the step
    level and atp share it). A shard whose values depend on the whole run (``--replacement mean`` or
    ``resample``, or any step-level experiment: their means, partners and donors) pools every
    shard's used pairs (:func:`global_pool`; the manifest's ``replacement_pool`` says so)."""
    if ctx.value_pool is not None:
        return ctx.value_pool
    config = ctx.config
    engine_cfg = EngineConfig(config.direction, config.replacement)
    whole_run = config.replacement in GLOBAL_REPLACEMENTS or any(
        e in (*STEP_EXPERIMENTS, STEER_EXPERIMENT) for e in config.experiments
    )
    if config.shard is None or not whole_run:
        pool = pool_of(ctx.bases, ctx.indices, engine_cfg, config.seed, ctx.pairs)
    else:
        unsharded, _ = pairs_to_run(all_pairs, dataclasses.replace(config, shard=None))
        bases, position = global_pool(ctx.model, ctx.cache, config, unsharded, ctx.indices)
        by_id = {p.pair_id: p for _, p in unsharded}
        pairs = [by_id[b.pair_id] for b in bases]
        pool = ValuePool(bases, position, list(ctx.indices), engine_cfg, config.seed, pairs, label="all shards")
        ctx.replacement_pool = pool.label
    ctx.value_pool = pool
    return pool


def global_pool(
    model: LatentModel,
    cache: ActivationCache | None,
    config: RunConfig,
    all_selected: Sequence[tuple[int, Pair]],
    indices: Sequence[int],
) -> tuple[list[PairBaseline], list[int]]:
    """Every shard's used pairs (``all_selected``: the unsharded ``(global_index, pair)`` list;
    recorded runs only, no baseline metrics), and the places of this shard's ``indices`` in that
    list. Needed only by sharded ``mean``/``resample`` runs; the activation cache makes the extra
    rollouts free when shards share a cache directory."""
    pool: list[PairBaseline] = []
    pool_index: dict[int, int] = {}
    for k, pair in all_selected:
        stream = pair_stream(pair.pair_id)  # the pair's own draws, as in the shard that runs it (§21)
        clean, corrupted = (recorded_run(model, cache, v.question, stream=stream) for v in (pair.clean, pair.corrupted))
        b = PairBaseline(
            pair.pair_id, float(pair.clean.answer), float(pair.corrupted.answer), clean, corrupted, config.direction
        )
        b.stream = stream
        if config.only_correct and not (b.clean_correct and b.corrupted_correct):
            continue
        pool_index[k] = len(pool)
        pool.append(b)
    return pool, [pool_index[k] for k in indices]
