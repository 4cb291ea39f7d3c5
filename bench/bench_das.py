"""DAS benchmark (docs/method.md §20): a training step batched over pairs with the base run's prefix
reused, vs an unbatched loop that recomputes each pair's prefix, side by side in one process.

- **batched**: :func:`latentpatch.probing.das.train_subspace`: each step forks the base runs' cache up
  to the site for a batch of pairs and runs the rest of the latent loop once, with gradients;
- **unbatched**: what a plain loop does: per pair, the prompt pass and every thought from 0 with the
  interchange at the site, the answer scored, backward; one optimizer step per batch (same loss: checked);
- **fit**: ``--fit-steps`` steps of the batched fit to time one (site, k) to its plateau (loss printed).

Prints the machine, seconds per step of each, their ratio, and the peak resident memory (RSS) after the
model and the base runs are in memory and after the steps. ``--model random-llama1b`` times a random
LLaMA-3.2-1B-shaped model (``bench/sweep_methods.py``; nothing downloaded) on GSM8K-length random prompts.

Usage: python bench/bench_das.py [--model default] [--site thought.t1] [--k 16] [--batch 16] [--steps 5]
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import ActivationHooks, Edit
from latentpatch.probing.das import DasSet, DasSite, Example, Subspace, Training, das_loss, train_subspace


def rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def examples_for(model: LatentModel, name: str, n: int) -> list[Example]:
    if name.startswith("random-llama1b"):
        from bench.sweep_methods import synthetic_items

        items = synthetic_items(model, n + 1)
        return [
            Example(tuple(a.clean), tuple(b.clean), float(a.clean_answer + 1), a.pair_id)
            for a, b in zip(items, items[1:])
        ]
    from latentpatch.data.pairs import load_pairs
    from latentpatch.pipeline.das import draw_examples, problems_of
    from latentpatch.pipeline.selection import default_pairs_path

    return draw_examples(problems_of(model, load_pairs(default_pairs_path())), ("intermediate", "0"), n, 0)


def unbatched_loss(data: DasSet, site: DasSite, sub: Subspace, rows: torch.Tensor) -> float:
    """One batch the plain way: per pair, the whole rollout from the prompt with the interchange, backward."""
    model, total = data.model, 0.0
    for i in rows.tolist():
        src = data.source_values[site][i : i + 1]
        with model.grad_mode(True):
            state, h = model.prefill([list(data.examples[i].base)])
            hooks, step_hook = None, None
            if site.component == "thought":
                step_hook = lambda p, t: sub(t, src) if p == site.position else t  # noqa: E731, B023
            else:
                at = torch.tensor([state.length + site.position])
                edit = Edit(site.component, site.layer, at, torch.tensor([True]), lambda a, b: sub(a, src[b]))  # noqa: B023
                hooks = ActivationHooks(model.lm, writes=[edit])
            with hooks if hooks is not None else nullcontext():
                model.run_thoughts(state, model.feedback(h), 0, hooks=hooks, step_hook=step_hook)
                end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), 1), hooks=hooks)
            ids, start = data.targets[i]
            out = model.score(state, model.logits(end[:, -1]), [[ids]], grad=True)[0][0]
            loss = torch.nn.functional.cross_entropy(out[start:].double(), torch.tensor(ids[start:])) / len(rows)
        loss.backward()
        total += float(loss.detach())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--site", default="thought.t1")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="steps timed for each of batched and unbatched")
    parser.add_argument("--fit-steps", type=int, default=0, help="also time a fit of this many batched steps")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/ as a package
    if args.model.startswith("random-llama1b"):
        from bench.sweep_methods import random_llama1b

        tiny = dict(n_layers=2, d=64, heads=4, kv_heads=2, inter=128) if args.model.endswith("-tiny") else {}
        model = random_llama1b(args.device, torch.float32, **tiny)
    else:
        from latentpatch.model.load import load_model

        model = load_model(args.model, device=args.device)
    from latentpatch.probing.das import parse_das_sites

    (site,) = parse_das_sites(args.site, model.n_layers, model.num_latent)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), {args.device}"
    print(f"machine: {machine}; model {args.model} ({model.n_layers} layers, K {model.num_latent}, d {model.d_model})")
    print(f"peak RSS after loading the model: {rss_gb():.2f} GB")
    t = time.perf_counter()
    data = DasSet(model, examples_for(model, args.model, args.pairs), [site])
    print(f"{len(data)} pairs: base and source runs in {time.perf_counter() - t:.1f} s; peak RSS {rss_gb():.2f} GB")

    settings = Training(steps=args.steps, batch=args.batch, lr=0.01, seed=0)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    train_subspace(data, site, args.k, settings)
    batched = (time.perf_counter() - t) / args.steps
    gpu = (
        f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GB"
        if args.device.startswith("cuda")
        else ""
    )
    print(
        f"batched (prefix reused), batch {args.batch}, k {args.k}: {batched:.3f} s/step; "
        f"peak RSS {rss_gb():.2f} GB{gpu}"
    )

    sub = Subspace(model.d_model, args.k, seed=0)
    rows = torch.arange(min(args.batch, len(data)))
    with model.grad_mode(True):
        ref = float(das_loss(data, site, rows, sub).detach())
    plain = unbatched_loss(data, site, sub, rows)
    assert abs(plain - ref) <= 1e-3 * max(1.0, abs(ref)), f"the two disagree: {plain} vs {ref}"
    opt = torch.optim.Adam(sub.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(args.steps):
        opt.zero_grad()
        unbatched_loss(data, site, sub, torch.randperm(len(data), generator=g)[: args.batch])
        opt.step()
    unbatched = (time.perf_counter() - t) / args.steps
    print(f"unbatched (prefix recomputed per pair): {unbatched:.3f} s/step; same loss: {plain:.5f} vs {ref:.5f}")
    print(f"ratio: {unbatched / batched:.1f}x")
    if args.fit_steps:
        t = time.perf_counter()
        _, losses = train_subspace(data, site, args.k, Training(args.fit_steps, args.batch, 0.01, 0))
        marks = ", ".join(f"{i}: {losses[i]:.2f}" for i in range(0, len(losses), max(1, len(losses) // 5)))
        print(
            f"fit of {args.fit_steps} steps: {time.perf_counter() - t:.1f} s; loss by step {marks}, "
            f"last {losses[-1]:.2f}"
        )


if __name__ == "__main__":
    main()
