"""A finished patched rollout → one metric row per cell (docs/method.md §6, §7.2, §7.3).

Contract: given a patched rollout run through [EOT] (its :class:`~latentpatch.model.latent.RolloutState`,
B rows) and ``[B, V]`` logits of its first answer token, where row b is the spec ``specs[b]`` on the
pair ``row_bases[b]`` (a prepared :class:`~latentpatch.patching.baselines.PairBaseline`),
:func:`cell_results` returns one metric dict per row, in order (keys:
:func:`latentpatch.patching.metrics.answer_metrics`, plus ``answer_ids``, the greedy answer;
``logprob_final`` for step-level specs; and, for tracked specs, the ``act_*`` similarities of
``tracked[b]``: [n_later, d]). The sweeps that build the rollouts live in
:mod:`latentpatch.patching.engine`; this module only reads a finished one:

- :func:`score_and_generate` (the fast engine's answers): teacher-forced logits of ``A_base`` +
  [EOS], ``A_clean`` and ``A_corr`` for every row (one pass per string), and each row's greedy
  answer, decoded step by step only where the teacher-forced argmaxes do not already give it (the
  decoding shortcut); :func:`reference_answers` (the reference engine's): every row decoded step by
  step, the strings fed whole. Either gives :data:`Answers`, which :func:`cell_results` reads.
- :func:`thought_similarity`: a thought-site spec's fed thoughts ([K-start, d]) against the
  target's ([K, d]): ``thought_cos`` and ``thought_rel_l2`` per thought.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from latentpatch.model.config import extract_number
from latentpatch.model.latent import LatentModel, RolloutState
from latentpatch.patching.baselines import PairBaseline, score_answer_strings, to_answer_logits
from latentpatch.patching.greedy import decode_rest, reproduces_greedy, verify_guesses
from latentpatch.patching.interventions import EarlyExit, ThoughtReplacement
from latentpatch.patching.metrics import AnswerLogits, answer_logprob, answer_metrics, cosine
from latentpatch.patching.specs import PatchSpec


# ---- answers of a finished rollout -----------------------------------------------------------
def _decode_number(model: LatentModel, ids: list[int]) -> float | None:
    return extract_number(model.decode(ids)) if model.tokenizer is not None else None


def _require_prepared(row_bases: Sequence[PairBaseline]) -> None:
    """A pair must be prepared (answer strings, target logits) before its cells can be read."""
    for base in row_bases:
        if base.target_logits is None:
            raise ValueError(f"pair {base.pair_id}: baselines not prepared (call prepare_pair first)")


def _rows_by_pair(row_bases: Sequence[PairBaseline]) -> list[list[int]]:
    """The row indices of each pair in a batch (``row_bases[b]``: row b's pair), in order."""
    rows: dict[int, list[int]] = {}
    for b, base in enumerate(row_bases):
        rows.setdefault(id(base), []).append(b)
    return list(rows.values())


def score_and_generate(
    model: LatentModel,
    row_bases: Sequence[PairBaseline],
    state: RolloutState,
    first: torch.Tensor,
    shared_prefix: bool = True,
) -> Answers:
    """Greedy answers and teacher-forced answer logits for every row of a finished rollout (the
    fast path; :func:`reference_answers` is the plain one).

    ``row_bases[b]``: row b's pair; ``first``: [B, V] logits of the first answer token. ``A_base``
    is scored with its closing [EOS]; a row whose teacher-forced argmaxes reproduce ``A_base`` +
    [EOS] would decode exactly ``A_base`` greedily, so only the other rows (the patches that
    changed the answer) are checked against ``A_clean``/``A_corr`` or decoded step by step (one
    pair's rows at a time where a batch of one could arise). ``shared_prefix``:
    :meth:`LatentModel.score`'s option (off: the default's bits).
    """
    _require_prepared(row_bases)
    eos = model.config.eos_id
    conts = [[[*b.target.answer_ids, eos], b.answers["clean"][0], b.answers["corr"][0]] for b in row_bases]
    scored = model.score(state, first, conts, shared_prefix)  # [B][3] x [len, V]
    room = model.answer_room(state)  # [B] answer tokens each row may hold (the position limit)
    gen: list[list[int] | None] = [
        list(row_bases[b].target.answer_ids) if reproduces_greedy(model, sc[0], conts[b][0], room[b]) else None
        for b, sc in enumerate(scored)
    ]
    pairs = _rows_by_pair(row_bases)
    for c in (1, 2):  # a flipped row most often gives A_clean or A_corr: verify that guess
        verify_guesses(model, state, first, [cont[c] for cont in conts], gen, [sc[c] for sc in scored], pairs, room)
    for rows in pairs:
        done = decode_rest(model, state, first, gen, among=rows)
        for b in rows:
            gen[b] = done[b]
    answers = [ids or [] for ids in gen]
    preds = [_decode_number(model, ids) for ids in answers]
    return answers, [to_answer_logits(sc, b.answers, pred) for sc, b, pred in zip(scored, row_bases, preds)]


# ---- metrics per cell ------------------------------------------------------------------------
def thought_similarity(target: torch.Tensor, fed: torch.Tensor, start: int) -> dict[str, list[float]]:
    """Every thought j of a patched run against the target's: ``thought_cos`` and ``thought_rel_l2``
    (|fed − target| / |target|), lists over j = 0..K-1. ``target``: [K, d]; ``fed``: [K-start, d]
    thoughts start..K-1 (earlier ones are the target's by construction: cos 1, distance 0)."""
    t = target[start:].float()
    cos = cosine(fed, t)  # [K-start]
    rel = (fed.float() - t).norm(dim=-1) / t.norm(dim=-1).clamp(min=1e-12)
    return {
        "thought_cos": [1.0] * start + [float(x) for x in cos],
        "thought_rel_l2": [0.0] * start + [float(x) for x in rel],
    }


def _tracking_metrics(model: LatentModel, base: PairBaseline, spec: PatchSpec, acts: torch.Tensor) -> dict:
    """Similarity of the regenerated activations ``acts`` ([n_later, d] at latent positions
    max(positions)+1 .. K-1) to the clean and corrupted runs' activations there."""
    later = list(range(max(spec.positions) + 1, model.num_latent))
    clean = base.clean.acts[spec.component][spec.layer, later]  # [n_later, d]
    corr = base.corrupted.acts[spec.component][spec.layer, later]
    cc, cr = cosine(acts, clean), cosine(acts, corr)  # [n_later]
    m: dict = {
        "act_positions": later,
        "act_cos_clean_by_position": [float(x) for x in cc],
        "act_cos_corr_by_position": [float(x) for x in cr],
        "act_cos_clean": float(cc.mean()) if len(later) else math.nan,
        "act_cos_corr": float(cr.mean()) if len(later) else math.nan,
    }
    m["act_bias"] = m["act_cos_clean"] - m["act_cos_corr"]
    return m


#: Each row's greedy answer ids and its teacher-forced answer strings: what a finished rollout's
#: answers are, whichever path (:func:`score_and_generate` or :func:`reference_answers`) gave them.
Answers = tuple[list[list[int]], list[AnswerLogits]]


def reference_answers(
    model: LatentModel, row_bases: Sequence[PairBaseline], state: RolloutState, first: torch.Tensor
) -> Answers:
    """The plain path (the reference engine, one pair per batch): every row greedy-decoded step by
    step (:meth:`LatentModel.generate`), then the three answer strings teacher-forced whole.
    ``first``: [B, V] logits of the first answer token."""
    _require_prepared(row_bases)
    gen = model.generate(state, first)
    preds = [_decode_number(model, ids) for ids in gen]
    return gen, score_answer_strings(model, state, first, row_bases[0].answers, preds)


def cell_results(
    model: LatentModel,
    row_bases: Sequence[PairBaseline],
    specs: Sequence[PatchSpec],
    answers: Answers,
    tracked: dict[int, torch.Tensor],
) -> list[dict]:
    """Metrics for each row of a patched, finished rollout (after [EOT]); row b is ``specs[b]`` on
    the pair ``row_bases[b]``.

    ``answers``: the rows' greedy ids and teacher-forced answer logits, from the fast path
    (:func:`score_and_generate`) or the plain one (:func:`reference_answers`); ``tracked[row]``:
    [n_later, d] regenerated activations of a tracked spec.
    """
    _require_prepared(row_bases)
    target_logits = [base.target_logits for base in row_bases]
    gen, patched = answers
    out = []
    for row, (spec, base, target) in enumerate(zip(specs, row_bases, target_logits)):
        assert target is not None  # checked above
        m = answer_metrics(
            patched[row], target, base.ld_target, base.ld_source, base.clean_answer, base.corrupted_answer
        )
        m["answer_ids"] = gen[row]
        if isinstance(spec.intervention, (ThoughtReplacement, EarlyExit)):  # step-level (§13)
            m["logprob_final"] = answer_logprob(patched[row].base, patched[row].base_ids, patched[row].base_start)
        if spec.track and row in tracked:
            m.update(_tracking_metrics(model, base, spec, tracked[row]))
        out.append(m)
    return out
