"""Clean/corrupted pair files: the :class:`Pair` data model, loading, validation, filtering, saving.

A *pair* is two versions of one question that differ in a detail (e.g. one number) and so have
different answers; activation patching copies activations from the clean run into the corrupted
run (or back) and asks how much of the clean answer comes back.

On disk (design.md §7) a pair file is a flat JSON list with one entry per variant::

    [{"pair_id": 0, "variant": "clean",     "question": "...", "answer": 18, ...extra},
     {"pair_id": 0, "variant": "corrupted", "question": "...", "answer": 20, ...extra}, ...]

:func:`load_pairs` also reads the nested "prepared pairs" format
``[{"pair_id": 0, "clean": {"question", "answer", ...}, "corrupted": {...}}, ...]``, and either
format wrapped as ``{"pairs": [...]}``. :func:`save_pairs` always writes the flat format.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

VARIANTS = ("clean", "corrupted")
#: Keys with a fixed meaning in a flat entry; every other key is kept verbatim in ``Variant.extra``.
RESERVED_KEYS = ("pair_id", "variant", "question", "answer")

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Variant:
    """One side of a pair: a question, its numeric answer, and any other fields kept verbatim."""

    question: str
    answer: float | int  # numeric; integral answers are ints
    extra: dict = field(default_factory=dict)  # e.g. program, cot, reasoning_steps

    def __post_init__(self) -> None:
        if isinstance(self.answer, bool) or not isinstance(self.answer, (int, float)):
            raise TypeError(f"Variant.answer must be an int or float, got {self.answer!r}")
        clash = [k for k in RESERVED_KEYS if k in self.extra]
        if clash:
            raise ValueError(f"Variant.extra may not contain the reserved keys {clash}")


@dataclass(frozen=True)
class Pair:
    """A clean/corrupted pair. ``pair_id`` is always a str; ``raw_id`` is the id as written in the
    file (int or str), so that saving writes back the same JSON type.

    ``Pair(pair_id=7, ...)`` is accepted too: it becomes ``pair_id="7", raw_id=7``.
    """

    pair_id: str
    clean: Variant
    corrupted: Variant
    raw_id: int | str | None = None

    def __post_init__(self) -> None:
        pid = self.pair_id
        if isinstance(pid, bool) or not isinstance(pid, (int, str)):
            raise TypeError(f"Pair.pair_id must be an int or str, got {pid!r}")
        raw = pid if self.raw_id is None else self.raw_id
        if isinstance(raw, bool) or not isinstance(raw, (int, str)) or str(raw) != str(pid):
            raise ValueError(f"Pair.raw_id {raw!r} does not match pair_id {pid!r}")
        object.__setattr__(self, "pair_id", str(pid))
        object.__setattr__(self, "raw_id", raw)

    def variant(self, name: str) -> Variant:
        """The ``"clean"`` or ``"corrupted"`` variant."""
        if name not in VARIANTS:
            raise KeyError(name)
        return self.clean if name == "clean" else self.corrupted


def pairs_to_entries(pairs: Sequence[Pair]) -> list[dict]:
    """The flat §7 entries for ``pairs``: clean then corrupted, in the order given."""
    entries = []
    for pair in pairs:
        for name in VARIANTS:
            v = pair.variant(name)
            entries.append(
                {"pair_id": pair.raw_id, "variant": name, "question": v.question, "answer": v.answer, **v.extra}
            )
    return entries


def save_pairs(pairs: Sequence[Pair], path: PathLike) -> Path:
    """Write ``pairs`` to ``path`` in the flat §7 format, atomically (temp file + ``os.replace``).

    Returns the path written. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(pairs_to_entries(pairs), indent=2, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
