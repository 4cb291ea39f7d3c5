"""User-facing errors.

A :class:`LatentPatchError` is a problem with the user's input (a file, a flag, a checkpoint),
not a bug. The CLI prints its message as one line on stderr and exits with code 2, without a
traceback. Messages name the file/field/flag and say how to fix it.
"""

from __future__ import annotations


class LatentPatchError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep the message on one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))


class RunInterrupted(LatentPatchError):
    """A run stopped by Ctrl-C: one line saying how far it got and how to continue, exit code 130."""

    exit_code = 130
