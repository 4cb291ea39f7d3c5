"""The sweep benchmark's instruments and accounting: what a run costs and what it must cost.

Owns the measurements ``bench/bench_sweep.py`` takes of the sweeps in ``bench/sweep_methods.py``:

- ``TokenCounter``: token positions every forward pass computes (``LatentModel.prefill``/``advance``
  instrumented);
- ``LinearFlops`` and ``matmul_peak``: FLOPs in the model's ``nn.Linear`` products, and the same
  process's ``torch.mm`` peak they are compared with;
- ``measure`` (with ``REPEATS``, set by ``--repeats``): wall time of the fastest run and its token count;
- ``lower_bound``: token positions a sweep must recompute, and ``max_diffs``: the largest metric gap
  between two methods' cells;
- ``peak_extra_bytes``: peak memory a call adds (CUDA, or a forked child's RSS on CPU).

Nothing here runs a sweep; ``bench/bench_atp.py`` uses ``peak_extra_bytes`` too.
"""

from __future__ import annotations

import math
import os
import time

import torch

from latentpatch.model.answering import shared_prefix_length
from latentpatch.model.latent import LatentModel

METRICS = ("kl", "answer_logit_diff", "logit_l2")


# ---- instrumentation -------------------------------------------------------------------------
class TokenCounter:
    """Counts the token positions every forward pass computes (rows x tokens, padding included)."""

    def __init__(self):
        self.n = 0

    def __enter__(self):
        self._advance, self._prefill = LatentModel.advance, LatentModel.prefill
        fwd, pre = self._advance, self._prefill

        def advance(model, state, *, input_ids=None, inputs_embeds=None, **options):
            x = input_ids if input_ids is not None else inputs_embeds
            self.n += x.shape[0] * x.shape[1]
            return fwd(model, state, input_ids=input_ids, inputs_embeds=inputs_embeds, **options)

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


# ---- accounting ------------------------------------------------------------------------------
def lower_bound(model, bases, cells: dict, shared_prefix: bool = True) -> tuple[int, int]:
    """Token positions a sweep must compute for ``cells``: (thoughts p.. + answer start + teacher
    forcing of the three answer strings, + greedy decoding of the patched answers that changed).

    A cell patched at latent p shares the target's prefix before p; it recomputes the K - p thoughts,
    the answer-start tokens and len - 1 tokens of each answer string (the first is predicted at
    [EOT]), A_base with its closing [EOS] (one more position: it tells whether greedy decoding
    would reproduce A_base). Only a cell whose answer differs from A_base must be decoded: that
    feeds min(len(answer), max_answer_tokens - 1) more tokens. The strings' common prefix
    (``shared_prefix_length``) is counted once, as the engine scores it (three times with
    ``shared_prefix=False``: ``--whole-strings``), and so are the tokens two strings feed alike after it."""
    by_id = {b.pair_id: b for b in bases}
    K, start, cap = model.num_latent, len(model.answer_start_ids()), model.config.max_answer_tokens
    rollout = decode = 0
    for (pid, _, p, *_), m in cells.items():
        base = by_id[pid]
        strings = [base.answers["base"][0] + [model.config.eos_id], base.answers["clean"][0], base.answers["corr"][0]]
        n = shared_prefix_length(strings) if shared_prefix else 0
        forced = n + sum(len(fed) for fed in {tuple(s[n:-1]) for s in strings})
        rollout += (K - p) + start + forced
        if list(m["answer_ids"]) != list(base.target.answer_ids):
            decode += min(len(m["answer_ids"]), cap - 1)
    return rollout, decode


def max_diffs(a: dict, b: dict) -> dict:
    out = {}
    for k in METRICS:
        diffs = [abs(a[c][k] - b[c][k]) for c in b if c in a and not (math.isnan(a[c][k]) and math.isnan(b[c][k]))]
        out[k] = max(diffs) if diffs else math.nan
    return out


# ---- peak memory -----------------------------------------------------------------------------
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
