"""Answer metrics (docs/method.md §6), from teacher-forced logits.

Every answer string is ``answer_prefix + number``; its *answer positions* are the positions whose
next-token distribution predicts a token of the number (the first is the last prefix position).
Logits come in as ``[len, V]`` tensors where row j predicts token j of the string
(see :meth:`latentpatch.model.latent.LatentModel.score`). All arithmetic is in fp32.

Names (used as keys everywhere: JSON, parquet, stats):

- ``kl``                 mean over the answer positions of ``A_base`` of KL(p_patched ‖ p_baseline), nats
- ``logit_l2``           RMS of (patched − baseline) logits over the same positions (logit units)
- ``pred_change_rate``   fraction of those positions whose argmax changes
- ``answer_logit_diff``  mean logit of ``A_clean``'s number tokens − mean logit of ``A_corr``'s
- ``answer_logprob_diff`` log P(A_clean) − log P(A_corr), summed over number tokens (nats)
- ``recovery``           (LD_patched − LD_target) / (LD_source − LD_target), LD = answer_logit_diff:
                         0 = no effect, 1 = the source run's preference fully restored
- ``pred_answer``, ``pred_is_clean``, ``pred_is_corrupted``: the greedy answer of the patched run
- ``act_cos_clean``, ``act_cos_corr``, ``act_bias``: chained/frozen activation similarity
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class AnswerLogits:
    """Teacher-forced logits of one run on the three answer strings, plus its greedy answer.

    ``base``/``clean``/``corr``: [len, V] fp32 logits on ``A_base``, ``A_clean``, ``A_corr``;
    ``*_start``: index of the first number token in each string; ``pred``: greedy number or None.
    """

    base: torch.Tensor
    clean: torch.Tensor
    corr: torch.Tensor
    base_ids: list[int]
    clean_ids: list[int]
    corr_ids: list[int]
    base_start: int
    clean_start: int
    corr_start: int
    pred: float | None


def _number_rows(logits: torch.Tensor, start: int) -> torch.Tensor:
    """Rows predicting number tokens; all rows if the string holds no number token."""
    rows = logits[start:]
    return rows if rows.shape[0] else logits


def _token_logits(logits: torch.Tensor, ids: list[int], start: int) -> torch.Tensor:
    """Logit (row j, token ids[j]) for the number tokens of the string."""
    idx = torch.tensor(ids, device=logits.device)
    picked = logits.float().gather(1, idx[:, None])[:, 0]
    return _number_rows(picked[:, None], start)[:, 0]


def _token_logprobs(logits: torch.Tensor, ids: list[int], start: int) -> torch.Tensor:
    idx = torch.tensor(ids, device=logits.device)
    picked = F.log_softmax(logits.float(), -1).gather(1, idx[:, None])[:, 0]
    return _number_rows(picked[:, None], start)[:, 0]


def answer_logit_diff_tensor(a: AnswerLogits) -> torch.Tensor:
    """:func:`answer_logit_diff` as a 0-dim tensor (differentiable: attribution patching, §15)."""
    return (
        _token_logits(a.clean, a.clean_ids, a.clean_start).mean()
        - _token_logits(a.corr, a.corr_ids, a.corr_start).mean()
    )


def answer_logit_diff(a: AnswerLogits) -> float:
    """Mean logit of A_clean's number tokens minus mean logit of A_corr's number tokens."""
    return float(answer_logit_diff_tensor(a))


def answer_logprob_diff_tensor(a: AnswerLogits) -> torch.Tensor:
    """:func:`answer_logprob_diff` as a 0-dim tensor (differentiable: attribution patching, §15)."""
    return (
        _token_logprobs(a.clean, a.clean_ids, a.clean_start).sum()
        - _token_logprobs(a.corr, a.corr_ids, a.corr_start).sum()
    )


def answer_logprob_diff(a: AnswerLogits) -> float:
    """log P(number of A_clean) − log P(number of A_corr), given the prefix (nats)."""
    return float(answer_logprob_diff_tensor(a))


def answer_logprob(logits: torch.Tensor, ids: list[int], start: int) -> float:
    """log P(the number tokens of a string | its prefix), summed (nats); ``logits``: [len, V]."""
    return float(_token_logprobs(logits, ids, start).sum())


def distribution_shift(patched: torch.Tensor, baseline: torch.Tensor, start: int) -> dict[str, float | list[float]]:
    """KL, logit RMS and argmax-change rate over the answer positions of ``A_base``.

    ``patched``/``baseline``: [len, V] logits teacher-forced on the same string ``A_base``.
    """
    p = _number_rows(patched.float(), start)
    q = _number_rows(baseline.float(), start)
    logp, logq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    kl_per_position = (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)
    return {
        "kl": float(kl_per_position.mean()),
        "kl_by_position": [float(x) for x in kl_per_position],
        "logit_l2": float(((p - q) ** 2).mean().sqrt()),
        "pred_change_rate": float((p.argmax(-1) != q.argmax(-1)).float().mean()),
    }


def recovery(ld_patched: float, ld_target: float, ld_source: float, eps: float = 1e-6) -> float:
    """(LD_patched − LD_target) / (LD_source − LD_target); NaN when the baselines don't differ."""
    denom = ld_source - ld_target
    if abs(denom) < eps:
        return math.nan
    return (ld_patched - ld_target) / denom


def same_number(x: float | None, y: float | None) -> bool:
    return x is not None and y is not None and abs(float(x) - float(y)) < 1e-6


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis, in fp32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def answer_metrics(
    patched: AnswerLogits,
    baseline: AnswerLogits,
    ld_target: float,
    ld_source: float,
    clean_answer: float,
    corrupted_answer: float,
) -> dict[str, Any]:
    """Every answer metric of one patched run against the target's baseline run."""
    out: dict[str, Any] = distribution_shift(patched.base, baseline.base, baseline.base_start)
    ld = answer_logit_diff(patched)
    out["answer_logit_diff"] = ld
    out["answer_logprob_diff"] = answer_logprob_diff(patched)
    out["recovery"] = recovery(ld, ld_target, ld_source)
    out["pred_answer"] = patched.pred
    out["pred_is_clean"] = same_number(patched.pred, clean_answer)
    out["pred_is_corrupted"] = same_number(patched.pred, corrupted_answer)
    return out
