"""The whole default job, timed side by side: ``latentpatch run`` with one worker process and with
the run's own choice (``--workers`` unset), alternating, each in a fresh process (start-up,
imports, model load, baselines, checks, sweep, report: what a user waits for).

    python bench/bench_job.py --repeats 3 [--extra "--experiments layer"]

Prints the wall time of every run, each step's time from ``manifest.json``, the medians and the
ratio one-worker / default; checks that both write the same result bytes. Record the machine line
with the numbers (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ("load_model_s", "baselines_s", "checks_s", "sweep_s", "assemble_s", "total_s")


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores visible, load {os.getloadavg()[0]:.2f} at start"


def one_run(out: Path, extra: list[str]) -> dict:
    cmd = ["latentpatch", "run", "--out", str(out), "--no-use-cache", *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    lines = (proc.stdout + proc.stderr).splitlines()  # progress messages go to stderr
    report = next((line for line in lines if line.startswith("report: done")), "")
    return {
        "wall_s": wall,
        "report_s": float(report.split()[3]) if report else float("nan"),
        **{k: manifest["timings"].get(k, float("nan")) for k in STEPS},
        "workers": manifest.get("workers", {}).get("count"),
    }


def result_bytes(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "results").rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extra", default="", help="more `latentpatch run` options for both")
    args = ap.parse_args()
    extra = shlex.split(args.extra)
    variants = {"one worker": ["--workers", "1"], "default": []}
    print(f"machine: {machine()}; python {platform.python_version()}")
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, opts in variants.items():
                out = Path(tmp) / f"{name.replace(' ', '_')}_{r}"
                rows[name].append(one_run(out, extra + opts))
                row = rows[name][-1]
                steps = ", ".join(f"{k[:-2]} {row[k]:.1f}" for k in STEPS)
                print(
                    f"{name:>10} run {r + 1}: wall {row['wall_s']:.1f} s (workers {row['workers']}; {steps}; "
                    f"report {row['report_s']:.1f})"
                )
        same = result_bytes(Path(tmp) / "one_worker_0") == result_bytes(Path(tmp) / "default_0")
    med = {name: statistics.median(r["wall_s"] for r in runs) for name, runs in rows.items()}
    for name, m in med.items():
        print(f"median wall, {name}: {m:.1f} s")
    print(f"one worker / default: {med['one worker'] / med['default']:.2f}x; same result bytes: {same}")


if __name__ == "__main__":
    main()
