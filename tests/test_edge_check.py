"""The ``edges_engine_reference`` check (docs/method.md §8, §17): its plain reference equals the test's
own plain loop (tests/test_edges.py: a 4-D mask built in the test, the sender's keys/values written into
the cache for the receiver's step), it passes on the real sweep, fails on a broken one, and is recorded in
the manifest and the report's checks table; ``--strict`` stops the run at it."""

from __future__ import annotations

import math

import pytest
from helpers import tiny_text_model
from test_edges import QUESTION, _base, assert_same_cell, plain, plain_sender_kv
from torch import nn

import latentpatch.patching.edge_check as edge_check
from latentpatch.model.load import load_model
from latentpatch.patching.edges import Edge, key_columns, knockout_edges, path_edges


@pytest.fixture(scope="module", params=["codi-default", "identity-gpt2"])
def setup(request):
    """The shipped model (CODI projection, LLaMA) and a config-built identity-feedback one (GPT-2 blocks)."""
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


def grid(model):
    """The run's edges with the per-head knockouts of two heads (as ``--edge-heads`` adds them)."""
    return knockout_edges(model.num_latent, 2) + path_edges(model.num_latent)


def test_the_reference_is_the_plain_loop(setup):
    """edge_reference (the one latent loop, HeadMask in the chosen heads, fresh sender run) equals the
    test's own loop with a hand-built 4-D mask / cache write, for each kind of edge."""
    model, base = setup
    K, T_q = model.num_latent, len(base.target.prompt)
    cells = []
    for edge in (
        Edge("knockout", "question", (0,)),
        Edge("knockout", "t0", (2,)),
        Edge("knockout", "bot", (K,), head=1),
    ):
        head = None if edge.head < 0 else edge.head
        ref = plain(model, base, drop=(edge.queries[0], key_columns(edge.key, T_q), head))
        cells.append(edge_check.edge_reference(model, base, edge))
        assert_same_cell(cells[-1], ref)
    for edge in (Edge("path", "t0", (2,)), Edge("path", "t1", (K,))):
        i = edge.sender
        ref = plain(model, base, swap=(edge.queries[0], T_q + i, plain_sender_kv(model, base, i)))
        cells.append(edge_check.edge_reference(model, base, edge))
        assert_same_cell(cells[-1], ref)
    # not vacuous: the edges move the answer (a reference that ignored them would be the baseline)
    assert max(c["kl"] for c in cells) > 1e-3


def test_the_check_passes_on_the_real_sweep(setup):
    model, base = setup
    edges = grid(model)
    check = edge_check.check_edges_engine_reference(model, base, edges, batch_size=5, n_cells=6, seed=1)
    assert check["passed"] and check["cells"] == 6 and check["answers_differ"] == 0
    assert 0.0 <= check["value"] <= check["threshold"]
    other = edge_check.check_edges_engine_reference(model, base, edges, batch_size=5, n_cells=6, seed=2)
    assert other["passed"] and other["detail"] != "" and other["cells"] == 6


def broken(metric=None, shift=0.0, answer=None):
    """The real sweep, every cell's ``metric`` moved by ``shift`` (NaN: set to NaN), its answer ids replaced."""
    real = edge_check.edge_sweep

    def sweep(*args, **kwargs):
        cells = real(*args, **kwargs)
        for c in cells:
            if metric is not None:
                c[metric] = math.nan if math.isnan(shift) else c[metric] + shift
            if answer is not None:
                c["answer_ids"] = answer
        return cells

    return sweep


def test_the_check_fails_on_a_broken_sweep(setup, monkeypatch):
    model, base = setup
    edges = grid(model)[:12]
    args = (model, base, edges, 4, 3, 0)
    monkeypatch.setattr(edge_check, "edge_sweep", broken("answer_logit_diff", 1e-2))
    off = edge_check.check_edges_engine_reference(*args)
    assert not off["passed"] and off["value"] > off["threshold"]
    monkeypatch.setattr(edge_check, "edge_sweep", broken("kl", math.nan))  # NaN on the sweep's side only
    nan = edge_check.check_edges_engine_reference(*args)
    assert not nan["passed"] and nan["value"] == math.inf
    monkeypatch.setattr(edge_check, "edge_sweep", broken(answer=[7, 7, 7]))
    wrong = edge_check.check_edges_engine_reference(*args)
    assert not wrong["passed"] and wrong["answers_differ"] == 3


def test_the_check_is_recorded_and_a_failure_is_fatal_with_strict(tmp_path, monkeypatch):
    """A run with ``edges`` records ``edges_engine_reference`` in the manifest (and the report's checks
    table shows it); with a broken sweep it is a warning, and with ``--strict`` the run stops before any pair."""
    from latentpatch.analysis.sections import checks_section
    from latentpatch.errors import LatentPatchError
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments
    from latentpatch.rundir import read_manifest

    common = dict(limit=1, experiments=("edges",), report=False, use_cache=False, workers=1, check_cells=3)
    out = run_experiments(RunConfig(out=str(tmp_path / "ok"), **common), progress=False)
    check = read_manifest(out)["checks"]["edges_engine_reference"]
    assert check["passed"] and check["cells"] == 3
    html, n_fail = checks_section(read_manifest(out))
    assert "edges_engine_reference" in html and n_fail == 0

    monkeypatch.setattr(edge_check, "edge_sweep", broken("answer_logit_diff", 1.0))
    warned = run_experiments(RunConfig(out=str(tmp_path / "warn"), **common), progress=False)
    assert read_manifest(warned)["checks"]["edges_engine_reference"]["passed"] is False
    assert len(list((warned / "results" / "edges").glob("*.json"))) == 1  # without --strict: warned, and run
    with pytest.raises(LatentPatchError, match="edges_engine_reference"):
        run_experiments(RunConfig(out=str(tmp_path / "strict"), strict=True, **common), progress=False)
    assert not list((tmp_path / "strict" / "results").glob("edges/*.json"))
