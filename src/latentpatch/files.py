"""Files written so that a reader, or a crash, never sees half of one: atomic writes (a temporary
file next to the target, then one ``os.replace``), and JSON made of plain values.

Every writer of the project goes through here: the run directory (:mod:`latentpatch.rundir`),
pair files, model directories and the activation cache. Imports no torch.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without error it replaces
    ``path`` in one step (``os.replace``), else it is removed. Parent folders are created.

    For writers that take a path (parquet, safetensors, savefig); text and bytes have
    :func:`atomic_write_text` / :func:`atomic_write_bytes`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; ``fsync``: flush to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: Path | str, text: str, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync)


def json_safe(x: Any) -> Any:
    """Plain JSON values: NaN/±inf -> None, numpy/torch arrays and scalars -> lists/numbers,
    pandas NA -> None, dict keys -> str, tuples -> lists.

    >>> json_safe({1: (float("nan"), 2.5, float("inf")), "b": [True, None]})
    {'1': [None, 2.5, None], 'b': [True, None]}
    """
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float):  # also numpy.float64
        return float(x) if math.isfinite(x) else None
    if hasattr(x, "tolist"):  # numpy arrays/scalars and torch tensors, without importing either
        return json_safe(x.tolist())
    pandas = sys.modules.get("pandas")  # pd.NA can only exist if pandas is loaded
    if pandas is not None and x is pandas.NA:
        return None
    return x


def write_json(path: Path | str, data: Any) -> None:
    """``data`` through :func:`json_safe`, indent 1, a final newline; atomic."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=1) + "\n")


def write_parquet(path: Path | str, rows: list[dict], columns: Sequence[str]) -> None:
    """``rows`` as a parquet table with exactly ``columns`` (in that order); atomic."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(columns))
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
