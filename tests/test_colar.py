"""CoLaR (model/colar.py) against a plain loop written from the official inference code, on a tiny
random LLaMA checkpoint written in the official layout.

Official code read: xiaomi-research/colar at 4b6ae9a.
- ``src/modules/projector.py`` lines 16-38 (``LatentPolicy``): copied below as the official module.
- ``src/models/model_base.py`` lines 25-58 (``[PAD]`` added, ``resize_token_embeddings``, peft
  LoRA with the config's r/alpha on the default llama targets q_proj/v_proj), 41-46 (templates),
  217-327 (``latent_generate``: per latent ``rsample() * embeds_std``, then
  ``torch.multinomial(softmax(logits), 1)``; ``###`` stops, the latent fed at that step counted;
  then ``###`` is fed and the answer generated).
- ``run.py`` lines 22-31: ``torch.load(ckpt)["state_dict"]`` loaded with ``strict=False``.

The checkpoint is the official module tree (``llm`` = a peft model, ``latent_policy``) with only the
trainable parameters saved, and ``hyper_parameters.model_kwargs``. The official answer is sampled
(top_p 0.9); the comparison is of greedy answers (the tool's rule) on both sides.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentpatch.errors import LatentPatchError
from latentpatch.model.colar import EMB_STD, QUESTION_TEMPLATE, colar_latent_count
from latentpatch.model.load import load_model
from latentpatch.model.loaders import byte_tokenizer

QUESTION = "Tom has 12 apples. How many?"
SEED = 4


class OfficialLatentPolicy(nn.Module):
    """``src/modules/projector.py`` ``LatentPolicy``, as released."""

    def __init__(self, feature_size, intermediate_size=512, deterministic=False):
        super().__init__()
        self.deterministic = deterministic
        self.fc = nn.Sequential(
            nn.Linear(feature_size, intermediate_size),
            nn.GELU(),
            nn.Linear(intermediate_size, intermediate_size),
            nn.LayerNorm(intermediate_size),
        )
        self.mean = nn.Linear(intermediate_size, feature_size)
        if not deterministic:
            self.log_std = nn.Linear(intermediate_size, feature_size)

    def forward(self, x, temperature=1.0):
        x = self.fc(x)
        mean = self.mean(x)
        if self.deterministic:
            return torch.distributions.Normal(mean, torch.ones_like(mean) * 1e-9)
        log_std = self.log_std(x)
        std = log_std.exp() * temperature
        return torch.distributions.Normal(mean, std)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(official module tree, tokenizer, base dir, ckpt path)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("colar")
    tok = byte_tokenizer()
    tok.add_tokens(["###"])
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=256,
    )
    lm = LlamaForCausalLM(cfg).eval()
    sep = tok.convert_tokens_to_ids("###")
    with torch.no_grad():  # make "###" likely after a latent, so the sampled stop ends within a few steps
        h = lm(torch.tensor([list(range(40, 80))]), output_hidden_states=True).hidden_states[-1][0].mean(0)
        lm.get_input_embeddings().weight[sep] = h / h.norm() ** 2 * 4.0
    lm.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    # the official construction: [PAD] added, embeddings resized, then peft
    tok.add_special_tokens({"pad_token": "[PAD]"})
    V = cfg.vocab_size
    with torch.no_grad():
        mean = lm.get_input_embeddings().weight.mean(0)
        lm.resize_token_embeddings(len(tok), mean_resizing=False)  # the row is set just below
        lm.get_input_embeddings().weight[V] = mean  # the unsaved row: the loader's rule, copied here
    tree = nn.Module()
    tree.llm = get_peft_model(lm, LoraConfig(r=128, lora_alpha=32))
    tree.latent_policy = OfficialLatentPolicy(64, 32)
    with torch.no_grad():
        for name, p in tree.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # peft starts B at zero: make the adapter do something
    trainable = {k: v for k, v in tree.state_dict().items() if "lora_" in k or k.startswith("latent_policy.")}
    kwargs = {
        "model_id": "gpt2",
        "lora_config": {"r": 128, "lora_alpha": 32},
        "latent_policy_config": {"lp_determinisitc": False, "lp_intermediate_size": 32},
        "latent_generation_config": {"max_n_latent_forward": 64, "latent_temperature": 1.0, "compression_factor": 5},
    }
    torch.save({"state_dict": trainable, "hyper_parameters": {"model_kwargs": kwargs}}, d / "colar.ckpt")
    return tree.eval(), tok, d / "base", d / "colar.ckpt"


@torch.no_grad()
def official_run(tree, tok, question: str, seed: int):
    """``latent_generate`` for one question (no cache): thoughts [n, d], logits after ``###``, greedy answer."""
    llm, E = tree.llm, tree.llm.get_input_embeddings()
    sep = tok.convert_tokens_to_ids("###")
    text = f"Question: {question} Let's think step by step:" + f"(Thinking speed: {5})" + "###"
    seq = E(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]))
    torch.manual_seed(seed)
    out = llm(inputs_embeds=seq, output_hidden_states=True)
    thoughts = []
    for _ in range(64):
        x = tree.latent_policy(out.hidden_states[-1][:, -1:, :], temperature=1.0).rsample() * EMB_STD["gpt2"]
        thoughts.append(x[0, 0])
        seq = torch.cat([seq, x], 1)
        out = llm(inputs_embeds=seq, output_hidden_states=True)
        if int(torch.multinomial(torch.softmax(out.logits[:, -1], -1), num_samples=1)) == sep:
            break
    seq = torch.cat([seq, E(torch.tensor([[sep]]))], 1)
    first = llm(inputs_embeds=seq).logits[0, -1]
    answer, logits = [], first.clone()
    for _ in range(16):
        logits[tok.pad_token_id] = float("-inf")  # the tool's rule bans pad (= bot = eot here)
        nxt = int(logits.argmax())
        if nxt == tok.eos_token_id:
            break
        answer.append(nxt)
        seq = torch.cat([seq, E(torch.tensor([[nxt]]))], 1)
        logits = llm(inputs_embeds=seq).logits[0, -1].clone()
    return torch.stack(thoughts), first, answer


def test_colar_equals_the_official_procedure_with_its_stop(official):
    tree, tok, base, ckpt = official
    thoughts, logits, answer = official_run(tree, tok, QUESTION, SEED)
    n = len(thoughts)
    assert 1 < n < 64  # the stop rule ended it (not the cap), after more than one latent
    model = load_model(f"colar:{ckpt}", base=str(base), num_latent=n)
    model.feedback.reseed(SEED)
    assert model.decode(model.prompt_ids(QUESTION)) == QUESTION_TEMPLATE.format(question=QUESTION, speed=5)
    assert colar_latent_count(model, QUESTION) == n
    r = model.rollout([QUESTION])
    torch.testing.assert_close(r.thoughts[0], thoughts, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.answer_logits[0], logits, atol=1e-5, rtol=0)
    assert list(model.generate(r.state, r.answer_logits)[0]) == answer
    again = load_model(f"colar:{ckpt}", base=str(base), num_latent=n)
    again.feedback.reseed(SEED)
    assert torch.equal(again.rollout([QUESTION]).thoughts, r.thoughts)  # same seed: the same bits


def test_colar_checkpoint_is_loaded_strictly(official, tmp_path):
    _, _, base, ckpt = official
    saved = torch.load(ckpt, weights_only=False)
    saved["state_dict"]["decoder.weight"] = torch.zeros(2)
    bad = tmp_path / "extra.ckpt"
    torch.save(saved, bad)
    with pytest.raises(LatentPatchError, match="outside llm.base_model.model"):
        load_model(f"colar:{bad}", base=str(base))
    saved["state_dict"].pop("decoder.weight")
    saved["state_dict"].pop("latent_policy.mean.bias")
    torch.save(saved, bad)
    with pytest.raises(LatentPatchError, match="missing"):
        load_model(f"colar:{bad}", base=str(base))


def test_colar_engine_equals_reference_and_own_value_patch(official):
    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.model.sites import Write
    from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
    from latentpatch.patching.checks import check_engine_reference
    from latentpatch.patching.specs import EngineConfig, position_specs

    _, _, base, ckpt = official
    m = load_model(f"colar:{ckpt}", base=str(base), num_latent=3)
    r = m.rollout([QUESTION], record=[("resid_out", 0)])
    at = r.prompt_len + 1
    own = r.hooks.recorded("resid_out", 0)[:, at].clone()
    patched = m.rollout([QUESTION], writes=[Write("resid_out", 0, torch.tensor([at]), torch.tensor([True]), own)])
    assert torch.equal(patched.thoughts, r.thoughts) and torch.equal(patched.answer_logits, r.answer_logits)
    bases = []
    for pair in generate_pairs(2, seed=1):
        clean, corr = (record_run(m, m.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
        bases.append(prepare_pair(m, pair.pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer))
    specs = position_specs(m.n_layers, m.num_latent)
    result = check_engine_reference(m, bases, specs, lambda i: replacement_values(bases[i], EngineConfig()), 4, 6)
    assert result["passed"], result
