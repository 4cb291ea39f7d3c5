"""latentpatch: activation patching on continuous chain-of-thought models (CODI, Coconut).

The package is laid out as the pipeline it runs; each folder is one stage::

    data/      pair files and synthetic problems
    model/     the latent rollout (LatentModel), sites, checkpoint loading
    patching/  patch specs and experiment generators, the batched engine, metrics, built-in checks
    pipeline/  run options, the run itself, activation cache, memory estimate, merging shards
    rundir.py  the run directory (file names, atomic writes, assembly; no torch)
    analysis/  statistics, figures, report.html, compare, W&B (no torch)
    training/  training and evaluating the shipped model (uses model/)

The public API below is imported lazily, so ``import latentpatch`` (and ``latentpatch --help``)
does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from latentpatch.errors import LatentPatchError

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {
    "load_model": "latentpatch.model.load",
    "LatentModel": "latentpatch.model.latent",
    "Write": "latentpatch.model.sites",
    "PatchSpec": "latentpatch.patching.specs",
    "sweep_fast": "latentpatch.patching.engine",
    "RunConfig": "latentpatch.pipeline.run",
    "run_experiments": "latentpatch.pipeline.run",
    "load_pairs": "latentpatch.data.pairs",
    "build_report": "latentpatch.analysis.report",
}

__all__ = ["LatentPatchError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'latentpatch' has no attribute {name!r}")
