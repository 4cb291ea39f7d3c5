"""Vocabulary-space thought replacements (docs/method.md §13): each value is built here by hand (numpy
cosines, least squares, the number's token from the tokenizer) and fed through one plain latent loop;
the engine's cells (fast and reference) must equal that loop's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_text_model
from test_engine import baselines
from test_steps import plain_thought_cell

from latentpatch.names import NUMBER_REPLACEMENTS, VOCAB_REPLACEMENTS, VOCAB_TOP_K
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference
from latentpatch.patching.experiments import SpecShape, experiment_specs
from latentpatch.patching.interventions import Replacement, ThoughtReplacement
from latentpatch.patching.specs import PatchSpec
from latentpatch.patching.steps import step_pool, step_record, step_rows, step_values, thought_specs
from latentpatch.patching.vocab import Vocabulary, runs_for, vocab_specs

FAMILIES = ["llama", "gpt2"]
#: The ids that are not vocabulary: <eos>, <unk> (special; the shipped model has no <unk>), <pad>, <bot>, <eot>.
NOT_VOCAB = ("<eos>", "<unk>", "<pad>", "<bot>", "<eot>")
#: The target run's intermediate values in the number tests (first answer tokens "9", "1", "4", "4").
INTERMEDIATES = [9.0, 41.0]


def setup(family: str):
    m = tiny_text_model(family, num_latent=3)
    bases = baselines(m)
    recs = [(step_record(m, b.target.prompt), step_record(m, b.source.prompt)) for b in bases]
    pool = step_pool([s for _, s in recs])
    vocab = Vocabulary.of(m)
    values = [step_values(t, s, pool, vocab=vocab, intermediates=INTERMEDIATES) for t, s in recs]
    return m, bases, values


def excluded(m) -> list[int]:
    ids = (m.tokenizer.convert_tokens_to_ids(t) for t in NOT_VOCAB)
    return sorted(i for i in ids if i is not None)


def embeddings(m) -> np.ndarray:
    return m.lm.get_input_embeddings().weight.detach().double().numpy()  # [V, d]


def by_hand(m, kind: str, thoughts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The replaced thoughts [n, d] (float64) of ``kind`` and each row's token ids by cosine, best first."""
    E, T = embeddings(m), thoughts.detach().double().numpy()
    cos = (T / np.linalg.norm(T, axis=1, keepdims=True)) @ (E / np.linalg.norm(E, axis=1, keepdims=True)).T
    cos[:, excluded(m)] = -np.inf
    order = np.argsort(-cos, axis=1, kind="stable")
    top = E[order[:, 0]]  # [n, d]
    norm_t = np.linalg.norm(T, axis=1, keepdims=True)
    if kind == "discretize":
        return top, order
    if kind == "discretize_norm":
        return top * norm_t / np.linalg.norm(top, axis=1, keepdims=True), order
    if kind == "vocab_proj":
        out = []
        for t, ids in zip(T, order):
            A = E[ids[:VOCAB_TOP_K]].T  # [d, k]
            p = A @ np.linalg.lstsq(A, t, rcond=None)[0]
            out.append(p * np.linalg.norm(t) / np.linalg.norm(p))
        return np.stack(out), order
    u = top / np.linalg.norm(top, axis=1, keepdims=True)
    return T - (T * u).sum(1, keepdims=True) * u, order  # remove_top1


def assert_cells_match(m, base, specs, values, fed) -> None:
    """Engine (fast: every spec in one sweep, batched; reference) == one plain loop per spec, fed
    ``fed[i]`` [len(positions), d] at spec i's thoughts."""
    fast = sweep_fast(m, base, specs, values, EngineOptions(batch_size=4))
    ref = sweep_reference(m, base, specs, values)
    for spec, mine, f, r in zip(specs, fed, fast, ref):
        plain = plain_thought_cell(m, base, spec, lambda _, v=mine: v.to(m.dtype))
        for cell in (f, r):
            assert cell["kl"] == pytest.approx(plain["kl"], abs=1e-4), spec
            assert cell["answer_logit_diff"] == pytest.approx(plain["answer_logit_diff"], abs=1e-4), spec
            assert cell["answer_ids"] == plain["answer_ids"], spec
            assert cell["thought_rel_l2"] == pytest.approx(plain["thought_rel_l2"], abs=1e-4), spec


@pytest.mark.parametrize("family", FAMILIES)
def test_each_vocabulary_replacement_matches_a_plain_loop(family):
    m, bases, values = setup(family)
    K, effects = m.num_latent, []
    for base, vals in zip(bases, values):
        thoughts = base.target.thoughts  # [K, d]: the unpatched target's fed thoughts
        specs, fed = [], []
        for kind in VOCAB_REPLACEMENTS:
            mine = torch.tensor(by_hand(m, kind, thoughts)[0], dtype=torch.float32)  # [K, d]
            one = PatchSpec("thought", "single", "thought", -1, (1,), 1, replacement=kind)
            every = PatchSpec("thought", "all", "thought", -1, tuple(range(K)), -1, replacement=kind)
            for spec, want in ((one, mine[[1]]), (every, mine)):
                got = vals(spec).float()
                assert got.shape == want.shape
                assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max())), (kind, spec.positions)
                specs.append(spec)
                fed.append(want)
        assert_cells_match(m, base, specs, vals, fed)
        effects += [c["kl"] for c in sweep_fast(m, base, specs, vals)]
    assert max(effects) > 1e-3  # not vacuous


@pytest.mark.parametrize("family", FAMILIES)
def test_number_writes_the_first_answer_token_of_the_intermediate(family):
    m, bases, values = setup(family)
    tok, E = m.tokenizer, m.lm.get_input_embeddings().weight.detach()
    base, vals = bases[0], values[0]
    specs, fed = [], []
    for s, value in enumerate(INTERMEDIATES):
        for kind, v in (("number", value), ("number_plus1", value + 1)):
            row = E[tok.convert_tokens_to_ids(str(int(v))[0])]  # the answer "= 42" starts with "4"
            for p in range(m.num_latent):
                spec = PatchSpec("thought", "single", "thought", -1, (p,), p, replacement=f"{kind}:{s}")
                assert torch.equal(vals(spec), row[None])
                specs.append(spec)
                fed.append(row[None])
    assert_cells_match(m, base, specs, vals, fed)


def test_projection_keeps_the_norm_and_lies_in_the_span_and_removal_is_orthogonal():
    m, bases, values = setup("llama")
    t = bases[0].target.thoughts  # [K, d]
    K = m.num_latent
    every = {
        k: PatchSpec("thought", "all", "thought", -1, tuple(range(K)), -1, replacement=k) for k in VOCAB_REPLACEMENTS
    }
    E = embeddings(m)
    _, order = by_hand(m, "vocab_proj", t)
    proj = values[0](every["vocab_proj"]).double().numpy()
    removed = values[0](every["remove_top1"]).double().numpy()
    disc, disc_norm = (values[0](every[k]) for k in ("discretize", "discretize_norm"))
    T = t.double().numpy()
    for p in range(K):
        assert np.linalg.norm(proj[p]) == pytest.approx(np.linalg.norm(T[p]), rel=1e-5)
        A = E[order[p, :VOCAB_TOP_K]].T  # [d, k]
        resid = proj[p] - A @ np.linalg.lstsq(A, proj[p], rcond=None)[0]
        assert np.linalg.norm(resid) < 1e-5 * np.linalg.norm(proj[p])
        u = E[order[p, 0]] / np.linalg.norm(E[order[p, 0]])
        assert abs(removed[p] @ u) < 1e-5 * np.linalg.norm(T[p])
        assert torch.equal(disc[p], m.lm.get_input_embeddings().weight[int(order[p, 0])])  # the token's own embedding
        assert int(order[p, 0]) not in excluded(m)
        assert float(disc_norm[p].norm()) == pytest.approx(float(t[p].norm()), rel=1e-5)


def test_the_search_skips_what_is_not_vocabulary():
    m, _, _ = setup("gpt2")
    vocab = Vocabulary.of(m)
    assert list(vocab.excluded) == excluded(m)
    E = m.lm.get_input_embeddings().weight.detach()
    markers = E[[m.config.bot_id, m.config.eot_id, m.config.pad_id]]  # a thought equal to a marker's embedding
    picked = vocab.replace("discretize", markers)
    ids = [int((E == row).all(1).nonzero()[0]) for row in picked]
    assert not set(ids) & set(excluded(m))


def test_labels_round_trip_and_specs_follow_the_old_ones():
    K = 3
    specs = vocab_specs(K, n_intermediates=2)
    assert len(specs) == len(VOCAB_REPLACEMENTS) * (K + 1) + len(NUMBER_REPLACEMENTS) * 2 * K
    for spec in specs:
        rep = spec.replacement_value
        assert Replacement.parse(rep.label).label == spec.replacement
        assert spec.intervention == ThoughtReplacement("thought", spec.positions)
        assert not rep.is_donor
    assert Replacement.parse("number_plus1:1") == Replacement("number_plus1", 1)
    assert Replacement.parse("same:1").is_donor
    shape = SpecShape(n_layers=2, num_latent=K, n_intermediates=2)
    assert experiment_specs("thought", shape) == thought_specs(K) + specs  # the old specs first, unchanged


def test_rows_carry_the_intermediate_and_missing_values_are_refused():
    m, bases, values = setup("llama")
    base, vals = bases[0], values[0]
    specs = [s for s in vocab_specs(m.num_latent, 2) if s.index in (-1, 0)]
    rows, _ = step_rows(base, specs, sweep_fast(m, base, specs, vals))
    got = {(r["replacement"], r["intermediate"]) for r in rows}
    assert ("number:1", 1) in got and ("number_plus1:0", 0) in got and ("discretize", -1) in got
    number = PatchSpec("thought", "single", "thought", -1, (0,), 0, replacement="number:2")
    vocab = Vocabulary.of(m)
    assert not runs_for(number, INTERMEDIATES, vocab) and runs_for(number, [1.0, 2.0, 3.0], vocab)
    assert not runs_for(number, None, vocab) and runs_for(specs[0], None, None)
    with pytest.raises(ValueError, match="no intermediate 2"):
        vals(number)
    with pytest.raises(ValueError, match="site 'thought'"):
        vals(PatchSpec("thought", "single", "thought_pre", -1, (0,), 0, replacement="discretize"))


@torch.no_grad()
def test_a_thought_run_writes_vocabulary_rows_and_its_report(tmp_path, monkeypatch):
    import pandas as pd

    import latentpatch.pipeline.steps as stage
    from latentpatch.data.pairs import save_pairs
    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.model.config import extract_number
    from latentpatch.model.load import load_model
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    pairs = generate_pairs(3, seed=5, intermediates=True)
    save_pairs(pairs, tmp_path / "pairs.json")
    built = []
    real = stage.Vocabulary.of
    monkeypatch.setattr(stage.Vocabulary, "of", lambda model: built.append(1) or real(model))
    model = load_model("default")
    cfg = RunConfig(
        pairs=str(tmp_path / "pairs.json"), experiments=("thought",), out=str(tmp_path / "run"), use_cache=False
    )
    out = run_experiments(cfg, model=model, progress=False, command="test")
    assert built == [1]  # one vocabulary per run
    steps = pd.read_parquet(out / "results" / "steps.parquet")
    K = model.num_latent
    for kind in VOCAB_REPLACEMENTS:
        rows = steps[steps["replacement"] == kind]
        assert len(rows) == 3 * (K + 1) and set(rows["site"]) == {"thought"} and (rows["intermediate"] == -1).all()
    for pair in pairs:
        inter = pair.corrupted.extra["intermediates"]  # denoising: the target is the corrupted run
        mine = steps[(steps["pair_id"] == pair.pair_id) & steps["replacement"].str.startswith("number")]
        assert len(mine) == len(NUMBER_REPLACEMENTS) * len(inter) * K
        assert all(r.replacement.endswith(f":{r.intermediate}") for r in mine.itertuples())

    # one row end to end: discretize at thought 2 of the first pair, by hand on the shipped model
    prompt = model.prompt_ids(pairs[0].corrupted.question)
    target = model.rollout([prompt])
    t = target.thoughts[0]  # [K, d]
    fed = torch.tensor(by_hand(model, "discretize", t)[0], dtype=t.dtype)
    override, mask = t[None].clone(), torch.zeros(1, K, dtype=torch.bool)
    override[0, 2], mask[0, 2] = fed[2], True
    r = model.rollout([prompt], thought_override=override, override_mask=mask)
    ids = model.generate(r.state, r.answer_logits)[0]
    row = steps[(steps["pair_id"] == pairs[0].pair_id) & (steps["replacement"] == "discretize")]
    row = row[row["position"] == 2].iloc[0]
    assert row["pred_answer"] == extract_number(model.decode(ids))
    assert bool(row["flipped"]) == (ids != model.generate(target.state, target.answer_logits)[0])

    page = (out / "report.html").read_text()
    assert '<section id="thought">' in page and "discretize" in page and "number:0" in page
    stats = json.loads((out / "stats.json").read_text())["steps"]["thought"]["summary"]
    assert {r["replacement"] for r in stats} >= set(VOCAB_REPLACEMENTS) | {"number:0", "number_plus1:0"}
