"""One seeded draw stream per pair (docs/method.md §21, model/streams.py) on the random families.

Multiplex (model/mixture.py) and CoLaR (model/colar.py) draw at every latent step. Each pair's
clean, corrupted and patched runs draw from the pair's own stream: a generator seeded with
``stream_seed(seed, pair_stream(pair_id))`` drawing step 0's draws, then step 1's, ... The plain
loop below is that documented procedure written out: one ``torch.Generator`` per pair, J1mL1's
``torch.multinomial(p, width, replacement=False, generator=...)`` per step (no KV cache, one
question at a time; J1mL1/causal-latent-cot ``common/models/multiplex_model.py`` lines 172-241).
"""

from __future__ import annotations

import pytest
import torch

from latentpatch.data.synthetic import generate_pairs
from latentpatch.model.colar import CoLaRFeedback, LatentPolicy
from latentpatch.model.latent import LatentModel
from latentpatch.model.loaders import random_model
from latentpatch.model.mixture import (
    MULTIPLEX_DEFAULT,
    SOFT_THINKING_PAPER,
    DrawStream,
    MixtureSettings,
    mixture_model,
)
from latentpatch.model.sites import Write
from latentpatch.model.stops import rule_latent_counts
from latentpatch.model.streams import pair_stream, stream_seed
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
from latentpatch.patching.checks import check_engine_reference
from latentpatch.patching.specs import EngineConfig, position_specs

K, SEED = 4, 5
QUESTIONS = ["Tom has 12 apples. How many?", "What is 2+3?", "Sam had 7 cats and 2 ran off."]
IDS = ["pair-a", "pair-b", "pair-c"]


@pytest.fixture(scope="module")
def base():
    m = random_model("llama", num_latent=K, seed=3)
    with torch.no_grad():  # peaked distributions (random logits are ~flat)
        m.lm.get_input_embeddings().weight.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def multiplex(base):
    # a high temperature: which ids the draw picks depends on the draws, so other noise shows
    flat = MixtureSettings(**{**MULTIPLEX_DEFAULT.__dict__, "temperature": 30.0})
    return mixture_model(base, "multiplex", flat, seed=SEED)


@pytest.fixture(scope="module")
def colar():
    base = random_model("llama", num_latent=K, seed=4)
    head = base.lm.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach() * 60.0)  # untied and peaked: the stop can fire
    torch.manual_seed(0)
    feedback = CoLaRFeedback(LatentPolicy(base.d_model, 32), emb_std=1.0, vocab=base.vocab_size, seed=SEED)
    with torch.no_grad():  # a wide std: the normals decide the thoughts
        feedback.latent_policy.log_std.bias.fill_(-1.0)
    m = LatentModel(base.lm, feedback, base.config, base.tokenizer, name="colar-tiny")
    r = m.rollout(QUESTIONS, streams=keys(3))
    prompts = [m.prompt_ids(q) for q in QUESTIONS]
    for sep in m.logits(r.latent_hidden).argmax(-1).flatten().tolist():  # a stop that fires for some pair
        feedback.separator_id = int(sep)
        if min(rule_latent_counts(m, prompts, K, keys(3))) < K:
            break
    return m


@pytest.fixture(scope="module")
def soft_noise(base):
    # Soft Thinking with the official Gumbel noise: random, so its rows read their pairs' streams too
    settings = MixtureSettings(**{**SOFT_THINKING_PAPER.__dict__, "noise": "gumbel", "gumbel_temperature": 0.5})
    return mixture_model(base, "soft", settings, seed=SEED)


def keys(n: int) -> list[int]:
    return [pair_stream(i) for i in IDS[:n]]


def test_stream_draws_depend_on_the_key_only():
    plan = [("normal", 6), ("exponential", 9)]
    a, b = DrawStream(SEED, 9, plan), DrawStream(SEED, 9, plan, budget=1, keys=1)  # b forgets and draws again
    ka, kb = keys(2)
    for step in (0, 1, 2):
        b.draws(step, kb)  # other streams read in between, another order
    got = [torch.cat(b.draws(s, ka)) for s in (2, 0, 1)]
    gen = torch.Generator().manual_seed(stream_seed(SEED, ka))  # the documented procedure
    plain = []
    for _ in range(3):  # per step: the normals, then the exponentials, each as [1, n]
        normals = torch.empty(1, 6).normal_(generator=gen)[0]
        plain.append(torch.cat([normals, torch.empty(1, 9).exponential_(generator=gen)[0]]))
    assert all(torch.equal(g, plain[s]) for g, s in zip(got, (2, 0, 1)))
    assert all(torch.equal(torch.cat(a.draws(s, ka)), plain[s]) for s in range(3))
    assert not torch.equal(torch.cat(a.draws(0, kb)), plain[0])  # another pair, another stream
    assert not torch.equal(torch.cat(a.draws(0)), plain[0])  # the run's stream (no key) is neither


@torch.no_grad()
def plain_multiplex(m, question: str, pair_id: str) -> torch.Tensor:
    """Thoughts [K, d] of one question by the documented per-pair generator, no KV cache."""
    lm, V, s = m.lm, m.feedback.vocab, m.feedback.settings
    E = lm.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(stream_seed(SEED, pair_stream(pair_id)))
    seq = E[torch.tensor(m.question_ids(question))][None]
    thoughts = []
    for _ in range(K):
        h = lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][:, -1]
        probs = torch.softmax(lm.lm_head(h)[:, :V] / s.temperature, -1)
        idx = torch.multinomial(probs, num_samples=s.width, replacement=False, generator=gen)
        w = torch.gather(probs, 1, idx)
        t = ((w / w.sum(-1, keepdim=True))[0, :, None] * E[idx[0]]).sum(0)
        thoughts.append(t)
        seq = torch.cat([seq, t[None, None]], 1)
    return torch.stack(thoughts)


def test_a_pairs_thoughts_are_its_own_stream_in_any_batch(multiplex):
    together = multiplex.rollout(QUESTIONS, streams=keys(3)).thoughts
    order = [2, 0, 1]
    shuffled = multiplex.rollout([QUESTIONS[i] for i in order], streams=[keys(3)[i] for i in order]).thoughts
    for b in range(3):
        plain = plain_multiplex(multiplex, QUESTIONS[b], IDS[b])
        torch.testing.assert_close(together[b], plain, atol=1e-6, rtol=0)
        alone = multiplex.rollout([QUESTIONS[b]], streams=[keys(3)[b]]).thoughts[0]
        torch.testing.assert_close(alone, plain, atol=1e-6, rtol=0)
        assert torch.equal(shuffled[order.index(b)], together[b])  # rows of >= 2: the same bits
    # the same question under two pairs' streams meets other noise: other thoughts
    twice = multiplex.rollout([QUESTIONS[0]] * 2, streams=keys(2)).thoughts
    assert not torch.equal(twice[0, 1:], twice[1, 1:])


@pytest.mark.parametrize("family", ["multiplex", "colar", "soft_noise"])
def test_own_value_patch_changes_nothing(family, multiplex, colar, soft_noise):
    m = {"multiplex": multiplex, "colar": colar, "soft_noise": soft_noise}[family]
    assert m.feedback.random
    r = m.rollout(QUESTIONS[:2], record=[("resid_out", 1)], streams=keys(2))
    at = r.prompt_len + 1  # latent 1: every later step must meet its row's own draws again
    own = r.hooks.recorded("resid_out", 1)[:, at].clone()
    write = Write("resid_out", 1, torch.full((2,), at), torch.ones(2, dtype=torch.bool), own)
    patched = m.rollout(QUESTIONS[:2], writes=[write], streams=keys(2))
    assert torch.equal(patched.thoughts, r.thoughts) and torch.equal(patched.answer_logits, r.answer_logits)


def test_colar_stop_counts_follow_each_pairs_stream(colar):
    prompts = [colar.prompt_ids(q) for q in QUESTIONS]
    batched = rule_latent_counts(colar, prompts, 12, keys(3))
    alone = [rule_latent_counts(colar, [p], 12, [k])[0] for p, k in zip(prompts, keys(3))]
    assert batched == alone and min(batched) < 12  # the rule fired somewhere
    # the plain rule on row 0: the stop token sampled from its pair's stream, step by step
    r = colar.rollout(prompts[:1], streams=keys(1))
    logits = colar.logits(r.latent_hidden[0])  # [K, V]
    gen = torch.Generator().manual_seed(stream_seed(SEED, keys(1)[0]))
    fired = []
    for step in range(K):
        torch.empty(1, colar.d_model).normal_(generator=gen)  # the step's normals come first
        q = torch.empty(1, colar.vocab_size).exponential_(generator=gen)[0]
        fired.append(int((torch.softmax(logits[step], -1) / q).argmax()) == colar.feedback.separator_id)
    assert min(batched[0], K) == (fired.index(True) + 1 if True in fired else K)


@pytest.mark.parametrize("family", ["multiplex", "colar"])
def test_engine_equals_reference_with_pair_streams(family, multiplex, colar):
    m = multiplex if family == "multiplex" else colar
    pair = generate_pairs(1, seed=1)[0]
    bases = []
    for pair_id in (pair.pair_id, pair.pair_id + "-twin"):  # the same questions under two pairs' streams
        stream = pair_stream(pair_id)
        clean, corr = (record_run(m, m.prompt_ids(v.question), stream=stream) for v in (pair.clean, pair.corrupted))
        bases.append(prepare_pair(m, pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer))
        assert bases[-1].stream == stream
    assert not torch.equal(bases[0].target.thoughts, bases[1].target.thoughts)  # other noise
    specs = position_specs(m.n_layers, m.num_latent)
    values = lambda i: replacement_values(bases[i], EngineConfig())  # noqa: E731
    # one shared batch key: both pairs' rows run in one batch, each row with its own pair's stream
    result = check_engine_reference(m, bases, specs, values, 4, 6, shared_rows=256)
    assert result["passed"], result


def test_activation_cache_tells_streams_apart(multiplex, tmp_path):
    from latentpatch.pipeline.cache import ActivationCache, recorded_run

    cache = ActivationCache(tmp_path, "k")
    a = recorded_run(multiplex, cache, QUESTIONS[0], stream=keys(1)[0])
    b = recorded_run(multiplex, cache, QUESTIONS[0], stream=keys(2)[1])  # another pair: a miss
    again = recorded_run(multiplex, cache, QUESTIONS[0], stream=keys(1)[0])
    assert (cache.hits, cache.misses) == (1, 2)
    assert torch.equal(again.thoughts, a.thoughts) and not torch.equal(a.thoughts, b.thoughts)
    assert again.stream == a.stream == keys(1)[0]


def test_sharded_run_draws_each_pairs_stream(multiplex, tmp_path):
    """A pair's result file is the same bytes in the unsharded run and in the shard that runs it
    (other pairs around it, another batch, another process's order)."""
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    pairs = generate_pairs(3, seed=2)

    def run(name, shard=None):
        cfg = RunConfig(
            out=str(tmp_path / name),
            shard=shard,
            experiments=("position",),
            seed=SEED,
            report=False,
            use_cache=False,
            check_cells=2,
            workers=1,
        )
        return run_experiments(cfg, model=multiplex, pairs=pairs, progress=False)

    full, part = run("full"), run("shard", "1/2")
    files = sorted((part / "results" / "pairs").iterdir())
    assert files
    for f in files:
        assert f.read_bytes() == (full / "results" / "pairs" / f.name).read_bytes()


def test_thought_replacements_through_the_feedback_keep_the_pairs_stream(multiplex):
    """A ``thought_pre`` replacement feeds its value through the feedback at the row's step, with the
    row's pair's draws: the target's own ``thought_pre`` value gives back the target's own thoughts,
    and the fast engine equals one rollout per spec (check 5)."""
    from latentpatch.patching.checks import check_steps_engine_reference
    from latentpatch.patching.engine import sweep_fast
    from latentpatch.patching.steps import thought_specs

    pair = generate_pairs(1, seed=4)[0]
    stream = pair_stream(pair.pair_id)
    runs = [
        record_run(multiplex, multiplex.prompt_ids(v.question), stream=stream) for v in (pair.clean, pair.corrupted)
    ]
    base = prepare_pair(multiplex, pair.pair_id, *runs, pair.clean.answer, pair.corrupted.answer)
    specs = [s for s in thought_specs(K) if getattr(s.intervention, "through_feedback", False)][:K]
    assert specs and base.target.thought_pre is not None
    pre = base.target.thought_pre

    def own(spec):  # [len(positions), d]: the target's own states before the feedback
        return pre[list(spec.intervention.positions)]

    cells = sweep_fast(multiplex, base, specs, own)
    assert max(max(c["thought_rel_l2"]) for c in cells) < 1e-5, [c["thought_rel_l2"] for c in cells]
    assert max(abs(c["kl"]) for c in cells) < 1e-6, [c["kl"] for c in cells]
    result = check_steps_engine_reference(multiplex, base, specs, own, 64, n_cells=len(specs))
    assert result["passed"], result


def test_noisy_soft_thinking_rows_draw_their_pairs_streams(soft_noise, base):
    """Soft Thinking's noise (model/mixture_stops.py) reads each row's pair's stream: a pair's
    thoughts are the same alone and in a batch, and two pairs on one question differ."""
    together = soft_noise.rollout(QUESTIONS[:2], streams=keys(2)).thoughts
    for b in range(2):
        alone = soft_noise.rollout([QUESTIONS[b]], streams=[keys(2)[b]]).thoughts[0]
        torch.testing.assert_close(alone, together[b], atol=1e-6, rtol=0)
    twice = soft_noise.rollout([QUESTIONS[0]] * 2, streams=keys(2)).thoughts
    assert not torch.equal(twice[0], twice[1])
    assert not mixture_model(base, "soft").feedback.random  # no noise: deterministic, keys ignored
