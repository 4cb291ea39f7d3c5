"""The patching engine: one mechanism behind every experiment (docs/method.md §5, §7).

Contract: given a pair's baselines (:mod:`latentpatch.patching.baselines`), a list of
:class:`~latentpatch.patching.specs.PatchSpec` and a :data:`~latentpatch.patching.baselines.ValueFn`,
a sweep returns one metric dict per spec, in order (keys: :func:`latentpatch.patching.metrics.answer_metrics`,
plus ``answer_ids`` and, for tracked specs, the ``act_*`` similarities). Two engines compute the same
numbers:

- :func:`sweep_fast` (default): a patch whose earliest site is latent position p leaves every
  position before p as in the target baseline, so the target's KV cache up to p is computed once per
  pair and shared: specs are sorted by p, and each chunk of ``batch_size`` specs is one batched
  continuation from the cached prefix before the chunk's smallest p (the cache repeated along the
  batch). Only the cells whose answer changed are greedy-decoded step by step.
- :func:`sweep_reference`: one full hooked rollout per spec and plain greedy decoding of every
  cell. Used by the engine-vs-reference check (:func:`latentpatch.patching.checks.check_engine_reference`)
  and the benchmarks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from latentpatch.model.config import extract_number
from latentpatch.model.latent import LatentModel, Rollout, RolloutState
from latentpatch.model.sites import ActivationHooks, Write
from latentpatch.names import EARLY_SITE, THOUGHT_SITES
from latentpatch.patching.baselines import PairBaseline, ValueFn, score_answer_strings, to_answer_logits
from latentpatch.patching.greedy import decode_rest, reproduces_greedy, verify_guess
from latentpatch.patching.metrics import AnswerLogits, answer_logprob, answer_metrics, cosine
from latentpatch.patching.specs import PatchSpec


def _decode_number(model: LatentModel, ids: list[int]) -> float | None:
    return extract_number(model.decode(ids)) if model.tokenizer is not None else None


def _score_and_generate(
    model: LatentModel,
    base: PairBaseline,
    state: RolloutState,
    first: torch.Tensor,
    shared_prefix: bool = False,
) -> tuple[list[list[int]], list[AnswerLogits]]:
    """Greedy answers and teacher-forced answer logits for every row of a finished rollout.

    ``first``: [B, V] logits of the first answer token. ``A_base`` is scored with its closing
    [EOS]; a row whose teacher-forced argmaxes reproduce ``A_base`` + [EOS] would decode exactly
    ``A_base`` greedily, so only the other rows (the patches that changed the answer) are decoded
    step by step. ``shared_prefix``: :meth:`LatentModel.score`'s option (off: the default's bits).
    """
    greedy_base = list(base.target.answer_ids)
    base_scored = greedy_base + [model.config.eos_id]
    conts = [base_scored, base.answers["clean"][0], base.answers["corr"][0]]
    scored = model.score(state, first, [conts] * state.batch_size, shared_prefix)  # [B][3] x [len, V]
    reproduced = [reproduces_greedy(model, sc[0], base_scored) for sc in scored]
    gen: list[list[int] | None] = [list(greedy_base) if ok else None for ok in reproduced]
    for c in (1, 2):  # a flipped row most often gives A_clean or A_corr: verify that guess
        verify_guess(model, state, first, conts[c], gen, [sc[c] for sc in scored])
    done = decode_rest(model, state, first, gen)
    preds = [_decode_number(model, ids) for ids in done]
    return done, [to_answer_logits(sc, base.answers, pred) for sc, pred in zip(scored, preds)]


# ---- the patch as hooks ----------------------------------------------------------------------
def _writes_for(specs: Sequence[PatchSpec], values: ValueFn, prompt_len: int, device: torch.device) -> list[Write]:
    """One :class:`Write` per (component, layer, position), with a row mask over the chunk (row = spec)."""
    grouped: dict[tuple[str, int, int], dict[int, torch.Tensor]] = defaultdict(dict)
    for row, spec in enumerate(specs):
        if spec.component in THOUGHT_SITES or spec.component == EARLY_SITE:
            continue  # step-level specs write no activation (docs/method.md §13)
        vals = values(spec)  # [len(positions), d]
        for i, q in enumerate(spec.positions):
            grouped[(spec.component, spec.layer, q)][row] = vals[i]
    writes = []
    B = len(specs)
    for (component, layer, q), rows in grouped.items():
        d = next(iter(rows.values())).shape[-1]
        value = torch.zeros(B, d, dtype=next(iter(rows.values())).dtype, device=device)  # [B, d]
        mask = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
        for row, v in rows.items():
            value[row] = v.to(device)
            mask[row] = True
        writes.append(Write(component, layer, torch.full((B,), prompt_len + q, device=device), mask, value))
    return writes


def _freeze(
    specs: Sequence[PatchSpec],
    target_thoughts: torch.Tensor,
    K: int,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Thought overrides for frozen specs: (``[B, K, d]`` target thoughts, ``[B, K]`` mask of the
    positions after the patch), or (None, None) when no spec is frozen. ``target_thoughts``: [K, d]."""
    if not any(s.frozen for s in specs):
        return None, None
    B = len(specs)
    mask = torch.zeros(B, K, dtype=torch.bool, device=target_thoughts.device)
    for row, spec in enumerate(specs):
        if spec.frozen:
            mask[row, max(spec.positions) + 1 :] = True
    return target_thoughts[None].expand(B, -1, -1), mask


def _overrides(
    model: LatentModel, specs: Sequence[PatchSpec], values: ValueFn, target_thoughts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Thought overrides of a chunk (``[B, K, d]``, ``[B, K]``): frozen specs (:func:`_freeze`) and
    thought-site specs (docs/method.md §13): ``thought`` feeds the value as thought p,
    ``thought_pre`` feeds ``prj(value)``. ``target_thoughts``: [K, d]."""
    K = model.num_latent
    frozen = _freeze(specs, target_thoughts, K)
    if not any(s.component in THOUGHT_SITES for s in specs):
        return frozen
    override, mask = frozen
    B = len(specs)
    if override is None or mask is None:
        override = target_thoughts[None].expand(B, -1, -1)
        mask = torch.zeros(B, K, dtype=torch.bool, device=target_thoughts.device)
    override = override.clone()
    for row, spec in enumerate(specs):
        if spec.component in THOUGHT_SITES:
            pos = list(spec.positions)
            vals = values(spec).to(device=model.device, dtype=model.dtype)  # [len(positions), d]
            if spec.component == "thought_pre":
                vals = model.prj(vals)
            override[row, pos] = vals.to(override.dtype)
            mask[row, pos] = True
    return override, mask


def _thought_similarity(target: torch.Tensor, fed: torch.Tensor, start: int) -> dict[str, list[float]]:
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


# ---- metrics per cell ------------------------------------------------------------------------
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


def _cell_results(
    model: LatentModel,
    base: PairBaseline,
    specs: Sequence[PatchSpec],
    state: RolloutState,
    answer_logits: torch.Tensor,
    tracked: dict[int, torch.Tensor],
    decode_all: bool = False,
    shared_prefix: bool = False,
) -> list[dict]:
    """Metrics for each row of a patched, finished rollout (after [EOT]); row b is ``specs[b]``.

    ``answer_logits``: [B, V]; ``tracked[row]``: [n_later, d] regenerated activations of a tracked
    spec. ``decode_all`` (the reference): greedy-decode every row step by step, the plain way,
    instead of only the rows whose teacher-forced argmaxes do not reproduce ``A_base``.
    """
    if base.target_logits is None:
        raise ValueError(f"pair {base.pair_id}: baselines not prepared (call prepare_pair first)")
    if decode_all:
        gen = model.generate(state, answer_logits)
        preds = [_decode_number(model, ids) for ids in gen]
        patched = score_answer_strings(model, state, answer_logits, base.answers, preds)
    else:
        gen, patched = _score_and_generate(model, base, state, answer_logits, shared_prefix)
    out = []
    for row, spec in enumerate(specs):
        m = answer_metrics(
            patched[row], base.target_logits, base.ld_target, base.ld_source, base.clean_answer, base.corrupted_answer
        )
        m["answer_ids"] = gen[row]
        if spec.component in THOUGHT_SITES or spec.component == EARLY_SITE:
            m["logprob_final"] = answer_logprob(patched[row].base, patched[row].base_ids, patched[row].base_start)
        if spec.track and row in tracked:
            m.update(_tracking_metrics(model, base, spec, tracked[row]))
        out.append(m)
    return out


# ---- the sweeps ------------------------------------------------------------------------------
def _unique_computations(specs: Sequence[PatchSpec]) -> list[PatchSpec]:
    """One spec per :attr:`PatchSpec.computation` (a tracked one where any is), in first-seen order."""
    unique: dict[tuple, PatchSpec] = {}
    for s in specs:
        u = unique.get(s.computation)
        unique[s.computation] = s if u is None or s.track else u
    return list(unique.values())


def _sweep_chunk(
    model: LatentModel,
    base: PairBaseline,
    target: Rollout,
    chunk: Sequence[PatchSpec],
    values: ValueFn,
    shared_prefix: bool = False,
) -> list[dict]:
    """Metrics of a chunk of specs (sorted by start), as one batched continuation of the target's prefix."""
    T_q, K = target.prompt_len, model.num_latent
    start, B = chunk[0].start, len(chunk)
    state = target.state.fork(length=T_q + start, repeats=B)  # KV cache [B, ..., T_q + start, ...]
    writes = _writes_for(chunk, values, T_q, model.device)
    record = sorted({(s.component, s.layer) for s in chunk if s.track})
    override, mask = _overrides(model, chunk, values, target.thoughts[0])  # [B, K, d], [B, K] or None
    with ActivationHooks(model.lm, writes=writes, record=record) as hooks:
        first = target.thoughts[0, start][None].expand(B, -1)  # [B, d]: the target's thought at start
        fed, _, _ = model.run_thoughts(state, first, start, hooks=hooks, thought_override=override, override_mask=mask)
        end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), B), hooks=hooks)
    tracked = {}
    for row, s in enumerate(chunk):
        if s.track:
            acts = hooks.recorded(s.component, s.layer)  # [B, T_new, d], index 0 = absolute T_q + start
            lo = max(s.positions) + 1 - start
            tracked[row] = acts[row, lo : K - start]  # [n_later, d]
    logits = model.logits(end[:, -1])  # [B, V]
    cells = _cell_results(model, base, chunk, state, logits, tracked, shared_prefix=shared_prefix)
    for row, s in enumerate(chunk):
        if s.component in THOUGHT_SITES:
            cells[row].update(_thought_similarity(target.thoughts[0], fed[row], start))
    return cells


def _early_chunk(model: LatentModel, base: PairBaseline, target: Rollout, chunk: Sequence[PatchSpec]) -> list[dict]:
    """Early answers S(k), k = ``spec.start``, as one batch on the target's cache (docs/method.md §13):
    row b keeps the cache of all K thoughts but masks thoughts k..K-1 out of attention (as left
    padding is), so its [EOT] sits right after thought k-1 with position id ``T_q + k``."""
    T_q, K, B = target.prompt_len, model.num_latent, len(chunk)
    state = target.state.fork(length=T_q + K, repeats=B)
    mask = state.attention_mask.clone()  # [B, T_q + K]
    for row, s in enumerate(chunk):
        mask[row, T_q + s.start : T_q + K] = 0
    state.attention_mask, state.next_position = mask, mask.sum(1)
    end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), B))
    return _cell_results(model, base, chunk, state, model.logits(end[:, -1]), {})


def _early_rollout(model: LatentModel, prompt: list[int], k: int) -> tuple[RolloutState, torch.Tensor]:
    """The plain early answer: prompt, k thoughts, [EOT]. Returns the state and [1, V] answer logits."""
    state, h = model.prefill([prompt])
    thought = model.prj(h)
    for _ in range(k):
        thought = model.prj(model.advance(state, inputs_embeds=thought[:, None])[:, -1])
    end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), 1))
    return state, model.logits(end[:, -1])


@torch.no_grad()
def sweep_fast(
    model: LatentModel,
    base: PairBaseline,
    specs: Sequence[PatchSpec],
    values: ValueFn,
    batch_size: int = 64,
    shared_prefix: bool = False,
) -> list[dict]:
    """Metrics for every spec on one pair, sharing the target's KV prefix (docs/method.md §7).

    Specs with the same :attr:`PatchSpec.computation` are computed once. Returns one metric dict
    per spec, in order; ``batch_size`` patches run as one batch. ``shared_prefix``: score the
    answer strings' common prefix once per row (:meth:`LatentModel.score`; off by default, as
    it changes the last bits).

    >>> from latentpatch.data.synthetic import generate_pairs
    >>> from latentpatch.model.load import load_model
    >>> from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
    >>> from latentpatch.patching.specs import EngineConfig, layer_specs
    >>> model = load_model("default")
    >>> pair = generate_pairs(1, seed=0)[0]  # a bus question: clean answer 32, corrupted 31
    >>> clean, corrupted = (record_run(model, model.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
    >>> base = prepare_pair(model, pair.pair_id, clean, corrupted, pair.clean.answer, pair.corrupted.answer)
    >>> specs = layer_specs(model.n_layers, model.num_latent)[:2]  # layers 0 and 1, every latent position
    >>> cells = sweep_fast(model, base, specs, replacement_values(base, EngineConfig()))  # clean into corrupted
    >>> [(cell["pred_answer"], round(cell["recovery"], 2)) for cell in cells]
    [(32.0, 1.0), (32.0, 1.0)]
    """
    # The baselines' own target rollout when prepare_pair kept it: the same batch-1 computation.
    target = base.target_rollout if base.target_rollout is not None else model.rollout([base.target.prompt])
    # Chunks of batch_size specs in order of their first patched position; a chunk continues from
    # the prefix before its earliest start (rows starting later rerun a few unpatched thoughts,
    # which equal the target's), so small start groups share one batch (fewer, fuller passes).
    unique = _unique_computations(specs)
    ordered = sorted((s for s in unique if s.component != EARLY_SITE), key=lambda s: s.start)
    early = [s for s in unique if s.component == EARLY_SITE]
    results: dict[tuple, dict] = {}
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        for s, cell in zip(chunk, _sweep_chunk(model, base, target, chunk, values, shared_prefix)):
            results[s.computation] = cell
    for i in range(0, len(early), batch_size):
        chunk = early[i : i + batch_size]
        for s, cell in zip(chunk, _early_chunk(model, base, target, chunk)):
            results[s.computation] = cell
    return [dict(results[s.computation]) for s in specs]


@torch.no_grad()
def sweep_reference(model: LatentModel, base: PairBaseline, specs: Sequence[PatchSpec], values: ValueFn) -> list[dict]:
    """The plain method: one full hooked rollout per spec (no sharing, no batching), greedy
    decoding of every cell's answer."""
    out = []
    K = model.num_latent
    for spec in specs:
        T_q = len(base.target.prompt)  # batch of one: no padding
        if spec.component == EARLY_SITE:
            state, logits = _early_rollout(model, base.target.prompt, spec.start)
            out.extend(_cell_results(model, base, [spec], state, logits, {}, decode_all=True))
            continue
        writes = _writes_for([spec], values, T_q, model.device)
        override, mask = _overrides(model, [spec], values, base.target.thoughts)
        record = [(spec.component, spec.layer)] if spec.track else []
        r = model.rollout(
            [base.target.prompt], writes=writes, record=record, thought_override=override, override_mask=mask
        )
        tracked = {}
        if spec.track:
            assert r.hooks is not None  # rollout always returns the hooks it ran with
            acts = r.hooks.recorded(spec.component, spec.layer)[0]  # [T_total, d]
            tracked[0] = acts[T_q + max(spec.positions) + 1 : T_q + K]  # [n_later, d]
        cells = _cell_results(model, base, [spec], r.state, r.answer_logits, tracked, decode_all=True)
        if spec.component in THOUGHT_SITES:
            cells[0].update(_thought_similarity(base.target.thoughts, r.thoughts[0], 0))
        out.extend(cells)
    return out
