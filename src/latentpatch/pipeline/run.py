"""A run: model + pairs + experiments -> a run directory (the ``latentpatch run`` command).

Order of work (each step's output is on disk before the next starts)::

    pairs (filtered, limited, sharded) -> baselines (clean + corrupted, activation cache)
    -> built-in checks (design.md §5) -> sweep, one pair at a time, committed atomically
    -> results/*.json, cells.parquet, trajectories.parquet, thoughts.json -> report

Resuming: every finished pair is a file under ``results/pairs/``; ``resume=True`` skips them and
ends with the same bytes as an uninterrupted run. A run directory remembers the hash of the
options that change numbers; a different config is refused instead of being mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from latentpatch.rundir import FORMAT, assemble, write_json
from latentpatch.pipeline.cache import ActivationCache, default_cache_dir, model_key
from latentpatch.patching.checks import check_engine_reference, check_full_restoration, check_identity, check_live_thoughts
from latentpatch.patching.engine import (
    DIRECTIONS, REPLACEMENTS, EngineConfig, PairBaseline, PatchSpec, RunRecord, mean_activations, prepare_pair,
    record_run, replacement_values, resample_partner, sweep_fast, sweep_reference,
)
from latentpatch.errors import LatentPatchError
from latentpatch.patching.specs import EXPERIMENTS, experiment_specs
from latentpatch.model.latent import LatentModel
from latentpatch.data.pairs import Pair, filter_pairs, load_pairs, save_pairs
from latentpatch.model.sites import COMPONENTS

#: Replacements whose values depend on every pair of the run (dataset mean, resample partner):
#: a shard computes them over all shards' pairs (see :func:`_global_pool`).
GLOBAL_REPLACEMENTS = ("mean", "resample")

@dataclass
class RunConfig:
    """Every option of ``latentpatch run`` (a ``--config`` file takes the same keys)."""

    model: str = "default"
    base: str | None = None
    preset: str | None = None
    pairs: str = "default"
    experiments: tuple[str, ...] = EXPERIMENTS
    component: str = "resid_out"
    direction: str = "denoise"
    replacement: str = "source"
    out: str = "runs/latest"
    limit: int | None = None
    shard: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int | str = 64
    threads: int | None = None
    seed: int = 0
    only_correct: bool = False
    keep_same_answer: bool = False
    engine: str = "fast"
    strict: bool = False
    check_cells: int = 8
    cache_dir: str | None = None
    use_cache: bool = True
    report: bool = True
    wandb: bool = False
    wandb_project: str | None = None
    thoughts_pairs: int = 5

    # Options that do not change any number in results/ (safe to differ on --resume).
    NOT_RESULT_KEYS = ("out", "strict", "report", "wandb", "wandb_project", "cache_dir", "use_cache")

    def validate(self) -> None:
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad or not self.experiments:
            raise LatentPatchError(f"--experiments: unknown {','.join(bad) or '(empty)'}; use a comma list of {','.join(EXPERIMENTS)}")
        if self.component not in COMPONENTS:
            raise LatentPatchError(f"--component {self.component!r}: use one of {', '.join(COMPONENTS)}")
        if self.direction not in DIRECTIONS:
            raise LatentPatchError(f"--direction {self.direction!r}: use one of {', '.join(DIRECTIONS)}")
        if self.replacement not in REPLACEMENTS:
            raise LatentPatchError(f"--replacement {self.replacement!r}: use one of {', '.join(REPLACEMENTS)}")
        if self.engine not in ("fast", "reference"):
            raise LatentPatchError(f"--engine {self.engine!r}: use fast or reference")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise LatentPatchError(f"--dtype {self.dtype!r}: use float32 or bfloat16")
        if self.threads is not None and self.threads < 1:
            raise LatentPatchError("--threads must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise LatentPatchError("--limit must be >= 1")
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1)):
            raise LatentPatchError(f"--batch-size {self.batch_size!r}: use a positive integer or auto")
        if self.shard is not None:
            parse_shard(self.shard)

    def result_hash(self) -> str:
        d = {k: v for k, v in self.to_dict().items() if k not in self.NOT_RESULT_KEYS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["experiments"] = list(d["experiments"])
        return d

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "RunConfig":
        """Read a JSON or TOML config file; ``overrides`` (explicit CLI flags) win."""
        path = Path(path)
        if not path.exists():
            raise LatentPatchError(f"config file {path} does not exist; fix: pass an existing JSON or TOML file")
        try:
            text = path.read_text()
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except Exception as err:
            raise LatentPatchError(f"config file {path} cannot be parsed ({err}); fix: write valid JSON or TOML")
        if not isinstance(data, dict):
            raise LatentPatchError(f"config file {path}: expected a mapping of option names to values")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LatentPatchError(f"config file {path}: unknown key(s) {', '.join(unknown)}; fix: use the names of `latentpatch run --help`")
        data.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(data.get("experiments"), str):
            data["experiments"] = tuple(x.strip() for x in data["experiments"].split(",") if x.strip())
        elif "experiments" in data:
            data["experiments"] = tuple(data["experiments"])
        return cls(**data)


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(x) for x in shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise LatentPatchError(f"--shard {shard!r}: use i/N with 0 <= i < N, e.g. 0/4")
    return i, n


def shard_pairs(pairs: Sequence[Pair], shard: str | None) -> list[tuple[int, Pair]]:
    """Deterministic split: pair k (in file order, after filtering) goes to shard k mod N.

    Returns ``(k, pair)``: k is the pair's global index, which names its result file, so shard
    run directories merge back into exactly the unsharded run.
    """
    indexed = list(enumerate(pairs))
    if shard is None:
        return indexed
    i, n = parse_shard(shard)
    return [(k, p) for k, p in indexed if k % n == i]


def default_pairs_path() -> Path:
    return Path(str(resources.files("latentpatch") / "default_data" / "pairs.json"))


def _versions() -> dict:
    import numpy
    import transformers

    from latentpatch import __version__

    return {"latentpatch": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "platform": platform.platform()}


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


# ---- the run ---------------------------------------------------------------------------------


def _load_model(config: RunConfig) -> LatentModel:
    from latentpatch.model.load import load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise LatentPatchError("--device cuda: no CUDA device is available here; fix: use --device cpu")
    kwargs = {"dtype": dtype, "device": config.device}
    if config.base:
        kwargs["base"] = config.base
    if config.preset:
        kwargs["preset"] = config.preset
    return load_model(config.model, **kwargs)


def select_pairs(pairs: Sequence[Pair], config: RunConfig) -> tuple[list[tuple[int, Pair]], list[tuple[str, str]]]:
    """Filter (same-answer pairs out unless kept), limit to the first N, then shard.

    Returns ``(global_index, pair)`` for this process, and the removed pairs with reasons.
    """
    removed: list[tuple[str, str]] = []
    if not config.keep_same_answer:
        pairs, removed = filter_pairs(pairs)
    pairs = list(pairs)
    if config.limit is not None:
        pairs = pairs[: config.limit]
    return shard_pairs(pairs, config.shard), removed


def _load_run_pairs(config: RunConfig) -> list[Pair]:
    path = default_pairs_path() if config.pairs == "default" else Path(config.pairs)
    return load_pairs(path)


def _as_number(x) -> float:
    return float(x)


def _record(model, cache, question: str) -> RunRecord:
    """The unpatched run of one question, from the activation cache when it holds it."""
    prompt = model.prompt_ids(question)
    rec = cache.get(prompt) if cache is not None else None
    if rec is None:
        rec = record_run(model, prompt)
        if cache is not None:
            cache.put(rec)
    return rec


def _prepare_baselines(model, pairs, config, cache, progress) -> list[PairBaseline]:
    bases = []
    for pair in pairs:
        clean, corrupted = _record(model, cache, pair.clean.question), _record(model, cache, pair.corrupted.question)
        bases.append(prepare_pair(model, pair.pair_id, clean, corrupted, _as_number(pair.clean.answer),
                                  _as_number(pair.corrupted.answer), config.direction))
        progress("baselines")
    return bases


def _value_factory(bases: Sequence[PairBaseline], config: RunConfig,
                   pool: Sequence[PairBaseline] | None = None,
                   pool_position: Sequence[int] | None = None) -> Callable[[int], Callable]:
    """``i -> ValueFn`` for this process's pair ``i``.

    ``mean`` and ``resample`` values depend on every pair of the run. ``pool`` is that whole set
    (all shards' used pairs, in global order; default: ``bases``) and ``pool_position[i]`` is pair
    ``i``'s place in it, so a shard computes exactly the values the unsharded run would.
    """
    if pool is None:
        pool, pool_position = bases, range(len(bases))
    engine_cfg = EngineConfig(config.direction, config.replacement, 1, config.seed)
    means = mean_activations(pool) if config.replacement == "mean" else None
    partner = resample_partner(len(pool), config.seed)

    def values_for(i: int):
        source = pool[partner[pool_position[i]]] if config.replacement == "resample" else None
        return replacement_values(bases[i], engine_cfg, means, source)

    return values_for


def _global_pool(model, all_selected: Sequence[tuple[int, Pair]], indices: Sequence[int], config: RunConfig,
                 cache) -> tuple[list[PairBaseline], list[int]]:
    """Every shard's used pairs (recorded runs only; no baseline metrics), and this shard's places
    in that list. Needed only by sharded ``mean``/``resample`` runs; the activation cache makes
    the extra rollouts free when shards share a cache directory."""
    pool, pool_index = [], {}
    for k, pair in all_selected:
        clean, corrupted = (_record(model, cache, v.question) for v in (pair.clean, pair.corrupted))
        b = PairBaseline(pair.pair_id, _as_number(pair.clean.answer), _as_number(pair.corrupted.answer),
                         clean, corrupted, config.direction)
        if config.only_correct and not (b.clean_correct and b.corrupted_correct):
            continue
        pool_index[k] = len(pool)
        pool.append(b)
    return pool, [pool_index[k] for k in indices]


def _cell_row(spec: PatchSpec, metrics: dict, base: PairBaseline) -> dict:
    row = {"experiment": spec.experiment, "mode": spec.mode, "component": spec.component, "layer": spec.layer,
           "position": spec.index, "key": spec.key}
    row.update(metrics)
    row.update({"clean_correct": base.clean_correct, "corrupted_correct": base.corrupted_correct,
                "flagged": not (base.clean_correct and base.corrupted_correct)})
    return row


def _set_threads(config: RunConfig, model: LatentModel) -> None:
    """CPU threads: ``--threads`` if given; else one thread for small models, whose many tiny
    matrix products only lose time to thread start-up and (on a busy machine) oversubscription."""
    if model.device.type != "cpu":
        return
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    elif model.d_model * model.n_layers <= 4096:
        torch.set_num_threads(1)


def _pick_batch_size(config: RunConfig, model: LatentModel) -> int:
    if config.batch_size == "auto":
        try:
            from latentpatch.pipeline.memory import auto_batch_size  # written with the benchmarks

            return auto_batch_size(model)
        except ImportError:
            return 64
    return int(config.batch_size)


def run_experiments(
    config: RunConfig,
    *,
    model: LatentModel | None = None,
    pairs: Sequence[Pair] | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    stop_after_pairs: int | None = None,
) -> Path:
    """Run the configured experiments and write the run directory; returns its path.

    ``model``/``pairs`` may be passed in (notebooks, tests) instead of being loaded from
    ``config.model``/``config.pairs``. ``stop_after_pairs`` stops after committing that many new
    pairs (to test resuming).
    """
    config.validate()
    out = Path(config.out)
    manifest_path = out / "manifest.json"
    previous = None
    if manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except Exception:
            raise LatentPatchError(f"{manifest_path} is not valid JSON; fix: delete the run directory or choose a new --out")
        if previous.get("config_hash") != config.result_hash():
            old = previous.get("config", {})
            diff = [k for k, v in config.to_dict().items() if k not in RunConfig.NOT_RESULT_KEYS and old.get(k) != v]
            raise LatentPatchError(
                f"run directory {out} was made with a different config (differs in: {', '.join(diff) or 'config hash'}); "
                f"fix: choose a new --out, or rerun with the same options")
        if not resume:
            raise LatentPatchError(f"run directory {out} already holds a run; fix: pass --resume to continue it, or choose a new --out")

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(config.seed)
    if model is None:
        model = _load_model(config)
    timings["load_model_s"] = time.perf_counter() - t0
    all_pairs = _load_run_pairs(config) if pairs is None else list(pairs)
    selected, removed = select_pairs(all_pairs, config)
    if not selected:
        raise LatentPatchError(f"pair file {config.pairs}: no pairs left after filtering/sharding; "
                               "fix: check --pairs, --shard, --limit")
    indices = [k for k, _ in selected]
    pairs = [p for _, p in selected]
    batch_size = _pick_batch_size(config, model)
    _set_threads(config, model)
    cache = ActivationCache(config.cache_dir or default_cache_dir(), model_key(model)) if config.use_cache else None

    manifest: dict[str, Any] = {
        "format": FORMAT, "status": "running", "config": config.to_dict(), "config_hash": config.result_hash(),
        "command": command or "latentpatch run " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "versions": _versions(), "git_commit": _git_commit(), "seed": config.seed, "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""), "batch_size": batch_size,
        "model": {"name": model.name or config.model, "family": model.family, "n_layers": model.n_layers,
                  "num_latent": model.num_latent, "d_model": model.d_model, "config": model.config.to_dict()},
        "pairs_removed": [{"pair_id": p, "reason": r} for p, r in removed],
    }
    if previous and previous.get("timings"):
        manifest["previous_timings"] = previous["timings"]

    # ---- baselines ---------------------------------------------------------------------------
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    specs: list[PatchSpec] = []
    for name in config.experiments:
        specs += experiment_specs(name, model.n_layers, model.num_latent, config.component)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), disable=not progress, transient=False)
    with bar:
        task = bar.add_task("baselines", total=len(pairs))
        t = time.perf_counter()
        bases = _prepare_baselines(model, pairs, config, cache, lambda _: bar.advance(task))
        timings["baselines_s"] = time.perf_counter() - t
        bar.update(task, visible=False) if progress else None

        used_pairs = pairs
        if config.only_correct:
            keep = [i for i, b in enumerate(bases) if b.clean_correct and b.corrupted_correct]
            used_pairs, bases, indices = [pairs[i] for i in keep], [bases[i] for i in keep], [indices[i] for i in keep]
            if not bases:
                raise LatentPatchError("--only-correct: the model gets no pair fully right; fix: drop --only-correct")
        n = len(bases)
        manifest["n_pairs"] = n
        manifest["baselines"] = {
            "n_pairs": n,
            "clean_accuracy": sum(b.clean_correct for b in bases) / n,
            "corrupted_accuracy": sum(b.corrupted_correct for b in bases) / n,
            "both_correct": sum(b.clean_correct and b.corrupted_correct for b in bases) / n,
            "flagged_pairs": [b.pair_id for b in bases if not (b.clean_correct and b.corrupted_correct)],
            "per_pair": {b.pair_id: {"clean_pred": b.clean.pred, "corrupted_pred": b.corrupted.pred,
                                     "clean_answer": b.clean_answer, "corrupted_answer": b.corrupted_answer,
                                     "ld_clean_run": b.ld_source if config.direction == "denoise" else b.ld_target,
                                     "ld_corrupted_run": b.ld_target if config.direction == "denoise" else b.ld_source}
                         for b in bases},
        }
        out.mkdir(parents=True, exist_ok=True)
        save_pairs(used_pairs, out / "pairs.json")
        write_json(manifest_path, manifest)

        # ---- checks (design.md §5) -------------------------------------------------------------
        t = time.perf_counter()
        if config.replacement in GLOBAL_REPLACEMENTS and config.shard is not None:
            unsharded, _ = select_pairs(all_pairs, dataclasses.replace(config, shard=None))
            values_for = _value_factory(bases, config, *_global_pool(model, unsharded, indices, config, cache))
            manifest["replacement_pool"] = "all shards"
        else:
            values_for = _value_factory(bases, config)
        checks = {
            "identity": check_identity(model, bases, specs, n_pairs=1),
            "full_restoration": check_full_restoration(model, bases[: min(n, 8)]),
            "live_thoughts": check_live_thoughts(model, bases),
            "engine_reference": check_engine_reference(model, bases, specs, values_for, batch_size, config.check_cells, config.seed),
        }
        timings["checks_s"] = time.perf_counter() - t
        manifest["checks"] = checks
        write_json(manifest_path, manifest)
        failed = [k for k, c in checks.items() if not c["passed"]]
        if failed:
            msg = "; ".join(f"{k} (value {checks[k]['value']:.3g}, threshold {checks[k]['threshold']:.3g}): {checks[k]['detail']}" for k in failed)
            print(f"CHECK FAILED: {msg}", file=sys.stderr)
            if config.strict:
                raise LatentPatchError(f"built-in check failed ({', '.join(failed)}); see {manifest_path}; --strict makes this fatal")

        # ---- the sweep, one committed file per pair ---------------------------------------------
        pair_dir = out / "results" / "pairs"
        pair_dir.mkdir(parents=True, exist_ok=True)
        task = bar.add_task("patching", total=n * len(specs))
        t = time.perf_counter()
        new = 0
        for i, (k, base) in enumerate(zip(indices, bases)):
            path = pair_dir / f"{k:05d}.json"
            if path.exists():
                bar.advance(task, len(specs))
                continue
            if stop_after_pairs is not None and new >= stop_after_pairs:
                return out
            values = values_for(i)
            if config.engine == "fast":
                cells = sweep_fast(model, base, specs, values, batch_size)
            else:
                cells = sweep_reference(model, base, specs, values)
            rows = [_cell_row(s, c, base) for s, c in zip(specs, cells)]
            entry = {"pair_id": base.pair_id, "index": k, "cells": rows}
            if k < config.thoughts_pairs and model.tokenizer is not None:
                entry["thoughts"] = _decoded_thoughts(model, used_pairs[i])
            write_json(path, entry)
            new += 1
            bar.advance(task, len(specs))
        timings["sweep_s"] = time.perf_counter() - t

    # ---- assemble --------------------------------------------------------------------------------
    t = time.perf_counter()
    assemble(out)
    timings["assemble_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    manifest["timings"] = timings
    manifest["cells_per_second"] = n * len(specs) / max(timings.get("sweep_s", 0.0), 1e-9) if timings.get("sweep_s") else None
    manifest["activation_cache"] = {"hits": cache.hits, "misses": cache.misses} if cache else None
    manifest["status"] = "complete"
    write_json(manifest_path, manifest)
    if config.report:
        _build_report(out, config)
    return out


@torch.no_grad()
def _decoded_thoughts(model: LatentModel, pair: Pair, k: int = 5) -> dict:
    """Top-k tokens of each thought of the clean and the corrupted run (the CODI probe)."""
    entry = {}
    for variant in ("clean", "corrupted"):
        r = model.rollout([model.prompt_ids(pair.variant(variant).question)])
        entry[variant] = [[tok for tok, _ in top] for top in model.decode_thoughts(r, k)[0]]
    return entry


def _build_report(out: Path, config: RunConfig) -> None:
    try:
        from latentpatch.analysis.report import build_report
    except ImportError:
        return
    build_report(out)
    if config.wandb:
        from latentpatch.analysis.wandb_log import log_run

        log_run(out, project=config.wandb_project)
