"""How an option is declared, and the parsers that turn its text into a value (no torch).

Contract: :func:`option` makes a dataclass field that is also a command-line option; its metadata
(``help``, ``flags``, ``parse``, ``omit_if_unset``) is all that ``cli_options`` and
:meth:`latentpatch.pipeline.config.RunConfig.to_dict` read. A ``parse`` function takes the text of
the command line (or a string in a config file) and returns the field's value; :func:`parse_values`
applies them to a mapping of option names. Bad text raises :class:`LatentPatchError` naming the
option, or is left for ``RunConfig.validate`` to reject. Imports nothing of the run, no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from latentpatch.errors import LatentPatchError

#: What an option is about, in the order ``latentpatch run --help`` groups them: the model it
#: loads, the experiments and pairs (what is computed), how the run executes (where, how fast, in how
#: many pieces), and what it writes.
CONCERNS: tuple[str, ...] = ("model", "experiments", "execution", "output")


def option(
    default: Any,
    help: str,
    *,
    flags: str | None = None,
    parse: Callable[[str], Any] | None = None,
    omit_if_unset: bool = False,
    concern: str | None = None,
    results: bool = True,
) -> Any:
    """A dataclass field that is also a command-line option.

    ``help``: the option's help text. ``flags``: the option's declaration when it is not
    ``--field-name`` (``--name/--no-name`` for booleans). ``parse``: turns the text given on the
    command line (or a string in a config file) into the field's value. ``omit_if_unset``: left
    out of :meth:`RunConfig.to_dict` (the manifest's ``config`` and the config hash) while None or
    equal to ``default``, so adding such an option does not change the hash of existing run directories. ``concern``:
    one of :data:`CONCERNS` (the help panel it is listed in; None: no panel). ``results``: False for
    an option that changes no number in ``results/`` (left out of the config hash, free to differ on
    ``--resume`` and between merged shards).
    """
    if concern is not None and concern not in CONCERNS:
        raise ValueError(f"concern {concern!r}: expected one of {CONCERNS}")
    meta = {
        "help": help,
        "flags": flags,
        "parse": parse,
        "omit_if_unset": omit_if_unset,
        "concern": concern,
        "results": results,
    }
    return dataclasses.field(default=default, metadata=meta)


def parse_experiments(text: str) -> tuple[str, ...]:
    """``"layer,position"`` -> ``("layer", "position")``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_batch_size(text: str) -> int | str:
    """``"8"`` -> 8; anything else stays text (``"auto"``; :meth:`RunConfig.validate` rejects the rest)."""
    return int(text) if text.strip().isdigit() else text


def parse_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each string run through its field's ``parse`` (lists become tuples)."""
    parsers = {f.name: f.metadata["parse"] for f in dataclasses.fields(cls) if f.metadata.get("parse")}
    out = dict(values)
    for name, value in values.items():
        if isinstance(value, str) and name in parsers:
            out[name] = parsers[name](value)
        elif isinstance(value, list):
            out[name] = tuple(value)
    return out


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(x) for x in shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise LatentPatchError(f"--shard {shard!r}: use i/N with 0 <= i < N, e.g. 0/4") from None
    return i, n
