"""Step-level analyses (docs/method.md §13): the engine against plain loops, and theory cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_text_model
from test_engine import baselines

from latentpatch.patching.baselines import score_answer_strings
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference
from latentpatch.patching.metrics import answer_metrics
from latentpatch.patching.steps import (
    StepRecord,
    early_specs,
    influence_specs,
    intermediate_specs,
    pick_donors,
    step_pool,
    step_record,
    step_rows,
    step_values,
    thought_specs,
)

FAMILIES = ["llama", "gpt2"]

DEFAULT_PAIRS = Path(__file__).parents[1] / "src" / "latentpatch" / "default_data" / "pairs.json"


def setup(family: str, noise_scale: float = 1.0):
    m = tiny_text_model(family, num_latent=3)
    bases = baselines(m)
    recs = [(step_record(m, b.target.prompt), step_record(m, b.source.prompt)) for b in bases]
    pool = step_pool([s for _, s in recs])
    values = [
        step_values(t, s, pool, partner=recs[1 - i][1], seed=0, pair_index=i, noise_scale=noise_scale)
        for i, (t, s) in enumerate(recs)
    ]
    return m, bases, values


@torch.no_grad()
def plain_thought_cell(m, base, spec, values):
    """One rollout with the thought override of ``spec``, plain greedy decoding, own teacher forcing."""
    K = m.num_latent
    override = base.target.thoughts[None].clone()  # [1, K, d]
    mask = torch.zeros(1, K, dtype=torch.bool)
    vals = values(spec)
    if spec.component == "thought_pre":
        vals = m.prj(vals)
    override[0, list(spec.positions)] = vals
    mask[0, list(spec.positions)] = True
    r = m.rollout([base.target.prompt], thought_override=override, override_mask=mask)
    ids = m.generate(r.state, r.answer_logits)[0]
    pred = float(m.decode(ids)) if m.decode(ids).strip().lstrip("=").strip().isdigit() else None
    scored = score_answer_strings(m, r.state, r.answer_logits, base.answers, [pred])[0]
    cell = answer_metrics(scored, base.target_logits, base.ld_target, base.ld_source, 0, 0)
    t, fed = base.target.thoughts.float(), r.thoughts[0].float()
    cell["answer_ids"] = ids
    cell["thought_rel_l2"] = ((fed - t).norm(dim=-1) / t.norm(dim=-1)).tolist()
    return cell


@pytest.mark.parametrize("family", FAMILIES)
def test_thought_and_influence_match_plain_loop(family):
    m, bases, values = setup(family)
    specs = thought_specs(m.num_latent)[::3] + influence_specs(m.num_latent)
    for base, vals in zip(bases, values):
        fast = sweep_fast(m, base, specs, vals, EngineOptions(batch_size=4))
        ref = sweep_reference(m, base, specs, vals)
        for spec, f, r in zip(specs, fast, ref):
            plain = plain_thought_cell(m, base, spec, vals)
            for cell in (f, r):
                assert cell["kl"] == pytest.approx(plain["kl"], abs=1e-4), spec
                assert cell["answer_logit_diff"] == pytest.approx(plain["answer_logit_diff"], abs=1e-4)
                assert cell["answer_ids"] == plain["answer_ids"]
                assert cell["thought_rel_l2"] == pytest.approx(plain["thought_rel_l2"], abs=1e-4)
        assert max(c["kl"] for c in fast) > 1e-3  # not vacuous


@torch.no_grad()
def plain_early(m, base, k):
    """No cache: [prompt, k thoughts, EOT, answer] in one forward; logits that predict each answer token."""
    emb = m.lm.get_input_embeddings()
    thoughts = base.target.thoughts[:k][None]  # the first k thoughts do not depend on later ones

    def logits_for(ids):
        seq = torch.cat(
            [emb(torch.tensor([base.target.prompt])), thoughts, emb(torch.tensor([m.answer_start_ids() + ids[:-1]]))], 1
        )
        return m.lm(inputs_embeds=seq).logits[0, -len(ids) :].float()

    a_base, start = base.answers["base"]
    lp = F.log_softmax(logits_for(a_base), -1)[torch.arange(len(a_base)), a_base]
    (c, cs), (r, rs) = base.answers["clean"], base.answers["corr"]
    lc, lr = logits_for(c), logits_for(r)
    ld = lc[torch.arange(len(c)), c][cs:].mean() - lr[torch.arange(len(r)), r][rs:].mean()
    return float(lp[start:].sum() if start < len(a_base) else lp.sum()), float(ld)


@pytest.mark.parametrize("family", FAMILIES)
def test_early_answers_match_plain_loop(family):
    m, bases, values = setup(family)
    specs = early_specs(m.num_latent)
    for base, vals in zip(bases, values):
        fast = sweep_fast(m, base, specs, vals, EngineOptions(batch_size=3))
        ref = sweep_reference(m, base, specs, vals)
        for spec, f, r in zip(specs, fast, ref):
            logprob, ld = plain_early(m, base, spec.start)
            for cell in (f, r):
                assert cell["logprob_final"] == pytest.approx(logprob, abs=1e-4)
                assert cell["answer_logit_diff"] == pytest.approx(ld, abs=1e-4)
            assert f["answer_ids"] == r["answer_ids"]
        # S(K) is the unpatched run
        assert fast[-1]["kl"] < 1e-6 and fast[-1]["answer_ids"] == list(base.target.answer_ids)


def test_intervention_at_step_i_changes_no_earlier_thought():
    m, bases, values = setup("llama")
    specs = influence_specs(m.num_latent)
    for base, vals in zip(bases, values):
        for spec, cell in zip(specs, sweep_reference(m, base, specs, vals)):
            i = spec.start
            assert max(cell["thought_rel_l2"][:i], default=0.0) < 1e-5  # below the diagonal: zero
            if spec.replacement == "zero":
                assert cell["thought_rel_l2"][i] == pytest.approx(1.0)
        _, influence = step_rows(base, specs, sweep_fast(m, base, specs, vals))
        assert all(r["thought_rel_l2"] < 1e-5 for r in influence if r["later"] < r["step"])


def test_noise_of_scale_zero_equals_baseline():
    m, bases, values = setup("gpt2", noise_scale=0.0)
    specs = [s for s in thought_specs(m.num_latent) if s.replacement == "noise"]
    for base, vals in zip(bases, values):
        for cell in sweep_fast(m, base, specs, vals):
            assert cell["kl"] < 1e-6
            assert cell["answer_ids"] == list(base.target.answer_ids)
            assert max(cell["thought_rel_l2"]) < 1e-5
    _, _, noisy = setup("gpt2", noise_scale=1.0)
    assert not torch.equal(noisy[0](specs[0]), values[0](specs[0]))


def test_same_value_donors_change_nothing_when_the_thought_is_the_only_path():
    """A chain built so that thought p *is* its intermediate value (a fixed code per value): a
    donor with the same value feeds the target's own thought, a different value another one."""
    m, bases, _ = setup("llama")
    base = bases[0]
    K, d = m.num_latent, m.d_model
    codes = {v: torch.randn(K, d, generator=torch.Generator().manual_seed(v)) for v in (3, 5)}
    inter = [[3.0], [3.0], [5.0]]  # run 0 = the target, run 1 shares its value, run 2 does not
    target = StepRecord(base.target.thoughts, base.target.thoughts)
    runs = [target, target, StepRecord(codes[5], codes[5])]  # same value -> same thought
    donors = pick_donors(inter, 0, 1, seed=0)
    assert donors == {"same:0": 1, "diff:0": 2}
    vals = step_values(target, target, step_pool(runs), donors={k: runs[j] for k, j in donors.items()})
    specs = intermediate_specs(K, 1)
    cells = sweep_fast(m, base, specs, vals)
    same = [c for s, c in zip(specs, cells) if s.replacement == "same:0"]
    diff = [c for s, c in zip(specs, cells) if s.replacement == "diff:0"]
    assert all(c["kl"] < 1e-6 and c["answer_ids"] == list(base.target.answer_ids) for c in same)
    assert max(c["kl"] for c in diff) > 1e-3
    rows, _ = step_rows(base, specs, cells)
    assert {r["replacement"] for r in rows} == {"same", "diff"} and all(r["intermediate"] == 0 for r in rows)
    assert not any(math.isnan(r["p_final"]) for r in rows)


def test_run_with_step_experiments_writes_tables_and_report(tmp_path):
    import pandas as pd

    from latentpatch.names import INFLUENCE_COLUMNS, STEP_COLUMNS
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    for exps in (("thought", "early", "influence"), ("layer", "early")):
        cfg = RunConfig(limit=2, experiments=exps, out=str(tmp_path / "_".join(exps)), use_cache=False)
        out = run_experiments(cfg, progress=False, command="test")
        steps = pd.read_parquet(out / "results" / "steps.parquet")
        assert list(steps.columns) == STEP_COLUMNS and set(steps["experiment"]) <= set(exps)
        early = steps[steps["experiment"] == "early"]
        assert len(early) == 2 * 7 and not early[early["position"] == 6]["flipped"].any()  # S(K) = baseline
        # to_source: the greedy number is the clean question's answer (denoising), read from the pair file
        clean = {e["pair_id"]: e["answer"] for e in json.loads(DEFAULT_PAIRS.read_text()) if e["variant"] == "clean"}
        expect = [p == clean[pid] for p, pid in zip(steps["pred_answer"], steps["pair_id"])]
        assert steps["to_source"].tolist() == expect
        influence = pd.read_parquet(out / "results" / "influence.parquet")
        assert list(influence.columns) == INFLUENCE_COLUMNS
        page = (out / "report.html").read_text()
        assert '<section id="early">' in page and "Finding." in page
        assert (out / "figures" / "early_answers.png").is_file()
        check = json.loads((out / "manifest.json").read_text())["checks"]["steps_engine_reference"]
        assert check["passed"] and check["cells"] > 0 and check["value"] <= check["threshold"]
        # the step-level statistics are in stats.json (the section reads them from there)
        stats = json.loads((out / "stats.json").read_text())["steps"]
        assert set(stats) == {e for e in exps if e != "layer"}
        early_stats = {r["k"]: r for r in stats["early"]["summary"] if r["metric"] == "correct"}
        assert sorted(early_stats) == list(range(7)) and early_stats[6]["n"] == 2


def test_every_experiment_shards_except_per_head_pooled_values():
    """``merge`` joins every stage and the step-level pools are global (tests/test_merge.py): every
    experiment shards; per-head mean/resample values are still pooled over a shard's own pairs."""
    from latentpatch.errors import LatentPatchError
    from latentpatch.pipeline.config import RunConfig

    RunConfig(experiments=("layer", "thought"), shard="0/2").validate()
    RunConfig(experiments=("lens", "attention", "atp", "early", "influence", "intermediate"), shard="1/2").validate()
    with pytest.raises(LatentPatchError, match="--component head_out --replacement mean"):
        RunConfig(component="head_out", replacement="mean", shard="1/2").validate()
    RunConfig(component="head_out", replacement="zero", shard="1/2").validate()
    RunConfig(experiments=("layer",), shard="0/2").validate()  # the seed experiments shard as before


def test_steps_engine_reference_check_catches_a_disagreement(monkeypatch):
    """Check 5 compares the fast engine with one rollout per spec: a reference that disagrees fails it."""
    from latentpatch.patching import checks

    model, bases, values = setup("llama")
    base, vals = bases[0], values[0]
    specs = early_specs(model.num_latent)
    ok = checks.check_steps_engine_reference(model, base, specs, vals, batch_size=8, n_cells=4)
    assert ok["passed"] and ok["cells"] == 4

    real = checks.sweep_reference

    def shifted(*args, **kwargs):
        cells = real(*args, **kwargs)
        return [{**c, "answer_logit_diff": c["answer_logit_diff"] + 10.0} for c in cells]

    monkeypatch.setattr(checks, "sweep_reference", shifted)
    bad = checks.check_steps_engine_reference(model, base, specs, vals, batch_size=8, n_cells=4)
    assert not bad["passed"] and bad["value"] > 0.5


def test_the_step_chain_is_recorded_with_the_baselines_and_cached(tmp_path):
    """The step stage reads thought and thought_pre from the baselines' records (no second rollout):
    the same bits as a rollout of its own; the activation cache keeps both, and a file written
    before thought_pre was recorded is a miss."""
    from latentpatch.patching.baselines import record_run
    from latentpatch.patching.steps import recorded_chain
    from latentpatch.pipeline.cache import ActivationCache

    m = tiny_text_model("gpt2", num_latent=3)
    prompt = m.prompt_ids("What is 2 + 3?")
    record = record_run(m, prompt)
    own = step_record(m, prompt)
    chain = recorded_chain(record)
    assert torch.equal(chain.thought, own.thought) and torch.equal(chain.thought_pre, own.thought_pre)

    cache = ActivationCache(tmp_path, "k")
    cache.dir.mkdir(parents=True)
    cache.put(record)
    back = cache.get(prompt)
    assert back is not None and torch.equal(back.thought_pre, record.thought_pre)
    from safetensors.torch import load_file, save_file

    path = next(cache.dir.glob("*.safetensors"))
    old = {k: v for k, v in load_file(str(path)).items() if k != "thought_pre"}
    save_file(old, str(path))
    assert cache.get(prompt) is None and cache.misses == 1
