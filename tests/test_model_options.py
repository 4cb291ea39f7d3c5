"""One set of model options for every command that loads a model, and error hints that only
advise options those commands have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from latentpatch.cli import app

MODEL_OPTIONS = (
    "--model --base --preset --lora-r --lora-alpha --lora-targets --prj-dim --prj-ln --no-prj-ln --num-latent "
    "--remove-eos --keep-eos --eos-id --answer-prefix --dtype --device"
).split()
MODEL_COMMANDS = ("run", "eval", "inspect")


def command_options(name: str) -> set[str]:
    group = typer.main.get_command(app)
    cmd = group.commands[name]  # type: ignore[attr-defined]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_model_option_on_every_model_command(name):
    assert set(MODEL_OPTIONS) <= command_options(name)


def test_error_hints_only_advise_existing_options():
    """Every ``--option`` a model loader's message names exists on run, eval and inspect."""
    src = Path(__file__).resolve().parents[1] / "src" / "latentpatch" / "model"
    advised = set()
    for f in src.glob("*.py"):
        for literal in re.findall(r'"[^"\n]*"', f.read_text()):
            advised |= set(re.findall(r"--[a-z]+(?:-[a-z]+)*(?![a-z-])", literal))  # not "--lora-*"
    assert advised, "the loaders' messages name options"
    for name in MODEL_COMMANDS:
        missing = advised - command_options(name)
        assert not missing, (name, sorted(missing))
