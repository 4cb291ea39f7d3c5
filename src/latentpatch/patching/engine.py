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

Both build the patched rollouts here (the patch as hooks and thought overrides); the finished
rollout's rows are scored, greedy-decoded and turned into one metric dict per cell by
:mod:`latentpatch.patching.cells` (:func:`~latentpatch.patching.cells.cell_results`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from latentpatch.model.answering import shared_prefix_length
from latentpatch.model.latent import LatentModel, Rollout, RolloutState
from latentpatch.model.sites import ActivationHooks, Write
from latentpatch.model.state import stack_states
from latentpatch.model.stops import StopObserver, stop_rule_of
from latentpatch.model.streams import row_streams
from latentpatch.names import LATENT_COUNT, RULE_LATENTS, STOPS_ELSEWHERE
from latentpatch.patching.baselines import PairBaseline, ValueFn
from latentpatch.patching.cells import cell_results, reference_answers, score_and_generate, thought_similarity
from latentpatch.patching.interventions import ActivationPatch, EarlyExit, ThoughtReplacement
from latentpatch.patching.specs import PatchSpec
from latentpatch.patching.stop_cells import primed_observer, stop_columns


# ---- the patch as hooks ----------------------------------------------------------------------
def _writes_for(
    specs: Sequence[PatchSpec], row_values: Sequence[ValueFn], prompt_len: int, device: torch.device
) -> list[Write]:
    """One :class:`Write` per (component, layer, position), with a row mask over the chunk (row b =
    ``specs[b]``, its values from ``row_values[b]``)."""
    grouped: dict[tuple[str, int, int], dict[int, torch.Tensor]] = defaultdict(dict)
    for row, spec in enumerate(specs):
        if not isinstance(spec.intervention, ActivationPatch):
            continue  # step-level specs write no activation (docs/method.md §13)
        vals = row_values[row](spec)  # [len(positions), d]
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
    specs: Sequence[PatchSpec], target_thoughts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Thought overrides for frozen specs: (``[B, K, d]`` target thoughts, ``[B, K]`` mask of the
    positions after the patch), or (None, None) when no spec is frozen. ``target_thoughts``:
    [B, K, d], row b's pair's."""
    if not any(s.frozen for s in specs):
        return None, None
    mask = torch.zeros(target_thoughts.shape[:2], dtype=torch.bool, device=target_thoughts.device)
    for row, spec in enumerate(specs):
        if spec.frozen:
            mask[row, max(spec.positions) + 1 :] = True
    return target_thoughts, mask


def _overrides(
    model: LatentModel,
    specs: Sequence[PatchSpec],
    row_values: Sequence[ValueFn],
    target_thoughts: torch.Tensor,
    streams: Sequence[int | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Thought overrides of a chunk (``[B, K, d]``, ``[B, K]``): frozen specs (:func:`_freeze`) and
    thought-site specs (docs/method.md §13): ``thought`` feeds the value as thought p,
    ``thought_pre`` feeds the feedback of the value (``prj(value)``). ``target_thoughts``: [B, K, d], row b's pair's;
    ``streams``: row b's draw-stream key (its pair's: a random feedback draws from it, §21)."""
    frozen = _freeze(specs, target_thoughts)
    if not any(isinstance(s.intervention, ThoughtReplacement) for s in specs):
        return frozen
    override, mask = frozen
    if override is None or mask is None:
        override = target_thoughts
        mask = torch.zeros(target_thoughts.shape[:2], dtype=torch.bool, device=target_thoughts.device)
    override = override.clone()
    keys = row_streams(streams, len(specs))
    for row, spec in enumerate(specs):
        iv = spec.intervention
        if isinstance(iv, ThoughtReplacement):
            pos = list(iv.positions)
            vals = row_values[row](spec).to(device=model.device, dtype=model.dtype)  # [len(positions), d]
            if iv.through_feedback:
                vals = model.feedback.feed(vals, pos, [keys[row]] * len(pos))  # the row's pair's draws
            override[row, pos] = vals.to(override.dtype)
            mask[row, pos] = True
    return override, mask


# ---- the sweeps ------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineOptions:
    """How the fast engine batches its work: never what it computes (every choice gives the same
    metrics, docs/method.md §7), passed once to :func:`sweep_pairs` / :func:`sweep_fast`.

    >>> EngineOptions(batch_size=16, shared_rows=256)
    EngineOptions(batch_size=16, shared_rows=256, shared_prefix=True)
    """

    batch_size: int = 64  # patches of one pair per batched continuation (--batch-size)
    shared_rows: int | None = None  # rows several pairs' chunks may share in one batch; None: each pair alone (§7.1)
    shared_prefix: bool = True  # feed the answer strings' common prefix once per row, then branch (§7.2)


def _unique_computations(specs: Sequence[PatchSpec]) -> list[PatchSpec]:
    """One spec per :attr:`PatchSpec.computation` (a tracked one where any is), in first-seen order."""
    unique: dict[tuple, PatchSpec] = {}
    for s in specs:
        u = unique.get(s.computation)
        unique[s.computation] = s if u is None or s.track else u
    return list(unique.values())


@dataclass(frozen=True)
class _Part:
    """One pair's share of a batched continuation: its baselines, target rollout, patched-in values
    and chunk of specs (sorted by start)."""

    base: PairBaseline
    target: Rollout
    values: ValueFn
    specs: Sequence[PatchSpec]


def _sweep_chunk(model: LatentModel, parts: Sequence[_Part], options: EngineOptions) -> list[list[dict]]:
    """Metrics of each part's chunk, all parts as one batched continuation of their targets'
    prefixes (rows: the parts' specs in order). The parts share the prompt length and the chunk."""
    T_q, K = parts[0].target.prompt_len, model.num_latent
    start = parts[0].specs[0].start
    specs = [s for p in parts for s in p.specs]
    row_bases = [p.base for p in parts for _ in p.specs]
    row_values = [p.values for p in parts for _ in p.specs]
    B = len(specs)
    targets = torch.cat([p.target.thoughts[0][None].expand(len(p.specs), -1, -1) for p in parts])  # [B, K, d]
    # KV cache [B, ..., T_q + start, ...]: each target's repeated for its rows (one copy)
    state = stack_states([p.target.state for p in parts], T_q + start, [len(p.specs) for p in parts])
    writes = _writes_for(specs, row_values, T_q, model.device)
    record = sorted({(s.component, s.layer) for s in specs if s.track})
    override, mask = _overrides(model, specs, row_values, targets, state.streams)  # [B, K, d], [B, K] or None
    observer = primed_observer(model, row_bases, start)  # a family's stop rule, read in the patched runs (§22)
    with ActivationHooks(model.lm, writes=writes, record=record) as hooks:
        first = targets[:, start]  # [B, d]: each target's thought at start
        fed, hidden, _ = model.run_thoughts(
            state, first, start, hooks=hooks, thought_override=override, override_mask=mask, observe=observer
        )
        end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), B), hooks=hooks)
    tracked = {}
    for row, s in enumerate(specs):
        if s.track:
            acts = hooks.recorded(s.component, s.layer)  # [B, T_new, d], index 0 = absolute T_q + start
            lo = max(s.positions) + 1 - start
            tracked[row] = acts[row, lo : K - start]  # [n_later, d]
    logits = model.logits(end[:, -1])  # [B, V]
    answers = score_and_generate(model, row_bases, state, logits, options.shared_prefix)
    cells = cell_results(model, row_bases, specs, answers, tracked)
    if any(isinstance(s.intervention, ThoughtReplacement) for s in specs):
        # the chain influence compares (the fed thoughts; PCCoT: what the site round hands on)
        target_hidden = torch.cat([p.target.latent_hidden[0][None].expand(len(p.specs), -1, -1) for p in parts])
        target_chain, chain = model.thought_chain(targets, target_hidden), model.thought_chain(fed, hidden)
        for row, s in enumerate(specs):
            if isinstance(s.intervention, ThoughtReplacement):
                cells[row].update(thought_similarity(target_chain[row], chain[row], start))
    if observer is not None:
        for row, columns in enumerate(stop_columns(observer, K, model.latent_cap)):
            cells[row].update(columns)
    out, i = [], 0
    for p in parts:
        out.append(cells[i : i + len(p.specs)])
        i += len(p.specs)
    return out


def _early_chunk(
    model: LatentModel, base: PairBaseline, target: Rollout, chunk: Sequence[PatchSpec], options: EngineOptions
) -> list[dict]:
    """Early answers S(k), k = ``spec.start``, as one batch on the caches of
    :meth:`LatentModel.early_states` (docs/method.md §13): the target's, with thoughts k..K-1
    masked out of attention (as left padding is), so row b's [EOT] sits right after thought k-1
    with position id ``T_q + k`` (PCCoT: the state after round k)."""
    B = len(chunk)
    state = model.early_states(base.target.prompt, target, [s.start for s in chunk])  # the family's caches
    end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), B))
    logits = model.logits(end[:, -1])  # [B, V]
    answers = score_and_generate(model, [base] * B, state, logits, options.shared_prefix)
    return cell_results(model, [base] * B, chunk, answers, {})


def _early_rollout(
    model: LatentModel, prompt: list[int], k: int, stream: int | None = None
) -> tuple[RolloutState, torch.Tensor]:
    """The plain early answer: prompt, k thoughts, [EOT] (:meth:`LatentModel.early_answer`, the one
    latent loop; ``stream``: the pair's draw-stream key). Returns the state and [1, V] answer logits."""
    return model.early_answer([prompt], k, streams=[stream])


def shared_batch_key(base: PairBaseline, eos_id: int) -> tuple[int, ...]:
    """Pairs with the same key can share the engine's forward passes (:func:`sweep_pairs`) and
    get the same bits as alone: the target's prompt length, the token lengths of ``A_base`` +
    [EOS], ``A_clean`` and ``A_corr`` (so no row is padded, on the keys' side or the answers'),
    and the length of their common prefix (scored once, §7.2: the same split for every row)."""
    strings = [[*base.target.answer_ids, eos_id], base.answers["clean"][0], base.answers["corr"][0]]
    return (len(base.target.prompt), *(len(s) for s in strings), shared_prefix_length(strings))


def group_pairs(
    bases: Sequence[PairBaseline], order: Sequence[int], pairs_per_group: int, eos_id: int
) -> list[list[int]]:
    """``order`` (indices into ``bases``) cut into groups of at most ``pairs_per_group`` pairs of
    one :func:`shared_batch_key` each, in order of each key's first pair.

    >>> group_pairs([], [], 4, eos_id=0)
    []
    """
    by_key: dict[tuple[int, ...], list[int]] = {}
    for i in order:
        by_key.setdefault(shared_batch_key(bases[i], eos_id), []).append(i)
    step = max(1, pairs_per_group)
    return [same[j : j + step] for same in by_key.values() for j in range(0, len(same), step)]


def pairs_per_batch(specs: Sequence[PatchSpec], batch_size: int, max_rows: int | None) -> int:
    """How many pairs :func:`sweep_pairs` puts in one batch of at most ``max_rows`` rows (None: 1),
    for ``specs``: ``max_rows`` over the rows of a pair's largest chunk.

    >>> from latentpatch.patching.specs import position_specs
    >>> pairs_per_batch(position_specs(4, 6), 64, 256)  # 24 patches a pair
    10
    """
    unique = [s for s in _unique_computations(specs) if not isinstance(s.intervention, EarlyExit)]
    rows = min(len(unique), batch_size)
    return 1 if max_rows is None or rows < 2 else max(1, max_rows // rows)


def _shared_groups(bases: Sequence[PairBaseline], rows: int, max_rows: int | None, eos_id: int) -> list[list[int]]:
    """The pairs that run one chunk of ``rows`` specs together: at most ``max_rows`` rows in all,
    with one :func:`shared_batch_key`. A chunk of one row runs alone (a batch of one sums in
    another order than a larger batch)."""
    if max_rows is None or rows < 2:
        return [[j] for j in range(len(bases))]
    return group_pairs(bases, range(len(bases)), max_rows // rows, eos_id)


@torch.no_grad()
def sweep_pairs(
    model: LatentModel,
    bases: Sequence[PairBaseline],
    specs: Sequence[PatchSpec],
    values: Sequence[ValueFn],
    options: EngineOptions = EngineOptions(),
) -> list[list[dict]]:
    """:func:`sweep_fast` of several pairs (``values[j]``: pair j's): one list of metric dicts per
    pair, each the same as :func:`sweep_fast` gives it.

    Each pair's specs are cut into the same chunks as alone; the chunks of pairs with one
    :func:`shared_batch_key` run as one batch of at most ``options.shared_rows`` rows (None: each
    pair alone). On the CPU a row's numbers do not depend on the other rows of its batch (at two
    rows or more), so the bits are those of one pair at a time (docs/method.md §7.1).

    >>> from latentpatch.data.synthetic import generate_pairs
    >>> from latentpatch.model.load import load_model
    >>> from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
    >>> from latentpatch.patching.specs import EngineConfig, layer_specs
    >>> model = load_model("default")
    >>> bases = []
    >>> for pair in generate_pairs(2, seed=0):
    ...     clean, corr = (record_run(model, model.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
    ...     bases.append(prepare_pair(model, pair.pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer))
    >>> specs = layer_specs(model.n_layers, model.num_latent)
    >>> values = [replacement_values(b, EngineConfig()) for b in bases]
    >>> together = sweep_pairs(model, bases, specs, values, EngineOptions(shared_rows=256))
    >>> together == [sweep_fast(model, b, specs, v) for b, v in zip(bases, values)]
    True
    """
    # The baselines' own target rollout when prepare_pair kept it: the same batch-1 computation.
    targets = [
        b.target_rollout if b.target_rollout is not None else model.rollout([b.target.prompt], streams=[b.stream])
        for b in bases
    ]
    # Chunks of batch_size specs in order of their first patched position; a chunk continues from
    # the prefix before its earliest start (rows starting later rerun a few unpatched thoughts,
    # which equal the target's), so small start groups share one batch (fewer, fuller passes).
    unique = _unique_computations(specs)
    ordered = sorted((s for s in unique if not isinstance(s.intervention, EarlyExit)), key=lambda s: s.start)
    early = [s for s in unique if isinstance(s.intervention, EarlyExit)]
    results: list[dict[tuple, dict]] = [{} for _ in bases]
    batch_size = options.batch_size
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        for group in _shared_groups(bases, len(chunk), options.shared_rows, model.config.eos_id):
            parts = [_Part(bases[j], targets[j], values[j], chunk) for j in group]
            for j, cells in zip(group, _sweep_chunk(model, parts, options)):
                results[j].update((s.computation, cell) for s, cell in zip(chunk, cells))
    for j, base in enumerate(bases):
        for i in range(0, len(early), batch_size):
            chunk = early[i : i + batch_size]
            results[j].update(
                (s.computation, cell) for s, cell in zip(chunk, _early_chunk(model, base, targets[j], chunk, options))
            )
    return [[dict(res[s.computation]) for s in specs] for res in results]


@torch.no_grad()
def sweep_fast(
    model: LatentModel,
    base: PairBaseline,
    specs: Sequence[PatchSpec],
    values: ValueFn,
    options: EngineOptions = EngineOptions(),
) -> list[dict]:
    """Metrics for every spec on one pair, sharing the target's KV prefix (docs/method.md §7).

    Specs with the same :attr:`PatchSpec.computation` are computed once. Returns one metric dict
    per spec, in order; how it batches is ``options`` (:class:`EngineOptions`).

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
    return sweep_pairs(model, [base], specs, [values], options)[0]


@torch.no_grad()
def sweep_reference(model: LatentModel, base: PairBaseline, specs: Sequence[PatchSpec], values: ValueFn) -> list[dict]:
    """The plain method: one full hooked rollout per spec (no sharing, no batching), greedy
    decoding of every cell's answer."""
    out = []
    K = model.num_latent
    target_chain = None  # the target's chain for influence (model.thought_chain), computed once
    for spec in specs:
        T_q = len(base.target.prompt)  # batch of one: no padding
        if isinstance(spec.intervention, EarlyExit):
            state, logits = _early_rollout(model, base.target.prompt, spec.start, base.stream)
            out.extend(cell_results(model, [base], [spec], reference_answers(model, [base], state, logits), {}))
            continue
        writes = _writes_for([spec], [values], T_q, model.device)
        override, mask = _overrides(model, [spec], [values], base.target.thoughts[None], [base.stream])
        record = [(spec.component, spec.layer)] if spec.track else []
        r = model.rollout(
            [base.target.prompt],
            writes=writes,
            record=record,
            thought_override=override,
            override_mask=mask,
            streams=[base.stream],  # the pair's draw stream, as its baselines and the fast engine's rows
        )
        tracked = {}
        if spec.track:
            assert r.hooks is not None  # rollout always returns the hooks it ran with
            acts = r.hooks.recorded(spec.component, spec.layer)[0]  # [T_total, d]
            tracked[0] = acts[T_q + max(spec.positions) + 1 : T_q + K]  # [n_later, d]
        answers = reference_answers(model, [base], r.state, r.answer_logits)
        cells = cell_results(model, [base], [spec], answers, tracked)
        if isinstance(spec.intervention, ThoughtReplacement):
            if target_chain is None:
                t = base.target_rollout if base.target_rollout is not None else model.rollout([base.target.prompt])
                target_chain = model.thought_chain(base.target.thoughts, t.latent_hidden[0])
            chain = model.thought_chain(r.thoughts[0], r.latent_hidden[0])
            cells[0].update(thought_similarity(target_chain, chain, 0))
        observer = primed_observer(model, [base], 0)  # the rule asked at each step of this rollout (§22)
        if observer is not None:
            for step in range(K):
                observer(step, r.latent_hidden[:, step])
            cells[0].update(stop_columns(observer, K, model.latent_cap)[0])
        out.extend(cells)
    return out


@torch.no_grad()
def rule_stopped_cells(
    model: LatentModel, base: PairBaseline, specs: Sequence[PatchSpec], values: ValueFn, cap: int
) -> list[dict]:
    """The cells of ``specs`` with each patched run stopped by the family's stop rule
    (``--patched-stop rule``, docs/method.md §22): per spec one plain hooked rollout to ``cap``
    latents, cut after the rule's count r (``cap`` where it never fires) and answered there with
    plain greedy decoding. A patch at a position >= r never takes effect (the run stopped before
    it). Cells carry ``rule_latents`` r; ``latent_count`` is the pair's K (``model.num_latent``)."""
    rule = stop_rule_of(model)
    if rule is None:
        raise ValueError("rule_stopped_cells: the model's family has no stop rule")
    K, T_q = model.num_latent, len(base.target.prompt)
    out = []
    for spec in specs:
        writes = _writes_for([spec], [values], T_q, model.device)
        override, mask = _overrides(model, [spec], [values], base.target.thoughts[None], [base.stream])  # [1, K, d]
        if override is not None and mask is not None:  # run past K: nothing is overridden there
            override = torch.cat([override, override.new_zeros(1, max(cap - K, 0), override.shape[-1])], 1)
            mask = torch.cat([mask, mask.new_zeros(1, max(cap - K, 0))], 1)
        observer = StopObserver(model, rule, 1, [base.stream])  # the pair's draw stream (§21)
        with ActivationHooks(model.lm, writes=writes) as hooks, model.latent_count(cap):
            state, h = model.prefill([base.target.prompt], hooks=hooks, streams=[base.stream])
            observer.prompt(h)
            model.run_thoughts(
                state,
                model.feedback.feed(h, 0, state.streams),
                hooks=hooks,
                thought_override=override,
                override_mask=mask,
                observe=observer,
                next_thought=False,
            )
        r = observer.counts(cap)[0]
        state = state.fork(length=T_q + r)  # the latents after the rule's stop are not part of this run
        logits = model.logits(model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), 1))[:, -1])
        cell = cell_results(model, [base], [spec], reference_answers(model, [base], state, logits), {})[0]
        cell.update({LATENT_COUNT: K, RULE_LATENTS: r, STOPS_ELSEWHERE: r != K})
        out.append(cell)
    return out
