"""Attribution patching (docs/method.md §15): the estimate against plain computations written here."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_text_model
from test_engine import QUESTIONS
from torch import nn

from latentpatch.model.sites import Write
from latentpatch.names import COMPONENTS, head_component
from latentpatch.patching.atp import (
    GradDrop,
    attribution_patching,
    exact_effects,
    refine_sites,
    site_gradients,
)
from latentpatch.patching.baselines import (
    own_values,
    prepare_pair,
    record_run,
    replacement_values,
)
from latentpatch.patching.heads import add_head_acts
from latentpatch.patching.specs import EngineConfig


def pair_baseline(model, i: int = 0):
    qc, ac, qr, ar = QUESTIONS[i]
    clean, corr = record_run(model, model.prompt_ids(qc)), record_run(model, model.prompt_ids(qr))
    return prepare_pair(model, str(i), clean, corr, ac, ar)


def plain_ld(model, logits_clean: torch.Tensor, logits_corr: torch.Tensor, base) -> float:
    """Mean logit of A_clean's number tokens − mean logit of A_corr's, from [len, V] logits."""
    (ci, cs), (ri, rs) = base.answers["clean"], base.answers["corr"]
    clean = torch.stack([logits_clean[j, ci[j]] for j in range(cs, len(ci))]).mean()
    corr = torch.stack([logits_corr[j, ri[j]] for j in range(rs, len(ri))]).mean()
    return float(clean - corr)


@torch.no_grad()
def patched_ld(model, base, site, value, frozen: bool = False) -> float:
    """One plain rollout of the target with ``value`` written at ``site`` (``frozen``: later thoughts
    held at the target's), then the answer strings teacher-forced: its answer logit difference."""
    c, layer, p = site
    T, K = len(base.target.prompt), model.num_latent
    w = Write(c, layer, torch.tensor([T + p]), torch.tensor([True]), value[None])
    kwargs = {}
    if frozen:
        mask = torch.zeros(1, K, dtype=torch.bool)
        mask[0, p + 1 :] = True
        kwargs = {"thought_override": base.target.thoughts[None], "override_mask": mask}
    r = model.rollout([base.target.prompt], writes=[w], **kwargs)
    conts = [base.answers["clean"][0], base.answers["corr"][0]]
    clean, corr = model.score(r.state, r.answer_logits, [conts])[0]
    return plain_ld(model, clean, corr, base)


class Ones(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)


def linear_model():
    """A tiny LLaMA whose answer metric is affine in every activation: no norms, q/k = 0 (uniform
    attention: an average of values), the MLP's gate a constant 1 (so it is ``down(up(x))``),
    ``prj`` = identity."""
    m = tiny_text_model("llama", n_layers=2, d=32, num_latent=3)
    with torch.no_grad():
        for block in m.blocks:
            block.input_layernorm = nn.Identity()
            block.post_attention_layernorm = nn.Identity()
            block.self_attn.q_proj.weight.zero_()
            block.self_attn.k_proj.weight.zero_()
            block.mlp.act_fn = Ones()
        m.lm.model.norm = nn.Identity()
    m.prj = nn.Identity()
    return m


# ---- (a) a model whose metric is linear in the site: estimate == exact effect -----------------------
def test_linear_model_estimate_equals_exact_effect():
    m = linear_model()
    base = pair_baseline(m)
    add_head_acts(m, [base.clean, base.corrupted])
    components = (*COMPONENTS, head_component(1))
    res = attribution_patching(m, base, replacement_values(base, EngineConfig()), components)
    checked = 0
    for site in res.sites():
        c, layer, p = site
        v = base.source.acts[c][layer, p]
        exact = patched_ld(m, base, site, v) - base.ld_target
        frozen = patched_ld(m, base, site, v, frozen=True) - base.ld_target
        tol = 1e-5 + 1e-3 * abs(exact)
        assert abs(res.value("full", site) - exact) <= tol, (site, res.value("full", site), exact)
        assert abs(res.value("attention", site) - frozen) <= tol, (site, res.value("attention", site), frozen)
        checked += abs(exact) > 1e-3 and abs(exact - frozen) > 1e-4
    assert checked > 5  # the patches change the metric, and the two paths differ


def test_linear_model_exact_effects_match_engine():
    """exact_effects (the engine) on the same sites equals the plain patched rollouts."""
    m = linear_model()
    base = pair_baseline(m)
    sites = [("resid_out", 0, 1), ("attn_out", 1, 0), ("mlp_out", 0, 2)]
    values = replacement_values(base, EngineConfig())
    exact = exact_effects(m, base, sites, values)
    for site, e in zip(sites, exact):
        c, layer, p = site
        plain = patched_ld(m, base, site, base.source.acts[c][layer, p]) - base.ld_target
        assert abs(e - plain) <= 1e-4 * max(1.0, abs(plain))


# ---- (b) the gradient is the derivative along (a_source − a_target) --------------------------------
def test_gradient_matches_finite_difference_on_default_model(default_model_f64):
    m, base = default_model_f64
    res = attribution_patching(m, base, replacement_values(base, EngineConfig()), paths=("full",))
    eps = 1e-2
    for site in [("resid_out", 1, 2), ("attn_out", 0, 3), ("resid_pre", 0, 4), ("resid_out", 0, 5), ("mlp_out", 2, 0)]:
        c, layer, p = site
        a = base.target.acts[c][layer, p]
        d = base.source.acts[c][layer, p] - a
        fd = (patched_ld(m, base, site, a + eps * d) - patched_ld(m, base, site, a - eps * d)) / (2 * eps)
        est = res.value("full", site)
        assert abs(fd - est) <= 2e-3 + 2e-2 * abs(est), (site, fd, est)


@pytest.fixture(scope="module")
def default_model_f64():
    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.model.load import load_model

    m = load_model("default")
    m.lm.double()
    m.prj.double()
    pair = generate_pairs(2, seed=0)[1]
    clean, corr = (record_run(m, m.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
    return m, prepare_pair(m, pair.pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer)


# ---- (c) a site whose only route to the answer is the recurrence ------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_recurrence_only_site_has_zero_attention_path_estimate(family):
    """The last block's output at a latent position feeds no key or value (those are read from block
    inputs): it reaches the answer only as the next thought. Cutting the recurrence zeroes its
    estimate, and the exact frozen patch (later thoughts held) changes nothing, while the full
    estimate does not vanish."""
    m = tiny_text_model(family, n_layers=2, d=32, num_latent=3)
    base = pair_baseline(m)
    res = attribution_patching(m, base, replacement_values(base, EngineConfig()), ("resid_out", "mlp_out"))
    last = m.n_layers - 1
    for c in ("resid_out", "mlp_out"):
        assert torch.equal(res.estimates["attention"][c][last], torch.zeros(m.num_latent))
        assert float(res.estimates["full"][c][last, : m.num_latent - 1].abs().max()) > 1e-4
        assert float(res.estimates["full"][c][last, -1]) == 0.0  # the last thought's successor is never fed
    site = ("resid_out", last, 0)
    frozen = patched_ld(m, base, site, base.source.acts["resid_out"][last, 0], frozen=True)
    assert abs(frozen - base.ld_target) < 1e-5


# ---- (d) equal source and target values: estimate 0 ----------------------------------------------------
def test_equal_values_give_zero_estimate():
    m = tiny_text_model("gpt2", n_layers=2, d=32, num_latent=3)
    base = pair_baseline(m)
    res = attribution_patching(m, base, own_values(base), graddrop=True)
    for path in res.estimates.values():
        for est in path.values():
            assert torch.equal(est, torch.zeros_like(est))
    for est in res.graddrop.values():
        assert torch.equal(est, torch.zeros_like(est))


# ---- GradDrop, metric value, refine --------------------------------------------------------------------
def test_graddrop_gradient_equals_plain_detached_block():
    """Gradient with block ℓ dropped = the gradient of a forward whose block-ℓ attention and MLP
    outputs are detached (a plain hook), for every ℓ."""
    m = tiny_text_model("llama", n_layers=2, d=32, num_latent=3)
    base = pair_baseline(m)
    _, grads = site_gradients(m, base, ("resid_pre",), graddrop=True)
    for layer in range(m.n_layers):
        handles = [
            mod.register_forward_hook(
                lambda mod, a, out: (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach()
            )
            for mod in (m.blocks[layer].self_attn, m.blocks[layer].mlp)
        ]
        try:
            _, plain = site_gradients(m, base, ("resid_pre",))
        finally:
            for h in handles:
                h.remove()
        assert torch.allclose(grads[1 + layer]["resid_pre"], plain[0]["resid_pre"], atol=1e-6)
    assert not torch.allclose(grads[0]["resid_pre"], grads[1]["resid_pre"])


def test_graddrop_leaves_values_unchanged():
    m = tiny_text_model("llama", n_layers=2, d=32, num_latent=3)
    base = pair_baseline(m)
    with GradDrop(m):
        r = m.rollout([base.target.prompt])
    assert torch.equal(r.thoughts[0], base.target.thoughts)


def test_metric_value_is_target_logit_diff_and_logprob_metric():
    m = tiny_text_model("llama", n_layers=2, d=32, num_latent=3)
    base = pair_baseline(m)
    values = replacement_values(base, EngineConfig())
    res = attribution_patching(m, base, values, metric="answer_logprob_diff", paths=("full",))
    from latentpatch.patching.metrics import answer_logprob_diff

    assert abs(res.metric_value - answer_logprob_diff(base.target_logits)) < 1e-4
    sites = list(res.sites())[:5]
    exact = exact_effects(m, base, sites, values, metric="answer_logprob_diff")
    assert all(math.isfinite(x) for x in exact)


def test_refine_sites_top_and_seeded_control():
    ranking = {("resid_out", layer, p): float((layer * 7 + p * 3) % 11 - 5) for layer in range(3) for p in range(4)}
    top, control = refine_sites(ranking, 3, seed=1)
    by_size = sorted(ranking, key=lambda s: -abs(ranking[s]))
    assert top == by_size[:3]
    assert len(control) == 3 and not set(control) & set(top)
    assert refine_sites(ranking, 3, seed=1) == (top, control)
    assert refine_sites(ranking, 100, seed=1) == (by_size, [])


def test_gradients_leave_parameters_and_default_rollout_alone():
    m = tiny_text_model("llama", n_layers=2, d=32, num_latent=3)
    flags = [p.requires_grad for p in m.parameters()]
    base = pair_baseline(m)
    site_gradients(m, base)
    assert [p.requires_grad for p in m.parameters()] == flags
    r = m.rollout([base.target.prompt])
    assert not r.answer_logits.requires_grad
    assert torch.equal(r.thoughts[0], base.target.thoughts)


# ---- the run: --experiments atp -------------------------------------------------------------------------
def test_run_with_atp_exact_check_and_refine(tmp_path):
    """Rows equal the estimator and plain patched rollouts; pair 0 is checked (every site exact),
    pair 1 has exact effects on its top-K and control sites only; the report has the section."""
    import pandas as pd

    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.model.load import load_model
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    pairs = generate_pairs(2, seed=0)
    cfg = RunConfig(
        experiments=("atp",), out=str(tmp_path / "r"), use_cache=False, atp_exact_pairs=1, refine=3, graddrop=True
    )
    out = run_experiments(cfg, pairs=pairs, progress=False, command="test")
    atp = pd.read_parquet(out / "results" / "atp.parquet")
    m = load_model("default")
    L, K = m.n_layers, m.num_latent
    assert len(atp) == 2 * 4 * L * K and atp["atp_graddrop"].notna().all()
    first, second = (atp[atp["pair_id"] == p.pair_id] for p in pairs)
    assert first["checked"].all() and first["exact"].notna().all()
    assert not second["checked"].any()
    assert sorted(second["selected"].value_counts().items()) == [("", 4 * L * K - 6), ("control", 3), ("top", 3)]
    assert second["exact"].notna().sum() == 6
    top = second[second["selected"] == "top"]
    assert top["atp_graddrop"].min() >= second[second["selected"] != "top"]["atp_graddrop"].max()
    clean, corr = (record_run(m, m.prompt_ids(v.question)) for v in (pairs[1].clean, pairs[1].corrupted))
    base = prepare_pair(m, pairs[1].pair_id, clean, corr, pairs[1].clean.answer, pairs[1].corrupted.answer)
    res = attribution_patching(m, base, replacement_values(base, EngineConfig()))
    for r in second[second["exact"].notna()].itertuples():
        site = (r.component, r.layer, r.position)
        assert abs(r.atp - res.value("full", site)) < 1e-5
        plain = patched_ld(m, base, site, base.source.acts[r.component][r.layer, r.position]) - base.ld_target
        assert abs(r.exact - plain) < 1e-4 * max(1.0, abs(plain))
    html = (out / "report.html").read_text()
    part = html[html.index('id="atp"') :]
    part = part[: part.index("</section>")]
    assert "Pearson" in part and "data:image/png;base64," in part and "--refine" in part
    # the section's numbers are stats.json's: the agreement against a plain correlation of the checked rows
    import json

    import numpy as np

    stats = json.loads((out / "stats.json").read_text())["atp"]
    checked = atp[atp["checked"] & atp["exact"].notna()]
    assert abs(stats["agreement"]["pearson"] - np.corrcoef(checked["atp"], checked["exact"])[0, 1]) < 1e-9
    ranks = checked[["atp", "exact"]].rank()
    assert abs(stats["agreement"]["spearman"] - np.corrcoef(ranks["atp"], ranks["exact"])[0, 1]) < 1e-9
    refined = atp[(atp["selected"] == "top") & atp["exact"].notna()]  # every pair's top sites
    assert abs(stats["refine"]["top"]["mean_abs_exact"] - refined["exact"].abs().mean()) < 1e-9
    assert f"{stats['agreement']['n_sites']}</td>" in part


def test_atp_options_need_the_experiment():
    from latentpatch.errors import LatentPatchError
    from latentpatch.pipeline.config import RunConfig

    with pytest.raises(LatentPatchError, match="--refine applies to attribution patching"):
        RunConfig(refine=5).validate()
    with pytest.raises(LatentPatchError, match="--atp-exact-pairs must be >= 1"):
        RunConfig(experiments=("atp",), atp_exact_pairs=0).validate()
    RunConfig(experiments=("layer", "atp"), refine=2, graddrop=False).validate()
    assert RunConfig().to_dict() == RunConfig(refine=None, atp_exact_pairs=None).to_dict()


def test_run_with_layer_and_atp_per_head(tmp_path):
    """--component head_out: every head is a site too; a run with cells and atp has both sections,
    and a head row's estimate equals the estimator's."""
    import pandas as pd

    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.model.load import load_model
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    pairs = generate_pairs(1, seed=2)
    cfg = RunConfig(experiments=("layer", "atp"), component="head_out", out=str(tmp_path / "r"), use_cache=False)
    out = run_experiments(cfg, pairs=pairs, progress=False, command="test")
    atp = pd.read_parquet(out / "results" / "atp.parquet")
    m = load_model("default")
    L, K = m.n_layers, m.num_latent
    assert len(atp) == (4 + 4) * L * K and atp["exact"].notna().all()
    heads = atp[atp["component"].str.startswith("head_out.")]
    assert sorted(heads["component"].unique()) == [f"head_out.{h}" for h in range(4)]
    clean, corr = (record_run(m, m.prompt_ids(v.question)) for v in (pairs[0].clean, pairs[0].corrupted))
    base = prepare_pair(m, pairs[0].pair_id, clean, corr, pairs[0].clean.answer, pairs[0].corrupted.answer)
    add_head_acts(m, [base.clean, base.corrupted])
    res = attribution_patching(m, base, replacement_values(base, EngineConfig()), ("head_out.2",), paths=("full",))
    row = heads[(heads["component"] == "head_out.2") & (heads["layer"] == 1) & (heads["position"] == 3)].iloc[0]
    assert abs(row["atp"] - res.value("full", ("head_out.2", 1, 3))) < 1e-5
    html = (out / "report.html").read_text()
    assert 'id="atp"' in html and 'id="layer"' in html


def test_cli_refine_without_atp_is_one_line(capsys):
    from latentpatch import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        cli.main(["run", "--refine", "3", "--limit", "1"])
    assert err.value.code == 2
    out, errtext = capsys.readouterr()
    assert "--refine applies to attribution patching only" in out + errtext and "Traceback" not in out + errtext
