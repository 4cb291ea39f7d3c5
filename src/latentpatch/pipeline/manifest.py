"""What a run records about itself: the state its steps share (:class:`RunContext`) and the
``manifest.json`` built from it (:func:`build_manifest`, a :class:`latentpatch.rundir.Manifest`),
with the environment (package versions, git commit) and the command line.

Imports no torch at module level (the types of the shared state are only annotations).
"""

from __future__ import annotations

import dataclasses
import platform
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.progress import RunProgress
from latentpatch.rundir import Manifest, RunPaths

if TYPE_CHECKING:
    from latentpatch.data.pairs import Pair
    from latentpatch.model.latent import LatentModel
    from latentpatch.patching.baselines import PairBaseline
    from latentpatch.patching.specs import PatchSpec
    from latentpatch.patching.values import ValuePool
    from latentpatch.pipeline.cache import ActivationCache
    from latentpatch.pipeline.threads import ThreadChoice


@dataclass
class RunContext:
    """What the steps of one run share; :func:`build_manifest` turns it into ``manifest.json``."""

    config: RunConfig
    model: LatentModel
    command: str
    environment: dict[str, Any]  # {"versions": {...}, "git_commit": str | None}, read once
    batch_size: int
    cache: ActivationCache | None
    progress: RunProgress
    pairs: list[Pair]  # the pairs this process patches (after --only-correct: the kept ones)
    indices: list[int]  # their global indices, which name their result files
    removed: list[tuple[str, str]]  # (pair_id, reason) dropped by the filter
    specs: list[PatchSpec]
    timings: dict[str, float]
    previous_timings: dict[str, float] | None = None
    threads: ThreadChoice | None = None  # the CPU thread count chosen (pipeline/threads.py)
    workers: ThreadChoice | None = None  # processes for the per-pair loops (pipeline/workers.py)
    shared_rows: int | None = None  # rows per forward when pairs share the engine's batches (threads.py)
    bases: list[PairBaseline] = field(default_factory=list)
    value_pool: ValuePool | None = None  # the run's one value pool (pipeline/values.py run_value_pool), built once
    replacement_pool: str | None = None  # "all shards" when a shard's mean/resample values use every shard
    checks: dict[str, dict] | None = None
    tuned_lens: dict[str, Any] | None = None  # --lens tuned|both: the lens's training report (pipeline/reading.py)
    answers_cut: dict[str, Any] | None = None  # pipeline/limits.py cut_answers, set when the run finishes
    complete: bool = False
    finished: str | None = None  # set with ``complete``: the time the manifest and report state
    interrupted: bool = False  # stopped by Ctrl-C: the manifest says "interrupted"
    probe_fit: str | None = None  # "merge" when a shard recorded its probe activations and merge fits the probes
    #: a family with a stop rule (pipeline/latent_counts.py): each pair's latent count (this process's
    #: numbering; the target run's own with --latent-count target) and the manifest's summary of them
    latent_counts: list[int] | None = None
    latent_stops: dict[str, Any] | None = None

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.config.out)


def build_manifest(ctx: RunContext) -> Manifest:
    """The run's manifest as far as the run got (the one place a run's manifest is built).

    A step that has not run leaves its fields None, so :meth:`Manifest.to_dict` leaves its keys out.
    """
    config, model = ctx.config, ctx.model
    manifest = Manifest(
        status="interrupted" if ctx.interrupted else "complete" if ctx.complete else "running",
        config=config.to_dict(),
        config_hash=config.result_hash(),
        command=ctx.command,
        versions=ctx.environment["versions"],
        git_commit=ctx.environment["git_commit"],
        seed=config.seed,
        device=str(model.device),
        dtype=str(model.dtype).replace("torch.", ""),
        batch_size=ctx.batch_size,
        threads=ctx.threads.to_dict() if ctx.threads else None,
        workers=ctx.workers.to_dict() if ctx.workers else None,
        model={
            "name": model.name or config.model,
            "family": model.family,
            "n_layers": model.n_layers,
            "num_latent": model.num_latent,
            "d_model": model.d_model,
            "config": model.config.to_dict(),
        },
        pairs_removed=[{"pair_id": p, "reason": r} for p, r in ctx.removed],
        previous_timings=ctx.previous_timings or None,  # an empty record is left out too
        replacement_pool=ctx.replacement_pool,
        probe_fit=ctx.probe_fit,
        checks=ctx.checks,
        tuned_lens=ctx.tuned_lens,
        latent_stops=ctx.latent_stops,
    )
    if ctx.bases:
        manifest.n_pairs = len(ctx.bases)
        manifest.baselines = baseline_summary(ctx.bases, config.direction, config.component)
    if ctx.complete:
        sweep_s = ctx.timings.get("sweep_s")
        manifest.timings = ctx.timings
        manifest.finished = ctx.finished
        manifest.cells_per_second = len(ctx.bases) * len(ctx.specs) / max(sweep_s, 1e-9) if sweep_s else None
        manifest.activation_cache = {"hits": ctx.cache.hits, "misses": ctx.cache.misses} if ctx.cache else None
        manifest.answers_cut = ctx.answers_cut
    return manifest


def write_manifest(ctx: RunContext) -> None:
    build_manifest(ctx).write(ctx.out)


def baseline_summary(bases: Sequence[PairBaseline], direction: str, component: str | None = None) -> dict[str, Any]:
    """Accuracy of the unpatched runs and per-pair predictions (the manifest's ``baselines``);
    with ``component``, each pair's ``cos_clean_corrupted`` (the unpatched reference of the
    chained/frozen cosine plots)."""
    n = len(bases)
    denoise = direction == "denoise"
    return {
        "n_pairs": n,
        "clean_accuracy": sum(b.clean_correct for b in bases) / n,
        "corrupted_accuracy": sum(b.corrupted_correct for b in bases) / n,
        "both_correct": sum(b.clean_correct and b.corrupted_correct for b in bases) / n,
        "flagged_pairs": [b.pair_id for b in bases if not (b.clean_correct and b.corrupted_correct)],
        "per_pair": {
            b.pair_id: {
                "clean_pred": b.clean.pred,
                "corrupted_pred": b.corrupted.pred,
                "clean_answer": b.clean_answer,
                "corrupted_answer": b.corrupted_answer,
                "ld_clean_run": b.ld_source if denoise else b.ld_target,
                "ld_corrupted_run": b.ld_target if denoise else b.ld_source,
                **({"cos_clean_corrupted": cos_clean_corrupted(b, component)} if component else {}),
            }
            for b in bases
        },
    }


def cos_clean_corrupted(base: PairBaseline, component: str) -> list[list[float]] | None:
    """cos(clean, corrupted) of the unpatched runs' ``component`` activations, [layer][position]
    (rounded to 6 decimals); None if the runs did not record that component."""
    import torch

    clean, corrupted = base.clean.acts.get(component), base.corrupted.acts.get(component)
    if clean is None or corrupted is None:
        return None
    cos = torch.nn.functional.cosine_similarity(clean.float(), corrupted.float(), dim=-1)  # [n_layers, K]
    return [[round(float(v), 6) for v in row] for row in cos]


def environment() -> dict[str, Any]:
    """Package versions, platform and the git commit of this checkout (None outside git)."""
    import numpy
    import torch
    import transformers

    from latentpatch import __version__

    versions = {
        "latentpatch": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    return {"versions": versions, "git_commit": git_commit()}


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout holding this file; None outside git (an installed package)."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:  # no git, a timeout, ...: the commit is just unknown
        return None


def command_line(config: RunConfig) -> str:
    """The ``latentpatch run`` command that reproduces ``config`` (the manifest's ``command``):
    every option that differs from its default, and ``--out``, shell-quoted. The same for a run
    started from the command line (with or without a ``--config`` file) and from the Python API.

    >>> command_line(RunConfig(limit=5, only_correct=True, experiments=("layer",), out="runs/a b"))
    "latentpatch run --experiments layer --out 'runs/a b' --limit 5 --only-correct"
    """
    words = ["latentpatch", "run"]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if (value == f.default and f.name != "out") or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            on, _, off = (f.metadata.get("flags") or f"{flag}/--no-{flag[2:]}").partition("/")
            words.append(on if value else off)
            continue
        text = ",".join(value) if isinstance(value, (tuple, list)) else str(value)
        words += [flag, shlex.quote(text)]
    return " ".join(words)
