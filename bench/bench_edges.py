"""Edges benchmark (docs/method.md §17): the edge matrix of one pair vs one plain rollout per edge and vs one
position sweep, side by side in one process.

- **edges**: :func:`latentpatch.patching.edges.edge_sweep` of every visible knockout (every head) and the
  K x K path grid of one pair, batched from the target's shared prefix (``--batch-size``);
- **one edge per batch**: the same edges with ``batch_size=1`` (``--engine reference``'s path);
- **plain rollout per edge**: one full rollout of the target prompt and the plain answers
  (:func:`~latentpatch.patching.cells.reference_answers`: greedy decoding, the three answer strings
  teacher-forced) per edge: what a loop without the engine pays (the mask itself costs nothing extra);
- **position sweep**: :func:`~latentpatch.patching.engine.sweep_fast` of the position specs of the same pair.

Each timing is the best of ``--repeats``; prints the machine, the seconds and the ratios, and checks that
the batched and one-per-batch edges agree.

Usage: python bench/bench_edges.py [--model default] [--pairs 1] [--repeats 3] [--batch-size 64] [--heads]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

from latentpatch.data.synthetic import generate_pairs
from latentpatch.model.heads import head_shape
from latentpatch.model.load import load_model
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
from latentpatch.patching.cells import cell_results, reference_answers
from latentpatch.patching.edges import edge_sweep, knockout_edges, path_edges
from latentpatch.patching.engine import EngineOptions, sweep_fast
from latentpatch.patching.specs import EngineConfig, PatchSpec, position_specs


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def time_pair(model, base, edges, batch_size: int, repeats: int) -> tuple[dict[str, float], float]:
    """Seconds of each way on one pair, and the largest |kl| difference batched vs one edge per batch."""
    opts = EngineOptions(batch_size)
    fast = edge_sweep(model, base, edges, options=opts)
    single = edge_sweep(model, base, edges, options=EngineOptions(1))
    diff = max(abs(a["kl"] - b["kl"]) for a, b in zip(fast, single))
    spec = PatchSpec("edges", "plain", "edge", -1, (0,), 0)

    def plain_one() -> None:
        with torch.no_grad():
            r = model.rollout([base.target.prompt])
            cell_results(model, [base], [spec], reference_answers(model, [base], r.state, r.answer_logits), {})

    specs = position_specs(model.n_layers, model.num_latent)
    values = replacement_values(base, EngineConfig())
    seconds = {
        "edges": best(lambda: edge_sweep(model, base, edges, options=opts), repeats),
        "one per batch": best(lambda: edge_sweep(model, base, edges, options=EngineOptions(1)), 1),
        "plain per edge": best(plain_one, repeats) * len(edges),
        "position sweep": best(lambda: sweep_fast(model, base, specs, values, opts), repeats),
    }
    return seconds, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--pairs", type=int, default=1, help="pairs timed (the seconds are per pair)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--heads", action="store_true", help="also each head's knockouts (--edge-heads)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    K = model.num_latent
    edges = knockout_edges(K, head_shape(model.lm)[0] if args.heads else 0) + path_edges(K)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"
    print(f"machine: {machine}; model {args.model} ({model.n_layers} layers, K {K}, d {model.d_model})")
    totals = {"edges": 0.0, "one per batch": 0.0, "plain per edge": 0.0, "position sweep": 0.0}
    worst = 0.0
    for pair in generate_pairs(args.pairs, seed=0):
        clean, corr = (record_run(model, model.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
        base = prepare_pair(model, pair.pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer)
        seconds, diff = time_pair(model, base, edges, args.batch_size, args.repeats)
        worst = max(worst, diff)
        for k, v in seconds.items():
            totals[k] += v
    n = args.pairs
    print(f"{len(edges)} edges per pair ({'with' if args.heads else 'without'} per-head knockouts); {n} pair(s)")
    print(f"batched vs one edge per batch: max |kl difference| {worst:.1e}")
    for name, seconds in totals.items():
        print(f"{name}: {seconds / n:.3f} s per pair")
    e = totals["edges"]
    print(f"plain rollout per edge / edges: {totals['plain per edge'] / e:.1f}x")
    print(f"one edge per batch / edges: {totals['one per batch'] / e:.1f}x")
    print(f"edges / position sweep ({model.n_layers * K} specs): {e / totals['position sweep']:.2f}x")


if __name__ == "__main__":
    main()
