"""latentpatch: activation patching on continuous chain-of-thought models (CODI, Coconut).

The package is laid out as the pipeline it runs; each folder is one stage::

    errors.py    LatentPatchError (one line with the fix; the CLI prints it, exit code 2), RunInterrupted (130)
    names.py     the run directory's names and rules: experiments, modes, components, columns (no torch)
    files.py     atomic writes and plain JSON, for every writer of the project (no torch)
    rundir.py    the run directory: paths, typed manifest, readers, assembly (no torch)
    runlock.py   the lock on a run directory and the --out checks (no torch)
    data/        pairs (the pair-file format), answers, validate, synthetic (GSM8K-style pairs)
    model/       config (LatentConfig, decoding rules, prj), latent (LatentModel, the rollout), state,
                 sites (families, write sites), heads (per-head sites), checkpoint (strict core),
                 latent_dir (the model-dir format), hf, hub (hub names), codi, loaders, load (load_model)
    patching/    specs (patch specs, experiments), baselines, engine (the two sweeps), metrics, checks,
                 steps (step-level experiments), heads (per-head specs), reading (lens, attention)
    pipeline/    config (run options, no torch), run (the run's steps), manifest, progress, values,
                 cache (activation cache), memory (batch size), merge (shards, no torch),
                 steps (the step-level sweep), reading (lens and attention)
    analysis/    inference, stats (statistics), selection, findings (the first screen, run wording),
                 figures, hover, html, sections, stats_section, steps_section, steps_figures,
                 reading_section, reading_figures, report (report.html), compare, wandb_log (W&B); no torch
    training/    data, objective, train (the shipped model), evaluate (``latentpatch eval``)
    cli.py       the ``latentpatch`` command (options generated in cli_options.py)

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
    "RunConfig": "latentpatch.pipeline.config",
    "run_experiments": "latentpatch.pipeline.run",
    "load_pairs": "latentpatch.data.pairs",
    "build_report": "latentpatch.analysis.report",
}

__all__ = ["LatentPatchError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'latentpatch' has no attribute {name!r}")
