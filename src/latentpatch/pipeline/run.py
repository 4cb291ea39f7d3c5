"""A run: model + pairs + experiments -> a run directory (the ``latentpatch run`` command).

The steps of :func:`run_experiments` (each step's output is on disk before the next starts)::

    open_run (validate, resume guard) -> load the model -> start_run (pairs filtered, limited, sharded;
    batch size, threads, worker processes, activation cache) -> record_baselines (clean + corrupted
    runs) -> checks_and_sweep: run_checks (the built-in checks, docs/method.md §8), then sweep (each pair
    alone, committed atomically) -> finish_run (results/*.json, cells.parquet, trajectories.parquet, thoughts.json,
    manifest, report)

Baselines, checks and the sweeps run on this process and ``workers - 1`` forked children when the
run has more than one (:mod:`latentpatch.pipeline.workers`); the bytes are the same either way.
With workers the checks share the sweep's pool (no barrier between them), unless ``strict``.

The state the steps share and the manifest built from it are in :mod:`latentpatch.pipeline.manifest`;
the checks and the sweep in :mod:`latentpatch.pipeline.sweep`; what the model can take (its
tokenizer, its positions) in :mod:`latentpatch.pipeline.limits`.

Resuming: every finished pair is a file under ``results/pairs/``; ``resume=True`` skips them and
ends with the same bytes as an uninterrupted run. A run directory remembers the hash of the
options that change numbers; a different config is refused instead of being mixed in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentpatch.analysis.report_process import ReportProcess
from latentpatch.assembly import assemble
from latentpatch.data.pairs import Pair, save_pairs
from latentpatch.errors import LatentPatchError, RunInterrupted
from latentpatch.model.latent import LatentModel
from latentpatch.model.streams import pair_stream
from latentpatch.patching.baselines import PairBaseline, prepare_pair
from latentpatch.patching.experiments import SpecShape, experiment_specs, stage_experiments
from latentpatch.patching.specs import PatchSpec
from latentpatch.pipeline.atp import sweep_atp
from latentpatch.pipeline.cache import ActivationCache, default_cache_dir, model_key, recorded_run
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.das import sweep_das
from latentpatch.pipeline.edges import sweep_edges
from latentpatch.pipeline.latent_counts import at_count, check_latent_stops, pair_count, record_latent_counts
from latentpatch.pipeline.limits import check_pccot_run, check_question_lengths, check_tokenizer, cut_answers
from latentpatch.pipeline.manifest import RunContext, command_line, environment, write_manifest
from latentpatch.pipeline.memory import auto_batch_size
from latentpatch.pipeline.probing import check_question_file, sweep_probes
from latentpatch.pipeline.progress import BarProgress, RunProgress
from latentpatch.pipeline.reading import prepare_heads, sweep_reading
from latentpatch.pipeline.selection import load_run_pairs, pairs_to_run
from latentpatch.pipeline.stages import executor_scope
from latentpatch.pipeline.steering import sweep_steer
from latentpatch.pipeline.steps import sweep_steps
from latentpatch.pipeline.sweep import checks_and_sweep, replacement_source
from latentpatch.pipeline.threads import ThreadChoice, choose_threads, choose_workers, shared_rows
from latentpatch.pipeline.workers import run_items
from latentpatch.rundir import RunPaths, read_manifest
from latentpatch.runlock import check_writable_dir, run_lock

# ---- the steps -----------------------------------------------------------------------------------


def open_run(config: RunConfig, resume: bool) -> dict[str, Any] | None:
    """Guard ``config.out`` (validated and locked by the caller): returns the manifest of the run
    being resumed (None for a new run). A run directory made with other options, or resumed
    without ``resume``, is refused."""
    out = Path(config.out)
    if not RunPaths(out).manifest.exists():
        return None
    previous = read_manifest(out)  # as written: an interrupted run's manifest lacks the later steps' keys
    if previous.get("config_hash") != config.result_hash():
        version = str(previous.get("config_hash", "")).partition("-")
        if not version[1] or version[0] != str(RunConfig.CONFIG_HASH_VERSION):
            raise LatentPatchError(
                f"run directory {out} was made by another version of latentpatch (config hash "
                f"{previous.get('config_hash')!r}, this version writes version {RunConfig.CONFIG_HASH_VERSION}); "
                "fix: choose a new --out, or finish it with the version that started it"
            )
        old = previous.get("config", {})
        keys = set(RunConfig.result_keys())
        diff = [k for k, v in config.to_dict().items() if k in keys and old.get(k) != v]
        raise LatentPatchError(
            f"run directory {out} was made with a different config (differs in: {', '.join(diff) or 'config hash'}); "
            f"fix: choose a new --out, or rerun with the same options"
        )
    if not resume:
        raise LatentPatchError(
            f"run directory {out} already holds a run; fix: pass --resume to continue it, or choose a new --out"
        )
    return previous


def start_run(
    config: RunConfig,
    model: LatentModel,
    all_pairs: Sequence[Pair],
    *,
    previous: dict | None,
    progress: RunProgress,
    command: str | None,
    timings: dict[str, float],
) -> RunContext:
    """This process's pairs, batch size, CPU threads, activation cache and patch specs."""
    selected, removed = pairs_to_run(all_pairs, config)
    if removed:
        shown = ", ".join(p for p, _ in removed[:10]) + (f" (+{len(removed) - 10} more)" if len(removed) > 10 else "")
        progress.warn(f"dropped {len(removed)} pair(s) whose clean and corrupted answers are equal: {shown}")
    if not selected and removed and len(removed) == len(all_pairs):
        raise LatentPatchError(
            f"pair file {config.pairs}: all {len(all_pairs)} pairs have the same clean and corrupted answer, "
            "so patching has nothing to restore; fix: use pairs whose answers differ (or --keep-same-answer)"
        )
    if not selected:
        raise LatentPatchError(
            f"pair file {config.pairs}: no pairs left after filtering/sharding; fix: check --pairs, --shard, --limit"
        )
    check_tokenizer(model, config)
    check_question_lengths(model, [p for _, p in selected])
    batch_size = auto_batch_size(model) if config.batch_size == "auto" else int(config.batch_size)
    threads = set_threads(config, model)
    workers = choose_workers(
        model.d_model, model.n_layers, len(selected), config.workers, on_cpu=model.device.type == "cpu"
    )
    if config.executor == "ray":  # --workers counts Ray replicas; the driver forks none (pipeline/ray_executor.py)
        workers = ThreadChoice(1, "--executor ray: the pairs run on Ray replicas")
    cache = ActivationCache(config.cache_dir or default_cache_dir(), model_key(model)) if config.use_cache else None
    specs: list[PatchSpec] = []
    shape = SpecShape(model.n_layers, model.num_latent, config.component, frozen=model.frozen_path)
    for name in stage_experiments(config.experiments, "sweep"):  # the others: their own stages (§13-§15)
        specs += experiment_specs(name, shape)
    return RunContext(
        config=config,
        model=model,
        environment=environment(),
        batch_size=batch_size,
        threads=threads,
        workers=workers,
        shared_rows=shared_rows(model.d_model, model.n_layers, on_cpu=model.device.type == "cpu"),
        cache=cache,
        command=command or command_line(config),
        progress=progress,
        pairs=[p for _, p in selected],
        indices=[k for k, _ in selected],
        removed=removed,
        specs=specs,
        timings=timings,
        previous_timings=(previous or {}).get("timings"),
    )


def set_threads(config: RunConfig, model: LatentModel) -> ThreadChoice:
    """CPU threads: ``--threads`` if given, else from the model's size and the free cores
    (:func:`~latentpatch.pipeline.threads.choose_threads`). Off the CPU, torch's count is left as it is."""
    if model.device.type != "cpu":
        return ThreadChoice(torch.get_num_threads(), f"left as torch's (device {model.device.type})")
    choice = choose_threads(model.d_model, model.n_layers, config.threads)
    torch.set_num_threads(choice.count)
    return choice


def record_baselines(ctx: RunContext) -> None:
    """The unpatched clean and corrupted run of every pair (``ctx.bases``); with ``only_correct``
    only the pairs the model gets fully right stay. Writes ``pairs.json`` and the manifest."""
    config, model = ctx.config, ctx.model
    ctx.progress.stage("baselines", len(ctx.pairs))
    t = time.perf_counter()
    cache = ctx.cache
    counts = (cache.hits, cache.misses) if cache else (0, 0)
    record_latent_counts(ctx)  # a family with a stop rule: each pair's own latent count (§22)

    def baseline(i: int) -> tuple[PairBaseline, int, int]:
        pair, before = ctx.pairs[i], (cache.hits, cache.misses) if cache else (0, 0)
        k = pair_count(ctx, i)
        stream = pair_stream(pair.pair_id)  # the pair's own draws (docs/method.md §21)
        with at_count(ctx, k):  # the cache holds runs of the model's own count only
            runs = [
                recorded_run(model, cache if k == model.latent_cap else None, v.question, True, v.answer, stream)
                for v in (pair.clean, pair.corrupted)
            ]
            answers = float(pair.clean.answer), float(pair.corrupted.answer)
            base = prepare_pair(model, pair.pair_id, runs[0], runs[1], *answers, config.direction)
        after = (cache.hits, cache.misses) if cache else (0, 0)
        return base, after[0] - before[0], after[1] - before[1]  # a worker's cache counts come back

    done = run_items(
        list(range(len(ctx.pairs))),
        baseline,
        ctx.workers.count if ctx.workers else 1,
        lambda i: ctx.progress.advance(),
        threads=torch.get_num_threads(),
    )
    bases = [done[i][0] for i in range(len(ctx.pairs))]
    if cache:
        cache.hits = counts[0] + sum(d[1] for d in done.values())
        cache.misses = counts[1] + sum(d[2] for d in done.values())
    ctx.timings["baselines_s"] = time.perf_counter() - t
    if config.only_correct:
        keep = [i for i, b in enumerate(bases) if b.clean_correct and b.corrupted_correct]
        if not keep:
            raise LatentPatchError("--only-correct: the model gets no pair fully right; fix: drop --only-correct")
        ctx.pairs, ctx.indices = [ctx.pairs[i] for i in keep], [ctx.indices[i] for i in keep]
        bases = [bases[i] for i in keep]
        if ctx.latent_counts is not None:
            ctx.latent_counts = [ctx.latent_counts[i] for i in keep]
    ctx.bases = bases
    ctx.out.mkdir(parents=True, exist_ok=True)
    save_pairs(ctx.pairs, ctx.paths.pairs)
    write_manifest(ctx)


def finish_run(ctx: RunContext, t0: float, report_process: ReportProcess | None = None) -> None:
    """Assemble ``results/``, mark the manifest complete, build the report (both in ``report_process``
    when one was started, else here) and log to W&B."""
    t = time.perf_counter()
    if report_process is None or not report_process.assemble(ctx.out):
        assemble(ctx.out)
    ctx.timings["assemble_s"] = time.perf_counter() - t
    ctx.answers_cut = cut_answers(ctx.model, ctx.bases, ctx.indices, ctx.out)
    if ctx.answers_cut["baselines"] or ctx.answers_cut["patched"]:
        ctx.progress.warn(
            f"{ctx.answers_cut['baselines']} unpatched and {ctx.answers_cut['patched']} patched answer(s) were cut "
            f"at the model's last position ({ctx.answers_cut['max_positions']}); manifest.json: answers_cut"
        )
    ctx.timings["total_s"] = time.perf_counter() - t0
    ctx.complete, ctx.finished = True, time.strftime("%Y-%m-%d %H:%M")
    write_manifest(ctx)
    if ctx.config.report:
        ctx.progress.message("report: statistics, figures and report.html ...")
        t = time.perf_counter()
        if report_process is None or not report_process.build(ctx.out):
            from latentpatch.analysis.report import build_report  # matplotlib and pandas: only when reporting

            build_report(ctx.out)
        ctx.progress.message(f"report: done in {time.perf_counter() - t:.1f} s")
        if ctx.config.wandb:
            from latentpatch.analysis.wandb_log import log_run

            log_run(ctx.out, project=ctx.config.wandb_project)


# ---- the run -------------------------------------------------------------------------------------


def run_experiments(
    config: RunConfig,
    *,
    model: LatentModel | None = None,
    pairs: Sequence[Pair] | None = None,
    resume: bool = False,
    progress: bool | RunProgress = True,
    command: str | None = None,
    report_process: ReportProcess | None = None,
) -> Path:
    """Run the configured experiments and write the run directory; returns its path.

    ``model``/``pairs`` may be passed in (notebooks, tests) instead of being loaded from
    ``config.model``/``config.pairs``. ``progress``: True shows a progress bar, False shows none,
    or a :class:`~latentpatch.pipeline.progress.RunProgress` to follow the stages. A failed
    built-in check is reported through ``progress.warn`` (and is fatal with ``config.strict``).
    ``command``: the manifest's reproduce command (default: the equivalent ``latentpatch run``).
    ``report_process``: builds the report (:mod:`latentpatch.analysis.report_process`; the CLI
    starts one before importing torch). The run directory is locked while the run writes it; Ctrl-C raises
    :class:`~latentpatch.errors.RunInterrupted` after marking the manifest ``interrupted``.

    >>> import tempfile
    >>> out = tempfile.mkdtemp() + "/run"
    >>> config = RunConfig(limit=1, experiments=("layer",), out=out, report=False, use_cache=False)
    >>> path = run_experiments(config, progress=False, command="doctest")
    >>> sorted(f.name for f in (path / "results").iterdir())
    ['cells.parquet', 'layer.json', 'pairs', 'thoughts.json', 'trajectories.parquet']
    """
    config.validate()
    existed = Path(config.out).is_dir()
    out = check_writable_dir(config.out)
    reporter = progress if isinstance(progress, RunProgress) else BarProgress() if progress else RunProgress()
    command = command or command_line(config)
    ctx: RunContext | None = None  # the run's context once it exists (for the interrupted manifest)
    try:
        with run_lock(out, note=reporter.warn):
            previous = open_run(config, resume)
            all_pairs = load_run_pairs(config) if pairs is None else list(pairs)  # before the model loads
            check_question_file(config)  # --questions: a bad record stops the run before any work
            t0 = time.perf_counter()
            ctx = prepare_run(config, model, all_pairs, previous, reporter, command)
            execute_run(ctx, all_pairs, t0, report_process)
    except KeyboardInterrupt:
        raise interrupted(ctx, command) from None
    finally:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # refused before writing anything: leave no empty directory behind
    return out


def prepare_run(
    config: RunConfig,
    model: LatentModel | None,
    all_pairs: Sequence[Pair],
    previous: dict[str, Any] | None,
    reporter: RunProgress,
    command: str,
) -> RunContext:
    """The model (loaded unless given) and the run's context (:func:`start_run`), in the locked directory."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(config.seed)
    if model is None:
        model = config.load()
    check_pccot_run(model, config.experiments)  # PCCoT: the experiments defined on its rounds (one line)
    check_latent_stops(model, config)  # a family with a stop rule: what per-pair latent counts run (one line)
    model.feedback.reseed(config.seed)  # a random feedback's draws (mixtures): one stream per --seed
    timings["load_model_s"] = time.perf_counter() - t0
    return start_run(config, model, all_pairs, previous=previous, progress=reporter, command=command, timings=timings)


def execute_run(
    ctx: RunContext, all_pairs: Sequence[Pair], t0: float, report_process: ReportProcess | None = None
) -> None:
    """The steps of :func:`run_experiments` on a prepared context (``t0``: when the run started)."""
    with ctx.progress, executor_scope(ctx):  # --executor ray: its replicas stop with the run
        record_baselines(ctx)
        prepare_heads(ctx)  # only with --component head_out (docs/method.md §14)
        values_for = replacement_source(ctx, all_pairs)
        checks_and_sweep(ctx, values_for)
        sweep_steps(ctx, all_pairs)  # only with step-level experiments (docs/method.md §13)
        sweep_reading(ctx, all_pairs)  # only with lens/attention (docs/method.md §14)
        sweep_atp(ctx, values_for)  # only with atp (docs/method.md §15)
        sweep_probes(ctx, all_pairs)  # only with probe (docs/method.md §16)
        sweep_steer(ctx, all_pairs)  # only with steer (docs/method.md §16)
        sweep_edges(ctx, all_pairs)  # only with edges (docs/method.md §17)
        sweep_das(ctx, all_pairs)  # only with das (docs/method.md §20)
    finish_run(ctx, t0, report_process)


def interrupted(ctx: RunContext | None, command: str) -> RunInterrupted:
    """After Ctrl-C: mark the manifest ``interrupted`` (if the run wrote one) and say how to continue."""
    resume = command if command.endswith(" --resume") else command + " --resume"
    if ctx is None:
        return RunInterrupted(f"interrupted before the first pair; continue with: {resume}")
    done = sum(ctx.paths.pair_result(k).exists() for k in ctx.indices)
    if ctx.paths.manifest.exists():
        ctx.interrupted, ctx.complete = True, False
        write_manifest(ctx)
    return RunInterrupted(f"interrupted after {done} of {len(ctx.indices)} pairs; continue with: {resume}")
