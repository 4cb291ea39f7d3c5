"""``--seeds N``: one run per seed, then the spread over them (docs/method.md §21).

The runs are ordinary runs, each in ``OUT/seed-S/`` with ``--seed S`` (S = ``--seed`` ..
``--seed`` + N - 1), so each is resumable and reportable alone; the summary is
:func:`latentpatch.analysis.seeds.write_seeds` (``OUT/seeds.json``, ``OUT/seeds.html``). No torch here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from latentpatch.pipeline.config import RunConfig


def seed_configs(config: RunConfig) -> list[RunConfig]:
    """One config per seed: ``seed`` S, ``seeds`` 1, ``out`` ``OUT/seed-S``.

    >>> [(c.seed, Path(c.out).name) for c in seed_configs(RunConfig(out="runs/x", seed=3, seeds=2))]
    [(3, 'seed-3'), (4, 'seed-4')]
    """
    return [
        dataclasses.replace(config, seed=s, seeds=1, out=str(Path(config.out) / f"seed-{s}"))
        for s in range(config.seed, config.seed + config.seeds)
    ]


def run_seeds(config: RunConfig, run_one: Callable[[RunConfig], Path]) -> Path:
    """Run ``run_one`` for every seed's config, then write the summary; returns ``seeds.html``."""
    from latentpatch.analysis.seeds import write_seeds

    configs = seed_configs(config)
    runs = [run_one(c) for c in configs]
    return write_seeds(Path(config.out), runs, [c.seed for c in configs])
