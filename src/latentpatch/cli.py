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
