"""The run's one value pool: every kind of patch gets its values from one object, built once per
run, and they equal the plain computations written here."""

from __future__ import annotations

import torch

from latentpatch.data.synthetic import generate_pairs
from latentpatch.model.load import load_model
from latentpatch.patching.baselines import prepare_pair, record_run
from latentpatch.patching.specs import EngineConfig, PatchSpec
from latentpatch.patching.values import ValuePool, pool_of


def _pool(replacement: str, n: int = 4) -> tuple[ValuePool, list]:
    model = load_model("default")
    pairs = generate_pairs(n, seed=3)
    bases = []
    for pair in pairs:
        clean, corr = (record_run(model, model.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
        bases.append(prepare_pair(model, pair.pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer))
    return pool_of(bases, list(range(n)), EngineConfig("denoise", replacement), seed=0, pairs=pairs), bases


def test_site_and_thought_values_from_one_pool_equal_plain_computations():
    pool, bases = _pool("mean")
    site = PatchSpec("position", "single", "resid_out", 2, (1, 3), 1)
    mean = torch.stack([b.clean.acts["resid_out"].float() for b in bases]).mean(0)  # the sources' mean [L, K, d]
    got = pool.values(1, bases[1])(site)
    assert torch.allclose(got.float(), mean[2, [1, 3]], atol=1e-6)

    step_mean = PatchSpec("thought", "single", "thought", -1, (2,), 2, replacement="step_mean")
    by_hand = torch.stack([b.clean.thoughts.float() for b in bases]).mean(0)[2]
    assert torch.allclose(pool.values(0, bases[0])(step_mean)[0].float(), by_hand, atol=1e-6)

    pre = PatchSpec("thought", "single", "thought_pre", -1, (0,), 0, replacement="source")
    assert torch.equal(pool.values(2, bases[2])(pre), bases[2].clean.thought_pre[[0]])


def test_resample_partners_are_the_pools():
    pool, bases = _pool("resample")
    spec = PatchSpec("layer", "all", "resid_out", 0, (0, 1, 2, 3, 4, 5), -1)
    for i in range(len(bases)):
        partner = pool.partner[i]
        assert partner != i
        assert torch.equal(pool.values(i, bases[i])(spec), bases[partner].clean.acts["resid_out"][0])
        thought = PatchSpec("thought", "single", "thought", -1, (3,), 3, replacement="resample")
        assert torch.equal(pool.values(i, bases[i])(thought), bases[partner].clean.thoughts[[3]])


def test_a_shard_builds_the_whole_runs_pool_once(tmp_path, monkeypatch):
    import latentpatch.pipeline.values as values
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments
    from latentpatch.rundir import read_manifest

    calls = []
    real = values.global_pool
    monkeypatch.setattr(values, "global_pool", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = RunConfig(
        limit=6,
        shard="0/2",
        replacement="mean",
        experiments=("layer", "thought"),
        out=str(tmp_path / "s0"),
        report=False,
        use_cache=False,
        workers=1,
    )
    out = run_experiments(config, progress=False, command="test")
    assert calls == [1]  # the sweep (mean) and the step level (step means, partners) share it
    assert read_manifest(out)["replacement_pool"] == "all shards"
