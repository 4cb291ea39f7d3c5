"""The values patched in at each pair: ``--replacement`` source, zero, mean or resample.

``mean`` and ``resample`` values depend on every pair of the run; a shard computes them over
every shard's pairs (:func:`global_pool`), so merged shards equal the unsharded run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from latentpatch.data.pairs import Pair
from latentpatch.model.latent import LatentModel
from latentpatch.patching.baselines import PairBaseline, mean_activations, replacement_values, resample_partner
from latentpatch.patching.specs import EngineConfig
from latentpatch.pipeline.cache import ActivationCache, recorded_run
from latentpatch.pipeline.config import RunConfig


def value_factory(
    bases: Sequence[PairBaseline],
    config: RunConfig,
    pool: Sequence[PairBaseline] | None = None,
    pool_position: Sequence[int] | None = None,
) -> Callable[[int], Callable]:
    """``i -> ValueFn`` for this process's pair ``i``.

    ``mean`` and ``resample`` values depend on every pair of the run. ``pool`` is that whole set
    (all shards' used pairs, in global order; default: ``bases``) and ``pool_position[i]`` is pair
    ``i``'s place in it, so a shard computes exactly the values the unsharded run would.
    """
    if pool is None or pool_position is None:
        pool, pool_position = bases, range(len(bases))
    engine_cfg = EngineConfig(config.direction, config.replacement)
    means = mean_activations(pool) if config.replacement == "mean" else None
    partner = resample_partner(len(pool), config.seed)

    def values_for(i: int) -> Callable:
        source = pool[partner[pool_position[i]]] if config.replacement == "resample" else None
        return replacement_values(bases[i], engine_cfg, means, source)

    return values_for


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
        clean, corrupted = (recorded_run(model, cache, v.question) for v in (pair.clean, pair.corrupted))
        b = PairBaseline(
            pair.pair_id, float(pair.clean.answer), float(pair.corrupted.answer), clean, corrupted, config.direction
        )
        if config.only_correct and not (b.clean_correct and b.corrupted_correct):
            continue
        pool_index[k] = len(pool)
        pool.append(b)
    return pool, [pool_index[k] for k in indices]
