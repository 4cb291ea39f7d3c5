"""The benchmarks' own instruments (bench/bench_sweep.py), against plain computations."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from latentpatch.model.load import load_model

ROOT = Path(__file__).resolve().parents[1]


def bench_sweep():
    spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "bench" / "bench_sweep.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sweep"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_linear_flops_count_the_dense_products_of_a_forward():
    """A prompt pass of T tokens runs every layer's projections and MLP on T rows and neither the LM
    head nor prj: 2 x T x (the layers' weight entries) FLOPs, from the model's config."""
    bench, model = bench_sweep(), load_model("default")
    cfg = model.lm.config
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_token = layers * (d * q + 2 * d * kv + q * d + 3 * d * inter)
    prompt = list(range(5, 5 + 11))
    with torch.no_grad(), bench.LinearFlops(model) as counted:
        model.prefill([prompt, prompt])
    assert counted.flops == 2 * 2 * len(prompt) * per_token
    with torch.no_grad():
        model.prefill([prompt])  # the hooks are gone after the block
    assert counted.flops == 2 * 2 * len(prompt) * per_token


def test_matmul_peak_is_flops_per_second_of_one_product():
    peak, n = bench_sweep().matmul_peak(torch.device("cpu"), torch.float32, repeats=2)
    assert n == 1024 and 1e8 < peak < 1e14  # between 0.1 GFLOP/s and 100 TFLOP/s on any CPU


def test_the_sweep_benchmark_runs_end_to_end(tmp_path):
    """The benchmark instruments the engine by wrapping LatentModel methods: a change of their
    signatures must not break it (a one-pair engine-only run, its token count against the engine)."""
    import subprocess

    out = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_sweep.py"), "--model", "default", "--pairs", "1"]
    cmd += ["--skip-reference", "--skip-nnsight", "--shared-rows", "none", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "token positions" in done.stdout and out.exists()
