"""Progress of a run, as a callback object: :func:`latentpatch.pipeline.run.run_experiments` calls
``stage`` when a stage starts (with its number of steps), ``advance`` after steps, and ``warn`` for a
line the user must see (a failed built-in check). It is used as a context manager around the stages.
"""

from __future__ import annotations

import sys
from typing import Any


class RunProgress:
    """No progress bar; warnings go to stderr (``progress=False``, ``latentpatch run --quiet``).

    Subclass it to follow a run (notebooks, tests): every method may be overridden.
    """

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def stage(self, name: str, total: int) -> None:
        """A stage (``baselines``, ``patching``) of ``total`` steps starts."""

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps of the current stage are done."""

    def warn(self, message: str) -> None:
        print(message, file=sys.stderr)

    def message(self, text: str) -> None:
        """A step outside the bar (the report) starts or ends: one line on stderr."""
        print(text, file=sys.stderr)


class BarProgress(RunProgress):
    """A rich progress bar on the terminal, one line per stage (the previous stage's line is hidden)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task: Any = None

    def __enter__(self) -> BarProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def stage(self, name: str, total: int) -> None:
        if self._task is not None:
            self._bar.update(self._task, visible=False)
        self._task = self._bar.add_task(name, total=total)

    def advance(self, steps: int = 1) -> None:
        self._bar.advance(self._task, steps)
