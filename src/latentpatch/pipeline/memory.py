"""Batch size from free memory: ``--batch-size auto``.

A sweep chunk of B patches holds, besides the weights (already resident):

- KV cache rows: the chunk's fork of the target prefix, grown over thoughts + answer, plus the
  fork of teacher forcing or greedy decoding (one at a time) and a transient copy while a layer's
  cache grows (``torch.cat``): ~3 row copies of ``n_layers x 2 x kv_dim x seq`` values in the
  model's dtype;
- activations of teacher forcing (B rows x ``answer_len`` tokens per answer string, 3 strings whose
  logits are kept): hidden, MLP intermediate, attention scores in fp32;
- logits of teacher forcing ``[3B, answer_len, V]`` in the model's dtype and their fp32 copy, and
  the fp32 logits of a greedy decoding step.

The estimate is linear in B, so the batch is ``safety x free / bytes_per_row``, capped.
"""

from __future__ import annotations

import torch

from latentpatch.model.latent import LatentModel

#: Copies of a row's KV cache alive at the peak (sweep fork, scoring/decoding fork, cat transient).
KV_COPIES = 3


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on CUDA, MemAvailable on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # no /proc (not Linux): assume 8 GiB


def _shape(model: LatentModel) -> dict:
    cfg = model.lm.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or model.d_model // heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * model.d_model
    return dict(heads=heads, kv_dim=kv_heads * head_dim, inter=inter)


def working_set_bytes(model: LatentModel, batch_size: int, prompt_len: int = 256, answer_len: int | None = None) -> int:
    """Estimated peak bytes (beyond the weights) of one sweep chunk of ``batch_size`` patches."""
    s = _shape(model)
    answer_len = answer_len or model.config.max_answer_tokens
    nbytes = torch.finfo(model.dtype).bits // 8
    seq = prompt_len + model.num_latent + len(model.answer_start_ids()) + answer_len
    kv = KV_COPIES * model.n_layers * 2 * s["kv_dim"] * seq * nbytes
    act = answer_len * (4 * model.d_model + 2 * s["inter"]) * nbytes + answer_len * s["heads"] * seq * 4
    logits = 3 * answer_len * model.vocab_size * (nbytes + (4 if nbytes < 4 else 0))  # + fp32 copy of bf16/fp16 logits
    decode = 2 * model.vocab_size * 4  # greedy decoding: fp32 logits of one step and their masked copy
    return batch_size * (kv + act + logits + decode)


def auto_batch_size(
    model: LatentModel,
    prompt_len: int = 256,
    answer_len: int | None = None,
    safety: float = 0.5,
    free_bytes: int | None = None,
    cap: int = 512,
) -> int:
    """The largest batch (1..``cap``) whose estimated working set fits ``safety`` x free memory.

    ``free_bytes`` defaults to the free memory of the model's device (see :func:`free_memory_bytes`).
    """
    free = free_memory_bytes(model.device) if free_bytes is None else free_bytes
    per_row = working_set_bytes(model, 1, prompt_len, answer_len)
    return max(1, min(cap, int(safety * free // per_row)))
