"""The ``edges_engine_reference`` check (docs/method.md §8, §17): :func:`~latentpatch.patching.edges.edge_sweep`
(batched rows continuing a shared copy of the target's prefix) against one plain rollout per edge.

:func:`edge_reference` is the plain computation: a full prompt pass, the one latent loop
(:meth:`LatentModel.run_thoughts`) from thought 0, the edge applied at its query step(s) only, the
loop continued, the answer start, and the reference answers (greedy decoding step by step, the
answer strings teacher-forced whole: :func:`~latentpatch.patching.cells.reference_answers`). It
shares no state with the sweep: the sender's keys/values come from a fresh loop too, and a
knockout is a per-call 4-D attention mask in the chosen heads (every head for ``head = -1``;
:class:`~latentpatch.patching.edges.HeadMask`), where the sweep hides every-head keys through
:meth:`LatentModel.advance`'s 2-D ``hide``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from latentpatch.model.heads import head_shape
from latentpatch.model.kv_cache import layers_of
from latentpatch.model.latent import LatentModel
from latentpatch.names import ALL_HEADS, EDGE_PATH
from latentpatch.patching.baselines import PairBaseline
from latentpatch.patching.cells import cell_results, reference_answers
from latentpatch.patching.checks import COMPARED, mismatch, tolerance
from latentpatch.patching.edges import CacheSwaps, Edge, HeadMask, SenderKV, edge_columns, edge_sweep
from latentpatch.patching.engine import EngineOptions
from latentpatch.patching.specs import PatchSpec


@torch.no_grad()
def plain_sender_kv(
    model: LatentModel, prompt: Sequence[int], thought: torch.Tensor, i: int, stream: int | None = None
) -> SenderKV:
    """Keys/values at latent i of a fresh run of ``prompt`` (thoughts 0..i-1 its own; ``stream``: the
    pair's draw-stream key) with ``thought`` [d] fed as thought i, per layer: ([kv_heads, d_head],
    [kv_heads, d_head])."""
    state, h = model.prefill([list(prompt)], streams=[stream])
    model.run_thoughts(state, model.feedback.feed(h, 0, state.streams), 0, stop=i, next_thought=False)
    model.advance(state, inputs_embeds=thought.to(device=model.device, dtype=model.dtype)[None, None])
    col = len(prompt) + i
    return [(k[0, :, col].clone(), v[0, :, col].clone()) for k, v in layers_of(state.cache)]


@torch.no_grad()
def _dropped_keys(
    model: LatentModel, edge: Edge, T_q: int, roles: Sequence[str] | None
) -> tuple[list[int], torch.Tensor]:
    """The edge's key columns and the knockout mask ``[1, H, T_q + K + n_answer]`` (True: dropped)."""
    n_heads = head_shape(model.lm)[0]
    cols = edge_columns(edge, T_q, model.num_latent, n_heads, roles)
    width = T_q + model.num_latent + len(model.answer_start_ids())
    drop = torch.zeros(1, n_heads, width, dtype=torch.bool, device=model.device)
    heads = slice(None) if edge.head == ALL_HEADS else slice(edge.head, edge.head + 1)
    drop[0, heads, cols] = True
    return cols, drop


def edge_reference(model: LatentModel, base: PairBaseline, edge: Edge, roles: Sequence[str] | None = None) -> dict:
    """The metric dict of one edge on the pair's target run by one plain rollout (module docstring);
    the same keys as :func:`~latentpatch.patching.edges.edge_sweep`'s cells. Refused edges raise
    :class:`~latentpatch.patching.edges.EdgeRefused` as there.

    >>> from latentpatch.data.synthetic import generate_pairs
    >>> from latentpatch.model.load import load_model
    >>> from latentpatch.patching.baselines import prepare_pair, record_run
    >>> model = load_model("default")
    >>> pair = generate_pairs(1, seed=0)[0]
    >>> clean, corrupted = (record_run(model, model.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
    >>> base = prepare_pair(model, pair.pair_id, clean, corrupted, pair.clean.answer, pair.corrupted.answer)
    >>> edge = Edge("knockout", "t0", (1,))
    >>> ref, fast = edge_reference(model, base, edge), edge_sweep(model, base, [edge])[0]
    >>> abs(ref["kl"] - fast["kl"]) < 1e-4 and ref["answer_ids"] == fast["answer_ids"]
    True
    """
    prompt = list(base.target.prompt)  # batch of one: no padding, columns are absolute
    K, n_answer = model.num_latent, len(model.answer_start_ids())
    cols, drop = _dropped_keys(model, edge, len(prompt), roles)
    is_path = edge.kind == EDGE_PATH
    kv: SenderKV = []
    if is_path:
        assert edge.sender is not None  # checked by edge_columns
        kv = plain_sender_kv(model, prompt, base.source.thoughts[edge.sender], edge.sender, base.stream)
    override = mask = None
    if is_path and edge.hold:  # every input from the first receiver on is the target's thought
        override = base.target.thoughts[None].to(device=model.device, dtype=model.dtype)  # [1, K, d]
        mask = torch.zeros(1, K, dtype=torch.bool, device=model.device)
        mask[0, edge.start :] = True
    state, h = model.prefill([prompt], streams=[base.stream])  # the full prompt pass: nothing shared with the sweep
    swaps = CacheSwaps(state)
    with HeadMask(model.lm) as masks:

        def apply(p: int, length: int) -> None:
            # set up query p's call (p = K: the answer start) alone; undo the previous step's
            swaps.restore()
            masks.drop = None
            if p in edge.queries and is_path:
                swaps.apply([(0, cols[0], kv)], keep=p == K)  # the answer receiver: the whole answer phase
            elif p in edge.queries:
                masks.drop, masks.length = drop, length

        def step(p: int, thought: torch.Tensor) -> torch.Tensor:
            apply(p, state.length + 1)
            return thought

        first = model.feedback.feed(h, 0, state.streams)
        model.run_thoughts(state, first, 0, step_hook=step, thought_override=override, override_mask=mask)
        apply(K, state.length + n_answer)
        end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), 1))
        masks.drop = None
    logits = model.logits(end[:, -1])  # [1, V]
    spec = PatchSpec("edges", edge.kind, "edge", -1, edge.queries, edge.start)  # a label only
    return cell_results(model, [base], [spec], reference_answers(model, [base], state, logits), {})[0]


def check_edges_engine_reference(
    model: LatentModel,
    base: PairBaseline,
    edges: Sequence[Edge],
    batch_size: int,
    n_cells: int = 8,
    seed: int = 0,
    roles: Sequence[str] | None = None,
) -> dict:
    """Check 6 (runs with ``edges``): the run's sweep of every edge of one pair (:func:`edge_sweep`
    with the run's ``batch_size``) vs :func:`edge_reference` on ``n_cells`` seeded random edges: the
    metrics of :data:`~latentpatch.patching.checks.COMPARED` within the engine checks' threshold,
    relative to max(1, |reference|) as ``steps_engine_reference`` (:func:`~latentpatch.patching.checks.mismatch`:
    NaN on one side fails), and the same greedy ``answer_ids`` in every cell, as ``engine_reference``."""
    picked = sorted(random.Random(seed).sample(range(len(edges)), min(n_cells, len(edges))))
    cells = edge_sweep(model, base, edges, roles, EngineOptions(batch_size))  # as the run computes the pair
    worst, other_answers = 0.0, 0
    for r in picked:
        ref = edge_reference(model, base, edges[r], roles)
        for k in COMPARED:  # relative, as steps_engine_reference: logit_l2 and the answer logits can be large
            b = ref.get(k)
            scale = 1.0 if b is None or math.isnan(b) else max(1.0, abs(b))
            worst = max(worst, mismatch(cells[r].get(k), b) / scale)
        other_answers += list(cells[r]["answer_ids"]) != list(ref["answer_ids"])
    threshold = tolerance(model, 1e-4)
    return {
        "passed": worst <= threshold and other_answers == 0,
        "value": worst,
        "threshold": threshold,
        "cells": len(picked),
        "answers_differ": other_answers,
        "detail": f"max |sweep - plain rollout| / max(1, |plain|) over {len(picked)} random edges of pair "
        f"{base.pair_id}, metrics {', '.join(COMPARED)}; greedy answers differ in {other_answers} of them",
    }
