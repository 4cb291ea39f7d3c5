"""The report built in a process started before the run imports torch.

``latentpatch run`` spends its first seconds importing torch and transformers on one core. A
process forked before that imports the analysis stack (matplotlib, pandas, scipy, pyarrow: about a
second and a half) on the other core and then waits. When the run's pairs are done it assembles
``results/`` there (:func:`latentpatch.assembly.assemble`, whose parquet writer is then already
imported) and builds the report, so the run's end waits for neither import. Anything that goes
wrong in it (no fork, an error while assembling or building) makes :meth:`ReportProcess.assemble`
or :meth:`ReportProcess.build` return False, and the caller does that step itself, so the files and
their errors are the same as without it.

Imports no torch (the analysis side never does).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path


class ReportProcess:
    """A forked child that imports :mod:`latentpatch.analysis.report`, then assembles one run's
    results and builds its report on request.

    >>> process = ReportProcess.start()
    >>> process is None or process.build(Path("/nonexistent/run")) is False  # fails there: the caller builds
    True
    """

    def __init__(self, pid: int, request: int, reply: int) -> None:
        self.pid, self.request, self.reply = pid, request, reply

    @classmethod
    def start(cls) -> ReportProcess | None:
        """Fork the child (Linux only, where forking is safe and cheap); None where it cannot."""
        if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
            return None
        req_read, req_write = os.pipe()
        rep_read, rep_write = os.pipe()
        pid = os.fork()
        if pid:
            os.close(req_read)
            os.close(rep_write)
            return cls(pid, req_write, rep_read)
        os.close(req_write)  # the child: never returns
        os.close(rep_read)
        _serve(req_read, rep_write)
        os._exit(0)

    def assemble(self, run_dir: Path) -> bool:
        """Assemble ``run_dir``'s ``results/`` in the child; False if it did not (the caller then does)."""
        if self._ask("assemble", run_dir):
            return True
        self.close()  # the caller does the rest itself
        return False

    def build(self, run_dir: Path) -> bool:
        """Build ``run_dir``'s report in the child; False if it did not (the caller then builds it)."""
        built = self._ask("report", run_dir)
        self.close()
        return built

    def _ask(self, step: str, run_dir: Path) -> bool:
        if self.pid < 0:
            return False
        try:
            os.write(self.request, f"{step} {run_dir}\n".encode())  # the path as given: the report shows it
            return _read_line(self.reply) == "ok"
        except OSError:
            return False

    def close(self) -> None:
        """End the child (idempotent): it sees the end of its request pipe and exits."""
        if self.pid < 0:
            return
        for fd in (self.request, self.reply):
            try:
                os.close(fd)
            except OSError:
                pass
        os.waitpid(self.pid, 0)
        self.pid = -1


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def _serve(request: int, reply: int) -> None:
    """The child: import the report's modules, then do each request (``assemble PATH``, then
    ``report PATH``) until the run closes the pipe or a step fails."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's to handle
    try:
        from latentpatch.analysis.report import build_report
        from latentpatch.assembly import assemble

        steps: dict[str, Callable[[Path], object]] = {"assemble": assemble, "report": build_report}
        while line := _read_line(request):  # empty: the run ended (with or without a report)
            step, path = line.split(" ", 1)
            steps[step](Path(path))
            os.write(reply, b"ok\n")
    except Exception:  # noqa: BLE001 - the parent does the step itself and shows the error
        os.write(reply, b"failed\n")
