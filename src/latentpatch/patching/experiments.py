"""Every experiment by name: which stage of a run runs it and, for those that patch, its spec generator.

The one registry (:data:`REGISTRY`) from an experiment name (:data:`latentpatch.names.ALL_EXPERIMENTS`)
to an :class:`Experiment`:

- ``sweep`` (``layer``, ``position``, ``iterative``): activation patches at hook sites, one spec per
  cell (:mod:`latentpatch.patching.specs`), run by the engine over every pair;
- ``steps`` (``thought``, ``early``, ``influence``, ``intermediate``): thought replacements and
  early exits (:mod:`latentpatch.patching.steps`, docs/method.md §13; ``thought`` ends with the
  vocabulary-space specs of :mod:`latentpatch.patching.vocab`), run by the same engine;
- ``reading`` (``lens``, ``attention``): read one unpatched rollout, no patch (§14);
- ``atp``: one backward pass estimates every site; its exact check patches through the engine
  with specs it builds from the sites it ranks (§15), so it has no fixed spec list.

A generator takes a :class:`SpecShape` (what it needs to know of the model and the run).

>>> [name for name, e in REGISTRY.items() if e.stage == "steps"]
['thought', 'early', 'influence', 'intermediate']
>>> len(experiment_specs("position", SpecShape(n_layers=4, num_latent=6)))
24
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from latentpatch.names import ALL_EXPERIMENTS, DEFAULT_COMPONENT, THOUGHT_SITES
from latentpatch.patching.specs import PatchSpec, iterative_specs, layer_specs, position_specs
from latentpatch.patching.steps import early_specs, influence_specs, intermediate_specs, thought_specs
from latentpatch.patching.vocab import vocab_specs


@dataclass(frozen=True)
class SpecShape:
    """What a spec generator needs: the model's blocks and thoughts, the run's component, the
    thought sites the model has (``thought_pre`` only with a real feedback projection) and the
    intermediate values the pairs carry."""

    n_layers: int
    num_latent: int
    component: str = DEFAULT_COMPONENT
    thought_sites: tuple[str, ...] = THOUGHT_SITES
    n_intermediates: int = 0
    early_exits: int | None = None  # the early answers' last k (None: num_latent; PCCoT: its rounds)
    frozen: bool = True  # the iterative frozen control exists (not on PCCoT: LatentModel.frozen_path)


@dataclass(frozen=True)
class Experiment:
    """One experiment: the ``stage`` of a run that runs it (``sweep``, ``steps``, ``reading``,
    ``atp``), the question it answers, and its spec generator (None: it patches no fixed list)."""

    name: str
    stage: str
    question: str
    specs: Callable[[SpecShape], list[PatchSpec]] | None = None


REGISTRY: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "layer",
            "sweep",
            "which layers carry the reasoning?",
            lambda s: layer_specs(s.n_layers, s.num_latent, s.component),
        ),
        Experiment(
            "position",
            "sweep",
            "which thoughts, at which depth?",
            lambda s: position_specs(s.n_layers, s.num_latent, s.component),
        ),
        Experiment(
            "iterative",
            "sweep",
            "do the thoughts depend on each other in sequence, and through which path?",
            lambda s: iterative_specs(s.n_layers, s.num_latent, s.component, s.frozen),
        ),
        Experiment(
            "thought",
            "steps",
            "what does each thought carry?",
            lambda s: thought_specs(s.num_latent, s.thought_sites) + vocab_specs(s.num_latent, s.n_intermediates),
        ),
        Experiment(
            "early",
            "steps",
            "when is the answer committed?",
            lambda s: early_specs(s.num_latent if s.early_exits is None else s.early_exits),
        ),
        Experiment(
            "influence",
            "steps",
            "does step i change every later thought, and the answer?",
            lambda s: influence_specs(s.num_latent),
        ),
        Experiment(
            "intermediate",
            "steps",
            "does a thought store an intermediate value?",
            lambda s: intermediate_specs(s.num_latent, s.n_intermediates),
        ),
        Experiment("lens", "reading", "what does each layer at each thought decode to?"),
        Experiment("attention", "reading", "which question tokens does each thought read?"),
        Experiment("atp", "atp", "which sites matter, at the cost of one backward pass?"),
        Experiment("probe", "probe", "which value can be read linearly from which site?"),
        Experiment("steer", "steer", "does adding a direction at a site move the answer, more than a random one?"),
        Experiment(
            "edges", "edges", "which earlier position does each thought read, and does cutting that edge matter?"
        ),
        Experiment("das", "das", "which subspace of which site does the model use as a given value?"),
    )
}
assert tuple(REGISTRY) == ALL_EXPERIMENTS, "every experiment name has one registry entry, in names.py's order"


def experiment_specs(name: str, shape: SpecShape) -> list[PatchSpec]:
    """The spec list of the experiment ``name`` for ``shape``. An unknown name, or one that patches
    no fixed list (``lens``, ``attention``, ``atp``), is a ValueError naming its stage."""
    if name not in REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; expected one of {ALL_EXPERIMENTS}")
    experiment = REGISTRY[name]
    if experiment.specs is None:
        raise ValueError(f"experiment {name!r} has no spec list: its stage ({experiment.stage}) runs it")
    return experiment.specs(shape)


def stage_experiments(names: tuple[str, ...] | list[str], stage: str) -> list[str]:
    """The experiments of ``names`` that ``stage`` runs, in order."""
    return [n for n in names if REGISTRY[n].stage == stage]
