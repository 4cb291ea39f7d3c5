"""One pool of replacement values per run, for every kind of patch (docs/method.md §4, §13).

A patched value is either a function of the pair alone (``source``, ``zero``, ``noise``, a donor)
or of every pair of the run (``mean``, ``step_mean``, ``resample``). :class:`ValuePool` holds the
run's pool of unpatched runs once (this process's pairs, or for a shard every shard's used pairs in
global order, so merged shards equal the unsharded run) and gives each pair one
:data:`~latentpatch.patching.baselines.ValueFn` that answers every spec by its intervention type:

- an :class:`~latentpatch.patching.interventions.ActivationPatch` gets the run's ``--replacement``
  (:func:`~latentpatch.patching.baselines.replacement_values`: source, zero, mean, resample over the
  pool's source runs' activations);
- a :class:`~latentpatch.patching.interventions.ThoughtReplacement` gets its own replacement
  (:func:`~latentpatch.patching.steps.step_values`: source, zero, mean, step_mean, noise, resample,
  a donor's thought, a vocabulary-space value), from the chains recorded with the baselines
  (``thought``, ``thought_pre``).

The pool's means and partners are computed once, on first use; the model's vocabulary
(:class:`~latentpatch.patching.vocab.Vocabulary`: E's unit rows, float32) is set once per run by the
step-level stage when its specs need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from latentpatch.data.pairs import Pair
from latentpatch.patching.baselines import (
    PairBaseline,
    ValueFn,
    mean_activations,
    replacement_values,
    resample_partner,
)
from latentpatch.patching.interventions import ThoughtReplacement
from latentpatch.patching.specs import EngineConfig, PatchSpec
from latentpatch.patching.steps import (
    StepPool,
    StepRecord,
    recorded_chain,
    run_intermediates,
    step_pool,
    step_values,
)
from latentpatch.patching.vocab import Vocabulary


@dataclass
class ValuePool:
    """Every replacement value of one run.

    ``pool``: the unpatched runs the run-wide values are computed over (each a
    :class:`PairBaseline` whose records hold activations and chains; for a shard, every shard's used
    pairs in global order). ``position[i]``: this process's pair ``i``'s place in ``pool``;
    ``indices[i]``: its global index (seeds the noise of pair ``i``). ``config``: the run's direction
    and ``--replacement`` (for activation patches). ``vocab``: the model's
    :class:`~latentpatch.patching.vocab.Vocabulary` (vocabulary-space thought replacements; set once
    per run by the step-level stage).
    """

    pool: list[PairBaseline]
    position: list[int]
    indices: list[int]
    config: EngineConfig
    seed: int = 0
    pairs: list[Pair] | None = None  # the pool's pairs (their extra fields: intermediates), same order
    label: str | None = None  # "all shards" when the pool is every shard's (the manifest's replacement_pool)
    vocab: Vocabulary | None = None

    @property
    def _source_offset(self) -> int:
        """Pool run 2j is pair j's clean run, 2j+1 its corrupted run: the source's offset."""
        return 0 if self.config.direction == "denoise" else 1

    @cached_property
    def partner(self) -> list[int]:
        """The seeded resample partner of each pool pair (a derangement)."""
        return resample_partner(len(self.pool), self.seed)

    @cached_property
    def site_means(self) -> dict[str, torch.Tensor]:
        """Per component, [n_layers, K, d]: the pool's source runs' mean activations."""
        return mean_activations(self.pool)

    @cached_property
    def chains(self) -> list[StepRecord]:
        """The pool's chains (thought, thought_pre), recorded with the baselines: run 2j = pair j's
        clean, 2j+1 its corrupted."""
        return [recorded_chain(rec) for b in self.pool for rec in (b.clean, b.corrupted)]

    @cached_property
    def intermediates(self) -> list[list[float] | None]:
        """Per pool run (2j = pair j's clean, 2j+1 its corrupted): its ``intermediates`` or None."""
        return run_intermediates(self.pairs or [])

    def target_run(self, i: int) -> int:
        """The pool run index of this process's pair ``i``'s target run."""
        return 2 * self.position[i] + 1 - self._source_offset

    @cached_property
    def step_means(self) -> StepPool:
        """The pool's source chains' mean and per-step mean, per thought site."""
        src = self._source_offset
        return step_pool([self.chains[2 * j + src] for j in range(len(self.pool))])

    def values(self, i: int, base: PairBaseline, donors: dict[str, int] | None = None) -> ValueFn:
        """The values of this process's pair ``i`` (``base``: its baseline, with the run's
        activations; per-head ones when the run patches heads): one function for every spec.
        ``donors``: donor runs of the intermediate contrast (``same:s`` → a pool run index)."""
        j = self.position[i]
        rep = self.config.replacement
        sites = replacement_values(
            base,
            self.config,
            self.site_means if rep == "mean" else None,
            self.pool[self.partner[j]] if rep == "resample" else None,
        )
        bound: list[ValueFn] = []  # the step values, built on the first thought spec (they need the chains)

        def values(spec: PatchSpec) -> torch.Tensor:
            if isinstance(spec.intervention, ThoughtReplacement):
                if not bound:
                    bound.append(self._step_values(i, donors))
                return bound[0](spec)
            return sites(spec)

        return values

    def _step_values(self, i: int, donors: dict[str, int] | None) -> ValueFn:
        j, src = self.position[i], self._source_offset
        return step_values(
            self.chains[self.target_run(i)],
            self.chains[2 * j + src],
            self.step_means,
            partner=self.chains[2 * self.partner[j] + src],
            donors={rep: self.chains[d] for rep, d in (donors or {}).items()},
            seed=self.seed,
            pair_index=self.indices[i],
            vocab=self.vocab,
            intermediates=self.intermediates[self.target_run(i)] if self.pairs else None,
        )


def pool_of(
    bases: Sequence[PairBaseline], indices: Sequence[int], config: EngineConfig, seed: int, pairs: Sequence[Pair]
) -> ValuePool:
    """The pool of an unsharded run: its own pairs (``bases[i]`` of ``pairs[i]``, global index ``indices[i]``)."""
    return ValuePool(list(bases), list(range(len(bases))), list(indices), config, seed, list(pairs))
