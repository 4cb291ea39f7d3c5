"""Probe benchmark (docs/method.md §16): activations once per question vs one rollout per (site, question),
and the probes of every site, side by side in one process.

- **once**: :func:`latentpatch.probing.activations.record_shard`: one batched rollout per 64 questions
  records every site (every layer x K + 2 positions of ``resid_out``, and the two thought sites);
- **per site**: what a probe loop without a store does: for each site, one rollout per question that
  records that site (the same numbers; checked on a sample);
- **probes**: :func:`latentpatch.probing.probes.probe_all` over every site for one label.

Prints the machine, the seconds of each and the ratio. ``--model random-llama1b`` times a random
LLaMA-3.2-1B-shaped model (``bench/sweep_methods.py``; no weights are downloaded) on random prompts of
GSM8K length.

Usage: python bench/bench_probe.py [--model default] [--questions 2000] [--per-site-questions 20]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from latentpatch.data.questions import questions_from_pairs
from latentpatch.data.synthetic import generate_pairs
from latentpatch.model.load import load_model
from latentpatch.names import probe_position_names
from latentpatch.patching.reading import query_indices
from latentpatch.probing.activations import record_shard


def per_site(model, prompts, layer: int, j: int) -> torch.Tensor:
    """One rollout per question recording ``resid_out`` at ``layer``; row j of the site's positions."""
    out = []
    for prompt in prompts:
        with torch.no_grad():
            r = model.rollout([prompt], record=[("resid_out", layer)])
        idx = query_indices(r.prompt_len, model.num_latent, r.state.length) + [r.prompt_len - 1]
        out.append(r.hooks.recorded("resid_out", layer)[0, idx[j]])
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--per-site-questions", type=int, default=20, help="questions timed per site (then scaled)")
    parser.add_argument("--probes", action="store_true", help="also time the probes of every site for one label")
    args = parser.parse_args()
    torch.set_num_threads(1)
    qs = questions_from_pairs(generate_pairs((args.questions + 1) // 2, seed=0, intermediates=True))
    if args.model == "random-llama1b":  # LLaMA-3.2-1B-shaped random weights, GSM8K-length random prompts
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/ as a package
        from bench.sweep_methods import random_llama1b, synthetic_items

        model = random_llama1b("cpu", torch.float32)
        prompts = [it.clean for it in synthetic_items(model, args.questions)]
    else:
        model = load_model(args.model)
        prompts = [model.prompt_ids(q.question) for q in qs.questions][: args.questions]
    L, K = model.n_layers, model.num_latent
    n_sites = L * len(probe_position_names(K)) + 2 * K
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"
    print(f"machine: {machine}; model {args.model} ({L} layers, K {K}, d {model.d_model})")

    t = time.perf_counter()
    shard = record_shard(model, prompts, ("resid_out",), 64)
    once = time.perf_counter() - t

    sample = prompts[: args.per_site_questions]
    t = time.perf_counter()
    one = per_site(model, sample, L // 2, 1)
    per_site_s = (time.perf_counter() - t) / len(sample)  # seconds per (site, question)
    batched = shard.tensors["resid_out"][: len(sample), L // 2, 1]
    rel = float((one - batched).norm() / batched.norm())  # padding in a batch moves the last bits only
    assert rel < 1e-4, f"the two disagree: relative difference {rel:.1e}"
    naive = per_site_s * n_sites * len(prompts)
    print(f"{len(prompts)} questions, {n_sites} sites; batched vs one question: relative difference {rel:.1e}")
    print(f"once (batched, every site): {once:.1f} s")
    print(
        f"one rollout per (site, question): {per_site_s * 1e3:.1f} ms each -> {naive:.0f} s for every site "
        f"(scaled from {len(sample)} questions)"
    )
    print(f"ratio: {naive / once:.0f}x")
    if args.probes:
        from latentpatch.probing.probes import probe_all

        groups = np.array([q.group for q in qs.questions][: len(prompts)])
        y = [q.intermediates[0] if q.intermediates else None for q in qs.questions][: len(prompts)]
        sites = {
            f"{layer}|{j}": shard.tensors["resid_out"][:, layer, j].numpy() for layer in range(L) for j in range(K + 2)
        }
        sites.update({f"thought|{p}": shard.tensors["thought"][:, p].numpy() for p in range(K)})
        t = time.perf_counter()
        probe_all(sites, y, groups, min_count=10)
        print(f"probes of {len(sites)} sites for one label (intermediate_0): {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
