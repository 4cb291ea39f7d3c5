"""Command-line options generated from the dataclasses of :mod:`latentpatch.pipeline.config`.

Each field declared with :func:`latentpatch.pipeline.options.option` becomes one ``--option`` (name,
type, help and flags from the field), so ``latentpatch run``, ``eval`` and ``inspect`` and a
``--config`` file share one list of names. No torch, so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import typer

from latentpatch.pipeline.options import parse_values


def cli_type(annotation: Any) -> type:
    """``int | None`` -> int: the value type click converts the option's text to.

    >>> cli_type(int | None), cli_type(str)
    (<class 'int'>, <class 'str'>)
    """
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


#: The ``--help`` panel of each concern (``latentpatch.pipeline.options.CONCERNS``).
PANELS = {
    "model": "Model",
    "experiments": "Experiments and pairs",
    "execution": "Execution",
    "output": "Output",
}


def option_parameters(cls: type) -> list[inspect.Parameter]:
    """One ``--option`` per field of ``cls`` (name, type, help from the field; see ``config.option``).

    Every option defaults to None (= not given), so a ``--config`` file or the field's default
    applies; the help shows the field's default."""
    hints = typing.get_type_hints(cls)
    params = []
    option_fields = getattr(cls, "option_fields", None)  # RunConfig's display order
    for f in option_fields() if option_fields else dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        value_type = str if f.metadata.get("parse") else cli_type(hints[f.name])
        flags = f.metadata.get("flags") or (f"{flag}/--no-{flag[2:]}" if value_type is bool else flag)
        help_text = f.metadata["help"]
        if f.default is not None:  # shown in the help text: the option's own default is None
            shown = (
                flags.split("/")[0 if f.default else 1]
                if value_type is bool
                else (",".join(f.default) if isinstance(f.default, tuple) else str(f.default))
            )
            help_text += f" Default: {shown}."
        concern = f.metadata.get("concern")
        panel = PANELS[concern] if concern else None  # --help lists the options grouped by concern
        opt = typer.Option(None, flags, help=help_text, show_default=False, rich_help_panel=panel)
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=value_type | None)
        )
    return params


def with_options(cls: type) -> Callable[[Callable], Callable]:
    """Decorator: give a command one option per field of the dataclass ``cls``. The command gets
    the options given on the command line (parsed; the others left out) as its first argument."""

    def decorate(command: Callable) -> Callable:
        generated = option_parameters(cls)
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in list(inspect.signature(command, eval_str=True).parameters.values())[1:]
        ]
        names = {p.name for p in generated}

        def callback(**kwargs: Any) -> Any:
            given = {k: kwargs.pop(k) for k in names}
            return command(parse_values(cls, {k: v for k, v in given.items() if v is not None}), **kwargs)

        callback.__signature__ = inspect.Signature(generated + own)  # type: ignore[attr-defined]
        callback.__annotations__ = {p.name: p.annotation for p in generated + own}
        callback.__name__, callback.__doc__ = command.__name__, command.__doc__
        return callback

    return decorate
