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
        app(args=argv, standalone_mode=False)
    except LatentPatchError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except typer.Exit as ex:
        raise SystemExit(ex.exit_code)
    except Exception as err:  # click usage errors (bad flag values) are user errors too
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            raise SystemExit(2)
        if isinstance(err, click.exceptions.Abort):
            raise SystemExit(130)
        raise


if __name__ == "__main__":
    main()
