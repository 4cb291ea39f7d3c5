"""Soft Thinking's stops and noise (model/mixture_stops.py) against a plain loop written from the
official decode loop, on a tiny random LLaMA (byte tokenizer: ``</think>`` is 8 ids, the last '>').

The plain loop (no KV cache, one question, every step re-runs the sequence) follows
eric-ai-lab/Soft-Thinking at b97407c, ``sglang_soft_thinking_pkg/python/sglang/srt/``:

- ``layers/sampler.py`` lines 137-190 (the soft-thinking branch of ``Sampler.forward``): entropy of
  ``softmax(logits / T)`` before the filters; top-k, top-p, min-p each renormalised; the Dirichlet
  noise ``Gamma(p * alpha, 1)`` normalised; the ``max_topk`` largest renormalised; the Gumbel noise
  ``softmax((log w - log Exp(1)) / tau)`` re-sorted; the step's output id is ``topk_indices[:, 0]``.
- ``managers/schedule_batch.py`` lines 726-760 (``update_topk_info``): the low-entropy count (reset
  by a step at or above the threshold; at ``early_stopping_length_threshold`` the output becomes
  ``think_end_str_id``), then an output equal to ``think_end_str_id`` (the *last* id of
  ``encode("</think>")``) ends thinking and that id is fed one-hot.

The official draws come from the global generator after ``torch.manual_seed``, one step after the
other; the Dirichlet's Gamma draws use the tool's fixed-size sampler (``gamma_from_draws``, checked
against scipy's Gamma here) in the plan's order, since torch's own Gamma sampler consumes a
variable number of draws. Answers: the tool's greedy decoding (the official one samples).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentpatch.model.latent import LatentModel
from latentpatch.model.loaders import random_model
from latentpatch.model.mixture import SOFT_THINKING_PAPER, MixtureSettings, mixture_model, settings_json
from latentpatch.model.mixture_stops import GAMMA_TRIES, gamma_from_draws
from latentpatch.model.stops import rule_latent_counts

QUESTIONS = ["Tom has 12 apples. How many?", "What is 2+3?"]
MAX = 6  # the most latents a row may take
SEED = 5


def official_filter(logits: torch.Tensor, s: MixtureSettings) -> torch.Tensor:
    """sampler.py's filters on one row (logits [V]) -> p [V] before the max_topk cut."""
    p = torch.softmax(logits / s.temperature, -1)
    kth = torch.sort(p, descending=True).values[s.top_k - 1]
    p = torch.where(p >= kth, p, 0.0)
    p = p / p.sum()
    vals, ids = torch.sort(p, descending=True)
    keep = (vals.cumsum(-1) - vals) < s.top_p  # the token that crosses top_p is kept
    p = torch.zeros_like(p).scatter(0, ids, torch.where(keep, vals, 0.0))
    p = p / p.sum()
    p = torch.where(p < p.max() * s.min_p, 0.0, p)
    return p / p.sum()


def official_step(logits: torch.Tensor, s: MixtureSettings) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One decode step of sampler.py on logits [V]: (weights, ids, entropy); draws from the global
    generator in the plan's order (Dirichlet's candidates, then Gumbel's exponentials)."""
    probs = torch.softmax(logits / s.temperature, -1)
    entropy = float(-torch.sum(probs * torch.log(probs.clamp(min=1e-12))))
    p = official_filter(logits, s)
    V = p.shape[-1]
    if "dirichlet" in s.noise:
        normals = torch.empty(1, GAMMA_TRIES * V).normal_().view(GAMMA_TRIES, 1, V)
        exps = torch.empty(1, GAMMA_TRIES * V).exponential_().view(GAMMA_TRIES, 1, V)
        boost = torch.empty(1, V).exponential_()
        gamma = gamma_from_draws((p * s.dirichlet_alpha)[None], normals, exps, boost)[0]
        p = gamma / gamma.sum()
    w, ids = torch.topk(p, k=s.max_topk)
    w = w / w.sum()
    if "gumbel" in s.noise:
        gumbels = -torch.empty_like(w[None]).exponential_().log()[0]
        w, order = torch.sort(((torch.log(w) + gumbels) / s.gumbel_temperature).softmax(-1), descending=True)
        ids = ids[order]
    return w, ids, entropy


@torch.no_grad()
def official_run(m, question: str, s: MixtureSettings, j1ml1: bool = False, seed: int = SEED):
    """The decode loop until thinking ends (or MAX mixtures): (count, thoughts [c, d], answer
    logits after the think-end id, greedy answer ids, the prompt position's output id).

    ``j1ml1``: J1mL1's loop instead (softthinking_model.py ``rollout_from_step`` lines 277-324):
    the first mixture is fed unchecked (the stops are read from the first latent's logits on), the
    entropy clamps both sides, ``</think>`` stops only if it is one id, and all its ids are fed."""
    lm, V = m.lm, m.feedback.vocab
    E = lm.get_input_embeddings().weight
    think = m.tokenizer.encode("</think>", add_special_tokens=False)
    last = think[-1] if not j1ml1 else (think[0] if len(think) == 1 else -1)
    torch.manual_seed(seed)
    seq = E[torch.tensor(m.question_ids(question))][None]
    logits = lm(inputs_embeds=seq).logits[0, -1, :V]
    low, thoughts, first_out = 0, [], None
    while True:
        w, ids, entropy = official_step(logits, s)
        out = int(ids[0])
        if j1ml1:
            pc = torch.softmax(logits / s.temperature, -1).clamp(min=1e-12)
            entropy = float(-(pc * pc.log()).sum())
        if s.cold_stop_threshold > 0 and (thoughts or not j1ml1):
            low = low + 1 if entropy < s.cold_stop_threshold else 0
            out = last if low >= s.cold_stop_steps else out
        first_out = out if first_out is None else first_out
        if (out == last and (thoughts or not j1ml1)) or len(thoughts) == MAX:
            break
        t = (w[:, None] * E[ids]).sum(0)
        thoughts.append(t)
        seq = torch.cat([seq, t[None, None]], 1)
        logits = lm(inputs_embeds=seq).logits[0, -1, :V]
    fed = think if j1ml1 else [last]  # the official: the think-end id one-hot; J1mL1: every id
    seq = torch.cat([seq, E[torch.tensor(fed)][None]], 1)
    first = lm(inputs_embeds=seq).logits[0, -1]
    banned = m.config.banned_ids(first.shape[-1])
    answer, nxt_logits = [], first.clone()
    for _ in range(m.config.max_answer_tokens):
        nxt_logits[banned] = float("-inf")
        nxt = int(nxt_logits.argmax())
        if nxt == m.config.eos_id:
            break
        answer.append(nxt)
        seq = torch.cat([seq, E[nxt][None, None]], 1)
        nxt_logits = lm(inputs_embeds=seq).logits[0, -1].clone()
    stacked = torch.stack(thoughts) if thoughts else E.new_zeros(0, E.shape[1])
    return len(thoughts), stacked, first, answer, first_out


def _with_count(m, count: int) -> LatentModel:
    return LatentModel(m.lm, m.feedback, replace(m.config, num_latent=count), m.tokenizer, name=m.name)


def _compare(m, s: MixtureSettings, questions: list[str] = QUESTIONS, j1ml1: bool = False) -> list[int]:
    """The tool (rule_latent_counts, then a KV-cached rollout of that many latents) equals the
    official (or J1mL1's) loop per question: counts, thoughts, answer logits, greedy answers."""
    plain = [official_run(m, q, s, j1ml1, m.feedback.stream.seed) for q in questions]
    last = m.tokenizer.encode("</think>", add_special_tokens=False)[-1]
    # the tool's latent phase has >= 1 latent: the setups never end at the prompt's own position
    assert all(p[4] != last for p in plain)
    counts = rule_latent_counts(m, [m.prompt_ids(q) for q in questions], MAX)
    assert counts == [p[0] for p in plain]
    for q, (count, thoughts, logits, answer, _) in zip(questions, plain, strict=True):
        mc = _with_count(m, count)
        r = mc.rollout([q])
        torch.testing.assert_close(r.thoughts[0], thoughts, atol=1e-5, rtol=0)
        torch.testing.assert_close(r.answer_logits[0], logits, atol=1e-5, rtol=0)
        assert list(mc.generate(r.state, r.answer_logits)[0]) == answer
    return counts


def _base(scale: float, swap: tuple[int, int] | None = None):
    """The tiny LM with its embeddings scaled (peaked distributions); ``swap``: two token rows
    swapped (tied head and embeddings: the same mixtures, relabelled, for prompts without them)."""
    m = random_model("llama", num_latent=MAX, seed=3)
    with torch.no_grad():
        W = m.lm.get_input_embeddings().weight
        W.mul_(scale)
        if swap is not None:
            W[list(swap)] = W[list(swap)[::-1]].clone()
    return m


@pytest.mark.parametrize("noise", ["none", "gumbel"])
def test_official_think_end_rule_feeds_the_last_id_and_equals_the_official_loop(noise):
    s = replace(SOFT_THINKING_PAPER, think_stop="official", noise=noise)
    questions = ["What do 4 men get?", "Add 2 and 7?"]
    m0 = mixture_model(_base(1.5), "soft", replace(s, think_stop="none", noise="none"))
    last = m0.tokenizer.encode("</think>", add_special_tokens=False)[-1]
    with torch.no_grad():  # question 0's argmax moves from '?' to 's' at latent 2
        tops = m0.logits(m0.rollout(questions).latent_hidden)[..., : m0.feedback.vocab].argmax(-1)
    later = int(tops[0, 2])
    prompt_ids = {i for q in questions for i in m0.question_ids(q)}
    assert later not in tops[0, :2].tolist() and {later, last}.isdisjoint(prompt_ids), tops
    seed = 7  # a seed whose noised top-1 is '>' at some latent
    m = mixture_model(_base(1.5, swap=(later, last)), "soft", s, seed=seed)  # 's' is now '>'
    assert m.config.answer_start == (last,) and m.feedback.stop_rule is not None
    counts = _compare(m, s, questions)
    if noise == "none":
        assert counts[0] == 3 and counts != [3, 3], counts
    else:  # the noised top-1 decides (the stop reads the mixture's own draws)
        assert min(counts) < MAX, counts


def test_cold_stop_equals_the_official_loop():
    # one token per thought (max_topk 1): entropies that fall below the prompt position's
    base = _base(4.0)
    s0 = replace(SOFT_THINKING_PAPER, think_stop="none", max_topk=1)
    m0 = mixture_model(base, "soft", s0)
    with torch.no_grad():
        ids = torch.tensor([m0.question_ids(QUESTIONS[0])])
        hidden = torch.cat([base.lm.model(ids).last_hidden_state[0, -1:], m0.rollout([QUESTIONS[0]]).latent_hidden[0]])
        q = torch.softmax(m0.logits(hidden)[:, : m0.feedback.vocab] / s0.temperature, -1)
        ent = -(q * q.clamp(min=1e-12).log()).sum(-1)  # [1 + K]: the prompt position, then each latent
    pair = torch.maximum(ent[1:-1], ent[2:])  # two consecutive latents below a threshold over this
    j = int(pair.argmin())
    above = ent[ent > pair[j] + 1e-9]
    thr = float(pair[j] + above.min()) / 2
    assert float(above.min() - pair[j]) > 1e-4 and float(ent[0]) > thr  # margins over fp32 noise; prompt high
    s = replace(s0, cold_stop_threshold=thr, cold_stop_steps=2)
    assert mixture_model(base, "soft", s).config.answer_start == m0.config.answer_start  # every id of </think>
    s_official = replace(s, think_stop="official")  # the plain loop feeds the think-end id
    counts = _compare(mixture_model(base, "soft", s_official), s_official)
    assert 2 <= counts[0] <= j + 2, (counts, j)  # latents j, j + 1 are low: stopped there or before


@pytest.mark.parametrize("noise", ["gumbel", "dirichlet+gumbel"])
def test_noise_equals_the_official_sampler_and_is_seeded(noise):
    base = _base(4.0)
    s = replace(SOFT_THINKING_PAPER, think_stop="official", noise=noise, gumbel_temperature=0.5)
    m = mixture_model(base, "soft", s, seed=SEED)
    _compare(m, s)
    again = mixture_model(base, "soft", s, seed=SEED).rollout(QUESTIONS)
    assert torch.equal(m.rollout(QUESTIONS).thoughts, again.thoughts)  # the same seed: the same bits
    quiet = mixture_model(base, "soft", replace(s, noise="none")).rollout(QUESTIONS)
    assert not torch.allclose(quiet.thoughts[:, 1:], again.thoughts[:, 1:])  # the noise changes the mixtures


def test_gamma_sampler_matches_scipys_gamma():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    n = 20000
    shapes = torch.tensor([0.05, 0.3, 1.0, 4.0])
    a = shapes[:, None].expand(4, n)
    x = gamma_from_draws(
        a,
        torch.randn(GAMMA_TRIES, 4, n, generator=g),
        torch.empty(GAMMA_TRIES, 4, n).exponential_(generator=g),
        torch.empty(4, n).exponential_(generator=g),
    )
    for row, shape in zip(x, shapes.tolist(), strict=True):
        assert stats.kstest(row.double().numpy(), stats.gamma(shape).cdf).pvalue > 1e-3, shape
    zero = gamma_from_draws(
        torch.zeros(1, 3), torch.randn(GAMMA_TRIES, 1, 3), torch.ones(GAMMA_TRIES, 1, 3), torch.ones(1, 3)
    )
    assert torch.equal(zero, torch.zeros(1, 3))  # a zero probability stays zero


def test_default_soft_keeps_a_fixed_count_and_settings_are_recorded():
    from latentpatch.errors import LatentPatchError
    from latentpatch.model.load import load_model

    base = _base(1.0)
    m = mixture_model(base, "soft")  # J1mL1's rule on an 8-id </think>: never fires, no cold stop
    assert m.feedback.stop_rule is None and m.name == f"soft:{base.name}"
    assert len(m.config.answer_start) == 8
    spec = "soft,think_stop=official,cold_stop_threshold=0.01,noise=gumbel:config:llama"
    loaded = load_model(spec, num_latent=2)
    assert loaded.name == spec and loaded.feedback.settings.noise == "gumbel"
    assert '"think_stop": "official"' in settings_json(loaded.feedback)
    for bad, words in (
        ("soft,nope=1:config:llama", "known key"),
        ("soft,think_stop=late:config:llama", "think_stop 'late'"),
        ("multiplex,width=x:config:llama", "not a int"),
        ("multiplex,noise=gumbel:config:llama", "Soft Thinking's"),
    ):
        with pytest.raises(LatentPatchError, match=words) as err:
            load_model(bad)
        assert "fix:" in str(err.value) and "\n" not in str(err.value)


def test_multiplex_cold_stop_reads_the_filtered_entropy():
    """J1mL1's multiplex_model.py (lines 399-410): ``_entropy`` (clamped at 1e-12) of the filtered
    p, the count reset by a step at or above the threshold, firing at ``cold_stop_len``."""
    s = MixtureSettings(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, max_topk=0, width=2, rule="j1ml1")
    m = mixture_model(_base(1.0), "multiplex", replace(s, cold_stop_threshold=0.5, cold_stop_steps=2))
    rule = m.feedback.stop_rule
    V = m.feedback.vocab
    peaked, flat = torch.zeros(V), torch.zeros(V)
    peaked[:2] = torch.tensor([6.0, 0.0])  # top-2 of a flat tail: filtered entropy ~0.02, unfiltered ~2.8
    flat[:2] = 1.0
    memory, fired = rule.begin(1), []
    for logits in (peaked, flat, peaked, peaked):
        probs = torch.softmax(logits, -1)
        top = torch.zeros_like(probs).scatter(0, probs.topk(2).indices, probs.topk(2).values)
        p = (top / top.sum()).clamp(min=1e-12)
        assert (float(-(p * p.log()).sum()) < 0.5) == (logits is peaked)
        fired.append(bool(rule.fires(logits[None], len(fired), memory)[0]))
    assert fired == [False, False, False, True]


def test_cold_stop_equals_j1ml1s_loop_and_the_official_counts_the_prompt_too():
    """Every position low: J1mL1's loop counts from the first latent, the official loop from the
    prompt's last position, so it stops one latent earlier; the tool equals each with its settings
    (the official rule asks the prompt position too: StopRule.checks_prompt, docs/method.md §22)."""
    base = _base(4.0)
    s = replace(SOFT_THINKING_PAPER, max_topk=1, cold_stop_threshold=5.0, cold_stop_steps=3)  # think_stop j1ml1
    m = mixture_model(base, "soft", s)
    assert len(m.config.answer_start) == 8 and m.feedback.stop_rule is not None
    assert _compare(m, s, j1ml1=True) == [3, 3]
    official = replace(s, think_stop="official")
    assert [official_run(mixture_model(base, "soft", official), q, official)[0] for q in QUESTIONS] == [2, 2]
    assert _compare(mixture_model(base, "soft", official), official) == [2, 2]


def test_the_official_rule_can_end_thinking_at_the_prompt():
    """The official loop's first output token (at the prompt's last position) may be the think-end
    id: no mixture is fed. The tool's count is 0 there, and a run gives that pair one latent."""
    s = replace(SOFT_THINKING_PAPER, think_stop="official")
    m0 = mixture_model(_base(1.5), "soft", replace(s, think_stop="none"))
    last = m0.tokenizer.encode("</think>", add_special_tokens=False)[-1]

    q = QUESTIONS[0]
    assert last not in m0.question_ids(q)
    base = _base(1.5)
    with torch.no_grad():  # the think-end id's (tied) row along the prompt's last state: its top-1 there
        h = mixture_model(base, "soft", s).prefill([m0.prompt_ids(q)])[1][0]
        base.lm.get_input_embeddings().weight[last] = h / h.norm() ** 2 * 50.0
    m = mixture_model(base, "soft", s)
    count, _, logits, answer, _ = official_run(m, q, s)
    assert count == 0 and rule_latent_counts(m, [m.prompt_ids(q)], MAX) == [0]
    r = _with_count(m, 0).rollout([q])  # the think-end id right after the prompt
    torch.testing.assert_close(r.answer_logits[0], logits, atol=1e-5, rtol=0)
    assert list(m.generate(r.state, r.answer_logits)[0]) == answer


def test_engine_equals_reference_with_noise():
    """The noise is random feedback: the engine's shared prefixes and restarts read the same draws
    as one rollout per spec (the built-in check, answer ids compared)."""
    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
    from latentpatch.patching.checks import check_engine_reference
    from latentpatch.patching.specs import EngineConfig, position_specs

    s = replace(SOFT_THINKING_PAPER, noise="dirichlet+gumbel", gumbel_temperature=0.5)
    m = mixture_model(_base(4.0), "soft", s, seed=SEED)
    bases = []
    for pair in generate_pairs(2, seed=1):
        clean, corr = (record_run(m, m.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
        bases.append(prepare_pair(m, pair.pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer))
    specs = position_specs(m.n_layers, m.num_latent)
    result = check_engine_reference(m, bases, specs, lambda i: replacement_values(bases[i], EngineConfig()), 4, 6)
    assert result["passed"], result
