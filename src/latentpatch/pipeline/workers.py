"""Pairs in parallel processes: the per-pair loops of a run split over forked workers.

A small model (``pipeline/threads.py``) runs on one thread, so on a machine with free cores the
pairs themselves are what can run side by side. Every pair is computed alone from the same
baselines, by the same code and at the same thread count, and committed as its own file, so
a run's results are the same bytes whatever the number of workers (tested). The split is
round-robin over this process and ``workers - 1`` forked children (POSIX only; CPU only: a
forked child cannot use CUDA). Children report each finished item through a pipe, so the
progress bar moves for all of them; a child that fails makes the parent raise with its message
(the items it finished stay committed, and ``--resume`` continues).

Imports no torch until a child sets its thread count.
"""

from __future__ import annotations

import os
import pickle
import select
import shutil
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentpatch.errors import LatentPatchError


def fork_available() -> bool:
    """Can this platform fork worker processes?"""
    return hasattr(os, "fork")


def run_items(
    items: Sequence[int],
    work: Callable[[int], Any],
    workers: int,
    done: Callable[[int], None],
    threads: int | None = None,
) -> dict[int, Any]:
    """``{item: work(item)}`` for every item; ``done(item)`` is called in this process as each finishes.

    The results are collected by :func:`stream_items` (item j to worker ``j % workers``).

    >>> seen = []
    >>> run_items([3, 1, 2], lambda i: i * i, 1, seen.append)
    {3: 9, 1: 1, 2: 4}
    >>> seen
    [3, 1, 2]
    """
    results: dict[int, Any] = {}

    def got(item: int, result: Any) -> None:
        results[item] = result
        done(item)

    stream_items(items, work, workers, got, threads)
    return {item: results[item] for item in items}


def stream_items(
    items: Sequence[int],
    work: Callable[[int], Any],
    workers: int,
    on_result: Callable[[int, Any], None],
    threads: int | None = None,
) -> None:
    """Run ``work(item)`` for every item; ``on_result(item, result)`` is called in this process as
    each finishes (so the caller commits a child's results one by one, not when the child ends).

    With ``workers`` > 1 (and more than one item), item j goes to worker ``j % workers``: worker 0
    is this process, the others are forked children (at ``threads`` torch threads: a forked
    child does not inherit the count), which pickle each result to a file of their own before
    reporting the item. Blocks until every item is done; a child's error (or Ctrl-C) stops the
    others and is raised here.

    >>> got = []
    >>> stream_items([2, 5], lambda i: -i, 1, lambda i, r: got.append((i, r)))
    >>> got
    [(2, -2), (5, -5)]
    """
    workers = min(workers, len(items)) if fork_available() else 1
    children: dict[int, _Child] = {}  # read end of the child's pipe -> the child
    try:
        for w in range(1, workers):
            child = _fork_worker(items[w::workers], work, threads)
            children[child.read] = child
        for item in items[0::workers]:
            on_result(item, work(item))
            _drain(children, on_result, block=False)
        while children:
            _drain(children, on_result, block=True)
    finally:
        for child in children.values():  # only after an error here: stop the rest
            os.kill(child.pid, signal.SIGTERM)
            os.waitpid(child.pid, 0)
            child.close()


@dataclass
class _Child:
    pid: int
    read: int  # the pipe on which it reports finished items
    results: str  # the folder it pickles each result to (``<item>.pkl``)

    def close(self) -> None:
        os.close(self.read)
        shutil.rmtree(self.results, ignore_errors=True)

    def result(self, item: int) -> Any:
        """The result of ``item`` (reported on the pipe), read once."""
        path = Path(self.results) / f"{item}.pkl"
        with open(path, "rb") as f:
            out = pickle.load(f)
        path.unlink()
        return out


def _fork_worker(items: Sequence[int], work: Callable[[int], Any], threads: int | None) -> _Child:
    """Fork a child that runs ``work`` on ``items``, pickles each result to ``<folder>/<item>.pkl``,
    then writes ``"<item>\n"`` to its pipe (``"!<message>\n"`` on failure)."""
    results = tempfile.mkdtemp(prefix="latentpatch-worker-")
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        return _Child(pid, read, results)
    os.close(read)  # the child: never returns
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        if threads is not None:
            import torch  # the caller's work already imported it

            torch.set_num_threads(threads)
        for item in items:
            result = work(item)
            with open(Path(results) / f"{item}.pkl", "wb") as f:
                pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.write(write, f"{item}\n".encode())
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        message = " ".join(str(err).split()) or type(err).__name__
        os.write(write, f"!{type(err).__name__}: {message}\n".encode())
        code = 1
    finally:
        os._exit(code)  # no atexit handlers, no flushing of the parent's buffers


def _drain(children: dict[int, _Child], on_result: Callable[[int, Any], None], block: bool) -> None:
    """Hand over the results of the items the children finished since the last call; reap the
    children that ended."""
    ready, _, _ = select.select(list(children), [], [], None if block else 0)
    for read in ready:
        chunk = os.read(read, 65536).decode()
        if not chunk:  # end of file: the child has exited
            child = children.pop(read)
            _, status = os.waitpid(child.pid, 0)
            try:
                if status:
                    raise LatentPatchError(
                        f"a worker process stopped unexpectedly (status {status}); rerun with --resume"
                    )
            finally:
                child.close()
            continue
        # each line is one write() below PIPE_BUF, which the pipe never splits
        for line in chunk.splitlines():
            if line.startswith("!"):
                raise LatentPatchError(f"in a worker process: {line[1:]}; rerun with --resume after fixing it")
            item = int(line)
            on_result(item, children[read].result(item))
