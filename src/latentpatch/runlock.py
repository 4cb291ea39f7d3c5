"""The lock on a run directory and the check that ``--out`` can be written (no torch).

``latentpatch run`` holds ``RUN_DIR/.lock`` (``{pid, host, started}``) while it writes the run
directory, so two processes never mix their pair files into one run; a lock left by a killed
process is detected (its PID no longer runs) and taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from latentpatch.errors import LatentPatchError


def check_writable_dir(path: Path | str, option: str = "--out") -> Path:
    """``path`` as a directory this process can write into (created if missing), or one
    :class:`LatentPatchError` line: an empty path, an existing file, a parent that is a file, or
    a location without write permission."""
    if not str(path).strip():
        raise LatentPatchError(f"{option} is empty; fix: name a run directory, e.g. {option} runs/first")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LatentPatchError(f"{option} {path} is an existing file, not a directory; fix: choose another {option}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise LatentPatchError(
                f"{option} {path}: {parent} is a file, not a directory; fix: choose another {option}"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise LatentPatchError(
            f"{option} {path} cannot be written ({err.strerror or err}); fix: choose a location you can write to"
        ) from None
    return path


def _process_alive(pid: int) -> bool:
    if pid <= 0:  # a damaged lock (os.kill would address a process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def run_lock(run_dir: Path | str, note: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold ``RUN_DIR/.lock`` (``{pid, host, started}``) while the block runs, so two processes
    never write one run directory. A lock held by a live process is a :class:`LatentPatchError`
    naming it; a lock left by a dead process on this host is taken over, with ``note``."""
    path = Path(run_dir) / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):  # a lock released or taken over between our steps: try again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:  # half-written by a process starting right now, or damaged
                time.sleep(0.2)
                holder = _read_lock(path) or {"pid": -1, "host": me["host"], "started": "?"}
            if holder.get("host") != me["host"] or _process_alive(int(holder.get("pid", -1))):
                raise LatentPatchError(
                    f"run directory {run_dir} is in use by process {holder.get('pid')} on {holder.get('host')} "
                    f"(started {holder.get('started')}); fix: wait for it to finish or choose another --out "
                    f"(if that process is not a latentpatch run, delete {path})"
                ) from None
            note(f"note: taking over the lock of {run_dir} left by process {holder.get('pid')} (no longer running)")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:
        raise LatentPatchError(f"could not lock run directory {run_dir}; fix: retry, or choose another --out")
    try:
        yield path
    finally:
        if (_read_lock(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
