"""The position sweep written the way a researcher would with nnsight: one traced rollout per cell.

Benchmark counterpart of the project's engine (docs/method.md §5 position sweep, §7 the naive method).
For each pair, layer ℓ and latent position p:

1. the clean (source) rollout is traced once per pair and the ``component`` output at every
   requested layer and latent position is saved;
2. the corrupted (target) rollout is traced once per cell, and the clean value is written into
   the ``component`` output of block ℓ on the forward call of thought p. The rollout is the real
   one (:meth:`LatentModel.rollout`: prompt pass, then one KV-cached forward per thought, each
   thought = prj(final hidden state of the previous position), then ``[EOT]``), so the patch
   reaches thought p+1.. by the recurrent path and later positions by attention;
3. the three answer strings are teacher-forced and the answer generated greedily from the patched
   state after ``[EOT]`` (:meth:`LatentModel.score` / :meth:`LatentModel.generate`, no hooks: the
   patch already lives in the KV cache), and the metrics (docs/method.md §6) come from
   :func:`latentpatch.patching.metrics.answer_metrics` against the unpatched corrupted baseline.

Inside ``with nn_model.trace(prompts, fn=model.rollout)`` each block is called K+2 times
(occurrence 0 = prompt pass, 1..K = thoughts, K+1 = ``[EOT]``); ``tracer.iter[1 + p]`` binds a
read or write to thought p.

Usage::

    from bench.nnsight_impl import nnsight_position_sweep
    results = nnsight_position_sweep(model, pairs)            # pairs: list[Pair] (needs a tokenizer)
    results[("12", 5, 2)]["kl"]                              # pair "12", layer 5, latent position 2

or with pre-tokenized :class:`TokenPair` entries (a model without a tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nnsight
import torch
from nnsight import NNsight

from latentpatch.data.pairs import Pair
from latentpatch.model.config import extract_number
from latentpatch.model.latent import LatentModel
from latentpatch.patching.metrics import AnswerLogits, answer_logit_diff, answer_metrics


@dataclass
class TokenPair:
    """A pair as token ids. ``*_prompt``: prompt ids incl. separators (``model.prompt_ids``);
    ``*_ids``: ``(ids of answer_prefix + number, index of the first number token)``."""

    pair_id: str
    clean_prompt: list[int]
    corrupted_prompt: list[int]
    clean_answer: float
    corrupted_answer: float
    clean_ids: tuple[list[int], int]
    corr_ids: tuple[list[int], int]


def tokenize_pair(model: LatentModel, pair: Pair) -> TokenPair:
    return TokenPair(
        pair.pair_id,
        model.prompt_ids(pair.clean.question),
        model.prompt_ids(pair.corrupted.question),
        float(pair.clean.answer),
        float(pair.corrupted.answer),
        model.answer_ids(pair.clean.answer),
        model.answer_ids(pair.corrupted.answer),
    )


def _site(nn_model, component: str, layer: int) -> torch.Tensor:
    """The live activation of ``component`` at block ``layer`` (call only inside a trace)."""
    block = nn_model.blocks[layer]
    if component == "resid_pre":
        return block.input
    if component == "resid_out":
        out = block.output
    elif component == "attn_out":
        out = (block.self_attn if hasattr(block, "self_attn") else block.attn).output
    elif component == "mlp_out":
        out = block.mlp.output
    else:
        raise ValueError(f"unknown component {component!r}")
    return out[0] if isinstance(out, tuple) else out


def _clean_run(nn_model, model: LatentModel, prompt, component, layers, positions):
    """Traced clean rollout: ``acts[(layer, p)]`` = [1, d] activation at thought p, and the rollout."""
    with nn_model.trace([prompt], fn=model.rollout) as tracer:
        acts = nnsight.save({})
        for p in positions:
            for _ in tracer.iter[1 + p]:
                for layer in layers:
                    acts[(layer, p)] = _site(nn_model, component, layer)[:, -1].clone()
        rollout = tracer.result.save()
    return acts, rollout


def _patched_run(nn_model, model: LatentModel, prompt, component, layer, p, value):
    """Traced corrupted rollout with ``component`` of block ``layer`` at thought ``p`` set to ``value``."""
    with nn_model.trace([prompt], fn=model.rollout) as tracer:
        for _ in tracer.iter[1 + p]:
            _site(nn_model, component, layer)[:, -1] = value
        rollout = tracer.result.save()
    return rollout


def _answers(model: LatentModel, rollout, strings) -> tuple[AnswerLogits, list[int]]:
    """Teacher-forced logits on A_base, A_clean, A_corr and the greedy answer after ``[EOT]``."""
    (base, bs), (clean, cs), (corr, ks) = strings
    scored = model.score(rollout.state, rollout.answer_logits, [[base, clean, corr]])[0]
    gen = model.generate(rollout.state, rollout.answer_logits)[0]
    pred = extract_number(model.decode(gen)) if model.tokenizer is not None else None
    return AnswerLogits(*scored, base, clean, corr, bs, cs, ks, pred), gen


@torch.no_grad()
def nnsight_position_sweep(
    model: LatentModel,
    pairs: Sequence[Pair | TokenPair],
    component: str = "resid_out",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> dict[tuple[str, int, int], dict]:
    """Denoising position sweep (clean -> corrupted), one nnsight-traced rollout per cell.

    Returns ``{(pair_id, layer, position): metrics}`` with the keys of
    :func:`latentpatch.patching.metrics.answer_metrics` plus ``answer_ids`` (the patched greedy answer ids).
    ``pairs``: :class:`Pair` objects (the model needs a tokenizer) or :class:`TokenPair` objects.
    Without a tokenizer, ``A_base`` starts at its first token and ``pred_answer`` is None.
    """
    layers = sorted(range(model.n_layers) if layers is None else layers)
    positions = sorted(range(model.num_latent) if positions is None else positions)
    nn_model = NNsight(model)  # instruments the modules in place (inert outside a trace)
    results = {}
    for pair in pairs:
        tp = pair if isinstance(pair, TokenPair) else tokenize_pair(model, pair)
        acts, clean = _clean_run(nn_model, model, tp.clean_prompt, component, layers, positions)
        corrupted = model.rollout([tp.corrupted_prompt])
        base_ids = model.generate(corrupted.state, corrupted.answer_logits)[0] or [model.config.eos_id]
        base_start = model.number_start(base_ids) if model.tokenizer is not None else 0
        strings = [(base_ids, base_start), tp.clean_ids, tp.corr_ids]
        baseline, _ = _answers(model, corrupted, strings)
        ld_target, ld_source = answer_logit_diff(baseline), answer_logit_diff(_answers(model, clean, strings)[0])
        for layer in layers:
            for p in positions:
                rollout = _patched_run(nn_model, model, tp.corrupted_prompt, component, layer, p, acts[(layer, p)])
                patched, gen = _answers(model, rollout, strings)
                m = answer_metrics(patched, baseline, ld_target, ld_source, tp.clean_answer, tp.corrupted_answer)
                m["answer_ids"] = gen
                results[(tp.pair_id, layer, p)] = m
    return results
