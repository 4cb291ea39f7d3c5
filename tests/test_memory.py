"""latentpatch.pipeline.memory: the working-set estimate and --batch-size auto."""

from __future__ import annotations

import json

import torch
from helpers import tiny_latent_model

from latentpatch.pipeline.memory import auto_batch_size, free_memory_bytes, working_set_bytes


def test_estimate_grows_with_batch_and_lengths():
    m = tiny_latent_model("llama")
    sizes = [working_set_bytes(m, b, prompt_len=64, answer_len=8) for b in (1, 2, 8, 64)]
    assert sizes == sorted(sizes) and sizes[0] > 0 and sizes[1] == 2 * sizes[0]
    assert working_set_bytes(m, 4, prompt_len=128, answer_len=8) > working_set_bytes(m, 4, prompt_len=64, answer_len=8)
    assert working_set_bytes(m, 4, prompt_len=64, answer_len=16) > working_set_bytes(m, 4, prompt_len=64, answer_len=8)
    assert working_set_bytes(m.to(torch.bfloat16), 4, 64, 8) < working_set_bytes(m.float(), 4, 64, 8)


def test_auto_batch_size_respects_free_memory():
    m = tiny_latent_model("gpt2")
    row = working_set_bytes(m, 1, prompt_len=100, answer_len=8)
    pick = lambda free, **kw: auto_batch_size(m, prompt_len=100, answer_len=8, free_bytes=free, **kw)  # noqa: E731
    assert pick(10 * row, safety=1.0) == 10
    assert pick(10 * row) == 5  # default safety 0.5
    b = pick(123_456 * row // 1000)
    assert working_set_bytes(m, b, 100, 8) <= 0.5 * 123_456 * row // 1000 < working_set_bytes(m, b + 1, 100, 8)
    assert pick(0) == 1 and pick(10**15) == 512 and pick(10**15, cap=64) == 64
    assert [pick(f) for f in (row, 10 * row, 100 * row, 1000 * row)] == sorted(
        pick(f) for f in (row, 10 * row, 100 * row, 1000 * row)
    )
    assert free_memory_bytes("cpu") > 0 and 1 <= auto_batch_size(m) <= 512


def test_run_with_batch_size_auto_uses_the_estimate(tmp_path):
    """``--batch-size auto`` goes through auto_batch_size (recorded in the manifest)."""
    from helpers import tiny_text_model

    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.pipeline.run import RunConfig, run_experiments

    m = tiny_text_model("llama", n_layers=2, num_latent=2)
    cfg = RunConfig(out=str(tmp_path / "run"), batch_size="auto", experiments=("layer",), report=False, use_cache=False)
    out = run_experiments(cfg, model=m, pairs=generate_pairs(2, seed=1), progress=False)
    assert json.loads((out / "manifest.json").read_text())["batch_size"] == auto_batch_size(m) == 512  # tiny: the cap
