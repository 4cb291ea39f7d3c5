"""Scaling one run: one process vs ``--workers 2`` (forked) vs ``--executor ray`` with two replicas, side by side.

The default job (``latentpatch run``: layer, position and iterative sweeps of the default model over
the default pairs; ``--limit`` to shorten it), run three times into fresh run directories with one
shared, pre-warmed activation cache (so every run's baselines are cache hits and the three differ only
in how the per-pair work is executed). Printed: each run's wall time and sweep time, the speed-ups
against one process, Ray's start (cluster + replicas: model loads), transfer (pickling and putting each
stage's work) and driver time (scheduling, receiving results, committing: per pair), and whether the
three ``results/`` trees are the same bytes.

Ray starts its own local cluster here (``ray.init(num_cpus=--cpus)``), as ``latentpatch run
--executor ray`` does without ``--ray-address``; the cluster's start is timed separately.

Example::

    python bench/bench_scale.py --limit 20 --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from latentpatch.pipeline.run import RunConfig, run_experiments


def files(run: Path) -> dict[str, bytes]:
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted((run / "results").rglob("*")) if f.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="first N default pairs (default: all 57)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--out", type=Path, default=None, help="append a section to this results file")
    args = ap.parse_args()
    import ray
    import torch

    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    base = dict(limit=args.limit, report=False, cache_dir=str(root / "cache"), threads=1)
    run_experiments(RunConfig(out=str(root / "warm"), workers=1, **base), progress=False)  # fills the cache

    def timed(name: str, **kw) -> tuple[float, dict]:
        t = time.perf_counter()
        out = run_experiments(RunConfig(out=str(root / name), **base, **kw), progress=False)
        wall = time.perf_counter() - t
        return wall, json.loads((out / "manifest.json").read_text())

    one_s, one = timed("one", workers=1)
    fork_s, fork = timed("fork", workers=2)
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    init_s = time.perf_counter() - t
    ray_s, rayed = timed("ray", executor="ray", workers=2)
    from latentpatch.pipeline.ray_executor import release

    release()
    ray.shutdown()
    same = files(root / "one") == files(root / "fork") == files(root / "ray")
    n = one["n_pairs"]
    t1, tf, tr = one["timings"], fork["timings"], rayed["timings"]
    work = lambda t: t["checks_s"] + t["sweep_s"]  # noqa: E731 - the part the executor runs
    lines = [
        f"| one process | {one_s:.1f} | {work(t1):.1f} | 1.00x | |",
        f"| --workers 2 (forked) | {fork_s:.1f} | {work(tf):.1f} | {work(t1) / work(tf):.2f}x | |",
        f"| --executor ray, 2 replicas | {ray_s:.1f} | {work(tr) - tr['ray_start_s']:.1f} | "
        f"{work(t1) / (work(tr) - tr['ray_start_s']):.2f}x (with the replicas' start: {work(t1) / work(tr):.2f}x) | "
        f"cluster start {init_s:.1f} s (outside the run), replicas' start {tr['ray_start_s']:.1f} s, "
        f"work shipped {tr['ray_ship_s'] * 1000:.0f} ms, driver {tr['ray_driver_s'] / n * 1000:.1f} ms per pair |",
    ]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    text = (
        f"\n## Scaling one run: one process, --workers 2, --executor ray ({datetime.date.today()})\n\n"
        f"CPU: {cpu}, {len(__import__('os').sched_getaffinity(0))} cores, torch threads 1, torch {torch.__version__}, "
        f"ray {ray.__version__}, Python {platform.python_version()}. Command: "
        f"`python bench/bench_scale.py{' --limit ' + str(args.limit) if args.limit else ''}` (the default job, "
        f"{n} pairs, baselines from a warm cache).\n\n"
        "| executor | wall s | checks + sweep s | speed-up (checks + sweep) | overhead |\n|---|---:|---:|---:|---|\n"
        + "\n".join(lines)
        + f"\n\nresults/ the same bytes in all three: {same}.\n"
    )
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
