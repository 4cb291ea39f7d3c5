"""Every experiment ``latentpatch run`` runs on PCCoT (docs/method.md "SIM-CoT and PCCoT", "Every
experiment on the rounds"), each new number against a plain loop written here from the official
procedure (github whyNLP/PCCoT at 2e32e3e, ``models/modeling_gpt2.py``
``PCCoTGPT2LMHeadModel.forward`` lines 127-180: round 0 on question + [BOT] + [LATENT] x N, then
``num_iterations`` rounds on the question+[BOT] cache, the answer pass reading the last run's KV; with
``num_iterations`` 0 it reads round 0's pass). The plain loop re-runs the whole sequence without a
cache, one question at a time. The checkpoint is tests/test_pccot.py's (peft's own layout; identity
feedback, T = 2 rounds < N = 4 slots).
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
from test_pccot import LATENT, T_FILE, N, write_checkpoint

from latentpatch.errors import LatentPatchError
from latentpatch.model.load import load_model
from latentpatch.patching.baselines import prepare_pair, record_run
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference
from latentpatch.patching.metrics import answer_logprob
from latentpatch.patching.steps import early_specs, influence_specs, recorded_chain, step_pool, step_values

QUESTIONS = ("tom has 12 eggs", "tom has 13 eggs", 12, 13)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("pccot_exp")
    path, _, _ = write_checkpoint(root)
    return path


def models(adapter):
    """The checkpoint with its sites in round 1 and in round 2 (the last)."""
    return [load_model(f"pccot:{adapter}", pccot_round=r) for r in range(1, T_FILE + 1)]


def pair_of(m):
    qc, qr, ac, ar = QUESTIONS
    clean, corr = (record_run(m, m.prompt_ids(q)) for q in (qc, qr))
    return prepare_pair(m, "p0", clean, corr, ac, ar)  # denoise: the corrupted question is the target


@torch.no_grad()
def plain_rounds(lm, q: list[int], rounds: int, patch: tuple[int, int] | None = None):
    """The official rounds for question ids ``q`` (ending in [BOT]), identity feedback, no cache:
    ``(embeddings the answer reads [1, T_q + N, d], h of the last round's slots [1, N, d])``;
    ``patch`` = (round, slot): that slot's input zeroed in that round."""
    emb = lm.get_input_embeddings()
    ids = torch.tensor([q + [LATENT] * N])
    h0 = lm.transformer(input_ids=ids)[0]
    slots, seq, h = h0[:, len(q) - 1 : len(q) - 1 + N], emb(ids), h0[:, len(q) :]
    for r in range(1, rounds + 1):
        if patch is not None and patch[0] == r:
            slots = slots.clone()
            slots[:, patch[1]] = 0
        seq = torch.cat([emb(torch.tensor([q])), slots], 1)
        h = lm.transformer(inputs_embeds=seq)[0][:, len(q) :]
        slots = torch.cat([slots[:, :1], h[:, :-1]], 1)
    return seq, h


@torch.no_grad()
def plain_ld(m, seq: torch.Tensor, answers) -> float:
    """log p(A_clean) - log p(A_corr) after ``seq`` and the answer start, teacher-forced without a cache."""
    emb = m.lm.get_input_embeddings()
    start = emb(torch.tensor([m.answer_start_ids()]))
    out = []
    for ids, first in answers:
        full = torch.cat([seq, start, emb(torch.tensor([ids[:-1]]))], 1)
        logits = m.lm(inputs_embeds=full).logits[0, -len(ids) :].float()
        out.append(answer_logprob(logits, ids, first))
    return out[0] - out[1]


def test_early_answers_are_the_official_procedure_over_rounds(adapter):
    """S(r), r = 0..T: the answer after round r, i.e. the official procedure with ``num_iterations``
    = r; the engine's batched cells and the one-rollout reference both equal the plain loop."""
    m = models(adapter)[-1]
    base = pair_of(m)
    specs = early_specs(m.early_exits)
    assert [s.start for s in specs] == list(range(T_FILE + 1))
    fast = sweep_fast(m, base, specs, lambda s: torch.zeros(0), EngineOptions(batch_size=8))
    ref = sweep_reference(m, base, specs, lambda s: torch.zeros(0))
    answers = [base.answers["clean"], base.answers["corr"]]
    plain = [plain_ld(m, plain_rounds(m.lm, list(base.target.prompt), r)[0], answers) for r in range(T_FILE + 1)]
    for r, (f, g, want) in enumerate(zip(fast, ref, plain)):
        assert abs(f["answer_logprob_diff"] - want) <= 1e-4, (r, f["answer_logprob_diff"], want)
        assert abs(g["answer_logprob_diff"] - want) <= 1e-4, (r, g["answer_logprob_diff"], want)
    assert max(plain) - min(plain) > 1e-3  # the rounds change the answer: the check can fail
    with pytest.raises(LatentPatchError, match="rounds 0..2"):
        m.early_answer([list(base.target.prompt)], T_FILE + 1)


@pytest.mark.parametrize("site", [1, 2])
def test_influence_is_what_the_patched_round_hands_on(adapter, site):
    """Slot i of round ``site`` zeroed: thought j's distance is that of f(h of slot j) in that round
    (what it hands slot j+1), patched vs unpatched, from the plain loop; the answer too."""
    m = models(adapter)[site - 1]
    base = pair_of(m)
    pool = step_pool([recorded_chain(base.clean), recorded_chain(base.target)])
    values = step_values(recorded_chain(base.target), recorded_chain(base.clean), pool)
    specs = [s for s in influence_specs(N) if s.replacement == "zero"]
    fast = sweep_fast(m, base, specs, values, EngineOptions(batch_size=3))
    ref = sweep_reference(m, base, specs, values)
    prompt, answers = list(base.target.prompt), [base.answers["clean"], base.answers["corr"]]
    _, h = plain_rounds(m.lm, prompt, site)
    moved = 0.0
    for spec, f, g in zip(specs, fast, ref):
        i = spec.index
        _, hp = plain_rounds(m.lm, prompt, site, patch=(site, i))
        want = ((hp - h).norm(dim=-1) / h.norm(dim=-1))[0]  # [N]
        for cell in (f, g):
            assert torch.allclose(torch.tensor(cell["thought_rel_l2"]), want, atol=1e-5), (i, cell, want)
        moved = max(moved, float(want[i + 1 :].max()) if i + 1 < N else 0.0)
        seq, _ = plain_rounds(m.lm, prompt, T_FILE, patch=(site, i))
        assert abs(f["answer_logprob_diff"] - plain_ld(m, seq, answers)) <= 1e-4
    assert moved > 1e-5  # a later slot's hand-on value moves: the check can fail


def test_attention_is_the_site_rounds_pass(adapter):
    """The slots' rows: the attention of round r's pass (eager attention of the plain sequence
    question + round r's slots); the answer start's row: over round T's sequence."""
    for m in models(adapter):
        prompt = m.prompt_ids(QUESTIONS[0])
        weights, T_q = attention_run_of(m, prompt)
        assert T_q == len(prompt) and weights.shape[2] == N + 1
        kernel = m.lm.config._attn_implementation
        m.lm.config._attn_implementation = "eager"  # the plain loop reads torch's own weights
        try:
            seq, _ = plain_rounds(m.lm, prompt, m.site_round)
            att = m.lm.transformer(inputs_embeds=seq, output_attentions=True).attentions  # [1, H, T, T] each
            end, _ = plain_rounds(m.lm, prompt, m.rounds)
            start = m.lm.get_input_embeddings()(torch.tensor([m.answer_start_ids()]))
            last = m.lm.transformer(inputs_embeds=torch.cat([end, start], 1), output_attentions=True).attentions
        finally:
            m.lm.config._attn_implementation = kernel
        for layer in range(m.n_layers):
            slots = weights[layer, :, :N, : T_q + N]
            assert torch.allclose(slots, att[layer][0, :, T_q:], atol=1e-5)
            assert float(weights[layer, :, :N, T_q + N :].abs().max()) == 0.0
            assert torch.allclose(weights[layer, :, N], last[layer][0, :, -1], atol=1e-5)


def attention_run_of(m, prompt):
    from latentpatch.patching.reading import attention_run

    return attention_run(m, prompt)


def test_das_interchanges_the_site_rounds_slot(adapter):
    """DAS's intervention at thought p is slot p's input in the site round (later rounds recomputed):
    the full interchange equals a plain round hook, and the loss has a gradient through the rounds."""
    from latentpatch.probing.das import DasSet, DasSite, Example, das_loss, full_interchange, intervened

    m = models(adapter)[0]
    b, s = (tuple(m.prompt_ids(q)) for q in QUESTIONS[:2])
    site = DasSite("thought", -1, 1)
    data = DasSet(m, [Example(b, s, 13.0, "g0"), Example(s, b, 12.0, "g1")], [site])
    with torch.no_grad():
        _, logits = intervened(data, site, torch.tensor([0]), full_interchange)
        src = m.parallel_rollout([list(s)])

        def hook(r, slots):
            if r != m.site_round:
                return slots
            out = slots.clone()
            out[:, 1] = src.thoughts[:, r - 1, 1]
            return out

        want = m.parallel_rollout([list(b)], round_hook=hook).answer_logits
        assert (logits - want).abs().max() <= 1e-5
        assert (logits - m.parallel_rollout([list(b)]).answer_logits).abs().max() > 1e-4
    param = torch.randn(2, m.d_model, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    with m.grad_mode(True):
        loss = das_loss(data, site, torch.tensor([0, 1]), lambda a, v: a + ((v - a) @ param.T) @ param)
    (grad,) = torch.autograd.grad(loss, [param])
    assert float(grad.norm()) > 0


def test_every_experiment_runs_on_pccot(adapter, tmp_path):
    """``run`` with every experiment defined on the rounds that the other tests do not run end to
    end: every built-in check passes (steps_engine_reference included), early rows are rounds
    0..T, influence and attention are written; edges and atp refuse in one line naming the reason."""
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    entries = []
    for i in range(8):
        a, b = 10 + i, 20 + i
        extra = {"cf": float(b)}
        entries += [
            {"pair_id": f"p{i}", "variant": "clean", "question": f"tom has {a} eggs", "answer": a,
             "intermediates": [a], **extra},
            {"pair_id": f"p{i}", "variant": "corrupted", "question": f"tom has {b} eggs", "answer": b,
             "intermediates": [b]},
        ]  # fmt: skip
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(entries))
    cfg = RunConfig(
        model=f"pccot:{adapter}",
        pairs=str(pairs),
        limit=3,
        experiments=("early", "influence", "intermediate", "attention"),
        out=str(tmp_path / "run"),
        use_cache=False,
        threads=1,
    )
    out = run_experiments(cfg, progress=False, command="test")
    checks = json.loads((out / "manifest.json").read_text())["checks"]
    assert "steps_engine_reference" in checks and all(c["passed"] for c in checks.values()), checks
    steps = pd.read_parquet(out / "results" / "steps.parquet")
    early = steps[steps["experiment"] == "early"]
    assert sorted(set(early["position"])) == list(range(T_FILE + 1))
    assert set(steps["experiment"]) == {"early", "intermediate"}
    assert len(pd.read_parquet(out / "results" / "influence.parquet")) == 3 * 3 * N * N  # pairs x kinds x i x j
    assert any((out / "results" / "attention").iterdir())
    html = (out / "report.html").read_text()
    section = html[html.index('<section id="early"') :]
    section = section[: section.index("</section>")]
    assert "Jacobi rounds the accuracy" in section  # the report's k is the round here
    das = dataclasses.replace(
        cfg,
        limit=None,
        experiments=("das",),
        das_variable="column:cf",
        das_sites="thought.t1",
        das_k="1",
        das_steps=2,
        das_pairs=4,
        out=str(tmp_path / "das"),
    )
    table = pd.read_parquet(run_experiments(das, progress=False, command="test") / "results" / "das.parquet")
    assert set(table["method"]) >= {"das", "random", "full", "base"}
    # the iterative sweep without its frozen control (PCCoTModel.frozen_path: it would equal chained)
    it = dataclasses.replace(cfg, limit=2, experiments=("iterative",), out=str(tmp_path / "iterative"))
    cells = pd.read_parquet(run_experiments(it, progress=False, command="test") / "results" / "cells.parquet")
    assert set(cells["mode"]) == {"parallel", "cumulative", "chained"}
    for name in ("edges", "atp"):
        bad = dataclasses.replace(cfg, experiments=(name,), out=str(tmp_path / name))
        with pytest.raises(LatentPatchError, match=f"--experiments {name}: not defined on PCCoT.*{name}: "):
            run_experiments(bad, progress=False, command="test")
