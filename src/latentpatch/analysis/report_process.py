"""The report built in a process started before the run imports torch.

``latentpatch run`` spends its first seconds importing torch and transformers on one core. A
process forked before that imports the analysis stack (matplotlib, pandas, scipy: about a second
and a half) on the other core and then waits; when the run is done it builds the report there, so
the run's end does not wait for those imports. Anything that goes wrong in it (no fork, an error
while building) makes :meth:`ReportProcess.build` return False, and the caller builds the report
itself, so the report and its errors are the same as without it.

Imports no torch (the analysis side never does).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


class ReportProcess:
    """A forked child that imports :mod:`latentpatch.analysis.report` and builds one report on request.

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

    def build(self, run_dir: Path) -> bool:
        """Build ``run_dir``'s report in the child; False if it did not (the caller then builds it)."""
        try:
            os.write(self.request, f"{run_dir}\n".encode())  # as given: the report shows it
            answer = _read_line(self.reply)
        except OSError:
            answer = ""
        self.close()
        return answer == "ok"

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
    """The child: import the report's modules, wait for one run directory, build its report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's to handle
    try:
        from latentpatch.analysis.report import build_report

        path = _read_line(request)
        if not path:  # the run ended without a report to build
            return
        build_report(Path(path))
        os.write(reply, b"ok\n")
    except Exception:  # noqa: BLE001 - the parent builds the report itself and shows the error
        os.write(reply, b"failed\n")
