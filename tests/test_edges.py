"""Edges between thoughts (docs/method.md §17): knockouts and path patching against plain loops.

The plain computations here run the backbone one latent step at a time with a 4-D attention mask
built in the test (every head, or one head's row of a [1, H, Q, T] mask) and, for path patching,
the sender's keys/values written into the cache for the receiver's step only (the answer: for the
whole answer phase). One edge per run, no batching, no shared prefix.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_text_model
from torch import nn

from latentpatch.model.kv_cache import layers_of
from latentpatch.model.load import load_model
from latentpatch.model.state import RolloutState
from latentpatch.patching.baselines import prepare_pair, record_run
from latentpatch.patching.cells import cell_results, reference_answers
from latentpatch.patching.edges import (
    Edge,
    EdgeRefused,
    _edge_chunk,
    edge_sweep,
    key_columns,
    sender_specs,
    source_thoughts,
)
from latentpatch.patching.engine import EngineOptions, sweep_fast
from latentpatch.patching.specs import PatchSpec

QUESTION = ("Tom has 16 eggs and eats 3.", 13, "A box holds 28 pens, 5 are red.", 23)


def _base(model, qc, ac, qr, ar):
    clean, corr = record_run(model, model.prompt_ids(qc)), record_run(model, model.prompt_ids(qr))
    return prepare_pair(model, "p", clean, corr, ac, ar)


@pytest.fixture(scope="module", params=["codi-default", "identity-gpt2"])
def setup(request):
    """The shipped model (CODI projection, LLaMA) and a config-built Coconut-style one (identity
    feedback, GPT-2 blocks)."""
    if request.param == "codi-default":
        from latentpatch.data.synthetic import generate_pairs

        model = load_model("default")
        pair = generate_pairs(1, seed=0)[0]
        base = _base(model, pair.clean.question, pair.clean.answer, pair.corrupted.question, pair.corrupted.answer)
    else:
        model = tiny_text_model("gpt2")
        model.prj = nn.Identity()
        base = _base(model, *QUESTION)
    return model, base


# ---- the plain loop -----------------------------------------------------------------------------------
def _forward(model, state, embeds, keep):
    """One backbone call on ``state`` with the 4-D bool mask ``keep`` [1, 1 or H, T_new, T]."""
    out = model.backbone(
        inputs_embeds=embeds,
        attention_mask=keep,
        position_ids=state.next_position[:, None] + torch.arange(embeds.shape[1])[None],
        use_cache=True,
        **{model.cache_keyword: state.cache},
    )
    state.cache = getattr(out, model.cache_keyword)
    state.length += embeds.shape[1]
    state.next_position = state.next_position + embeds.shape[1]
    return out.last_hidden_state


def _mask(model, length, n_new, cols=(), head=None):
    """[1, 1 or H, n_new, length] causal keep-mask without ``cols`` (in ``head`` only, when given)."""
    H = model.lm.config.num_attention_heads
    q = torch.arange(n_new)[:, None]
    keep = (torch.arange(length)[None] <= length - n_new + q)[None, None].repeat(1, H, 1, 1)
    for c in cols:
        if head is None:
            keep[:, :, :, c] = False
        else:
            keep[:, head, :, c] = False
    return keep


def _write(state, col, kv):
    for (k, v), (sk, sv) in zip(layers_of(state.cache), kv):
        k[0, :, col], v[0, :, col] = sk, sv


def plain(model, base, *, drop=None, swap=None, hold_from=None):
    """The target run, one step at a time: ``drop`` = (query j, cols, head or None) masked out of j's
    call; ``swap`` = (receiver j, col, kv) written into the cache for j's call (j = K: kept for the
    answer phase); ``hold_from``: inputs from there on are the target's thoughts. Returns a cell."""
    K, prompt = model.num_latent, base.target.prompt
    state, h = model.prefill([prompt])
    thought = model.feedback(h)
    for p in range(K + 1):
        if hold_from is not None and hold_from <= p < K:
            thought = base.target.thoughts[p][None]
        n_new = 1 if p < K else len(model.answer_start_ids())
        length = state.length + n_new
        keep = _mask(model, length, n_new, *(drop[1:] if drop and drop[0] == p else ()))
        saved = None
        if swap and swap[0] == p:
            saved = [(k[0, :, swap[1]].clone(), v[0, :, swap[1]].clone()) for k, v in layers_of(state.cache)]
            _write(state, swap[1], swap[2])
        embeds = thought[:, None] if p < K else model.embed_ids(model.answer_start_ids(), 1)
        out = _forward(model, state, embeds, keep)
        if saved is not None and p < K:
            _write(state, swap[1], saved)
        if p < K:
            thought = model.feedback(out[:, -1])
    state = RolloutState(state.cache, torch.ones(1, state.length, dtype=torch.long), state.next_position, state.length)
    logits = model.logits(out[:, -1])
    spec = PatchSpec("edges", "plain", "edge", -1, (0,), 0)
    return cell_results(model, [base], [spec], reference_answers(model, [base], state, logits), {})[0]


def plain_sender_kv(model, base, i):
    """Keys/values at latent i of the target run with the source's thought i fed there."""
    state, h = model.prefill([base.target.prompt])
    thought = model.feedback(h)
    for _ in range(i):
        thought = model.feedback(_forward(model, state, thought[:, None], None)[:, -1])
    _forward(model, state, base.source.thoughts[i][None, None], None)
    col = len(base.target.prompt) + i
    return [(k[0, :, col].clone(), v[0, :, col].clone()) for k, v in layers_of(state.cache)]


def assert_same_cell(a, b, tol=1e-4):
    for k in ("kl", "answer_logit_diff", "recovery"):
        if not (math.isnan(a[k]) and math.isnan(b[k])):
            assert abs(a[k] - b[k]) <= tol * max(1.0, abs(b[k])), (k, a[k], b[k])
    assert a["answer_ids"] == b["answer_ids"]


# ---- knockouts ------------------------------------------------------------------------------------------
def test_knockout_equals_plain_rollout_with_a_4d_mask(setup):
    model, base = setup
    K, T_q = model.num_latent, len(base.target.prompt)
    edges = [
        Edge("knockout", "t0", (2,)),
        Edge("knockout", "question", (0,)),
        Edge("knockout", "bot", (K,)),
        Edge("knockout", "t1", (3,), head=1),
        Edge("knockout", "question", (K,), head=0),
        Edge("knockout", "bot", (K,), head=0),
    ]
    cells = edge_sweep(model, base, edges, options=EngineOptions(batch_size=3))  # several chunks, mixed starts
    for edge, cell in zip(edges, cells):
        cols = key_columns(edge.key, T_q)
        ref = plain(model, base, drop=(edge.queries[0], cols, None if edge.head < 0 else edge.head))
        assert_same_cell(cell, ref)
    # not vacuous: cutting the question out of thought 0 moves the answer distribution, and so does a
    # one-head knockout (its change of the logit difference is well above the comparison's tolerance)
    assert cells[1]["kl"] > 1e-3
    assert max(abs(c["answer_logit_diff"] - base.ld_target) for c in cells[3:]) > 1e-2


def test_knocking_out_nothing_equals_the_baseline(setup):
    model, base = setup
    target = base.target_rollout
    edges = [Edge("knockout", "t0", (2,)), Edge("knockout", "bot", (1,), head=1)]
    cells = _edge_chunk(model, base, target, edges, [[], []], lambda i: [], EngineOptions())
    for cell in cells:
        assert cell["kl"] <= 1e-6 and cell["answer_ids"] == list(base.target.answer_ids)
    assert_same_cell(cells[0], plain(model, base))


def test_a_knockout_the_query_cannot_see_is_refused(setup):
    model, base = setup
    K = model.num_latent
    for edge in (
        Edge("knockout", "t2", (2,)),  # itself: not an earlier key
        Edge("knockout", "t3", (1,)),  # a later thought: the causal mask hides it already
        Edge("knockout", "number 9", (1,)),  # the question has no ninth number
        Edge("knockout", "t0", (K + 1,)),  # no such query
        Edge("knockout", "t0", (1,), head=99),
        Edge("path", "t0", (1,), head=0),  # a path is patched in every head
        Edge("path", "question", (1,)),
    ):
        with pytest.raises(EdgeRefused):
            edge_sweep(model, base, [Edge("knockout", "t0", (1,)), edge], roles=["other"] * len(base.target.prompt))


# ---- path patching ---------------------------------------------------------------------------------------
def test_path_patching_equals_a_plain_loop(setup):
    model, base = setup
    K, T_q = model.num_latent, len(base.target.prompt)
    edges = [Edge("path", "t0", (2,)), Edge("path", "t1", (K,)), Edge("path", "t0", (1,))]
    cells = edge_sweep(model, base, edges, options=EngineOptions(batch_size=2))
    for edge, cell in zip(edges, cells):
        i = edge.sender
        ref = plain(model, base, swap=(edge.queries[0], T_q + i, plain_sender_kv(model, base, i)))
        assert_same_cell(cell, ref)


def test_path_to_every_later_position_held_is_the_frozen_patch(setup):
    """Exactly: path i -> every later position (thoughts i+1..K-1 and the answer phase) with every input
    after i held at the target's = the frozen thought patch of i; from the last thought to the answer,
    with nothing held, it is also the total patch (nothing regenerates)."""
    model, base = setup
    K = model.num_latent
    held = [Edge("path", f"t{i}", tuple(range(i + 1, K + 1)), hold=True) for i in range(K)]
    cells = edge_sweep(model, base, held + [Edge("path", f"t{K - 1}", (K,))])
    specs = sender_specs(K)
    frozen = sweep_fast(model, base, [s for s in specs if s.frozen], source_thoughts(base))
    total = sweep_fast(model, base, [s for s in specs if not s.frozen], source_thoughts(base))
    for a, b in zip(cells[:K], frozen):
        assert_same_cell(a, b)
    assert_same_cell(cells[K], frozen[K - 1])
    assert_same_cell(cells[K], total[K - 1])
    # not vacuous: some sender moves the answer through the attention path
    assert max(c["kl"] for c in frozen) > 1e-3


def test_edge_heads_without_the_edges_experiment_is_refused():
    from latentpatch.errors import LatentPatchError
    from latentpatch.pipeline.config import RunConfig

    with pytest.raises(LatentPatchError, match="--edge-heads applies to the edges experiment only; fix: add edges"):
        RunConfig(experiments=("layer",), edge_heads=True).validate()
    RunConfig(experiments=("edges",), edge_heads=True).validate()
