"""The built-in checks fail when they should: each is run against a deliberately broken engine
(a NaN on one side, a wrong greedy answer) and must report it, where the pre-foundation checks
passed (``max(0.0, nan)`` is 0.0; NaN KLs were dropped; answer ids were never compared)."""

from __future__ import annotations

import math

import pytest

import latentpatch.patching.checks as checks
from latentpatch.data.synthetic import generate_pairs
from latentpatch.model.load import load_model
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
from latentpatch.patching.specs import EngineConfig, layer_specs, position_specs
from latentpatch.patching.steps import step_pool, step_record, step_values, thought_specs


@pytest.fixture(scope="module")
def setup():
    model = load_model("default")
    bases = []
    for pair in generate_pairs(3, seed=0):
        clean, corr = (record_run(model, model.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
        bases.append(prepare_pair(model, pair.pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer))
    specs = layer_specs(model.n_layers, model.num_latent) + position_specs(model.n_layers, model.num_latent)
    return model, bases, specs


def values_for(bases):
    return lambda i: replacement_values(bases[i], EngineConfig())


def broken(real, metric=None, value=math.nan, answer=None):
    """A sweep that gives the real cells, but ``metric`` set to ``value`` in the first cell of each
    pair and/or its ``answer_ids`` replaced by ``answer``."""

    def sweep(*args, **kwargs):
        out = real(*args, **kwargs)
        per_pair = out if out and isinstance(out[0], list) else [out]
        for cells in per_pair:
            if metric is not None:
                cells[0][metric] = value
            if answer is not None:
                cells[0]["answer_ids"] = answer
        return out

    return sweep


def test_mismatch_counts_one_sided_nan_as_infinite():
    assert checks.mismatch(1.0, 1.25) == 0.25
    assert checks.mismatch(math.nan, math.nan) == 0.0 and checks.mismatch(None, None) == 0.0
    assert checks.mismatch(math.nan, 0.0) == math.inf and checks.mismatch(0.0, math.nan) == math.inf
    assert checks.mismatch(None, 0.0) == math.inf


def test_engine_reference_passes_on_the_real_engine_and_fails_on_a_broken_one(setup, monkeypatch):
    model, bases, specs = setup
    args = (model, bases, specs, values_for(bases), 64, 8, 0, 256)
    ok = checks.check_engine_reference(*args)
    assert ok["passed"] and ok["answers_differ"] == 0 and ok["cells"] == 8

    real = checks.sweep_pairs
    monkeypatch.setattr(checks, "sweep_pairs", broken(real, "kl"))  # NaN from the fast engine only
    nan = checks.check_engine_reference(*args)
    assert not nan["passed"] and nan["value"] == math.inf

    monkeypatch.setattr(checks, "sweep_pairs", broken(real, answer=[7, 7, 7]))  # a wrong greedy answer
    wrong = checks.check_engine_reference(*args)
    assert not wrong["passed"] and wrong["answers_differ"] == 2  # the first cell of each of the two pairs


def test_engine_reference_runs_the_runs_shared_batches(setup, monkeypatch):
    model, bases, specs = setup
    seen = []
    real = checks.sweep_pairs
    monkeypatch.setattr(
        checks, "sweep_pairs", lambda *a, **k: seen.append((len(a[1]), a[4].shared_rows)) or real(*a, **k)
    )
    checks.check_engine_reference(model, bases, specs, values_for(bases), 64, 8, 0, 256)
    assert seen == [(2, 256)]  # both sampled pairs in one call, with the run's shared rows


def test_identity_fails_on_a_nan_kl(setup, monkeypatch):
    model, bases, specs = setup
    assert checks.check_identity(model, bases, specs, n_pairs=1)["passed"]
    monkeypatch.setattr(checks, "sweep_fast", broken(checks.sweep_fast, "kl"))
    bad = checks.check_identity(model, bases, specs, n_pairs=1)
    assert not bad["passed"] and "1 cells gave NaN" in bad["detail"]


def test_steps_engine_reference_fails_on_a_one_sided_nan(setup, monkeypatch):
    model, bases, _ = setup
    step_specs = [s for s in thought_specs(model.num_latent) if s.replacement in ("zero", "source")]
    target, source = step_record(model, bases[0].target.prompt), step_record(model, bases[0].source.prompt)
    values = step_values(target, source, step_pool([source]), partner=source, seed=0, pair_index=0)
    assert checks.check_steps_engine_reference(model, bases[0], step_specs, values, 64)["passed"]
    monkeypatch.setattr(checks, "sweep_fast", broken(checks.sweep_fast, "logprob_final"))
    bad = checks.check_steps_engine_reference(model, bases[0], step_specs, values, 64)
    assert not bad["passed"] and bad["value"] == math.inf


def test_a_failed_steps_check_is_fatal_with_strict(tmp_path, monkeypatch):
    """docs/method.md §8: --strict stops a run at a failed check, the step-level one included."""
    import latentpatch.pipeline.steps as steps_stage
    from latentpatch.errors import LatentPatchError
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    failed = {"passed": False, "value": math.inf, "threshold": 1e-4, "detail": "made to fail"}
    monkeypatch.setattr(steps_stage, "check_steps_engine_reference", lambda *a, **k: dict(failed))
    common = dict(limit=2, experiments=("thought",), report=False, use_cache=False, workers=1)
    warned = run_experiments(RunConfig(out=str(tmp_path / "warn"), **common), progress=False)
    assert len(list((warned / "results" / "steps").glob("*.json"))) == 2  # without --strict: warned, and run
    with pytest.raises(LatentPatchError, match="steps_engine_reference"):
        run_experiments(RunConfig(out=str(tmp_path / "strict"), strict=True, **common), progress=False)
    assert not list((tmp_path / "strict" / "results").glob("steps/*.json"))


def test_engine_reference_threshold_is_the_models_batch_noise(setup):
    """The threshold allows 4x the model's own fp32 batch noise (a row alone vs in a batch of
    identical rows), never less than 1e-4; in float64 that noise vanishes, so it measures float
    rounding, not a difference of computations."""
    import copy

    import torch

    model, bases, specs = setup
    result = checks.check_engine_reference(model, bases, specs, values_for(bases), 64, 8, 0)
    assert result["passed"], result
    floor = checks.batch_noise(model, bases, 4)
    assert result["noise_floor"] < 1e-4 and floor < 1e-4  # the shipped model: fp32 rounding only
    assert result["threshold"] == max(1e-4, checks.NOISE_FACTOR * result["noise_floor"])
    wide = copy.deepcopy(model).to(torch.float64)
    assert checks.batch_noise(wide, bases[:1], 4) < 1e-12
