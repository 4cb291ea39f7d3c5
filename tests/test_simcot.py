"""SIM-CoT checkpoints (github InternLM/SIM-CoT at f3ae967), both variants, against plain loops
written here from the official inference code.

The official classes are not importable here (``CODI/src/model.py`` loads its bases with
``from_pretrained``; the repository is not a package), so the tiny checkpoints are written by the
documented key names: CODI side ``codi.base_model.model.*`` (peft LoRA) + ``prj.*`` + ``decoder.*``
(the training-only step decoder, a copy of the unresized base: ``CODI.__init__``, model.py lines
306-335); Coconut side ``base_causallm.*`` + ``embedding.weight`` + ``expainable_llm.*``
(``CoconutGPT_Same_Word_Embedding.__init__``, coconut.py lines 265-316).

The plain loops: CODI side = ``CODI/test.py`` lines 263-355 (cached question pass, ``prj`` of the
last hidden state 6 times, [EOT], then greedy ``argmax(logits[:, -1, :vocab_size - 1])`` until the
tokenizer's eos); Coconut side = ``CoconutGPT_Same_Word_Embedding.forward`` (coconut.py lines
341-428: each latent takes the previous position's last hidden state) and ``generate`` (lines
795-845: first token any argmax, later ones stop at eos).
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_hub import base_tokenizer, cache_repo
from test_loading import ALPHA, PRJ_DIM, TARGETS, R, V, base_lm, make_codi, run_cli, save_base, save_ckpt

from latentpatch.errors import LatentPatchError
from latentpatch.model.load import load_model
from latentpatch.model.simcot import COCONUT_PRESETS, coconut_latents
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
from latentpatch.patching.checks import check_engine_reference
from latentpatch.patching.specs import EngineConfig, layer_specs, position_specs

EOS, K, N_NEW = 2, 6, 8


def simcot_codi_sd(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(the CODI-like module, its SIM-CoT state dict: the module's keys + ``decoder.*``)."""
    module, _ = make_codi(family)
    decoder = base_lm(family, seed=3)  # SIM-CoT: AutoModelForCausalLM.from_pretrained(base), not resized
    sd = dict(module.state_dict())
    sd.update({"decoder." + k: v for k, v in decoder.state_dict().items()})
    return module, sd


def simcot_coconut_sd() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(the resized GPT-2, a SIM-CoT Coconut state dict with ``expainable_llm.*``)."""
    lm = base_lm("gpt2")
    lm.resize_token_embeddings(V + 3, mean_resizing=False)  # <|start-latent|>, <|end-latent|>, <|latent|>
    sd = {"base_causallm." + k: v for k, v in lm.state_dict().items()}
    sd["embedding.weight"] = lm.get_input_embeddings().weight
    sd.update({"expainable_llm." + k: v for k, v in base_lm("gpt2", seed=4).state_dict().items()})
    return lm, sd


@torch.no_grad()
def codi_test_py(module, prompt: list[int], k: int, eot: int, n: int):
    """SIM-CoT ``CODI/test.py`` (greedy, remove_eos, soft_weight off): thoughts [K, d], logits after
    [EOT] [V], greedy tokens (the stopping eos left out)."""
    lm = module.codi
    out = lm(input_ids=torch.tensor([prompt]), use_cache=True, output_hidden_states=True)
    pkv, latent = out.past_key_values, module.prj(out.hidden_states[-1][:, -1:])
    thoughts = []
    for _ in range(k):
        thoughts.append(latent[0, 0])
        out = lm(inputs_embeds=latent, use_cache=True, output_hidden_states=True, past_key_values=pkv)
        pkv, latent = out.past_key_values, module.prj(out.hidden_states[-1][:, -1:])
    step_in, tokens, first = lm.get_input_embeddings()(torch.tensor([[eot]])), [], None
    for _ in range(n):
        out = lm(inputs_embeds=step_in, use_cache=True, past_key_values=pkv)
        pkv = out.past_key_values
        first = out.logits[0, -1] if first is None else first
        nxt = int(out.logits[:, -1, : lm.config.vocab_size - 1].argmax(-1))
        if nxt == EOS:
            break
        tokens.append(nxt)
        step_in = lm.get_input_embeddings()(torch.tensor([[nxt]]))
    return torch.stack(thoughts), first, tokens


@torch.no_grad()
def coconut_generate(lm, prompt: list[int], k: int, end: int, n: int):
    """``CoconutGPT_Same_Word_Embedding.forward`` + ``generate`` (no cache: the whole sequence re-run)."""
    emb = lm.get_input_embeddings()
    seq, thoughts = emb(torch.tensor([prompt])), []
    for _ in range(k):
        h = lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][:, -1:]
        thoughts.append(h[0, 0])
        seq = torch.cat([seq, h], 1)
    seq = torch.cat([seq, emb(torch.tensor([[end]]))], 1)
    logits = lm(inputs_embeds=seq).logits[0, -1]
    tokens = [int(logits.argmax())]
    for _ in range(n - 1):
        seq = torch.cat([seq, emb(torch.tensor([[tokens[-1]]]))], 1)
        nxt = int(lm(inputs_embeds=seq).logits[0, -1].argmax())
        if nxt == EOS:
            break
        tokens.append(nxt)
    return torch.stack(thoughts), logits, tokens


def codi_overrides(family: str) -> dict:
    """The tiny model's sizes over a SIM-CoT preset (the preset's LoRA/prj sizes are the released ones)."""
    return dict(lora_r=R, lora_alpha=ALPHA, prj_dim=PRJ_DIM, eos_id=EOS, lora_targets=TARGETS[family])


@pytest.mark.parametrize("family,fmt", [("gpt2", "bin"), ("llama", "safetensors")])
def test_simcot_codi_equals_test_py(tmp_path, family, fmt, caplog):
    module, sd = simcot_codi_sd(family)
    ckpt = save_ckpt(sd, tmp_path / "ckpt", fmt)
    preset = "simcot-codi-gpt2" if family == "gpt2" else "simcot-codi-llama1b"
    with caplog.at_level(logging.INFO, logger="latentpatch.model.checkpoint"):
        m = load_model(f"codi:{ckpt}", base=str(save_base(tmp_path, family)), preset=preset, **codi_overrides(family))
    n_decoder = sum(k.startswith("decoder.") for k in sd)
    assert f"{n_decoder} key(s) under decoder.*, pj_in.*, pj_out.* are known and unused" in caplog.text
    assert m.num_latent == K and (m.config.pad_id, m.config.bot_id, m.config.eot_id) == (V, V + 1, V + 2)
    for prompt in ([5, 6, 7, 8, V + 1], [9, 10, 11, V + 1]):
        thoughts, logits, tokens = codi_test_py(module, prompt, K, V + 2, N_NEW)
        r = m.rollout([prompt])
        assert (r.thoughts[0] - thoughts).abs().max() <= 1e-5
        assert (r.answer_logits[0] - logits).abs().max() <= 1e-5
        assert m.generate(r.state, r.answer_logits, N_NEW)[0] == tokens


def test_simcot_coconut_equals_generate(tmp_path, caplog):
    lm, sd = simcot_coconut_sd()
    torch.save(sd, tmp_path / "checkpoint_30")
    with caplog.at_level(logging.INFO, logger="latentpatch.model.checkpoint"):
        m = load_model(
            f"coconut:{tmp_path / 'checkpoint_30'}", base=str(save_base(tmp_path, "gpt2")), preset="simcot-coconut-gpt2"
        )
    n_aux = sum(k.startswith("expainable_llm.") for k in sd)
    assert f"{n_aux} key(s) under expainable_llm.* are known and unused" in caplog.text
    assert m.num_latent == COCONUT_PRESETS["simcot-coconut-gpt2"]["num_latent"] == coconut_latents(2, 5, 30, 3) == 10
    prompt = m.prompt_ids([5, 6, 7])
    thoughts, logits, tokens = coconut_generate(lm, prompt, m.num_latent, V + 1, N_NEW)
    r = m.rollout([prompt])
    assert (r.thoughts[0] - thoughts).abs().max() <= 1e-5 and (r.answer_logits[0] - logits).abs().max() <= 1e-5
    assert m.generate(r.state, r.answer_logits, N_NEW)[0] == tokens
    base = str(save_base(tmp_path, "gpt2"))
    two = load_model(f"coconut:{tmp_path / 'checkpoint_30'}", base=base, preset="simcot-coconut-gpt2", num_latent=2)
    assert two.num_latent == 2 == COCONUT_PRESETS["simcot-coconut-gpt2"]["eval_config_latents"]


def test_unknown_keys_are_still_refused(tmp_path):
    """Only the named training-only prefixes leave: any other extra key fails, naming it; and a
    SIM-CoT file loaded without its preset says which preset to pass."""
    _, sd = simcot_codi_sd("gpt2")
    base = str(save_base(tmp_path, "gpt2"))
    extra = save_ckpt({**sd, "decoderx.weight": torch.zeros(1)}, tmp_path / "extra")
    with pytest.raises(LatentPatchError, match=r"unexpected key\(s\) \(decoderx.weight\)"):
        load_model(f"codi:{extra}", base=base, preset="simcot-codi-gpt2", **codi_overrides("gpt2"))
    plain = save_ckpt(sd, tmp_path / "plain")
    with pytest.raises(LatentPatchError, match="--preset simcot-codi-gpt2"):
        load_model(f"codi:{plain}", base=base, **codi_overrides("gpt2"))
    _, csd = simcot_coconut_sd()
    torch.save({**csd, "expainable_llm_head.weight": torch.zeros(1)}, tmp_path / "c_extra")
    with pytest.raises(LatentPatchError, match="expainable_llm_head.weight"):
        load_model(f"coconut:{tmp_path / 'c_extra'}", base=base, preset="simcot-coconut-gpt2")
    torch.save(csd, tmp_path / "c_plain")
    with pytest.raises(LatentPatchError, match="--preset simcot-coconut-gpt2"):
        load_model(f"coconut:{tmp_path / 'c_plain'}", base=base)
    with pytest.raises(LatentPatchError, match="not a Coconut preset"):
        load_model(f"coconut:{tmp_path / 'c_plain'}", base=base, preset="simcot-coconut-llama")


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory):
    """SIM-CoT checkpoints in a hub cache built here (HF_HOME, HF_HUB_OFFLINE=1), loaded by their
    presets' commands (with the tiny sizes as overrides)."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("hf")
    mp.setenv("HF_HOME", str(home))
    mp.delenv("HF_HUB_CACHE", raising=False)
    mp.setenv("HF_HUB_OFFLINE", "1")
    _, codi_sd = simcot_codi_sd("gpt2")
    _, coconut_sd = simcot_coconut_sd()
    hub = home / "hub"
    cache_repo(
        hub,
        "testorg/tiny-base",
        lambda d: (base_lm("gpt2").config.save_pretrained(d), base_tokenizer().save_pretrained(d)),
    )
    cache_repo(hub, "testorg/simcot-codi", lambda d: torch.save(codi_sd, d / "pytorch_model.bin"))
    cache_repo(hub, "testorg/simcot-coconut", lambda d: torch.save(coconut_sd, d / "checkpoint_30"))
    codi = load_model(
        "codi:testorg/simcot-codi",
        base="testorg/tiny-base",
        preset="simcot-codi-gpt2",
        answer_prefix="answer ",
        num_latent=3,
        **codi_overrides("gpt2"),
    )
    coconut = load_model(
        "coconut:testorg/simcot-coconut:checkpoint_30", base="testorg/tiny-base", preset="simcot-coconut-gpt2"
    )
    yield codi, coconut
    mp.undo()


def test_hub_cache_and_engine_check(hub_models):
    """Both variants load from the hub cache offline; the built-in engine-vs-reference check passes."""
    codi, coconut = hub_models
    assert codi.name == "codi:testorg/simcot-codi (simcot-codi-gpt2)" and codi.tokenizer is not None
    assert coconut.name == "coconut:testorg/simcot-coconut:checkpoint_30 (simcot-coconut-gpt2)"
    assert coconut.num_latent == 10
    pairs = [("tom has 12 eggs", "tom has 13 eggs", 12, 13), ("ann 4 cats", "ann 7 cats", 4, 7)]
    for model in (codi, coconut):
        bases = []
        for i, (qc, qr, ac, ar) in enumerate(pairs):
            clean, corr = (record_run(model, model.prompt_ids(q)) for q in (qc, qr))
            bases.append(prepare_pair(model, str(i), clean, corr, ac, ar))
        specs = layer_specs(model.n_layers, model.num_latent) + position_specs(model.n_layers, model.num_latent)
        values = [replacement_values(b, EngineConfig()) for b in bases]
        out = check_engine_reference(model, bases, specs, values.__getitem__, 16, 6)
        assert out["passed"] and out["cells"] == 6, out


def test_models_lists_every_simcot_preset(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    for name, cmd in [
        ("simcot-codi-gpt2", "--model codi:internlm/SIM_COT-GPT2-CODI --preset simcot-codi-gpt2"),
        ("simcot-codi-llama1b", "--model codi:internlm/SIM_COT-LLaMA3-CODI-1B --preset simcot-codi-llama1b"),
        ("simcot-codi-llama8b", "--model codi:internlm/SIM_COT-LLaMA3-CODI-8B --preset simcot-codi-llama8b"),
        ("simcot-coconut-gpt2", "--model coconut:internlm/SIM_COT-GPT2-Coconut --preset simcot-coconut-gpt2"),
    ]:
        assert f"{name}: " in out and cmd in out
    assert "prj_dim 4096" in out and "K 10 (the shipped eval config: 2)" in out
