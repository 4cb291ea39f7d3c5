"""Soft Thinking and Multiplex Thinking (model/mixture.py) against plain loops written from the
official inference code, on a tiny random LLaMA (byte tokenizer, d = 64, 4 thoughts).

The plain loops re-run the whole sequence at every step (no KV cache), one question at a time:

- Soft Thinking, eric-ai-lab/Soft-Thinking at b97407c (``python/sglang/srt/layers/sampler.py``,
  the soft-thinking branch of ``Sampler.forward``; ``vocab_parallel_embedding.py``
  ``weighted_forward``; as summarised in ../shared/families.md, "Soft Thinking"): softmax at the
  temperature, top-k renormalised, top-p on the renormalised p keeping the crossing token, min-p,
  the ``max_topk`` largest renormalised, ``sum w_i E[i]``. The latent count is fixed
  (J1mL1/causal-latent-cot at 30063d7, ``common/models/softthinking_model.py`` lines 281-300:
  ``</think>`` of several ids never stops; ``max_think_steps`` does), then every id of
  ``</think>`` is fed (same file, lines 308-324).
- Multiplex, J1mL1/causal-latent-cot ``common/models/multiplex_model.py`` lines 172-241
  (``_apply_top_k_top_p_min_p``, ``_latent_embedding_from_logits``): filtered p, then
  ``torch.multinomial(p, width, replacement=False)`` from the global generator after
  ``torch.manual_seed``, weights ``p[idx]`` renormalised.

Greedy answers are the tool's decoding rule (argmax with pad/bot/eot banned, stop at [EOS]); the
official answer phase samples, which is not comparable cell by cell.
"""

from __future__ import annotations

import pytest
import torch

from latentpatch.data.synthetic import generate_pairs
from latentpatch.model.loaders import random_model
from latentpatch.model.mixture import MULTIPLEX_DEFAULT, SOFT_THINKING_PAPER, MixtureSettings, mixture_model
from latentpatch.model.sites import Write
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
from latentpatch.patching.checks import check_engine_reference
from latentpatch.patching.specs import EngineConfig, position_specs

QUESTIONS = ["Tom has 12 apples. How many?", "What is 2+3?"]
K = 4


@pytest.fixture(scope="module")
def base():
    m = random_model("llama", num_latent=K, seed=3)
    with torch.no_grad():  # peaked distributions, so the filters cut somewhere (random logits are ~flat)
        m.lm.get_input_embeddings().weight.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def soft(base):
    return mixture_model(base, "soft")


@pytest.fixture(scope="module")
def multiplex(base):
    # the paper's filters on top of the draw, so top-k/top-p/min-p are exercised with the sampling
    settings = MixtureSettings(temperature=1.0, top_k=40, top_p=0.9, min_p=0.01, max_topk=0, width=3, rule="j1ml1")
    return mixture_model(base, "multiplex", settings, seed=11)


def official_soft_filter(logits: torch.Tensor, s: MixtureSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-Thinking's order on one row (logits [V]): weights and ids of the mixture."""
    p = torch.softmax(logits / s.temperature, -1)
    kth = torch.sort(p, descending=True).values[s.top_k - 1]
    p = torch.where(p >= kth, p, 0.0)  # top-k, ties kept
    p = p / p.sum()
    vals, ids = torch.sort(p, descending=True)
    keep = torch.zeros_like(vals, dtype=torch.bool)
    total = 0.0
    for i in range(len(vals)):  # top-p: keep until the kept mass reaches top_p (the crossing token kept)
        keep[i] = True
        total += float(vals[i])
        if total >= s.top_p:
            break
    vals = torch.where(keep, vals, 0.0)
    vals = vals / vals.sum()
    vals = torch.where(vals >= s.min_p * vals[0], vals, 0.0)  # min-p
    vals = vals / vals.sum()
    w, i = vals[: s.max_topk], ids[: s.max_topk]
    return w / w.sum(), i


def official_multiplex(logits: torch.Tensor, s: MixtureSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """J1mL1's ``_latent_embedding_from_logits`` on logits [1, V] (draws from the global generator)."""
    probs = torch.softmax(logits / s.temperature, -1)
    topk_vals, topk_idx = torch.topk(probs, k=s.top_k, dim=-1)
    probs = torch.zeros_like(probs).scatter(1, topk_idx, topk_vals)
    sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) <= s.top_p
    keep[:, 0] = True
    probs = torch.zeros_like(probs).scatter(1, sorted_idx, torch.where(keep, sorted_probs, 0.0))
    probs = torch.where(probs >= probs.max(-1, keepdim=True).values * s.min_p, probs, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    idx = torch.multinomial(probs, num_samples=s.width, replacement=False)
    w = torch.gather(probs, 1, idx)
    return (w / w.sum(-1, keepdim=True))[0], idx[0]


@torch.no_grad()
def plain_run(m, question: str, mix) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """No cache: thoughts [K, d], answer logits [V] after ``</think>``, greedy answer ids."""
    lm, V = m.lm, m.feedback.vocab
    E = lm.get_input_embeddings().weight
    seq = E[torch.tensor(m.question_ids(question))][None]  # the prompt ends with the question
    thoughts = []
    for _ in range(K):
        h = lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][0, -1]
        w, ids = mix(lm.lm_head(h)[None, :V])  # [1, V]
        t = (w[:, None] * E[ids]).sum(0)
        thoughts.append(t)
        seq = torch.cat([seq, t[None, None]], 1)
    seq = torch.cat([seq, E[torch.tensor(m.answer_start_ids())][None]], 1)
    first = lm(inputs_embeds=seq).logits[0, -1]
    banned = m.config.banned_ids(first.shape[-1])
    answer, logits = [], first.clone()
    for _ in range(m.config.max_answer_tokens):
        logits[banned] = float("-inf")
        nxt = int(logits.argmax())
        if nxt == m.config.eos_id:
            break
        answer.append(nxt)
        seq = torch.cat([seq, E[nxt][None, None]], 1)
        logits = lm(inputs_embeds=seq).logits[0, -1].clone()
    return torch.stack(thoughts), first, answer


def _compare(m, plain: list) -> None:
    r = m.rollout(QUESTIONS)  # a left-padded batch of both questions, KV-cached
    answers = m.generate(r.state, r.answer_logits)
    for b, (thoughts, logits, answer) in enumerate(plain):
        torch.testing.assert_close(r.thoughts[b], thoughts, atol=1e-5, rtol=0)
        torch.testing.assert_close(r.answer_logits[b], logits, atol=1e-5, rtol=0)
        assert list(answers[b]) == answer


def test_soft_thinking_equals_the_official_procedure(soft):
    s = SOFT_THINKING_PAPER
    plain = [plain_run(soft, q, lambda logits: official_soft_filter(logits[0], s)) for q in QUESTIONS]
    # the filters cut: the top-p / top-k leave fewer than max_topk tokens at some step, more than one at others
    with torch.no_grad():
        hidden = soft.rollout(QUESTIONS).latent_hidden  # [B, K, d]
        kept = [int((official_soft_filter(soft.lm.lm_head(h)[:257], s)[0] > 0).sum()) for h in hidden.flatten(0, 1)]
    assert min(kept) < s.max_topk and max(kept) > 1, kept
    _compare(soft, plain)


def test_multiplex_equals_the_official_procedure_and_draw_order(multiplex):
    s = multiplex.feedback.settings
    plain = []
    for q in QUESTIONS:  # the official draws: torch.manual_seed(seed), then one multinomial per step
        torch.manual_seed(11)
        plain.append(plain_run(multiplex, q, lambda logits: official_multiplex(logits, s)))
    _compare(multiplex, plain)


def test_same_seed_same_bits_other_seed_other_draws(base):
    flat = MixtureSettings(**{**MULTIPLEX_DEFAULT.__dict__, "temperature": 30.0})  # draws that matter
    a, b = (mixture_model(base, "multiplex", flat, seed=5) for _ in range(2))
    ra, rb = a.rollout(QUESTIONS), b.rollout(QUESTIONS)
    assert torch.equal(ra.thoughts, rb.thoughts) and torch.equal(ra.answer_logits, rb.answer_logits)
    b.feedback.reseed(6)
    assert not torch.equal(ra.thoughts[:, 1:], b.rollout(QUESTIONS).thoughts[:, 1:])
    soft = mixture_model(base, "soft", seed=5)
    first = soft.rollout(QUESTIONS)
    soft.feedback.reseed(6)  # deterministic: another seed, the same bits
    again = soft.rollout(QUESTIONS)
    assert torch.equal(first.thoughts, again.thoughts) and torch.equal(first.answer_logits, again.answer_logits)


def test_a_patch_of_a_site_with_its_own_value_changes_nothing(multiplex):
    r = multiplex.rollout(QUESTIONS, record=[("resid_out", 1)])
    acts = r.hooks.recorded("resid_out", 1)  # [B, T, d]
    at = r.prompt_len + 1  # latent position 1: later draws must meet the same noise
    write = Write("resid_out", 1, torch.full((2,), at), torch.ones(2, dtype=torch.bool), acts[:, at].clone())
    patched = multiplex.rollout(QUESTIONS, writes=[write])
    assert torch.equal(patched.thoughts, r.thoughts) and torch.equal(patched.answer_logits, r.answer_logits)


@pytest.mark.parametrize("family", ["soft", "multiplex"])
def test_engine_equals_reference(family, soft, multiplex):
    m = soft if family == "soft" else multiplex
    bases = []
    for pair in generate_pairs(2, seed=1):
        clean, corr = (record_run(m, m.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
        bases.append(prepare_pair(m, pair.pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer))
    specs = position_specs(m.n_layers, m.num_latent)
    result = check_engine_reference(m, bases, specs, lambda i: replacement_values(bases[i], EngineConfig()), 4, 6)
    assert result["passed"], result


def test_bad_mixture_specs_are_one_line_errors(tmp_path):
    from latentpatch.errors import LatentPatchError
    from latentpatch.model.load import load_model

    for spec, words in (
        ("soft:", "needs a plain LM after soft:"),
        ("multiplex:soft:config:llama", "needs a plain LM"),
        (f"colar:{tmp_path / 'none.ckpt'}", "no such CoLaR checkpoint"),
    ):
        with pytest.raises(LatentPatchError, match=words) as err:
            load_model(spec)
        assert "fix:" in str(err.value) and "\n" not in str(err.value)


def test_activation_cache_keys_tell_families_and_seeds_apart(base):
    """The mixtures have no weights of their own: the cache key must still tell a soft run from a
    multiplex run on the same LM, and one seed's draws from another's."""
    from latentpatch.pipeline.cache import model_key

    a, b = mixture_model(base, "multiplex", seed=1), mixture_model(base, "multiplex", seed=1)
    keys = {model_key(mixture_model(base, "soft")), model_key(a), model_key(mixture_model(base, "multiplex", seed=2))}
    assert len(keys) == 3 and model_key(a) == model_key(b)
