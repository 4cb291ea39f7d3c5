"""The ``edges`` experiment of a run (docs/method.md §17) through the one stage runner.

Per pair, on its target run (the run ``--direction`` patches): every visible attention-edge knockout
(query j = thought 0..K-1 or the answer start, key = the question, [BOT] or an earlier thought; every
head, and each head alone with ``--edge-heads``), the K x K grid of path patches (sender thought i,
receiver j > i) and per sender the whole-thought ``total`` and ``frozen`` patches
(:mod:`latentpatch.patching.edges`). One file per pair (``results/edges/NNNNN.json``, ``--resume``
skips finished pairs), assembled into ``results/edges.parquet`` (:data:`~latentpatch.names.EDGE_COLUMNS`).
A run without ``edges`` never calls it, so its files stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from latentpatch.data.pairs import Pair
from latentpatch.model.heads import head_shape
from latentpatch.names import EDGES_DIR, EDGES_EXPERIMENT
from latentpatch.patching.baselines import PairBaseline
from latentpatch.patching.edge_check import check_edges_engine_reference
from latentpatch.patching.edges import (
    Edge,
    edge_sweep,
    knockout_edges,
    path_edges,
    sender_specs,
    source_thoughts,
)
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference
from latentpatch.patching.metrics import same_number
from latentpatch.patching.specs import PatchSpec
from latentpatch.pipeline.manifest import RunContext
from latentpatch.pipeline.stages import Done, Plan, Stage, run_stage


def edge_row(base: PairBaseline, kind: str, query: int, key: str, sender: int, head: int, m: dict) -> dict[str, Any]:
    """One row of ``edges.parquet`` (:data:`~latentpatch.names.EDGE_COLUMNS`) from a cell's metrics."""
    source_answer = base.clean_answer if base.direction == "denoise" else base.corrupted_answer
    return {
        "pair_id": base.pair_id,
        "kind": kind,
        "query": query,
        "key": key,
        "sender": sender,
        "head": head,
        "kl": m["kl"],
        "answer_logit_diff": m["answer_logit_diff"],
        "ld_change": m["answer_logit_diff"] - base.ld_target,
        "recovery": m["recovery"],
        "pred_answer": m["pred_answer"],
        "flipped": list(m["answer_ids"]) != list(base.target.answer_ids),
        "to_source": same_number(m["pred_answer"], source_answer),
        "flagged": not (base.clean_correct and base.corrupted_correct),
    }


def edge_rows(
    base: PairBaseline, edges: Sequence[Edge], cells: Sequence[dict], specs: Sequence[PatchSpec], whole: Sequence[dict]
) -> list[dict[str, Any]]:
    """The pair's rows: one per edge, then one per whole-thought spec (``query`` -1, ``key`` ``t<i>``)."""
    rows = [
        edge_row(base, e.kind, e.queries[0], e.key, -1 if e.sender is None else e.sender, e.head, m)
        for e, m in zip(edges, cells)
    ]
    rows += [edge_row(base, s.mode, -1, f"t{s.index}", s.index, -1, m) for s, m in zip(specs, whole)]
    return rows


def pair_edges(ctx: RunContext, i: int, edges: Sequence[Edge], specs: Sequence[PatchSpec]) -> dict[str, Any]:
    """Pair ``i``'s file ``results/edges/{k:05d}.json``: the edges through :func:`edge_sweep` (batched
    from the shared prefix; ``--engine reference``: one row per batch), the whole-thought specs through
    the engine."""
    model, base = ctx.model, ctx.bases[i]
    values = source_thoughts(base)
    if ctx.config.engine == "fast":
        cells = edge_sweep(model, base, edges, options=EngineOptions(ctx.batch_size))
        whole = sweep_fast(model, base, specs, values, EngineOptions(ctx.batch_size))
    else:
        cells = edge_sweep(model, base, edges, options=EngineOptions(1))
        whole = sweep_reference(model, base, specs, values)
    return {"pair_id": base.pair_id, "index": ctx.indices[i], "rows": edge_rows(base, edges, cells, specs, whole)}


def edges_stage(ctx: RunContext) -> Stage:
    """The edges experiment as a stage (``results/edges/NNNNN.json``), checked first: the sweep of the
    first pair vs one plain rollout per edge on a seeded sample of ``--check-cells`` edges
    (``edges_engine_reference``, fatal with ``--strict``; docs/method.md §8)."""
    model = ctx.model
    K = model.num_latent
    n_heads = head_shape(model.lm)[0] if ctx.config.edge_heads else 0
    edges = knockout_edges(K, n_heads) + path_edges(K)
    specs = sender_specs(K)

    def check() -> dict:
        # the run's sweep of the first pair (its batch size) vs one plain rollout per sampled edge
        batch = ctx.batch_size if ctx.config.engine == "fast" else 1
        return check_edges_engine_reference(model, ctx.bases[0], edges, batch, ctx.config.check_cells, ctx.config.seed)

    def prepare() -> Plan:
        return Plan(
            work=lambda group: [Done(pair_edges(ctx, i, edges, specs)) for i in group],
            units=len(edges),
            checks={"edges_engine_reference": check},
        )

    return Stage("edges", EDGES_DIR, "rows", "edges_s", prepare)


def sweep_edges(ctx: RunContext, all_pairs: Sequence[Pair] | None = None) -> None:
    """The edges experiment, when ``--experiments`` names it (a default run never calls it)."""
    if EDGES_EXPERIMENT in ctx.config.experiments:
        run_stage(ctx, edges_stage(ctx))
