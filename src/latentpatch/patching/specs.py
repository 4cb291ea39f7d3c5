"""What an experiment is: the patches it makes (:class:`PatchSpec`) and what they write (:class:`EngineConfig`).

This module defines what a patch is (docs/method.md §5). A
:class:`PatchSpec` says *which* sites one patch overwrites (a component, one layer, a set of latent
positions) and how the rest of the rollout behaves (``frozen``); the run-level
:class:`EngineConfig` says with *what* (``replacement``) and in which ``direction``.

Each experiment is a spec generator: :func:`layer_specs`, :func:`position_specs` and
:func:`iterative_specs` return the spec list of one experiment for a model with ``n_layers`` blocks
and ``num_latent`` (K) thoughts (the step-level ones are in :mod:`latentpatch.patching.steps`; every
experiment, by name, in :mod:`latentpatch.patching.experiments`). Nothing else differs between
experiments: the engine (:mod:`latentpatch.patching.engine`) runs every spec the same way, by the
type of its :attr:`PatchSpec.intervention`.
"""

from __future__ import annotations

from dataclasses import dataclass

from latentpatch.names import (
    ALL_POSITIONS,
    DEFAULT_COMPONENT,
    DIRECTIONS,
    LAYER_MODE,
    POSITION_MODE,
    REPLACEMENTS,
)
from latentpatch.patching.interventions import Intervention, Replacement, intervention_of


@dataclass(frozen=True)
class PatchSpec:
    """One patch: overwrite ``component`` at ``layer`` at every latent position in ``positions``.

    ``experiment``/``mode``/``index`` only label the result (``index`` = the position shown in
    tables: -1 for "all latent positions", p for a single position, n for cumulative S_n).
    ``frozen``: after the last patched position, feed the target's own thoughts (no recurrence).
    ``track``: record the regenerated activation at ``layer`` at every later latent position.
    ``replacement``: set only by step-level specs (docs/method.md §13), whose experiments mix
    replacements in one sweep; "" = the run's ``--replacement``.
    """

    experiment: str
    mode: str
    component: str
    layer: int
    positions: tuple[int, ...]
    index: int
    frozen: bool = False
    track: bool = False
    replacement: str = ""

    @property
    def start(self) -> int:
        """The earliest patched latent position: everything before it is the target's baseline."""
        return min(self.positions)

    @property
    def key(self) -> str:
        """The innermost key of ``results[pair_id][layer][key]``."""
        if self.mode == LAYER_MODE:
            return LAYER_MODE
        if self.mode == POSITION_MODE:
            return str(self.index)
        if self.mode == "cumulative":
            return f"cumulative_{self.index}"
        return self.mode

    @property
    def intervention(self) -> Intervention:
        """What this patch does to the rollout, as the type the engine dispatches on
        (:mod:`latentpatch.patching.interventions`)."""
        return intervention_of(self.component, self.layer, self.positions)

    @property
    def replacement_value(self) -> Replacement:
        """:attr:`replacement` as a typed value (a kind, or a donor ``same``/``diff`` of intermediate s)."""
        return Replacement.parse(self.replacement)

    @property
    def computation(self) -> tuple[str, int, tuple[int, ...], bool, str]:
        """Specs with equal ``computation`` give identical patched runs (computed once)."""
        return (self.component, self.layer, self.positions, self.frozen, self.replacement)


@dataclass
class EngineConfig:
    """Run-level patch settings: ``direction`` picks the target/source roles of a pair
    (``denoise``: patch clean values into the corrupted run; ``noise``: the reverse) and
    ``replacement`` the values written (see :func:`latentpatch.patching.baselines.replacement_values`)."""

    direction: str = "denoise"
    replacement: str = "source"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}")


def layer_specs(n_layers: int, num_latent: int, component: str = DEFAULT_COMPONENT) -> list[PatchSpec]:
    """Layer sweep: per layer, every latent position at once."""
    every = tuple(range(num_latent))
    return [PatchSpec("layer", LAYER_MODE, component, layer, every, ALL_POSITIONS) for layer in range(n_layers)]


def position_specs(n_layers: int, num_latent: int, component: str = DEFAULT_COMPONENT) -> list[PatchSpec]:
    """Position sweep: per (layer, latent position p), that one site."""
    return [
        PatchSpec("position", POSITION_MODE, component, layer, (p,), p)
        for layer in range(n_layers)
        for p in range(num_latent)
    ]


def iterative_specs(
    n_layers: int, num_latent: int, component: str = DEFAULT_COMPONENT, frozen: bool = True
) -> list[PatchSpec]:
    """Iterative vs parallel, per layer:

    - ``parallel``: all latent positions patched with source values (= the layer-sweep cell);
    - ``cumulative`` n = 0..K-1: positions 0..n patched (how the effect builds up);
    - ``chained``: position 0 patched, every later thought regenerated by the model from the
      patched state; the regenerated activations at this layer are tracked;
    - ``frozen``: as chained, but later thoughts' input embeddings held at the target's values,
      so only the attention path carries the patch (control); ``frozen`` False leaves it out (a
      model without that path, PCCoT: :attr:`~latentpatch.model.latent.LatentModel.frozen_path`).
    """
    specs = []
    every = tuple(range(num_latent))
    for layer in range(n_layers):
        specs.append(PatchSpec("iterative", "parallel", component, layer, every, ALL_POSITIONS))
        specs += [
            PatchSpec("iterative", "cumulative", component, layer, tuple(range(n + 1)), n) for n in range(num_latent)
        ]
        specs.append(PatchSpec("iterative", "chained", component, layer, (0,), 0, track=True))
        if frozen:
            specs.append(PatchSpec("iterative", "frozen", component, layer, (0,), 0, frozen=True, track=True))
    return specs
