"""The sweep engine: fast == reference, identity, theory cases for chained/parallel/frozen."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_text_model

from latentpatch.model.answering import shared_prefix_length
from latentpatch.model.load import load_model
from latentpatch.model.sites import Write
from latentpatch.patching.baselines import (
    PairBaseline,
    mean_activations,
    own_values,
    prepare_pair,
    record_run,
    replacement_values,
    resample_partner,
)
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference
from latentpatch.patching.experiments import SpecShape, experiment_specs
from latentpatch.patching.specs import (
    EngineConfig,
    PatchSpec,
    iterative_specs,
    layer_specs,
    position_specs,
)

FAMILIES = ["llama", "gpt2"]
QUESTIONS = [
    ("Tom has 16 eggs and eats 3.", 13, "Tom has 17 eggs and eats 3.", 14),
    ("A box holds 24 pens, 5 are red.", 19, "A box holds 28 pens, 5 are red.", 23),
]
METRICS = ("kl", "logit_l2", "pred_change_rate", "answer_logit_diff", "answer_logprob_diff", "recovery")


def baselines(model, direction="denoise"):
    out = []
    for i, (qc, ac, qr, ar) in enumerate(QUESTIONS):
        clean, corr = record_run(model, model.prompt_ids(qc)), record_run(model, model.prompt_ids(qr))
        out.append(prepare_pair(model, str(i), clean, corr, ac, ar, direction))
    return out


def all_specs(model, component="resid_out"):
    n, k = model.n_layers, model.num_latent
    return layer_specs(n, k, component) + position_specs(n, k, component) + iterative_specs(n, k, component)


def assert_close_cells(a, b, tol=1e-4):
    for x, y in zip(a, b):
        for k in METRICS:
            if math.isnan(x[k]) and math.isnan(y[k]):
                continue
            # recovery divides by LD_source - LD_target: compare it relative to that scale
            assert abs(x[k] - y[k]) <= tol * max(1.0, abs(y[k])), (k, x[k], y[k])
        assert x["pred_answer"] == y["pred_answer"]
        for k in ("act_cos_clean", "act_cos_corr"):
            if k in x and k in y:
                assert abs(x[k] - y[k]) <= tol


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("component", ["resid_out", "attn_out"])
def test_fast_engine_equals_reference_on_all_experiments(family, component):
    m = tiny_text_model(family)
    for base in baselines(m):
        specs = all_specs(m, component)
        values = replacement_values(base, EngineConfig())
        fast = sweep_fast(m, base, specs, values, EngineOptions(batch_size=5))  # odd size: several chunks per start
        ref = sweep_reference(m, base, specs, values)
        assert_close_cells(fast, ref)
        # not a vacuous comparison: patches do move the answer distribution
        assert max(c["logit_l2"] for c in fast) > 1e-3


def test_fast_engine_with_noise_direction_and_resid_pre():
    m = tiny_text_model("llama")
    base = baselines(m, "noise")[0]
    specs = all_specs(m, "resid_pre")
    values = replacement_values(base, EngineConfig(direction="noise"))
    assert_close_cells(sweep_fast(m, base, specs, values, EngineOptions(64)), sweep_reference(m, base, specs, values))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_cell_metrics_against_plain_computation(family):
    """One layer-sweep cell recomputed by hand: hooked rollout, teacher forcing, log-softmax KL."""
    m = tiny_text_model(family)
    base = baselines(m)[0]
    layer = 1
    spec = PatchSpec("layer", "all", "resid_out", layer, tuple(range(m.num_latent)), -1)
    cell = sweep_fast(m, base, [spec], replacement_values(base, EngineConfig()))[0]

    tgt, src = base.corrupted.prompt, base.clean.prompt
    T = len(tgt)
    rec = m.rollout([src], record=[("resid_out", layer)])
    src_act = rec.hooks.recorded("resid_out", layer)[0, rec.prompt_len : rec.prompt_len + m.num_latent]
    writes = [
        Write("resid_out", layer, torch.tensor([T + p]), torch.tensor([True]), src_act[p][None])
        for p in range(m.num_latent)
    ]

    def tf_logits(writes_, ids):
        """Full no-cache forward of prompt+thoughts+[EOT]+answer: logits predicting each answer token."""
        r = m.rollout([tgt], writes=writes_)
        emb = m.lm.get_input_embeddings()
        seq = torch.cat([emb(torch.tensor([tgt])), r.thoughts, emb(torch.tensor([m.answer_start_ids() + ids[:-1]]))], 1)
        from latentpatch.model.sites import ActivationHooks

        with ActivationHooks(m.lm, writes=writes_) as h:
            h.offset = 0
            logits = m.lm(inputs_embeds=seq).logits[0].float()
        return logits[-len(ids) :]

    a_base, start = base.answers["base"]
    start = start if start < len(a_base) else 0  # no number token in A_base: all its positions count
    patched, baseline = tf_logits(writes, a_base)[start:], tf_logits([], a_base)[start:]
    lp, lq = F.log_softmax(patched, -1), F.log_softmax(baseline, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert cell["kl"] == pytest.approx(kl, abs=1e-5)
    assert cell["logit_l2"] == pytest.approx(float(((patched - baseline) ** 2).mean().sqrt()), abs=1e-5)

    (c_ids, c_start), (r_ids, r_start) = base.answers["clean"], base.answers["corr"]
    lc, lr = tf_logits(writes, c_ids), tf_logits(writes, r_ids)
    ld = float(
        lc[torch.arange(len(c_ids)), c_ids][c_start:].mean() - lr[torch.arange(len(r_ids)), r_ids][r_start:].mean()
    )
    assert cell["answer_logit_diff"] == pytest.approx(ld, abs=1e-5)
    assert cell["recovery"] == pytest.approx((ld - base.ld_target) / (base.ld_source - base.ld_target), rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_patch_changes_nothing(family):
    m = tiny_text_model(family)
    base = baselines(m)[0]
    cells = sweep_fast(m, base, all_specs(m), own_values(base))
    assert max(c["kl"] for c in cells) <= 1e-6
    assert all(c["pred_change_rate"] == 0 for c in cells)
    assert all(abs(c["recovery"]) < 1e-3 for c in cells if not math.isnan(c["recovery"]))


def test_full_patch_of_every_thought_at_every_layer_restores_nothing_more_than_clean():
    """Patching all latent positions at the *first* block's input (resid_pre L0) = feeding the
    clean thoughts: recovery is well defined and the patched thoughts are the clean ones."""
    m = tiny_text_model("llama")
    base = baselines(m)[0]
    spec = PatchSpec("layer", "all", "resid_pre", 0, tuple(range(m.num_latent)), -1)
    cell = sweep_fast(m, base, [spec], replacement_values(base, EngineConfig()))[0]
    assert not math.isnan(cell["recovery"])


@pytest.mark.parametrize("family", FAMILIES)
def test_chained_vs_parallel_vs_frozen_theory(family):
    m = tiny_text_model(family, num_latent=4)
    base = baselines(m)[0]
    values = replacement_values(base, EngineConfig())
    specs = iterative_specs(m.n_layers, m.num_latent)
    cells = {(s.layer, s.key): c for s, c in zip(specs, sweep_fast(m, base, specs, values))}
    last = m.n_layers - 1
    # Must differ (K >= 2): parallel also overwrites positions 1..K-1 with clean values, chained
    # lets the model regenerate them from the corrupted question context.
    for layer in range(m.n_layers):
        assert (
            abs(cells[(layer, "chained")]["answer_logit_diff"] - cells[(layer, "parallel")]["answer_logit_diff"]) > 1e-5
        )
    # Theory: cumulative S_{K-1} is the parallel patch; cumulative S_0 is the chained patch.
    for layer in range(m.n_layers):
        assert cells[(layer, f"cumulative_{m.num_latent - 1}")]["kl"] == cells[(layer, "parallel")]["kl"]
        assert cells[(layer, "cumulative_0")]["kl"] == cells[(layer, "chained")]["kl"]
    # Theory: the last block's output is attended by no position, so with the recurrent path cut
    # (frozen) a patch there cannot reach the answer at all ...
    assert cells[(last, "frozen")]["kl"] <= 1e-6  # float noise of batched vs unbatched only
    assert abs(cells[(last, "frozen")]["answer_logit_diff"] - base.ld_target) <= 1e-4
    # ... while the chained patch there does reach it, through the recurrent path only.
    assert cells[(last, "chained")]["kl"] > 1e-6
    # chained tracking: one cosine per later position, and the frozen run's later activations are
    # computed from the corrupted thoughts, so they are closer to the corrupted ones at the last layer
    ch = cells[(last, "chained")]
    assert ch["act_positions"] == list(range(1, m.num_latent))
    assert len(ch["act_cos_clean_by_position"]) == m.num_latent - 1
    fr = cells[(last, "frozen")]
    assert fr["act_cos_corr"] == pytest.approx(1.0, abs=1e-5)


def test_single_thought_model_chained_equals_parallel():
    """With K = 1 the chained patch (position 0, regenerate the rest) and the parallel patch (all
    positions) are the same set of sites: theory says they must agree exactly."""
    m = tiny_text_model("gpt2", num_latent=1)
    base = baselines(m)[0]
    specs = iterative_specs(m.n_layers, 1)
    cells = {
        (s.layer, s.key): c
        for s, c in zip(specs, sweep_reference(m, base, specs, replacement_values(base, EngineConfig())))
    }
    for layer in range(m.n_layers):
        for k in METRICS:
            a, b = cells[(layer, "chained")][k], cells[(layer, "parallel")][k]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-7)


@torch.no_grad()
def test_last_layer_patch_changes_later_thoughts_through_recurrence():
    """The public code's "last layer has zero effect" came from never running the loop."""
    m = tiny_text_model("llama")
    base = baselines(m)[0]
    last, p = m.n_layers - 1, 1
    spec = PatchSpec("position", "single", "resid_out", last, (p,), p, track=True)
    cell = sweep_fast(m, base, [spec], replacement_values(base, EngineConfig()))[0]
    assert cell["kl"] > 1e-6
    # the regenerated activations at later positions moved away from the corrupted run's
    assert min(cell["act_cos_corr_by_position"]) < 1 - 1e-6


def test_replacements_zero_mean_resample():
    m = tiny_text_model("llama")
    bases = baselines(m)
    spec = PatchSpec("position", "single", "resid_out", 1, (2,), 2)
    zero = replacement_values(bases[0], EngineConfig(replacement="zero"))(spec)
    assert torch.count_nonzero(zero) == 0
    means = mean_activations(bases)
    mean = replacement_values(bases[0], EngineConfig(replacement="mean"), mean_acts=means)(spec)
    by_hand = (bases[0].clean.acts["resid_out"][1, 2] + bases[1].clean.acts["resid_out"][1, 2]) / 2
    assert torch.allclose(mean[0], by_hand, atol=1e-6)
    res = replacement_values(bases[0], EngineConfig(replacement="resample"), resample_from=bases[1])(spec)
    assert torch.equal(res[0], bases[1].clean.acts["resid_out"][1, 2])
    partner = resample_partner(7, seed=3)
    assert all(partner[i] != i for i in range(7)) and sorted(partner) == list(range(7))
    assert partner == resample_partner(7, seed=3)


def greedy_test_model(family):
    """A tiny text model, or ``config:llama`` (the random demo model, whose answers all run to
    ``max_answer_tokens`` without [EOS]: the truncated case of the decoding shortcut)."""
    return load_model(family) if family.startswith("config:") else tiny_text_model(family)


@pytest.mark.parametrize("family", [*FAMILIES, "config:llama"])
def test_generated_answers_equal_plain_greedy_decoding(family, monkeypatch):
    """The engine decodes step by step only the rows whose teacher-forced argmaxes do not
    reproduce A_base; every cell's answer must still equal plain greedy decoding of its patched
    rollout (both branches are exercised: some patches change the answer, some do not). Answers
    cut at ``max_answer_tokens`` take the shortcut too (docs/method.md §7.3)."""
    m = greedy_test_model(family)
    decoded = []  # rows the engine decoded step by step
    plain_generate = m.generate

    def counting_generate(state, logits, *args):
        decoded.append(len(logits))
        return plain_generate(state, logits, *args)

    monkeypatch.setattr(m, "generate", counting_generate)
    changed = kept = shortcut_truncated = 0
    for base in baselines(m):
        specs = layer_specs(m.n_layers, m.num_latent, "resid_out") + position_specs(
            m.n_layers, m.num_latent, "resid_out"
        )
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(m.n_layers, m.num_latent, m.d_model, generator=gen) * 20

        def values(spec, base=base, noise=noise):  # large random writes on half the layers, so some answers change
            v = base.source.acts[spec.component][spec.layer, list(spec.positions)]
            return v + noise[spec.layer, list(spec.positions)] if spec.layer % 2 else v

        decoded.clear()
        cells = sweep_fast(m, base, specs, values, EngineOptions(batch_size=7))
        truncated = len(base.target.answer_ids) == m.config.max_answer_tokens
        if truncated:
            shortcut_truncated += len(cells) - sum(decoded)
        tgt, T = base.target.prompt, len(base.target.prompt)
        for spec, cell in zip(specs, cells):
            vals = values(spec)
            writes = [
                Write(spec.component, spec.layer, torch.tensor([T + p]), torch.tensor([True]), vals[i][None])
                for i, p in enumerate(spec.positions)
            ]
            r = m.rollout([tgt], writes=writes)
            assert cell["answer_ids"] == plain_generate(r.state, r.answer_logits)[0], spec
            if cell["answer_ids"] == list(base.target.answer_ids):
                kept += 1
            else:
                changed += 1
    # config:llama's answer does not move under any patch (a random model): only the kept branch
    assert (changed > 0 or family == "config:llama") and kept > 0, (changed, kept)
    assert shortcut_truncated > 0  # every model here has baselines cut at max_answer_tokens


def test_specs_and_config_validate_their_names():
    with pytest.raises(ValueError):
        EngineConfig(direction="sideways")
    with pytest.raises(ValueError):
        EngineConfig(replacement="noise")
    with pytest.raises(ValueError, match="stage"):
        experiment_specs("attention", SpecShape(2, 3))
    with pytest.raises(ValueError, match="unknown experiment"):
        experiment_specs("layers", SpecShape(2, 3))
    assert experiment_specs("layer", SpecShape(2, 3)) == layer_specs(2, 3)


def test_equal_computations_are_run_once_and_copied():
    """A spec repeated (e.g. iterative ``parallel`` = the layer cell) gets equal but separate dicts."""
    m = tiny_text_model("llama")
    base = baselines(m)[0]
    layer = layer_specs(m.n_layers, m.num_latent)[1]
    parallel = PatchSpec("iterative", "parallel", layer.component, layer.layer, layer.positions, -1)
    a, b = sweep_fast(m, base, [layer, parallel], replacement_values(base, EngineConfig()))
    assert a == b and a is not b


def test_sweep_needs_prepared_baselines():
    m = tiny_text_model("llama")
    prepared = baselines(m)[0]
    raw = PairBaseline("raw", prepared.clean_answer, prepared.corrupted_answer, prepared.clean, prepared.corrupted)
    spec = layer_specs(m.n_layers, m.num_latent)[0]
    with pytest.raises(ValueError, match="prepare_pair"):
        sweep_fast(m, raw, [spec], own_values(raw))


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_scoring_equals_plain_teacher_forcing(family):
    """``score(..., shared_prefix=True)`` feeds the answer strings' common prefix once and branches;
    its logits equal one plain batch-1 forward per string (to float precision), and the engine
    with it still equals the reference."""
    m = tiny_text_model(family)
    base = baselines(m)[0]
    r = m.rollout([base.target.prompt, base.source.prompt])
    clean, corr = base.answers["clean"][0], base.answers["corr"][0]
    conts = [clean + [0], corr, clean[:-1] + [7, 8, 0]]  # a shared "= " and more
    assert shared_prefix_length(conts) >= 2
    shared = m.score(r.state, r.answer_logits, [conts, conts], shared_prefix=True)
    for b in range(2):
        for c, seq in enumerate(conts):
            state = r.state.fork(rows=torch.tensor([b]))
            plain = m.logits(m.advance(state, input_ids=torch.tensor([seq[:-1]])))[0]  # [len - 1, V]
            expected = torch.cat([r.answer_logits[b : b + 1], plain])
            assert shared[b][c].shape == expected.shape
            assert torch.allclose(shared[b][c], expected, atol=1e-4), (b, c)
    specs = all_specs(m)
    values = replacement_values(base, EngineConfig())
    assert_close_cells(
        sweep_fast(m, base, specs, values, EngineOptions(7, shared_prefix=True)),
        sweep_reference(m, base, specs, values),
    )


def test_flipped_answers_verified_as_the_clean_answer_equal_plain_greedy_decoding(monkeypatch):
    """A patch that flips the shipped model's answer mostly makes it give the clean answer: the
    engine then checks that guess with one forward instead of decoding step by step. Every cell's
    answer must equal plain greedy decoding of its own patched rollout (one rollout per cell, no
    shared cache), and the guess must have saved decoding."""
    from latentpatch.data.synthetic import generate_pairs

    m = load_model("default")
    decoded = []
    plain_generate = m.generate

    def counting_generate(state, logits, *args):
        decoded.append(len(logits))
        return plain_generate(state, logits, *args)

    monkeypatch.setattr(m, "generate", counting_generate)
    specs = layer_specs(m.n_layers, m.num_latent, "resid_out") + position_specs(m.n_layers, m.num_latent, "resid_out")
    flipped = to_clean = stepwise = 0
    for pair in generate_pairs(3, seed=5):
        clean, corr = (record_run(m, m.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
        base = prepare_pair(m, pair.pair_id, clean, corr, float(pair.clean.answer), float(pair.corrupted.answer))

        def values(spec, base=base):
            return base.source.acts[spec.component][spec.layer, list(spec.positions)]

        decoded.clear()
        cells = sweep_fast(m, base, specs, values, EngineOptions(batch_size=16))
        T = len(base.target.prompt)
        for spec, cell in zip(specs, cells):
            writes = [
                Write(spec.component, spec.layer, torch.tensor([T + p]), torch.tensor([True]), values(spec)[i][None])
                for i, p in enumerate(spec.positions)
            ]
            r = m.rollout([base.target.prompt], writes=writes)
            assert cell["answer_ids"] == plain_generate(r.state, r.answer_logits)[0], spec
            if cell["answer_ids"] != list(base.target.answer_ids):
                flipped += 1
                to_clean += cell["answer_ids"] == base.answers["clean"][0]
        stepwise += sum(decoded)
    # the rows decoded step by step are the flipped ones whose answer is neither guess
    assert to_clean > 5 and stepwise <= flipped - to_clean, (flipped, to_clean, stepwise)


def test_baseline_answer_from_a_checked_guess_equals_plain_greedy_decoding(monkeypatch):
    """An unpatched run given the pair file's answer checks ``answer_prefix + answer`` with one
    forward; its answer ids must be those of plain greedy decoding, for right and wrong guesses,
    and a right guess must skip the step-by-step decode."""
    from latentpatch.data.synthetic import generate_pairs

    m = load_model("default")
    plain_generate = m.generate
    decoded = []

    def counting_generate(state, logits, *args):
        decoded.append(len(logits))
        return plain_generate(state, logits, *args)

    right = 0
    for pair in generate_pairs(6, seed=8):
        prompt = m.prompt_ids(pair.clean.question)
        plain = record_run(m, prompt).answer_ids  # before the patch below: plain generate
        monkeypatch.setattr(m, "generate", counting_generate)
        for guess in (pair.clean.answer, pair.clean.answer + 1):
            decoded.clear()
            ids = record_run(m, prompt, guess=guess).answer_ids
            assert ids == plain, (pair.pair_id, guess)
            if ids == m.answer_ids(guess)[0]:
                right += 1
                assert not decoded  # taken from the guess
            else:
                assert decoded == [1]
        monkeypatch.setattr(m, "generate", plain_generate)
    assert right >= 4
