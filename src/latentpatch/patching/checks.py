"""The built-in checks every run makes and reports (docs/method.md §8).

Each check returns ``{"passed": bool, "value": float, "threshold": float, "detail": str, ...}``.

1. ``identity``: patching the target with its own activations changes nothing (KL <= 1e-6).
2. ``full_restoration``: writing ``resid_pre`` at layer 0 at every position (question and
   thoughts) with the source run's values reproduces the source's answer logits (max |Δ| <= 1e-4);
   only pairs whose prompts have the same token length are covered, and the count is reported.
3. ``live_thoughts``: clean and corrupted thoughts differ, and replacing all thoughts by zeros
   changes the model's answers (reported as an accuracy drop and a changed-answer rate).
4. ``engine_reference``: on a seeded random subset of cells the fast engine, run as the run runs
   it (:func:`sweep_pairs`, several pairs in shared batches where the run shares them), agrees with
   the one-rollout-per-spec reference within the threshold, and gives the same greedy answer ids
   (the decoding shortcut of docs/method.md §7.3 is checked here too).
5. ``steps_engine_reference`` (runs with step-level experiments): the same for a seeded sample of
   the first pair's step-level specs, relative to max(1, |reference|) (noise interventions make
   the answer logits large).
6. ``edges_engine_reference`` (runs with ``edges``): the edge sweep of one pair vs one plain rollout
   per edge on seeded edges (:mod:`latentpatch.patching.edge_check`).

A check cannot pass on broken output: a metric that is NaN (or missing) on one side only counts as
an infinite difference (:func:`mismatch`), and a NaN KL in the identity check fails it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch

from latentpatch.model.config import extract_number
from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import Write
from latentpatch.names import LOGIT_METRICS, RULE_LATENTS
from latentpatch.patching.baselines import PairBaseline, ValueFn, own_values
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_pairs, sweep_reference
from latentpatch.patching.metrics import same_number
from latentpatch.patching.specs import PatchSpec

#: The metrics check 4 compares (continuous ones: the greedy answer is compared by the tests).
#: Metrics the fast engine must reproduce exactly (recovery is a ratio of these, so not compared again).
COMPARED = tuple(m for m in LOGIT_METRICS if m != "recovery")


def mismatch(fast: float | None, reference: float | None) -> float:
    """How far a fast-engine metric is from the reference's: ``|fast - reference|``; 0 when the
    metric is NaN or missing on both sides (it does not apply to the cell), inf when on one side
    only (a broken engine must not pass as "no difference").

    >>> mismatch(1.0, 1.5), mismatch(float("nan"), float("nan")), mismatch(float("nan"), 2.0), mismatch(None, 2.0)
    (0.5, 0.0, inf, inf)
    """
    missing_fast = fast is None or math.isnan(fast)
    missing_ref = reference is None or math.isnan(reference)
    if missing_fast or missing_ref:
        return 0.0 if missing_fast and missing_ref else math.inf
    assert fast is not None and reference is not None
    return abs(fast - reference)


def tolerance(model: LatentModel, fp32: float) -> float:
    """``fp32`` (float noise of reordered fp32 matmuls) for fp32 models, else a bf16/fp16 tolerance."""
    # bf16 has ~3 significant digits: batched vs unbatched matmuls legitimately differ more.
    return fp32 if model.dtype == torch.float32 else 5e-2


def check_identity(
    model: LatentModel, bases: Sequence[PairBaseline], specs: Sequence[PatchSpec], n_pairs: int = 2
) -> dict:
    """Check 1: each spec patched with the target's own activations, on the first ``n_pairs`` pairs.
    A NaN KL (a broken patch) fails the check."""
    worst, nans = 0.0, 0
    used = list(bases[:n_pairs])
    for base in used:
        cells = sweep_fast(model, base, specs, own_values(base))
        nans += sum(math.isnan(c["kl"]) for c in cells)
        worst = max([worst] + [c["kl"] for c in cells if not math.isnan(c["kl"])])
    threshold = tolerance(model, 1e-6)
    if nans:
        worst = math.inf
    return {
        "passed": worst <= threshold,
        "value": worst,
        "threshold": threshold,
        "detail": f"max KL over {len(specs)} specs x {len(used)} pairs patched with their own activations"
        + (f"; {nans} cells gave NaN" if nans else ""),
    }


@torch.no_grad()
def check_full_restoration(model: LatentModel, bases: Sequence[PairBaseline]) -> dict:
    """Check 2: the whole residual stream from the source run reproduces the source's answer logits."""
    worst, covered = 0.0, 0
    for base in bases:
        src, tgt = base.source.prompt, base.target.prompt
        if len(src) != len(tgt):
            continue
        covered += 1
        s = model.rollout([src], record=[("resid_pre", 0)], streams=[base.stream])  # the pair's draws (§21)
        assert s.hooks is not None  # rollout always returns the hooks it ran with
        act = s.hooks.recorded("resid_pre", 0)[0]  # [T_total, d]: prompt, thoughts, [EOT]
        writes = [
            Write(
                "resid_pre",
                0,
                torch.tensor([pos], device=model.device),
                torch.tensor([True], device=model.device),
                act[pos][None],
            )
            for pos in range(act.shape[0])
        ]
        r = model.rollout([tgt], writes=writes, streams=[base.stream])
        worst = max(worst, float((r.answer_logits - s.answer_logits).abs().max()))
    threshold = tolerance(model, 1e-4)
    return {
        "passed": covered == 0 or worst <= threshold,
        "value": worst,
        "threshold": threshold,
        "pairs_covered": covered,
        "pairs_total": len(bases),
        "detail": f"resid_pre L0 at every position from the source run; "
        f"{covered}/{len(bases)} pairs have equal prompt lengths",
    }


@torch.no_grad()
def check_live_thoughts(model: LatentModel, bases: Sequence[PairBaseline], batch: int = 16) -> dict:
    """Check 3: the thoughts carry information (clean != corrupted; zeroing them changes answers).

    The clean and corrupted prompts are rolled out with zeroed thoughts ``batch`` rows at a time."""
    diffs = [float((b.clean.thoughts.float() - b.corrupted.thoughts.float()).abs().max()) for b in bases]
    runs = [(b.clean, b.clean_answer) for b in bases] + [(b.corrupted, b.corrupted_answer) for b in bases]
    changed, correct_ablated = 0, 0
    for i in range(0, len(runs), batch):
        chunk = runs[i : i + batch]
        zeros = torch.zeros(1, model.num_latent, model.d_model)
        ablated = model.thought_ablation(zeros, len(chunk))
        r = model.rollout([rec.prompt for rec, _ in chunk], **ablated, streams=[rec.stream for rec, _ in chunk])
        for (rec, answer), ids in zip(chunk, model.generate(r.state, r.answer_logits)):
            changed += ids != rec.answer_ids
            pred = extract_number(model.decode(ids)) if model.tokenizer is not None else None
            correct_ablated += same_number(pred, answer)
    acc = sum(same_number(rec.pred, a) for rec, a in runs) / len(runs)
    acc_ablated = correct_ablated / len(runs)
    changed_rate = changed / len(runs)
    min_diff = min(diffs) if diffs else 0.0
    return {
        "passed": min_diff > 1e-6 and changed_rate > 0,
        "value": changed_rate,
        "threshold": 0.0,
        "min_thought_diff": min_diff,
        "accuracy": acc,
        "accuracy_ablated": acc_ablated,
        "ablation_accuracy_drop": acc - acc_ablated,
        "detail": f"thoughts zeroed: {changed}/{len(runs)} answers change, accuracy {acc:.3f} -> {acc_ablated:.3f}; "
        f"min over pairs of max |clean - corrupted thought| = {min_diff:.3g}",
    }


def check_engine_reference(
    model: LatentModel,
    bases: Sequence[PairBaseline],
    specs: Sequence[PatchSpec],
    values_for: Callable[[int], ValueFn],
    batch_size: int,
    n_cells: int = 8,
    seed: int = 0,
    shared_rows: int | None = None,
) -> dict:
    """Check 4: ``n_cells`` seeded random specs on two seeded pairs, the run's engine path
    (:func:`sweep_pairs` with ``shared_rows``, as the run calls it) vs :func:`sweep_reference`: the
    metrics of :data:`COMPARED` within the threshold (:func:`mismatch`: NaN on one side fails) and
    the same greedy ``answer_ids`` in every cell (and, on a family with a stop rule, the same
    ``rule_latents``: where the rule fires in the patched run).

    ``values_for(i)``: the replacement values of pair ``bases[i]`` (as the run uses them).
    """
    rng = random.Random(seed)
    pairs = rng.sample(range(len(bases)), min(2, len(bases)))
    subset = rng.sample(list(specs), min(max(n_cells // max(len(pairs), 1), 1), len(specs)))
    values = [values_for(i) for i in pairs]
    fast = sweep_pairs(model, [bases[i] for i in pairs], subset, values, EngineOptions(batch_size, shared_rows))
    worst, compared, other_answers = 0.0, 0, 0
    for i, v, fast_cells in zip(pairs, values, fast):
        for f, r in zip(fast_cells, sweep_reference(model, bases[i], subset, v)):
            worst = max([worst] + [mismatch(f.get(k), r.get(k)) for k in COMPARED])
            other_answers += list(f["answer_ids"]) != list(r["answer_ids"])
            other_answers += f.get(RULE_LATENTS) != r.get(RULE_LATENTS)  # where a stop rule fires (§22)
            compared += 1
    floor = batch_noise(model, [bases[i] for i in pairs], max(2, min(len(subset) * len(pairs), batch_size)))
    threshold = max(tolerance(model, 1e-4), NOISE_FACTOR * floor)
    return {
        "passed": worst <= threshold and other_answers == 0,
        "value": worst,
        "threshold": threshold,
        "noise_floor": floor,
        "cells": compared,
        "answers_differ": other_answers,
        "detail": f"max |fast - reference| over {compared} random cells, metrics {', '.join(COMPARED)}; "
        f"greedy answers differ in {other_answers} of them; threshold max(1e-4, {NOISE_FACTOR} x the model's "
        f"batch noise {floor:.1e})",
    }


#: How many times the model's own batch noise (:func:`batch_noise`) a fast-vs-reference difference may be.
NOISE_FACTOR = 4


@torch.no_grad()
def batch_noise(model: LatentModel, bases: Sequence[PairBaseline], rows: int) -> float:
    """The float noise of this model between batch shapes: the largest ``|logit|`` difference of
    each pair's unpatched target rollout, its answer strings teacher-forced (the logits the metrics
    read, [len, V] each), run alone and as ``rows`` identical rows (the engine batches a pair's
    patched rows; the reference runs each alone). On CPU a GEMM's
    summation order depends on the batch size, so a deep fp32 model with large activations
    (SmolLM2: ~1e-3 on GSM-length prompts) differs there by more than the check's 1e-4; a logit
    difference or log-prob difference moves by at most about twice this (docs/method.md §8)."""
    worst = 0.0
    for base in bases:
        prompt, stream, strings = list(base.target.prompt), base.stream, [ids for ids, _ in base.answers.values()]
        scored = []
        for n in (1, rows):
            r = model.rollout([prompt] * n, streams=[stream] * n)
            scored.append(model.score(r.state, r.answer_logits, [strings] * n))  # [n][3][len, V]
        for many in scored[1]:
            for a, b in zip(scored[0][0], many):
                worst = max(worst, float((a - b).abs().max()))
    return worst


#: Step-level metrics check 5 compares.
STEP_COMPARED = ("kl", "answer_logit_diff", "logprob_final")


def check_steps_engine_reference(
    model: LatentModel,
    base: PairBaseline,
    specs: Sequence[PatchSpec],
    values: ValueFn,
    batch_size: int,
    n_cells: int = 8,
    seed: int = 0,
) -> dict:
    """Check 5: ``n_cells`` seeded random step-level specs of one pair, :func:`sweep_fast` vs
    :func:`sweep_reference`, as the largest difference relative to max(1, |reference|)."""
    subset = random.Random(seed).sample(list(specs), min(n_cells, len(specs)))
    fast = sweep_fast(model, base, subset, values, EngineOptions(batch_size))
    ref = sweep_reference(model, base, subset, values)
    worst = 0.0
    for f, r in zip(fast, ref):
        for k in STEP_COMPARED:
            a, b = f.get(k), r.get(k)
            scale = 1.0 if b is None or math.isnan(b) else max(1.0, abs(b))
            worst = max(worst, mismatch(a, b) / scale)
    threshold = tolerance(model, 1e-4)
    return {
        "passed": worst <= threshold,
        "value": worst,
        "threshold": threshold,
        "cells": len(subset),
        "detail": f"max |fast - reference| / max(1, |reference|) over {len(subset)} random step-level specs of "
        f"pair {base.pair_id}, metrics {', '.join(STEP_COMPARED)}",
    }
