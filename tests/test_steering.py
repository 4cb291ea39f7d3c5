"""Steering (docs/method.md §16): the engine against a plain loop with the vector added by a hook written
here, alpha 0 = the baseline, random controls of the same norm, a run's table and report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_text_model
from test_engine import baselines

from latentpatch.patching.baselines import score_answer_strings
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference
from latentpatch.patching.metrics import answer_metrics
from latentpatch.patching.steering import random_directions, site_differences, steer_specs, steer_values, unit


def blocks(m):
    """The transformer blocks of a tiny model (GPT-2: transformer.h; LLaMA: model.layers)."""
    inner = getattr(m.lm, "transformer", None)
    return inner.h if inner is not None else m.lm.model.layers


@torch.no_grad()
def plain_steered_cell(m, base, layer, position, added):
    """One rollout of the target with ``added`` [d] summed into block ``layer``'s output at latent
    position ``position`` by a forward hook (its own position counter), then plain decoding and scoring."""
    seen = {"n": 0}
    absolute = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        start, width = seen["n"], hidden.shape[1]
        seen["n"] += width
        target = absolute["at"]
        if start <= target < start + width:
            hidden[:, target - start] += added.to(hidden.dtype)
        return output

    absolute["at"] = len(base.target.prompt) + position  # batch of one: no padding
    handle = blocks(m)[layer].register_forward_hook(hook)
    try:
        r = m.rollout([base.target.prompt])
    finally:
        handle.remove()
    ids = m.generate(r.state, r.answer_logits)[0]
    text = m.decode(ids).strip().lstrip("=").strip()
    pred = float(text) if text.isdigit() else None
    scored = score_answer_strings(m, r.state, r.answer_logits, base.answers, [pred])[0]
    cell = answer_metrics(scored, base.target_logits, base.ld_target, base.ld_source, 0, 0)
    cell["answer_ids"] = ids
    return cell


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_steering_equals_a_plain_loop_with_the_vector_added_by_a_hook(family):
    m = tiny_text_model(family, num_latent=3)
    bases = baselines(m)
    diffs = site_differences(bases, "resid_out")  # [n, L, K, d]
    scale = diffs.norm(dim=-1).mean(0)
    shape = tuple(diffs.shape[1:])
    directions = {"meandiff": unit(diffs.mean(0)), "random0": random_directions(shape, 0, 0)}
    specs = steer_specs(m.n_layers, m.num_latent, "resid_out", alphas=(-1.0, 0.0, 2.0), n_controls=1)
    for base in bases:
        values = steer_values(base.target.acts["resid_out"], directions, scale)
        fast = sweep_fast(m, base, specs, values, EngineOptions(batch_size=5))
        ref = sweep_reference(m, base, specs, values)
        moved = 0.0
        for spec, f, r in zip(specs, fast, ref):
            layer, (p,) = spec.layer, spec.positions
            alpha = float(spec.replacement.rpartition(":")[2])
            # the vector written here from the test's own pieces: alpha x site scale x unit direction
            v = directions[spec.mode][layer, p]
            added = alpha * float(scale[layer, p]) * v
            plain = plain_steered_cell(m, base, layer, p, added)
            for cell in (f, r):
                assert cell["kl"] == pytest.approx(plain["kl"], abs=1e-4), spec
                assert cell["answer_logit_diff"] == pytest.approx(plain["answer_logit_diff"], abs=1e-4)
                assert cell["answer_ids"] == plain["answer_ids"]
            if alpha == 0:  # steering with alpha 0 is the unpatched target run
                assert f["kl"] == pytest.approx(0.0, abs=1e-5) and f["answer_ids"] == list(base.target.answer_ids)
            moved = max(moved, f["kl"])
        assert moved > 1e-3  # not vacuous


def test_random_controls_have_the_norm_of_the_direction():
    m = tiny_text_model("llama", num_latent=3)
    bases = baselines(m)
    diffs = site_differences(bases, "resid_out")
    scale = diffs.norm(dim=-1).mean(0)
    shape = tuple(diffs.shape[1:])
    directions = {"meandiff": unit(diffs.mean(0))}
    directions.update({f"random{k}": random_directions(shape, 3, k) for k in range(2)})
    values = steer_values(bases[0].target.acts["resid_out"], directions, scale)
    own = bases[0].target.acts["resid_out"]
    for spec in steer_specs(m.n_layers, m.num_latent, "resid_out", alphas=(1.5,), n_controls=2):
        (p,) = spec.positions
        added = values(spec)[0] - own[spec.layer, p]
        assert float(added.norm()) == pytest.approx(1.5 * float(scale[spec.layer, p]), rel=1e-4)
    # the controls differ from the direction and from each other, and are seeded
    assert not torch.allclose(directions["random0"], directions["random1"])
    assert torch.equal(random_directions(shape, 3, 0), directions["random0"])
    # the mean difference, computed here: per pair source - target, averaged
    manual = torch.stack([b.source.acts["resid_out"] - b.target.acts["resid_out"] for b in bases]).float().mean(0)
    assert torch.allclose(unit(manual), directions["meandiff"], atol=1e-6)


def test_a_steer_run_writes_its_table_and_report(tmp_path):
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    cfg = RunConfig(
        limit=3,
        experiments=("steer",),
        out=str(tmp_path / "run"),
        use_cache=False,
        steer_layers="3",
        steer_alphas="1,2",
        steer_controls=2,
    )
    out = run_experiments(cfg, progress=False, command="test")
    table = pd.read_parquet(out / "results" / "steer.parquet")
    # 3 pairs x 1 layer x 6 thoughts x (1 direction + 2 controls) x 2 alphas
    assert len(table) == 3 * 6 * 3 * 2
    assert set(table["direction"]) == {"meandiff", "random0", "random1"}
    assert table.loc[table["direction"] == "meandiff", "control"].eq(False).all()
    assert np.isfinite(table["kl"]).all()
    page = (out / "report.html").read_text()
    assert '<section id="steer">' in page
    from test_report_sentences import check_layout, check_sentences

    check_sentences(out)  # the finding's numbers are stats.json's, its "more"/"less" the contrast's CI
    check_layout(out)


def test_steer_options_are_checked():
    from latentpatch.errors import LatentPatchError
    from latentpatch.pipeline.config import RunConfig

    with pytest.raises(LatentPatchError, match="--steer-alphas applies to the steer experiment only"):
        RunConfig(steer_alphas="1").validate()
    with pytest.raises(LatentPatchError, match="--steer-layers 'a'"):
        RunConfig(experiments=("steer",), steer_layers="a").validate()
    with pytest.raises(LatentPatchError, match="--steer-vector nowhere.npy: no such file"):
        RunConfig(experiments=("steer",), steer_vector="nowhere.npy").validate()
