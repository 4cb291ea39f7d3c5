"""Command-line interface: a thin layer over the Python API.

Every command turns a :class:`~latentpatch.errors.LatentPatchError` into one line on stderr and
exit code 2 (see :func:`main`). Commands import their modules lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import typer

from latentpatch.cli_options import with_options
from latentpatch.errors import LatentPatchError
from latentpatch.pipeline.config import ModelOptions, RunConfig  # no torch: --help stays fast
from latentpatch.pipeline.slurm import LaunchConfig  # no torch, no submitit until a launch
from latentpatch.pipeline.threads import CpuSample  # noqa: F401 - its import starts the start-up CPU sample
from latentpatch.training.config import TrainConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Activation patching on continuous chain-of-thought models (CODI, Coconut).",
)
pairs_app = typer.Typer(no_args_is_help=True, help="Generate, validate and filter clean/corrupted pair files.")
app.add_typer(pairs_app, name="pairs")


# ---- section: model (inspect) -------------------------------------------------------------
def _parse_input_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise LatentPatchError(
            f"--input-ids {text!r}: expected comma-separated integers; fix: e.g. --input-ids 5,6,7"
        ) from None
    if not ids:
        raise LatentPatchError("--input-ids is empty; fix: e.g. --input-ids 5,6,7")
    return ids


@app.command("inspect")
@with_options(ModelOptions)
def inspect_cmd(
    options: dict[str, Any],
    question: str | None = typer.Option(None, "--question", help="Question text (needs a tokenizer)."),
    input_ids: str | None = typer.Option(
        None, "--input-ids", help="Question token ids, e.g. 5,6,7 (separators are added)."
    ),
    top_k: int = typer.Option(5, "--top-k", help="Tokens shown per thought."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Answer length limit."),
    lens: str | None = typer.Option(
        None,
        "--lens",
        help="Also a lens per layer and position: logit, or tuned (trained on the shipped pairs' questions, "
        "or loaded from the cache; method.md §14, §14.1).",
    ),
    das: str | None = typer.Option(
        None,
        "--das",
        help="Also the question's coordinates in a saved DAS subspace (results/das/<site>.k<k>.safetensors) "
        "at its site's component and layer, at every thought (method.md §20).",
    ),
) -> None:
    """Show what a model thinks: the top-k tokens of each continuous thought, then its answer."""
    if lens is not None and lens not in ("logit", "tuned"):
        raise LatentPatchError(f"--lens {lens!r}: use logit or tuned")
    if (question is None) == (input_ids is None):
        raise LatentPatchError("pass exactly one of --question TEXT or --input-ids 5,6,7")
    if top_k < 1:
        raise LatentPatchError(f"--top-k {top_k}: must be at least 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise LatentPatchError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    ids = _parse_input_ids(input_ids) if input_ids is not None else None

    import torch

    from latentpatch.model.config import extract_number

    model_options = ModelOptions(**options)
    m = model_options.load()
    if ids is not None:
        bad = [i for i in ids if not 0 <= i < m.vocab_size]
        if bad:
            raise LatentPatchError(f"--input-ids: id(s) {bad[:5]} outside the vocabulary (0..{m.vocab_size - 1})")
        prompt = m.prompt_ids(ids)
    else:
        assert question is not None  # exactly one of the two was checked above
        if m.tokenizer is None:
            raise LatentPatchError(
                f"--model {model_options.model} has no tokenizer; fix: pass --input-ids instead of --question"
            )
        prompt = m.prompt_ids(question)
    typer.echo(
        f"model: {m.name} ({m.family}, {m.n_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}, "
        f"{m.num_latent} thoughts)"
    )
    if question is not None:
        typer.echo(f"question: {question}")
    typer.echo(f"prompt ids: {prompt}")
    r = m.rollout([prompt])
    k = min(top_k, m.vocab_size)
    typer.echo(
        f"numbering: thought p = latent position p (0..{m.num_latent - 1}; papers' z_(p+1)), decoded from the "
        "hidden state it was projected from = the official CODI probe's latent p (docs/checkpoints.md)"
    )
    for p, tops in enumerate(m.decode_thoughts(r, k=k)[0]):
        typer.echo(f"thought {p}: " + " | ".join(f"{tok!r} {prob:.3f}" for tok, prob in tops))
    last = torch.softmax(m.logits(r.latent_hidden[0, -1]), -1).topk(k)  # the probe's latent K: never fed
    names = [m.decode([i]) if m.tokenizer is not None else str(i) for i in last.indices.tolist()]
    typer.echo(
        f"after thought {m.num_latent - 1} (probe latent {m.num_latent}, not fed): "
        + " | ".join(f"{tok!r} {prob:.3f}" for tok, prob in zip(names, last.values.tolist()))
    )
    out = m.generate(r.state, r.answer_logits, max_new_tokens)[0]
    if len(out) >= m.room_at(int(r.state.next_position[0]), 1 << 30):
        typer.echo(f"note: the answer was cut at the model's last position ({m.max_positions} positions)")
    if m.tokenizer is None:
        typer.echo(f"answer ids: {out}")
    else:
        text = m.decode(out)
        num = extract_number(text)
        typer.echo(f"answer: {text!r} (ids {out})")
        typer.echo(f"number: {'none' if num is None else format(num, 'g')}")
    if das:
        from latentpatch.probing.das import subspace_lines

        for line in subspace_lines(m, prompt, das):
            typer.echo(line)
    if lens:
        from latentpatch.patching.reading import known_values, lens_lines

        answer = extract_number(m.decode(out)) if m.tokenizer is not None else None
        values = known_values(question or "", answer, None) if answer is not None else []
        reader = None
        if lens == "tuned":
            from latentpatch.pipeline.reading import shipped_pairs_lens

            trained = shipped_pairs_lens(m)
            kl = ", ".join(f"{r['layer']}: {r['logit']:.3g} -> {r['tuned']:.3g}" for r in trained.report["held_out_kl"])
            how = "loaded from" if trained.loaded else "trained on the shipped pairs and stored in"
            typer.echo(f"tuned lens {how} {trained.path}; held-out KL per layer (logit -> tuned): {kl}")
            reader = trained.lens
        typer.echo("\n".join(lens_lines(m, prompt, values, k, reader)))


@app.command("models")
def models_cmd() -> None:
    """List the released checkpoints latentpatch knows (--preset) and the command for each."""
    from latentpatch.model.codi import PRESETS  # torch is imported here, after --help

    for name, p in PRESETS.items():
        typer.echo(f"{name}: {p['about']}")
        typer.echo(f"  checkpoint {p['repo']} on base {p['base']}")
        typer.echo(
            f"  K {p['num_latent']}, LoRA r {p['lora_r']} alpha {p['lora_alpha']} on {','.join(p['lora_targets'])}, "
            f"prj_dim {p['prj_dim']}{' + LayerNorm' if p['prj_ln'] else ''}, remove_eos {p['remove_eos']}, "
            f"eos {p['eos_id']}"
        )
        typer.echo(f"  latentpatch run --model codi:{p['repo']} --preset {name}")
    typer.echo("Coconut checkpoints: --model coconut:FILE or coconut:ORG/NAME:FILE (--base gpt2). docs/checkpoints.md")
    from latentpatch.model.simcot import COCONUT_PRESETS

    for name, p in COCONUT_PRESETS.items():
        typer.echo(f"{name}: {p['about']}")
        typer.echo(f"  checkpoint {p['repo']} on base {p['base']}")
        typer.echo(
            f"  K {p['num_latent']} (the shipped eval config: {p['eval_config_latents']}), identity feedback, "
            f"known unused: {', '.join(k + '*' for k in p['known_unused'])}"
        )
        typer.echo(f"  latentpatch run --model coconut:{p['repo']} --preset {name}")
    from latentpatch.model.pccot_loader import PCCOT_PRESETS

    for name, p in PCCOT_PRESETS.items():
        typer.echo(f"{name}: {p['about']}")
        typer.echo(f"  checkpoint {p['repo']} on base {p['base']} (weights fetched too)")
        typer.echo(f"  latentpatch inspect --model pccot:{p['repo']}")
    from latentpatch.model.colar import PRESETS as COLAR_PRESETS
    from latentpatch.model.mixture import PRESETS as MIXTURE_PRESETS

    for name, (about, command) in {**MIXTURE_PRESETS, **COLAR_PRESETS}.items():  # other families (#31)
        typer.echo(f"{name}: {about}")
        typer.echo(f"  {command}")


# ---- end section: model -------------------------------------------------------------------


# ---- section: pairs -----------------------------------------------------------------------
@pairs_app.command("validate")
def pairs_validate(
    file: Path = typer.Argument(..., help="Pair file (flat or nested format, docs/method.md §9)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
) -> None:
    """Report on a pair file; exit 0 if usable, 2 (with the reasons) if not."""
    import json

    from latentpatch.data.validate import print_report, validate_pairs

    report = validate_pairs(file)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print_report(report)
    if not report.usable:
        # LatentPatchError, not typer.Exit(2): main() turns it into one stderr line and exit code 2.
        reasons = "; ".join(report.blocking_reasons[:3])
        more = len(report.blocking_reasons) - 3
        raise LatentPatchError(f"{file} is not usable: {reasons}" + (f" (+{more} more)" if more > 0 else ""))


@pairs_app.command("filter")
def pairs_filter(
    file: Path = typer.Argument(..., help="Pair file to filter."),
    out: Path = typer.Option(..., "--out", help="Where to write the kept pairs (flat format, docs/method.md §9.1)."),
    keep_same_answer: bool = typer.Option(False, "--keep-same-answer", help="Keep pairs whose answers are equal."),
) -> None:
    """Drop pairs that carry no patching signal (same clean and corrupted answer) and save the rest."""
    from latentpatch.data.pairs import filter_pairs, load_pairs, save_pairs

    pairs = load_pairs(file)
    kept, removed = filter_pairs(pairs, drop_same_answer=not keep_same_answer)
    for pair_id, reason in removed:
        typer.echo(f"removed pair {pair_id}: {reason}")
    if not kept:
        raise LatentPatchError(
            f"every pair in {file} was removed, {out} not written; fix: use --keep-same-answer "
            "or a file with pairs whose answers differ"
        )
    save_pairs(kept, out)
    typer.echo(f"kept {len(kept)} of {len(pairs)} pairs ({len(removed)} removed) -> {out}")


@pairs_app.command("generate")
def pairs_generate(
    n: int = typer.Option(57, "--n", help="Number of pairs (at least 1)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same pairs)."),
    out: Path = typer.Option(Path("pairs.json"), "--out", help="Output pair file (flat format, docs/method.md §9.1)."),
    intermediates: bool = typer.Option(
        False,
        "--intermediates",
        help="Also write each variant's intermediate results (for --experiments intermediate).",
    ),
) -> None:
    """Generate synthetic GSM8K-style clean/corrupted pairs."""
    if n < 1:
        raise LatentPatchError(f"--n {n} is not a valid number of pairs; fix: pass --n 1 or more")
    from latentpatch.data.pairs import save_pairs
    from latentpatch.data.synthetic import generate_pairs

    pairs = generate_pairs(n, seed, intermediates=intermediates)
    save_pairs(pairs, out)
    typer.echo(f"wrote {len(pairs)} pairs (seed {seed}) -> {out}")


# ---- end section: pairs -------------------------------------------------------------------


# ---- section: train / eval ----------------------------------------------------------------
@app.command("train")
@with_options(TrainConfig)
def train_cmd(
    options: dict[str, Any],
    out: Path = typer.Option(..., "--out", help="Output model directory."),
) -> None:
    """Train a small CODI model (LLaMA architecture) on synthetic problems with the CODI objective.

    The defaults are stage 1 of the shipped default model's recipe; scripts/train_default.sh runs all
    four stages."""
    import json as _json

    from latentpatch.training.train import train

    cfg = TrainConfig(**options)
    cfg.validate()
    summary = train(cfg, out)
    typer.echo(_json.dumps({"out": str(out), **summary}))


@app.command("eval")
@with_options(ModelOptions)
def eval_cmd(
    options: dict[str, Any],
    n: int = typer.Option(1000, "--n", min=1, help="Held-out problems."),
    seed: int = typer.Option(12345, "--seed", help="Seed of the held-out problems (distinct from training)."),
    pairs: Path | None = typer.Option(None, "--pairs", help="Pair file (default: the shipped 57 pairs)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Accuracy on held-out synthetic problems, on the pairs, and under thought ablation."""
    import json as _json

    from latentpatch.training.evaluate import evaluate, format_report

    model_options = ModelOptions(**options)
    res = evaluate(
        model_options.model, n=n, seed=seed, pairs_path=pairs, batch_size=batch_size, lm=model_options.load()
    )
    typer.echo(_json.dumps(res, indent=2) if as_json else format_report(res))


# ---- end section: train / eval ------------------------------------------------------------


# ---- section: run (engine) ----------------------------------------------------------------
@app.command("run")
@with_options(RunConfig)
def run_cmd(
    options: dict[str, Any],
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="JSON/TOML file whose keys are these options' "
        "names (e.g. batch_size or batch-size); flags given here win.",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Run the patching experiments and write a run directory (manifest, results, report)."""
    from latentpatch.analysis.report_process import ReportProcess

    cfg = RunConfig.from_file(config, **options) if config is not None else RunConfig(**options)
    report_process = ReportProcess.start() if cfg.report else None  # before torch is imported
    try:
        from latentpatch.pipeline.run import run_experiments

        if cfg.seeds > 1:  # --seeds N: one run per seed, then the spread (pipeline/seeds.py)
            from latentpatch.pipeline.seeds import run_seeds

            cfg.validate()
            page = run_seeds(cfg, lambda c: run_experiments(c, resume=resume, progress=not quiet))
            print(f"spread over {cfg.seeds} seeds: {page}")
            return
        path = run_experiments(cfg, resume=resume, progress=not quiet, report_process=report_process)
    finally:
        if report_process is not None:
            report_process.close()
    from latentpatch.rundir import Manifest, RunPaths, read_manifest

    manifest = Manifest.from_dict(read_manifest(path), RunPaths(path).manifest)
    t, checks, b = manifest.timings or {}, manifest.checks or {}, manifest.baselines or {}
    status = ", ".join(f"{k} {'ok' if c['passed'] else 'FAILED'}" for k, c in checks.items())
    print(
        f"{manifest.n_pairs} pairs, clean acc {b.get('clean_accuracy', 0):.3f}, corrupted acc "
        f"{b.get('corrupted_accuracy', 0):.3f}; checks: {status}; {t.get('total_s', 0):.1f} s"
        + (f"; threads {manifest.threads['count']} ({manifest.threads['reason']})" if manifest.threads else "")
        + (f"; workers {manifest.workers['count']} ({manifest.workers['reason']})" if manifest.workers else "")
    )
    report = RunPaths(path).report
    print(f"run directory: {path}" + (f"  report: {report}" if report.exists() else ""))


# ---- end section: run ---------------------------------------------------------------------


# ---- section: report / compare ------------------------------------------------------------
@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="run directory written by `latentpatch run`"),
    exclude_flagged: bool = typer.Option(
        False, "--exclude-flagged", help="drop pairs the model gets wrong (clean or corrupted)"
    ),
    n_resamples: int = typer.Option(9999, "--n-resamples", min=100, help="bootstrap resamples per cell"),
    ci_method: str = typer.Option("percentile", "--ci-method", help="bootstrap CI: percentile | bca | basic"),
    svg: bool = typer.Option(False, "--svg", help="also write every figure as SVG (default: the run's figure formats)"),
) -> None:
    """Rebuild stats.json, stats/, figures/ and report.html from a run's results (no model needed)."""
    from latentpatch.analysis.report import build_report

    if ci_method not in ("percentile", "bca", "basic"):
        raise LatentPatchError(f"--ci-method {ci_method!r}: use percentile, bca or basic")
    formats = ("svg",) if svg else None  # None: the formats the run was made with (PNG always)
    path = build_report(
        run_dir, exclude_flagged=exclude_flagged, n_resamples=n_resamples, ci_method=ci_method, formats=formats
    )
    typer.echo(path)


@app.command("compare")
def compare_cmd(
    run_a: Path = typer.Argument(..., help="first run directory (A)"),
    run_b: Path = typer.Argument(..., help="second run directory (B)"),
    out: Path = typer.Option(..., "--out", help="output directory for compare.html, compare.json and figures"),
    exclude_flagged: bool = typer.Option(False, "--exclude-flagged", help="drop flagged pairs in both runs"),
) -> None:
    """Side-by-side layer and position maps of two runs and their difference (A − B)."""
    from latentpatch.analysis.compare import compare_runs

    typer.echo(compare_runs(run_a, run_b, out, exclude_flagged=exclude_flagged))


# ---- end section: report ------------------------------------------------------------------


# ---- section: bench / merge ---------------------------------------------------------------
@app.command("merge")
def merge_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="the shard run directories (latentpatch run --shard i/N)"),
    out: Path = typer.Option(..., "--out", help="merged run directory (new or empty)"),
    no_report: bool = typer.Option(False, "--no-report", help="skip stats, figures and report.html"),
) -> None:
    """Merge shard run directories into one run directory (results as an unsharded run writes them)."""
    from latentpatch.pipeline.merge import merge_runs

    path = merge_runs(run_dirs, out, report=not no_report)
    report = path / "report.html"
    typer.echo(f"merged {len(run_dirs)} shard(s) into {path}" + (f"  report: {report}" if report.exists() else ""))


# ---- end section: bench / merge -----------------------------------------------------------


# ---- section: launch ----------------------------------------------------------------------
launch_app = typer.Typer(no_args_is_help=True, help="Run on a cluster: a SLURM job array of shards plus a merge.")
app.add_typer(launch_app, name="launch")


@launch_app.command("slurm")
@with_options(LaunchConfig)
def launch_slurm_cmd(options: dict[str, Any]) -> None:
    """Submit --shards run shards as a SLURM job array and a merge job after it (submitit; docs/scaling.md)."""
    from latentpatch.pipeline.slurm import launch_slurm

    done = launch_slurm(LaunchConfig(**options))
    print(
        f"shard jobs {', '.join(done.shard_jobs)} -> {done.shards[0].parent}/shard*; merge job {done.merge_job} -> "
        f"{done.merged}; logs: {done.logs}"
    )


# ---- end section: launch ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line + exit 2, never a traceback."""
    try:
        rc = app(args=argv, standalone_mode=False)
        if argv is None:  # the process ends here: its exit skips a collection over every object (~1 s after torch)
            gc.freeze()
    except LatentPatchError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None  # 2; 130 for an interrupted run
    except Exception as err:
        # typer bundles its own click: match usage errors by their interface, not their class.
        if hasattr(err, "show") and hasattr(err, "exit_code"):
            err.show()
            raise SystemExit(2 if err.exit_code not in (0, 1) else err.exit_code or 2) from None
        if type(err).__name__ in ("Abort", "KeyboardInterrupt"):
            raise SystemExit(130) from None
        if type(err).__name__ == "Exit":
            raise SystemExit(getattr(err, "exit_code", 0)) from None
        raise
    if isinstance(rc, int) and rc != 0:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
