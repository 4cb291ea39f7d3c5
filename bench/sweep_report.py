"""The sweep benchmark's results file: the sections ``bench/bench_sweep.py --out`` writes.

Owns the text of a run's report: ``machine`` (the CPU or GPU it ran on), ``section`` (the timing table,
the fraction of the matmul peak, the speed-ups and the agreement between methods), ``memory_section``
(the ``--memory`` table), and ``update_results``, which replaces one section of a results file such as
``bench/RESULTS.md`` (or appends it). Each takes the report dict ``bench_sweep.main`` builds; nothing
here measures. ``bench/bench_atp.py`` uses ``machine`` and ``update_results`` too.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


# ---- report ----------------------------------------------------------------------------------
def machine(device: torch.device, threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores visible, torch threads {threads}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text


def _header(key: str, r: dict, title: str) -> list[str]:
    return [
        f"<!-- section: {key} -->",
        f"## {title}",
        "",
        f"- date: {r['date']}",
        f"- machine: {r['machine']}",
        f"- command: `{r['command']}`",
        f"- model: {r['model']}; device {r['device']}, dtype {r['dtype']}",
    ]


def section(key: str, r: dict) -> str:
    fmt = lambda x: "n/a" if x is None else f"{x:.3g}"  # noqa: E731
    lines = _header(key, r, r["title"]) + [
        f"- sweep: position sweep, {r['n_layers']} layers x {r['K']} latent positions = {r['cells_per_pair']} cells "
        f"per pair, resid_out, denoise, source values; engine batch size {r['batch_size']}, "
        f"rows shared by several pairs {r['shared_rows']}; wall s = fastest of {r['repeats']} run(s)",
        f"- lower bound per cell (mean): {r['lb_cell']:.1f} token positions = thoughts p..K-1 + answer start + "
        f"teacher forcing of 3 answer strings and A_base's [EOS] ({r['lb_rollout_cell']:.1f}) + greedy decoding of the "
        f"answers that changed ({r['lb_decode_cell']:.1f})",
        "",
        "| method | pairs | cells | wall s | cells/s | token positions computed | per cell | x lower bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in r["methods"].items():
        lines.append(
            f"| {name} | {m['pairs']} | {m['cells']} | {m['wall']:.1f} | {m['cps']:.2f} | {m['tokens']:,} | "
            f"{m['tokens'] / m['cells']:.0f} | {m['tokens'] / m['lb']:.1f} |"
        )
    lines.append("")
    e = r["methods"].get("engine", {})
    if "peak_gflops" in e:
        lines.append(
            f"- engine: {e['linear_gflops']:.1f} GFLOP/s in its nn.Linear products = "
            f"{100 * e['linear_gflops'] / e['peak_gflops']:.0f}% of the same process's matmul peak "
            f"({e['peak_gflops']:.1f} GFLOP/s, {e['peak_n']}^3 torch.mm; attention's products not counted)"
        )
    for name in ("engine, pairs alone", "reference", "nnsight"):
        if name in r["methods"]:
            lines.append(f"- engine vs {name}: {r['methods']['engine']['cps'] / r['methods'][name]['cps']:.2f}x")
    for name, d in r["diffs"].items():
        ok = all(not (v > r["tol"]) for v in d.values())
        lines.append(
            f"- max |engine - {name}|: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in d.items())
            + f" ({'ok' if ok else 'EXCEEDS'} <= {r['tol']:g})"
        )
    if "nnsight" in r["methods"]:
        n = r["methods"]["nnsight"]
        lines.append(
            f"- nnsight's own per-pair baselines ({n['baseline_wall']:.1f} s, {n['baseline_tokens']:,} "
            "positions) are subtracted from its row"
        )
    lines.append(f"<!-- end section: {key} -->")
    return "\n".join(lines) + "\n"


def memory_section(key: str, r: dict) -> str:
    m = r["memory"]
    lines = _header(key, r, f"Memory: {r['title']}") + [
        f"- engine position sweep of one pair (prompt {m['prompt_len']} tokens, longest answer string or greedy answer "
        f"{m['answer_len']} tokens; a chunk holds at most the {r['cells_per_pair']} cells of a pair); peak = "
        f"{r['memory_kind']}; estimates = `latentpatch.pipeline.memory.working_set_bytes` at this pair's answer length "
        f"and at max_answer_tokens {r['max_answer_tokens']} (what `--batch-size auto` assumes); "
        f"`auto_batch_size` here: {r['auto_batch']}",
        "",
        "| batch | effective | peak extra MiB | estimate MiB | estimate at max_answer_tokens MiB | s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {x['batch']} | {x['effective']} | {x['peak_mib']:.0f} | {x['estimate_mib']:.0f} | "
        f"{x['estimate_max_mib']:.0f} | {x['seconds']:.1f} |"
        for x in m["rows"]
    ]
    lines.append(f"<!-- end section: {key} -->")
    return "\n".join(lines) + "\n"


def update_results(path: Path, key: str, text: str) -> None:
    """Replace the ``key`` section of ``path`` (or append it)."""
    old = path.read_text() if path.exists() else "# Sweep benchmarks\n\n"
    pattern = re.compile(rf"<!-- section: {re.escape(key)} -->.*?<!-- end section: {re.escape(key)} -->\n?", re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)
