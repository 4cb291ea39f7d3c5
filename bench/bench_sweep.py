"""Position-sweep benchmark: the engine vs the naive reference vs nnsight, on the same inputs.

One process, one model, the same pairs. The sweep is the position sweep (docs/method.md §5) (every layer x
every latent position, component resid_out, denoise, source values), computed three ways:

- ``engine``: :func:`latentpatch.patching.engine.sweep_pairs` (shared KV prefix, batched patches, and
  several pairs' chunks in one batch where ``latentpatch run`` would share them: ``--shared-rows``;
  then also timed with each pair alone, side by side);
- ``reference``: :func:`latentpatch.patching.engine.sweep_reference` (one full hooked rollout per cell);
- ``nnsight``: ``bench/nnsight_impl.py`` (one nnsight-traced rollout per cell).

Baselines (``record_run``/``prepare_pair``) are computed once, outside the timed region, and shared
by the engine and the reference; the nnsight sweep computes its own per-pair baselines (2 rollouts
per pair), which are timed separately and subtracted. Every method's forward passes are counted in
token positions (``LatentModel.prefill``/``advance`` instrumented) and compared with the lower bound
a sweep must recompute. All three must agree on kl / answer_logit_diff / logit_l2 (<= 1e-4 in fp32).
The engine's FLOPs in its ``nn.Linear`` products (counted in a second, untimed run) per second of its
timed run are printed as a fraction of the same process's ``torch.mm`` peak.

Examples::

    python bench/bench_sweep.py --model smollm2 --pairs 2 --threads 1 --out bench/RESULTS.md
    python bench/bench_sweep.py --model default --pairs 4 --threads 1 --memory 1,4,16 --out bench/RESULTS.md
    python bench/bench_sweep.py --model random-llama1b --device cuda --dtype bfloat16 --pairs 57 \\
        --reference-pairs 4 --memory 8,32,64,96 --out bench/RESULTS.md

This file is the command line and the run (``main``): the sweeps, models and pairs are in
``bench/sweep_methods.py``, the token / FLOP / memory instruments and the lower bound in
``bench/sweep_instruments.py``, the results-file sections in ``bench/sweep_report.py``.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import sweep_instruments, sweep_methods  # noqa: E402
from bench.sweep_instruments import LinearFlops, lower_bound, matmul_peak, max_diffs, measure  # noqa: E402
from bench.sweep_methods import (  # noqa: E402
    engine_sweep,
    influence_values,
    load,
    memory_table,
    nnsight_sweep,
    reference_sweep,
)
from bench.sweep_report import machine, memory_section, section, update_results  # noqa: E402
from latentpatch.patching.baselines import prepare_pair, record_run  # noqa: E402
from latentpatch.patching.specs import position_specs  # noqa: E402
from latentpatch.patching.steps import influence_specs  # noqa: E402
from latentpatch.pipeline.memory import auto_batch_size  # noqa: E402
from latentpatch.pipeline.threads import shared_rows  # noqa: E402


# ---- main ------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        default="default",
        help="default | smollm2 | random-llama1b | any latentpatch model spec (config:llama, gguf:PATH, ...)",
    )
    ap.add_argument("--pairs", type=int, default=2, help="pairs swept by the engine")
    ap.add_argument(
        "--reference-pairs",
        type=int,
        default=None,
        help="pairs swept by the reference and nnsight (default: --pairs); ratios are per cell",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (stated in the results)")
    ap.add_argument("--batch-size", default="64", help="engine batch size (the run's default 64), or auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=1, help="time each sweep this many times; the fastest counts")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-nnsight", action="store_true")
    ap.add_argument(
        "--whole-strings",
        action="store_true",
        help="engine: feed each answer string whole instead of their common prefix once (the default, §7.2)",
    )
    ap.add_argument(
        "--shared-rows",
        default="run",
        help="rows of a batch several pairs share: run (what latentpatch run picks here), none (each pair "
        "alone), or a number; with sharing, the engine is also timed with each pair alone",
    )
    ap.add_argument(
        "--experiment",
        default="position",
        choices=["position", "influence"],
        help="cells swept: the position sweep, or the K x 3 influence interventions (docs/method.md §13; no nnsight)",
    )
    ap.add_argument("--memory", default="", help="comma list of batch sizes to measure peak memory for")
    ap.add_argument("--memory-only", action="store_true", help="only the memory table (no timing)")
    ap.add_argument("--out", default=None, help="update this model's section of a results file (bench/RESULTS.md)")
    ap.add_argument("--key", default=None, help="section name in --out (default: from --model and --device)")
    args = ap.parse_args(argv)
    sweep_methods.SHARED_PREFIX = not args.whole_strings
    sweep_instruments.REPEATS = max(1, args.repeats)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n_ref = min(args.reference_pairs or args.pairs, args.pairs)
    t = time.perf_counter()
    model, items = load(args.model, args.device, dtype, args.pairs)
    print(
        f"loaded {model.name or args.model}: {model.n_layers} layers, K={model.num_latent}, d={model.d_model}, "
        f"{len(items)} pairs, {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    batch = auto_batch_size(model) if args.batch_size == "auto" else int(args.batch_size)
    if args.shared_rows == "run":
        sweep_methods.SHARED_ROWS = shared_rows(model.d_model, model.n_layers, on_cpu=device.type == "cpu")
    else:
        sweep_methods.SHARED_ROWS = None if args.shared_rows == "none" else int(args.shared_rows)
    specs = position_specs(model.n_layers, model.num_latent)
    if args.experiment == "influence":
        specs, args.skip_nnsight = influence_specs(model.num_latent), True

    # Baselines once, outside the timed region, shared by engine and reference.
    t = time.perf_counter()
    bases = [
        prepare_pair(
            model,
            it.pair_id,
            record_run(model, it.clean),
            record_run(model, it.corrupted),
            it.clean_answer,
            it.corrupted_answer,
        )
        for it in items
    ]
    if args.experiment == "influence":
        influence_values(model, bases)
    print(f"baselines: {time.perf_counter() - t:.1f} s", flush=True)
    engine_sweep(model, bases[:1], specs[:2], batch)  # warm-up (allocator, lazy inits)

    results, methods = {}, {}

    def record(name, out, wall, tokens, pairs):
        results[name] = out
        rollout, decode = lower_bound(model, bases, out, shared_prefix=sweep_methods.SHARED_PREFIX)
        methods[name] = {
            "pairs": pairs,
            "cells": len(out),
            "wall": wall,
            "cps": len(out) / wall,
            "tokens": tokens,
            "lb": rollout + decode,
            "lb_rollout": rollout,
            "lb_decode": decode,
        }
        print(
            f"{name}: {len(out)} cells in {wall:.1f} s = {len(out) / wall:.2f} cells/s; {tokens:,} token positions "
            f"({tokens / (rollout + decode):.1f}x the lower bound)",
            flush=True,
        )

    if not args.memory_only:
        record("engine", *measure(lambda: engine_sweep(model, bases, specs, batch), device), len(bases))
        if sweep_methods.SHARED_ROWS is not None:  # side by side: the same engine with each pair alone
            alone = measure(lambda: engine_sweep(model, bases, specs, batch, shared_rows=None), device)
            record("engine, pairs alone", *alone, len(bases))
        with LinearFlops(model) as counted:  # a second, untimed engine run: the hooks cost time
            engine_sweep(model, bases, specs, batch)
        peak, n = matmul_peak(device, dtype)
        achieved = counted.flops / methods["engine"]["wall"]
        methods["engine"].update(linear_gflops=achieved / 1e9, peak_gflops=peak / 1e9, peak_n=n)
        print(
            f"engine: {achieved / 1e9:.1f} GFLOP/s in its nn.Linear products = {100 * achieved / peak:.0f}% of this "
            f"process's matmul peak ({peak / 1e9:.1f} GFLOP/s, {n}x{n}x{n} torch.mm)",
            flush=True,
        )
    if not (args.skip_reference or args.memory_only):
        record("reference", *measure(lambda: reference_sweep(model, bases[:n_ref], specs), device), n_ref)
    if not (args.skip_nnsight or args.memory_only):
        nnsight_sweep(model, items[:1], baselines_only=True)  # warm-up: NNsight wraps the modules
        _, base_wall, base_tokens = measure(lambda: nnsight_sweep(model, items[:n_ref], baselines_only=True), device)
        out, wall, tokens = measure(lambda: nnsight_sweep(model, items[:n_ref]), device)
        record("nnsight", out, wall - base_wall, tokens - base_tokens, n_ref)
        methods["nnsight"].update(baseline_wall=base_wall, baseline_tokens=base_tokens)

    tol = 1e-4 if dtype == torch.float32 else 5e-2
    compared = ("engine, pairs alone", "reference", "nnsight")
    diffs = {name: max_diffs(results["engine"], results[name]) for name in compared if name in results}
    for name in compared:
        if name in methods:
            print(
                f"engine vs {name}: {methods['engine']['cps'] / methods[name]['cps']:.1f}x; max diffs "
                + ", ".join(f"{k} {v:.2g}" for k, v in diffs[name].items()),
                flush=True,
            )

    report = {
        "title": f"{model.name or args.model} ({args.device}, {args.dtype})",
        "date": datetime.date.today().isoformat(),
        "machine": machine(device, args.threads),
        "command": "python bench/bench_sweep.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "model": f"{model.name or args.model}: {model.n_layers} layers, d {model.d_model}, K {model.num_latent}, "
        f"vocab {model.vocab_size}, mean prompt {sum(len(b.target.prompt) for b in bases) / len(bases):.0f} tokens",
        "device": args.device,
        "dtype": args.dtype,
        "n_layers": model.n_layers,
        "K": model.num_latent,
        "cells_per_pair": len(specs),
        "batch_size": batch,
        "shared_rows": sweep_methods.SHARED_ROWS,
        "repeats": sweep_instruments.REPEATS,
        "methods": methods,
        "diffs": diffs,
        "tol": tol,
        "auto_batch": auto_batch_size(model),
        "max_answer_tokens": model.config.max_answer_tokens,
        "memory_kind": "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS growth of a forked child",
    }
    if methods:
        e = methods["engine"]
        report.update(
            lb_cell=e["lb"] / e["cells"],
            lb_rollout_cell=e["lb_rollout"] / e["cells"],
            lb_decode_cell=e["lb_decode"] / e["cells"],
        )
    if args.memory:
        rows, prompt_len, answer_len = memory_table(
            model, bases, specs, [int(x) for x in args.memory.split(",")], device
        )
        report["memory"] = {"rows": rows, "prompt_len": prompt_len, "answer_len": answer_len}
    if args.out:
        key = args.key or re.sub(r"[^a-z0-9]+", "-", f"{args.model.split('/')[-1]}-{device.type}".lower())
        if methods:
            update_results(Path(args.out), key, section(key, report))
        if args.memory:
            update_results(Path(args.out), key + "-memory", memory_section(key + "-memory", report))
        print(f"updated {args.out}")
    return report


if __name__ == "__main__":
    main()
