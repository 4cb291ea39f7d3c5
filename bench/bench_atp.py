"""Attribution patching vs exact patching (docs/method.md §15), side by side in one process.

For each pair, every site of the position sweep of the four block components (resid_pre, resid_out,
attn_out, mlp_out × layer × latent position; denoise, source values) is computed two ways:

- ``atp``: :func:`latentpatch.patching.atp.attribution_patching`, the ``full`` path only (one forward
  of the target rollout with gradients + one backward), and ``atp both paths`` (+ the recurrence cut);
- ``exact``: :func:`latentpatch.patching.engine.sweep_fast` on the same sites (batch size 64),
  through :func:`latentpatch.patching.atp.exact_effects`.

Baselines (``record_run``/``prepare_pair``) are computed once, outside the timed region. Printed: wall
times, the ratio exact / AtP, and the agreement (Pearson and Spearman pooled over pairs and sites,
their mean over pairs, top-10 overlap: :func:`latentpatch.analysis.atp_section.agreement`).

``--memory``: peak RSS growth (forked child) of one pair's attribution patching (both paths) on the
model, after its baselines; with ``--model random-llama1b`` a LLaMA-3.2-1B-shaped random model
(``bench/sweep_methods.py``'s, the model of ``bench/bench_sweep.py``) and a GSM8K-length prompt (80-120 tokens).

Examples::

    python bench/bench_atp.py --model default --pairs 4 --out bench/RESULTS.md
    python bench/bench_atp.py --model smollm2 --pairs 2 --out bench/RESULTS.md
    python bench/bench_atp.py --model random-llama1b --dtype float32 --pairs 1 --memory-only --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sweep_instruments import peak_extra_bytes  # noqa: E402
from bench.sweep_methods import load  # noqa: E402
from bench.sweep_report import machine, update_results  # noqa: E402
from latentpatch.analysis.atp_section import agreement  # noqa: E402
from latentpatch.names import COMPONENTS  # noqa: E402
from latentpatch.patching.atp import attribution_patching, exact_effects  # noqa: E402
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values  # noqa: E402
from latentpatch.patching.specs import EngineConfig  # noqa: E402

BATCH = 64


def baselines(model, items):
    out = []
    for it in items:
        clean, corr = record_run(model, it.clean), record_run(model, it.corrupted)
        out.append(prepare_pair(model, it.pair_id, clean, corr, it.clean_answer, it.corrupted_answer))
    return out


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def compare(model, bases) -> dict:
    """Per pair: AtP (full path; both paths) and exact on every site, timed side by side."""
    rows, t_full, t_both, t_exact = [], 0.0, 0.0, 0.0
    for b in bases:
        values = replacement_values(b, EngineConfig())
        _, s = timed(attribution_patching, model, b, values, COMPONENTS, paths=("full",))
        t_full += s
        res, s = timed(attribution_patching, model, b, values, COMPONENTS)
        t_both += s
        sites = list(res.sites())
        exact, s = timed(exact_effects, model, b, sites, values, batch_size=BATCH)
        t_exact += s
        rows += [
            {
                "pair_id": b.pair_id,
                "component": c,
                "layer": layer,
                "position": p,
                "atp": res.value("full", (c, layer, p)),
                "atp_attention": res.value("attention", (c, layer, p)),
                "exact": e,
                "checked": True,
            }
            for (c, layer, p), e in zip(sites, exact)
        ]
        print(f"{b.pair_id}: atp {t_full:.2f} s, both paths {t_both:.2f} s, exact {t_exact:.2f} s (cumulative)")
    a = agreement(pd.DataFrame(rows))
    return {
        "sites_per_pair": len(rows) // max(len(bases), 1),
        "t_full": t_full,
        "t_both": t_both,
        "t_exact": t_exact,
        "agreement": a,
    }


def section(key: str, r: dict) -> str:
    a = r["agreement"]
    comp = ", ".join(f"{g} {v['pearson']:.3f}/{v['spearman']:.3f}" for g, v in a["by_component"].items())
    lines = [
        f"<!-- section: {key} -->",
        f"## AtP vs exact: {r['model']}",
        "",
        f"- date: {r['date']}",
        f"- machine: {r['machine']}",
        f"- command: `{r['command']}`",
        f"- sites: position sweep of {', '.join(COMPONENTS)} = {r['sites_per_pair']} per pair; denoise, source values; "
        f"exact = `sweep_fast` batch {BATCH}",
        "",
        "| method | pairs | sites | wall s | s per pair |",
        "|---|---:|---:|---:|---:|",
    ]
    n = r["pairs"]
    for name, t in (("AtP (full path)", r["t_full"]), ("AtP (both paths)", r["t_both"]), ("exact", r["t_exact"])):
        lines.append(f"| {name} | {n} | {n * r['sites_per_pair']} | {t:.2f} | {t / n:.2f} |")
    lines += [
        "",
        f"- exact / AtP (full path): **{r['t_exact'] / r['t_full']:.1f}x**; exact / AtP (both paths): "
        f"**{r['t_exact'] / r['t_both']:.1f}x**",
        f"- agreement (full path vs exact): Pearson {a['pearson']:.3f}, Spearman {a['spearman']:.3f} pooled; "
        f"per pair (mean) Pearson {a['pair_pearson']:.3f}, Spearman {a['pair_spearman']:.3f}; "
        f"top-10 overlap {a['top_overlap']:.2f}",
        f"- per component (Pearson/Spearman, pooled): {comp}",
        f"<!-- end section: {key} -->",
        "",
    ]
    return "\n".join(lines)


def memory_section(key: str, r: dict) -> str:
    lines = [
        f"<!-- section: {key} -->",
        f"## AtP memory: {r['model']}",
        "",
        f"- date: {r['date']}",
        f"- machine: {r['machine']}",
        f"- command: `{r['command']}`",
        f"- one pair, prompt {r['prompt_len']} tokens, K {r['K']}, {r['n_sites']} sites; attribution patching "
        "with both paths (two forwards with gradients, two backwards); peak = peak RSS growth of a forked child "
        "over the process after loading the model and recording the baselines",
        f"- weights: {r['weights_mib']:.0f} MiB; process RSS before: {r['rss_before_mib']:.0f} MiB",
        f"- **peak extra: {r['peak_mib']:.0f} MiB** (wall {r['seconds']:.1f} s); weights + peak extra = "
        f"{r['weights_mib'] + r['peak_mib']:.0f} MiB",
        f"<!-- end section: {key} -->",
        "",
    ]
    return "\n".join(lines)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory(model, bases, args, command) -> str:
    b = bases[0]
    values = replacement_values(b, EngineConfig())
    fn = functools.partial(attribution_patching, model, b, values, COMPONENTS)
    before = rss_mib()
    t = time.perf_counter()
    peak = peak_extra_bytes(fn, torch.device("cpu"))
    r = {
        "model": model.name or args.model,
        "date": datetime.date.today().isoformat(),
        "machine": machine(torch.device("cpu"), args.threads),
        "command": command,
        "prompt_len": len(b.target.prompt),
        "K": model.num_latent,
        "n_sites": len(COMPONENTS) * model.n_layers * model.num_latent,
        "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "rss_before_mib": before,
        "peak_mib": peak / 2**20,
        "seconds": time.perf_counter() - t,
    }
    print(f"memory: peak extra {r['peak_mib']:.0f} MiB over RSS {before:.0f} MiB (weights {r['weights_mib']:.0f} MiB)")
    return memory_section(f"atp-{args.model}-memory", r)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default | smollm2 | random-llama1b[-tiny] | a load_model spec")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--memory", action="store_true", help="also measure the peak memory of one pair's AtP")
    ap.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    ap.add_argument("--out", default=None, help="update this model's sections of a results file (bench/RESULTS.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python bench/bench_atp.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    model, items = load(args.model, "cpu", getattr(torch, args.dtype), args.pairs)
    bases = baselines(model, items)
    texts = []
    if not args.memory_only:
        r = compare(model, bases)
        r |= {
            "model": f"{model.name or args.model} ({model.n_layers} layers, d {model.d_model}, K {model.num_latent})",
            "pairs": len(bases),
            "date": datetime.date.today().isoformat(),
            "machine": machine(torch.device("cpu"), args.threads),
            "command": command,
        }
        a = r["agreement"]
        print(
            f"exact / AtP: {r['t_exact'] / r['t_full']:.1f}x (full path), {r['t_exact'] / r['t_both']:.1f}x (both); "
            f"Pearson {a['pearson']:.3f}, Spearman {a['spearman']:.3f}, per pair {a['pair_pearson']:.3f} / "
            f"{a['pair_spearman']:.3f}, top-10 overlap {a['top_overlap']:.2f}"
        )
        texts.append((f"atp-{args.model}", section(f"atp-{args.model}", r)))
    if args.memory or args.memory_only:
        texts.append((f"atp-{args.model}-memory", memory(model, bases, args, command)))
    if args.out:
        for key, text in texts:
            update_results(Path(args.out), key, text)


if __name__ == "__main__":
    main()
