"""Per-pair latent counts by a family's stop rule (docs/method.md §22; model/stops.py,
patching/stop_cells.py, pipeline/latent_counts.py), checked against plain rollouts written here.

The model is a tiny random text model whose feedback is given a deterministic rule (stop when
the top-1 id after a latent is STOP_ID), chosen so that the pairs' counts differ (3 to the cap 6).
CoLaR's own rule (a sampled ``###``) is checked against its official loop in tests/test_colar.py;
here its counts through the pipeline are checked against that loop too.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from helpers import tiny_text_model

from latentpatch.data.pairs import load_pairs
from latentpatch.data.synthetic import generate_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.model.sites import Write
from latentpatch.model.stops import FirstIdStop, rule_latent_counts
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.run import run_experiments
from latentpatch.rundir import read_pair_result

CAP, STOP_ID = 6, 83


def stopping_model():
    m = tiny_text_model(num_latent=CAP, seed=3)
    m.feedback.stop_rule = FirstIdStop(STOP_ID)
    return m


def plain_count(model, question: str) -> int:
    """The rule read by hand: the full unpatched rollout to the cap, the first latent whose top-1 id
    is STOP_ID (that latent counted), the cap if none."""
    r = model.rollout([question])
    ids = model.logits(r.latent_hidden[0]).argmax(-1).tolist()
    return next((p + 1 for p, i in enumerate(ids) if i == STOP_ID), CAP)


def answer_ids(run, pair_id: str, experiment: str, layer: int, position: int) -> list[int]:
    """The greedy answer of one cell, from the run's per-pair result files."""
    for f in sorted((run / "results" / "pairs").glob("[0-9]*.json")):
        entry = read_pair_result(f)
        if entry and entry["pair_id"] == pair_id:
            for c in entry["cells"]:
                if (c["experiment"], c["layer"], c["position"]) == (experiment, layer, position):
                    return list(c["answer_ids"])
    raise KeyError((pair_id, experiment, layer, position))


def first_stop(model, latent_hidden: torch.Tensor) -> int:
    ids = model.logits(latent_hidden).argmax(-1).tolist()
    return next((p + 1 for p, i in enumerate(ids) if i == STOP_ID), -1)


@pytest.fixture(scope="module")
def pairs():
    return generate_pairs(8, seed=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pairs):
    out = {}
    for mode in ("keep", "rule"):
        d = tmp_path_factory.mktemp(mode) / "run"
        config = RunConfig(
            experiments=("layer", "position"), out=str(d), report=False, use_cache=False, patched_stop=mode
        )
        run_experiments(config, model=stopping_model(), pairs=pairs, progress=False, command="test")
        out[mode] = d
    return out


def test_rule_counts_equal_the_rule_read_by_hand(pairs):
    m = stopping_model()
    questions = [p.corrupted.question for p in pairs]
    counts = rule_latent_counts(m, [m.prompt_ids(q) for q in questions], CAP)
    assert counts == [plain_count(m, q) for q in questions]
    assert len(set(counts)) >= 3 and CAP in counts  # the rule splits the pairs (and some reach the cap)


def test_each_pair_runs_its_target_count_and_checks_pass(runs, pairs):
    m = stopping_model()
    manifest = json.loads((runs["keep"] / "manifest.json").read_text())
    assert all(c["passed"] for c in manifest["checks"].values()), manifest["checks"]
    cells = pd.read_parquet(runs["keep"] / "results" / "cells.parquet")
    by_pair = cells.groupby("pair_id")["latent_count"].agg(["min", "max"])
    for p in pairs:
        k = plain_count(m, p.corrupted.question)  # denoise: the corrupted run is the target
        assert by_pair.loc[p.pair_id, "min"] == by_pair.loc[p.pair_id, "max"] == k
        positions = cells[(cells.pair_id == p.pair_id) & (cells.experiment == "position")].position
        assert sorted(set(positions)) == list(range(k))  # the sites of its own K thoughts, no more
    assert manifest["latent_stops"]["target_counts"] == {
        str(k): n
        for k, n in sorted(pd.Series([plain_count(m, p.corrupted.question) for p in pairs]).value_counts().items())
    }


def test_a_patched_cell_equals_a_plain_rollout_at_the_pairs_count(runs, pairs):
    """A position patch (layer 1, thought 1) of the clean run's residual into the corrupted run, both
    rolled out with the pair's own K by the model stack directly: the same answer and logit diff,
    and the rule's first firing in that rollout is the cell's rule_latents."""
    m = stopping_model()
    cells = pd.read_parquet(runs["keep"] / "results" / "cells.parquet")
    checked = 0
    for p in pairs:
        k = plain_count(m, p.corrupted.question)
        if k < 3:
            continue
        with m.latent_count(k):
            src = m.rollout([p.clean.question], record=[("resid_out", 1)])
            tgt_prompt = m.prompt_ids(p.corrupted.question)
            at = len(tgt_prompt) + 1
            value = src.hooks.recorded("resid_out", 1)[:, src.prompt_len + 1]
            r = m.rollout([tgt_prompt], writes=[Write("resid_out", 1, torch.tensor([at]), torch.tensor([True]), value)])
            answer = m.generate(r.state, r.answer_logits)[0]
        row = cells[(cells.pair_id == p.pair_id) & (cells.experiment == "position") & (cells.layer == 1)]
        row = row[row.position == 1].iloc[0]
        assert answer_ids(runs["keep"], p.pair_id, "position", 1, 1) == list(answer)
        assert row.rule_latents == first_stop(m, r.latent_hidden[0])
        assert row.stops_elsewhere == (row.rule_latents != k and not (row.rule_latents == -1 and k == CAP))
        checked += 1
    assert checked >= 3


def test_patched_stop_rule_answers_where_the_rule_fires(runs, pairs):
    """--patched-stop rule: a cell whose rule fires elsewhere equals a plain rollout to the cap with
    the patch, cut after the rule's count r and answered there (the plain early answer at r)."""
    m = stopping_model()
    keep = pd.read_parquet(runs["keep"] / "results" / "cells.parquet")
    rule = pd.read_parquet(runs["rule"] / "results" / "cells.parquet")
    assert keep.stops_elsewhere.any()
    same = ~keep.stops_elsewhere.to_numpy()
    kept_before, kept_after = keep.answer_logit_diff.to_numpy()[same], rule.answer_logit_diff.to_numpy()[same]
    assert (kept_before == kept_after).all()  # the cells whose rule fires at K are untouched
    moved = rule[rule.stops_elsewhere & (rule.experiment == "position")]
    assert len(moved) > 0
    for _, row in moved.head(4).iterrows():
        p = next(x for x in pairs if x.pair_id == row.pair_id)
        with m.latent_count(int(row.latent_count)):
            src = m.rollout([p.clean.question], record=[("resid_out", int(row.layer))])
        value = src.hooks.recorded("resid_out", int(row.layer))[:, src.prompt_len + int(row.position)]
        prompt = m.prompt_ids(p.corrupted.question)
        at = len(prompt) + int(row.position)
        full = m.rollout(
            [prompt], writes=[Write("resid_out", int(row.layer), torch.tensor([at]), torch.tensor([True]), value)]
        )
        r = first_stop(m, full.latent_hidden[0])
        r = CAP if r == -1 else r
        assert row.rule_latents == r
        with m.latent_count(r):  # the patch lies before r, or the run stopped before it: then no write
            writes = [Write("resid_out", int(row.layer), torch.tensor([at]), torch.tensor([True]), value)]
            plain = m.rollout([prompt], writes=writes if int(row.position) < r else [])
            answer = m.generate(plain.state, plain.answer_logits)[0]
        got = answer_ids(runs["rule"], row.pair_id, "position", int(row.layer), int(row.position))
        assert got == list(answer)


def test_fixed_count_runs_every_pair_at_the_cap(tmp_path, pairs):
    config = RunConfig(
        experiments=("position",),
        out=str(tmp_path / "run"),
        report=False,
        use_cache=False,
        latent_count="fixed",
        limit=3,
    )
    run_experiments(config, model=stopping_model(), pairs=pairs, progress=False, command="test")
    cells = pd.read_parquet(tmp_path / "run" / "results" / "cells.parquet")
    assert set(cells.latent_count) == {CAP} and sorted(set(cells.position)) == list(range(CAP))


def test_what_per_pair_counts_cannot_run_is_refused_in_one_line(tmp_path, pairs):
    for kwargs, flag in (
        ({"experiments": ("layer", "early")}, "--experiments early"),
        ({"replacement": "mean"}, "--replacement mean"),
    ):
        config = RunConfig(out=str(tmp_path / "x"), report=False, use_cache=False, **kwargs)
        with pytest.raises(LatentPatchError, match=flag):
            run_experiments(config, model=stopping_model(), pairs=pairs, progress=False)
    fixed = tiny_text_model(num_latent=CAP, seed=3)  # no rule
    config = RunConfig(out=str(tmp_path / "y"), report=False, use_cache=False, patched_stop="rule")
    with pytest.raises(LatentPatchError, match="--patched-stop rule: .* has no stop rule"):
        run_experiments(config, model=fixed, pairs=pairs, progress=False)


def test_the_report_says_how_often_patched_runs_stop_elsewhere(runs):
    """stats.json's latent_stops recomputed here from cells.parquet with plain pandas (each pair's
    share of patched runs whose rule fires elsewhere, averaged over pairs), and the report's sentence
    quotes it (tests/test_report_sentences.py's checker)."""
    from test_report_sentences import check_sentences, findings_of, sections_of

    from latentpatch.analysis.report import build_report

    build_report(runs["keep"])
    _, stats, page = findings_of(runs["keep"])
    assert "stops" in sections_of(page)
    check_sentences(runs["keep"])
    cells = pd.read_parquet(runs["keep"] / "results" / "cells.parquet")
    for e in stats["latent_stops"]["experiments"]:
        rows = cells[cells.experiment == e["experiment"]]
        shares = [g.stops_elsewhere.sum() / len(g) for _, g in rows.groupby("pair_id")]
        assert e["mean"] == pytest.approx(sum(shares) / len(shares), abs=1e-12)
        assert e["ci_low"] <= e["mean"] <= e["ci_high"] and e["cells"] == len(rows)
    sentence = next(s for s in page.split('<p class="finding">') if "stop rule" in s)
    assert "would have stopped" in sentence


def test_shards_with_per_pair_counts_merge_to_the_unsharded_run(runs, pairs, tmp_path):
    """--shard 0/2 + 1/2 + merge == the unsharded keep run: every file of results/, and the manifest's
    latent_stops."""
    from latentpatch.pipeline.merge import merge_runs

    shards = []
    for i in range(2):
        config = RunConfig(
            experiments=("layer", "position"),
            out=str(tmp_path / f"s{i}"),
            report=False,
            use_cache=False,
            shard=f"{i}/2",
        )
        shards.append(run_experiments(config, model=stopping_model(), pairs=pairs, progress=False, command="test"))
    merged = merge_runs(shards, tmp_path / "merged", report=False)
    want = {p.relative_to(runs["keep"]): p.read_bytes() for p in (runs["keep"] / "results").rglob("*") if p.is_file()}
    got = {p.relative_to(merged): p.read_bytes() for p in (merged / "results").rglob("*") if p.is_file()}
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == []
    full_stops = json.loads((runs["keep"] / "manifest.json").read_text())["latent_stops"]
    assert json.loads((merged / "manifest.json").read_text())["latent_stops"] == full_stops


def test_colar_runs_each_pair_at_its_official_sampled_count(tmp_path):
    """CoLaR's own rule through a run: each pair's latent count is what the official loop
    (tests/test_colar.py ``official_run``, written from ``latent_generate``) samples for its target
    question with the pair's stream seed (at most the cap), and the engine's checks pass (a random
    head's thoughts do not matter to its answers, so live_thoughts is not asked of it)."""
    from test_colar import official, official_run  # noqa: F401  (the fixture's checkpoint builder)

    from latentpatch.model.load import load_model
    from latentpatch.model.streams import pair_stream, stream_seed

    tree, tok, base, ckpt = official.__wrapped__(TmpFactory(tmp_path))
    cap = 12
    entries = []
    for i, (a, b) in enumerate([(12, 15), (7, 9), (30, 41), (5, 8), (22, 26), (3, 6)]):
        entries += [
            {"pair_id": f"c{i}", "variant": "clean", "question": f"Tom has {a} apples. How many?", "answer": a},
            {"pair_id": f"c{i}", "variant": "corrupted", "question": f"Tom has {b} apples. How many?", "answer": b},
        ]
    (tmp_path / "pairs.json").write_text(json.dumps(entries))
    pairs = load_pairs(tmp_path / "pairs.json")
    config = RunConfig(experiments=("position",), out=str(tmp_path / "run"), report=False, use_cache=False)
    model = load_model(f"colar:{ckpt}", base=str(base), num_latent=cap)
    run_experiments(config, model=model, pairs=pairs, progress=False, command="test")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    checks = manifest["checks"]
    assert all(checks[c]["passed"] for c in ("identity", "full_restoration", "engine_reference")), checks
    cells = pd.read_parquet(tmp_path / "run" / "results" / "cells.parquet")
    counts = []
    for p in pairs:
        n = len(official_run(tree, tok, p.corrupted.question, stream_seed(config.seed, pair_stream(p.pair_id)))[0])
        counts.append(min(n, cap))
        assert set(cells[cells.pair_id == p.pair_id].latent_count) == {counts[-1]}
    assert len(set(counts)) >= 2 and min(counts) < cap, counts  # the sampled stop gives the pairs different counts


class TmpFactory:
    """``tmp_path_factory``'s ``mktemp`` for a fixture function called directly."""

    def __init__(self, root):
        self.root = root

    def mktemp(self, name):
        path = self.root / name
        path.mkdir()
        return path
