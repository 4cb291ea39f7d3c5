"""Command-line interface: a thin layer over the Python API.

Every command turns a :class:`~latentpatch.errors.LatentPatchError` into one line on stderr and
exit code 2 (see :func:`main`). Commands import their modules lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from latentpatch.errors import LatentPatchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Activation patching on continuous chain-of-thought models (CODI, Coconut).",
)
pairs_app = typer.Typer(no_args_is_help=True, help="Generate, validate and filter clean/corrupted pair files.")
app.add_typer(pairs_app, name="pairs")


# ---- section: model (inspect) -------------------------------------------------------------
# ---- end section: model -------------------------------------------------------------------

# ---- section: pairs -----------------------------------------------------------------------
@pairs_app.command("validate")
def pairs_validate(
    file: Path = typer.Argument(..., help="Pair file (design.md §7 flat format or nested prepared pairs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
) -> None:
    """Report on a pair file; exit 0 if usable, 2 (with the reasons) if not."""
    import json

    from latentpatch.pairs import print_report, validate_pairs

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
    out: Path = typer.Option(..., "--out", help="Where to write the kept pairs (flat §7 format)."),
    keep_same_answer: bool = typer.Option(False, "--keep-same-answer", help="Keep pairs whose answers are equal."),
) -> None:
    """Drop pairs that carry no patching signal (same clean and corrupted answer) and save the rest."""
    from latentpatch.pairs import filter_pairs, load_pairs, save_pairs

    pairs = load_pairs(file)
    kept, removed = filter_pairs(pairs, drop_same_answer=not keep_same_answer)
    for pair_id, reason in removed:
        typer.echo(f"removed pair {pair_id}: {reason}")
    if not kept:
        raise LatentPatchError(f"every pair in {file} was removed, {out} not written; fix: use --keep-same-answer "
                               "or a file with pairs whose answers differ")
    save_pairs(kept, out)
    typer.echo(f"kept {len(kept)} of {len(pairs)} pairs ({len(removed)} removed) -> {out}")


@pairs_app.command("generate")
def pairs_generate(
    n: int = typer.Option(57, "--n", help="Number of pairs (at least 1)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same pairs)."),
    out: Path = typer.Option(Path("pairs.json"), "--out", help="Output pair file (flat §7 format)."),
) -> None:
    """Generate synthetic GSM8K-style clean/corrupted pairs."""
    if n < 1:
        raise LatentPatchError(f"--n {n} is not a valid number of pairs; fix: pass --n 1 or more")
    from latentpatch.pairs import save_pairs
    from latentpatch.synthetic import generate_pairs

    pairs = generate_pairs(n, seed)
    save_pairs(pairs, out)
    typer.echo(f"wrote {len(pairs)} pairs (seed {seed}) -> {out}")


# ---- end section: pairs -------------------------------------------------------------------

# ---- section: train / eval ----------------------------------------------------------------
@app.command("train")
def train_cmd(
    out: Path = typer.Option(..., "--out", help="Output model directory."),
    steps: int = typer.Option(3000, "--steps", min=1, help="Optimizer steps."),
    seed: int = typer.Option(0, "--seed", help="Seed (init, data order)."),
    layers: int = typer.Option(4, "--layers", min=1),
    d_model: int = typer.Option(192, "--d-model", min=8),
    heads: int = typer.Option(6, "--heads", min=1),
    d_ff: int = typer.Option(512, "--d-ff", min=8),
    prj_dim: int = typer.Option(384, "--prj-dim", min=8),
    num_latent: int = typer.Option(6, "--num-latent", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(2e-3, "--lr"),
    distill_factor: float = typer.Option(20.0, "--distill-factor"),
    ref_factor: float = typer.Option(1.0, "--ref-factor"),
    teacher_only_steps: int = typer.Option(0, "--teacher-only-steps", min=0),
    train_pool: int = typer.Option(200_000, "--train-pool", min=100),
    threads: int = typer.Option(2, "--threads", min=1),
    ckpt_every: int = typer.Option(0, "--ckpt-every", min=0, help="Save an intermediate model to <out>_ckpt every N steps."),
) -> None:
    """Train a small CODI model (LLaMA architecture) on synthetic problems with the CODI objective."""
    import json as _json

    from latentpatch.train import TrainConfig, train

    if d_model % heads:
        raise LatentPatchError(f"--d-model {d_model} must be divisible by --heads {heads}")
    cfg = TrainConfig(steps=steps, seed=seed, layers=layers, d_model=d_model, heads=heads, d_ff=d_ff,
                      prj_dim=prj_dim, num_latent=num_latent, batch_size=batch_size, lr=lr,
                      distill_factor=distill_factor, ref_factor=ref_factor,
                      teacher_only_steps=teacher_only_steps, train_pool=train_pool, threads=threads,
                      ckpt_every=ckpt_every)
    summary = train(cfg, out)
    typer.echo(_json.dumps({"out": str(out), **summary}))


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("default", "--model", help="'default' or a model directory."),
    n: int = typer.Option(1000, "--n", min=1, help="Held-out problems."),
    seed: int = typer.Option(12345, "--seed", help="Seed of the held-out problems (distinct from training)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Pair file (default: the shipped 57 pairs)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Accuracy on held-out synthetic problems, on the pairs, and under thought ablation."""
    import json as _json

    from latentpatch.evaluate import evaluate, format_report

    res = evaluate(model, n=n, seed=seed, pairs_path=pairs, batch_size=batch_size)
    typer.echo(_json.dumps(res, indent=2) if as_json else format_report(res))


# ---- end section: train / eval ------------------------------------------------------------

# ---- section: run (engine) ----------------------------------------------------------------
# ---- end section: run ---------------------------------------------------------------------

# ---- section: report / compare ------------------------------------------------------------
# ---- end section: report ------------------------------------------------------------------

# ---- section: bench / merge ---------------------------------------------------------------
# ---- end section: bench / merge -----------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: user errors become one line + exit 2, never a traceback."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except LatentPatchError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except Exception as err:
        # typer bundles its own click: match usage errors by their interface, not their class.
        if hasattr(err, "show") and hasattr(err, "exit_code"):
            err.show()
            raise SystemExit(2 if err.exit_code not in (0, 1) else err.exit_code or 2)
        if type(err).__name__ in ("Abort", "KeyboardInterrupt"):
            raise SystemExit(130)
        if type(err).__name__ == "Exit":
            raise SystemExit(getattr(err, "exit_code", 0))
        raise
    if isinstance(rc, int) and rc != 0:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
