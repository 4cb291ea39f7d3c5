"""Strict CODI checkpoint loading: tiny random checkpoints saved in exactly the official layout
(peft-wrapped LM + prj, torch.save / safetensors of the whole module's state dict), loaded back and
compared with the *unmerged* peft model run through the same latent loop."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from latentpatch.cli import main
from latentpatch.errors import LatentPatchError
from latentpatch.model.codi import PRESETS, get_preset, load_codi_checkpoint
from latentpatch.model.config import LatentConfig, build_prj
from latentpatch.model.latent_dir import (
    MODEL_FORMAT,
    config_from_meta,
    latent_meta,
    load_latent_dir,
    save_latent_dir,
)
from latentpatch.model.load import load_model
from latentpatch.model.loaders import random_model

V = 40  # base vocabulary; pad/bot/eot = 40, 41, 42
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
R, ALPHA, PRJ_DIM, K = 4, 8, 48, 3
EMB = {
    "llama": "codi.base_model.model.model.embed_tokens.weight",
    "gpt2": "codi.base_model.model.transformer.wte.weight",
}
HEAD = "codi.base_model.model.lm_head.weight"


def base_lm(family: str, tie: bool = False, seed: int = 0, vocab: int = V, positions: int = 64):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            tie_word_embeddings=tie,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
        )
        lm = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=positions,
            bos_token_id=1,
            eos_token_id=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        lm = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() >= 2:
                p.mul_(2.0)
    return lm.eval()


class CODILike(nn.Module):
    def __init__(self, codi, prj):
        super().__init__()
        self.codi = codi
        self.prj = prj


def make_codi(family: str, tie: bool = False, prj_ln: bool = True, seed: int = 0):
    """(CODI-like module with a peft-wrapped LM, the base's config) with random LoRA A and B."""
    lm = base_lm(family, tie, seed)
    base_config = lm.config.to_dict()
    lm.resize_token_embeddings(V + 3, mean_resizing=False)
    with torch.no_grad():  # distinctive special rows: they must come back from the checkpoint
        lm.get_input_embeddings().weight[V:] = torch.randn(3, 32)
        if lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight:
            lm.get_output_embeddings().weight[V:] = torch.randn(3, 32)
    peft = get_peft_model(lm, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS[family], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    prj = build_prj(32, PRJ_DIM, layer_norm=prj_ln)
    with torch.no_grad():
        for p in prj.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return CODILike(peft, prj).eval(), base_config


def save_base(tmp_path, family, tie=False, vocab=V):
    d = tmp_path / f"base_{family}_{tie}_{vocab}"
    base_lm(family, tie, vocab=vocab).config.save_pretrained(d)
    return d


def save_ckpt(sd: dict, d, fmt: str = "bin"):
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        torch.save(sd, d / "pytorch_model.bin")
    else:
        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d


def old_spelling(sd: dict) -> dict:
    return {k.replace(".base_layer", ""): v for k, v in sd.items()}


@torch.no_grad()
def peft_plain_rollout(module: CODILike, prompt: list[int], k: int, answer_start: list[int]):
    """Reference: the unmerged peft model, no KV cache, whole sequence re-run at every step."""
    lm = module.codi
    emb = lm.get_input_embeddings()
    seq = emb(torch.tensor([prompt]))
    thoughts = []
    for _ in range(k):
        out = lm(inputs_embeds=seq, output_hidden_states=True)
        t = module.prj(out.hidden_states[-1][:, -1])
        thoughts.append(t[0])
        seq = torch.cat([seq, t[:, None]], 1)
    seq = torch.cat([seq, emb(torch.tensor([answer_start]))], 1)
    return torch.stack(thoughts), lm(inputs_embeds=seq).logits[0, -1]


def load(family, ckpt, base, **kw):
    args = dict(lora_r=R, lora_alpha=ALPHA, lora_targets=TARGETS[family], num_latent=K, eos_id=2)
    args.update(kw)
    return load_codi_checkpoint(ckpt, str(base), **args)


def assert_matches_unmerged(m, module, prompts=([5, 6, 7, 8], [9, 10])):
    r = m.rollout([m.prompt_ids(p) for p in prompts])
    for b, q in enumerate(prompts):
        thoughts, logits = peft_plain_rollout(module, m.prompt_ids(q), m.num_latent, m.answer_start_ids())
        assert (r.thoughts[b] - thoughts).abs().max() <= 1e-5
        assert (r.answer_logits[b] - logits).abs().max() <= 1e-5, (r.answer_logits[b] - logits).abs().max()
    return r


# ------------------------------------------------------------------------------------------------
# loading = the unmerged peft model


@pytest.mark.parametrize(
    "family,spelling,fmt",
    [
        ("llama", "current", "bin"),
        ("llama", "old", "safetensors"),
        ("gpt2", "current", "safetensors"),
        ("gpt2", "old", "bin"),
    ],
)
def test_load_equals_unmerged_peft(tmp_path, family, spelling, fmt):
    module, _ = make_codi(family)
    sd = module.state_dict()
    if spelling == "old":
        sd = old_spelling(sd)
        assert not any(".base_layer." in k for k in sd)
    ckpt = save_ckpt(sd, tmp_path / "ckpt", fmt)
    m = load(family, ckpt, save_base(tmp_path, family))
    assert (m.config.pad_id, m.config.bot_id, m.config.eot_id) == (V, V + 1, V + 2)
    assert m.family == family and m.n_layers == 2 and m.vocab_size == V + 3
    r = assert_matches_unmerged(m, module)
    # the LoRA matters: without it the logits are far off
    with module.codi.disable_adapter():
        _, plain = peft_plain_rollout(module, m.prompt_ids([5, 6, 7, 8]), K, m.answer_start_ids())
    assert (r.answer_logits[0] - plain).abs().max() > 1e-2
    # special-token rows are the checkpoint's
    assert torch.equal(m.lm.get_input_embeddings().weight[V:], sd[EMB[family]][V:])


def test_targets_inferred_from_file_when_not_given(tmp_path):
    module, _ = make_codi("gpt2")
    ckpt = save_ckpt(module.state_dict(), tmp_path / "ckpt")
    m = load_codi_checkpoint(ckpt, str(save_base(tmp_path, "gpt2")), lora_alpha=ALPHA, num_latent=K, eos_id=2)
    assert_matches_unmerged(m, module)


def test_preset_with_explicit_overrides(tmp_path):
    module, _ = make_codi("gpt2")
    ckpt = save_ckpt(module.state_dict(), tmp_path / "ckpt")
    # targets c_attn/c_proj/c_fc and prj_ln from the preset; rank/alpha/prj_dim/eos overridden
    m = load_codi_checkpoint(
        ckpt,
        str(save_base(tmp_path, "gpt2")),
        preset="codi-gpt2",
        lora_r=R,
        lora_alpha=ALPHA,
        prj_dim=PRJ_DIM,
        eos_id=2,
    )
    assert m.num_latent == 6 and m.config.answer_prefix == "The answer is: " and m.config.remove_eos
    assert_matches_unmerged(m, module)


def test_presets_hold_the_released_values():
    g, ll, li = get_preset("codi-gpt2"), get_preset("codi-llama1b"), get_preset("codi-llama1b-instruct")
    assert (g["base"], g["lora_r"], g["lora_alpha"], g["prj_dim"], g["eos_id"]) == ("gpt2", 128, 32, 768, 50256)
    assert set(g["lora_targets"]) == {"c_attn", "c_proj", "c_fc"}
    assert (ll["lora_r"], ll["lora_alpha"], ll["prj_dim"], ll["eos_id"]) == (128, 32, 2048, 128001)
    assert set(ll["lora_targets"]) == set(TARGETS["llama"]) and li["eos_id"] == 128009
    assert all(p["num_latent"] == 6 and p["remove_eos"] and p["prj_ln"] for p in PRESETS.values())
    with pytest.raises(LatentPatchError, match="--preset"):
        get_preset("codi-gpt3")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_lm_head_absence_allowed(tmp_path, family):
    module, _ = make_codi(family, tie=True)
    sd = dict(module.state_dict())
    del sd[HEAD]
    ckpt = save_ckpt(sd, tmp_path / "ckpt", "safetensors")
    m = load(family, ckpt, save_base(tmp_path, family, tie=True))
    assert m.lm.get_output_embeddings().weight is m.lm.get_input_embeddings().weight
    assert_matches_unmerged(m, module)


def test_untied_lm_head_absence_is_an_error(tmp_path):
    module, _ = make_codi("llama", tie=False)
    sd = dict(module.state_dict())
    del sd[HEAD]
    ckpt = save_ckpt(sd, tmp_path / "ckpt")
    with pytest.raises(LatentPatchError, match="lm_head"):
        load("llama", ckpt, save_base(tmp_path, "llama"))


def test_tied_file_lm_head_serves_both_and_is_logged(tmp_path, caplog):
    module, _ = make_codi("llama", tie=True)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    sd[HEAD] = sd[HEAD] + 0.01 * torch.randn_like(sd[HEAD])  # differs from the embedding in the file
    ckpt = save_ckpt(sd, tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="latentpatch.model.checkpoint"):
        m = load("llama", ckpt, save_base(tmp_path, "llama", tie=True))
    assert torch.equal(m.lm.get_input_embeddings().weight, sd[HEAD])
    assert torch.equal(m.lm.get_output_embeddings().weight, sd[HEAD])
    assert any("lm_head" in rec.getMessage() and "differ" in rec.getMessage() for rec in caplog.records)


# ------------------------------------------------------------------------------------------------
# strictness


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama_ckpt")
    module, _ = make_codi("llama")
    sd = dict(module.state_dict())
    return sd, save_base(tmp, "llama"), tmp


def _fails(sd, base, tmp, name, **kw) -> str:
    ckpt = save_ckpt(sd, tmp / name)
    with pytest.raises(LatentPatchError) as err:
        load("llama", ckpt, base, **kw)
    msg = str(err.value)
    assert "\n" not in msg and str(ckpt) in msg  # one line, names the file
    return msg


def test_dropped_key_fails_naming_it(llama_ckpt):
    sd, base, tmp = llama_ckpt
    key = "codi.base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"
    msg = _fails({k: v for k, v in sd.items() if k != key}, base, tmp, "dropped")
    assert "1 missing key" in msg and key in msg and "fix:" in msg


def test_dropped_prj_key_fails(llama_ckpt):
    sd, base, tmp = llama_ckpt
    msg = _fails({k: v for k, v in sd.items() if k != "prj.3.bias"}, base, tmp, "noprj")
    assert "prj.3.bias" in msg


def test_renamed_key_fails(llama_ckpt):
    sd, base, tmp = llama_ckpt
    old = "codi.base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"
    new = old.replace("up_proj", "upp_proj")
    renamed = {(new if k == old else k): v for k, v in sd.items()}
    msg = _fails(renamed, base, tmp, "renamed")
    assert "1 missing" in msg and "1 unexpected" in msg and old in msg and new in msg


def test_extra_key_fails(llama_ckpt):
    sd, base, tmp = llama_ckpt
    msg = _fails({**sd, "prj.5.weight": torch.zeros(3)}, base, tmp, "extra")
    assert "1 unexpected" in msg and "prj.5.weight" in msg


def test_wrong_lora_r_fails_with_shape_message(llama_ckpt):
    sd, base, tmp = llama_ckpt
    msg = _fails(sd, base, tmp, "wrong_r", lora_r=8)
    assert "shape mismatch" in msg and "rank is 4" in msg and "--lora-r" in msg


def test_wrong_lora_targets_fail(llama_ckpt):
    """The public study's mistake: attention-only targets silently dropped the MLP LoRA."""
    sd, base, tmp = llama_ckpt
    msg = _fails(sd, base, tmp, "wrong_targets", lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert "unexpected" in msg and "--lora-targets" in msg


def test_wrong_prj_dim_and_missing_alpha_fail(llama_ckpt):
    sd, base, tmp = llama_ckpt
    assert "prj_dim 48" in _fails(sd, base, tmp, "wrong_prj", prj_dim=64)
    msg = _fails(sd, base, tmp, "no_alpha", lora_alpha=None)
    assert "--lora-alpha" in msg


def test_lora_r_zero_on_lora_checkpoint_fails(llama_ckpt):
    sd, base, tmp = llama_ckpt
    assert "LoRA" in _fails(sd, base, tmp, "r0", lora_r=0)


def test_wrong_base_vocabulary_fails(llama_ckpt, tmp_path):
    sd, _, tmp = llama_ckpt
    msg = _fails(sd, save_base(tmp_path, "llama", vocab=V + 1), tmp, "vocab")
    assert "vocabulary" in msg and "--base" in msg


def test_base_of_another_family_fails(llama_ckpt, tmp_path):
    sd, _, tmp = llama_ckpt
    msg = _fails(sd, save_base(tmp_path, "gpt2"), tmp, "family", lora_targets=None)
    assert "wrong --base" in msg


def test_prj_ln_inferred_or_required(tmp_path):
    module, _ = make_codi("llama", prj_ln=False)
    ckpt = save_ckpt(module.state_dict(), tmp_path / "ckpt")
    base = save_base(tmp_path, "llama")
    m = load("llama", ckpt, base)  # inferred: no LayerNorm
    assert not hasattr(m.prj, "ln")
    assert_matches_unmerged(m, module)
    with pytest.raises(LatentPatchError, match="prj.ln"):
        load("llama", ckpt, base, prj_ln=True)


def test_no_lora_layout_and_lora_settings(tmp_path):
    """CODI trained without LoRA: codi.<hf keys>. LoRA settings for such a file are an error."""
    lm = base_lm("llama")
    lm.resize_token_embeddings(V + 3, mean_resizing=False)
    module = CODILike(lm, build_prj(32, PRJ_DIM)).eval()
    ckpt = save_ckpt(module.state_dict(), tmp_path / "ckpt", "safetensors")
    base = save_base(tmp_path, "llama")
    m = load_codi_checkpoint(ckpt, str(base), num_latent=K, eos_id=2)
    prompt = m.prompt_ids([5, 6, 7])
    thoughts, logits = peft_plain_rollout(module, prompt, K, m.answer_start_ids())
    r = m.rollout([prompt])
    assert (r.answer_logits[0] - logits).abs().max() <= 1e-5
    with pytest.raises(LatentPatchError, match="no LoRA"):
        load_codi_checkpoint(ckpt, str(base), lora_r=R, lora_alpha=ALPHA, num_latent=K, eos_id=2)


def test_bf16_checkpoint_loads(tmp_path):
    """Released checkpoints store the base in bf16 and LoRA/prj in fp32; load in bf16 and fp32."""
    module, _ = make_codi("gpt2")
    sd = {
        k: (v.to(torch.bfloat16) if "lora_" not in k and not k.startswith("prj.") else v)
        for k, v in module.state_dict().items()
    }
    ckpt = save_ckpt(sd, tmp_path / "ckpt")
    base = save_base(tmp_path, "gpt2")
    m16 = load("gpt2", ckpt, base, dtype="bfloat16")
    m32 = load("gpt2", ckpt, base)
    assert m16.dtype == torch.bfloat16 and m32.dtype == torch.float32
    r16, r32 = m16.rollout([m16.prompt_ids([5, 6])]), m32.rollout([m32.prompt_ids([5, 6])])
    assert torch.isfinite(r16.answer_logits).all()
    assert torch.equal(m32.lm.get_input_embeddings().weight[V:], sd[EMB["gpt2"]][V:].float())
    assert (r16.answer_logits - r32.answer_logits).abs().max() < 0.1 * r32.answer_logits.abs().max()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentPatchError, match="no model.safetensors or pytorch_model.bin"):
        load_codi_checkpoint(tmp_path / "empty", "gpt2")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(LatentPatchError, match="cannot read"):
        load_codi_checkpoint(tmp_path / "junk", "gpt2")
    with pytest.raises(LatentPatchError, match="--base"):
        load_codi_checkpoint(tmp_path / "junk", None)


# ------------------------------------------------------------------------------------------------
# other layouts and the front door


def test_latent_dir_roundtrip_with_tokenizer(tmp_path):
    m = random_model("llama", num_latent=3)
    save_latent_dir(m, tmp_path / "lp")
    sd_keys = set(
        __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "lp" / "model.safetensors"))
    )
    assert "codi.lm_head.weight" not in sd_keys and "prj.ln.weight" in sd_keys  # tied head omitted
    for spec in (f"dir:{tmp_path / 'lp'}", str(tmp_path / "lp")):
        m2 = load_model(spec)
        assert m2.tokenizer is not None and m2.config == m.config
        q = "What is 2 + 3?"
        assert m2.prompt_ids(q) == m.prompt_ids(q)
        a, b = m.rollout([q]), m2.rollout([q])
        assert torch.equal(a.answer_logits, b.answer_logits) and torch.equal(a.thoughts, b.thoughts)
    assert load_model(f"dir:{tmp_path / 'lp'}", num_latent=5).num_latent == 5


def test_latent_dir_is_strict(tmp_path):
    from safetensors.torch import load_file

    m = random_model("gpt2", num_latent=2)
    d = save_latent_dir(m, tmp_path / "lp")
    sd = load_file(str(d / "model.safetensors"))
    del sd["codi.transformer.h.1.mlp.c_fc.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(LatentPatchError, match=r"1 missing key.*codi\.transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_latent_dir(d)
    (d / "latentpatch.json").write_text("{}")
    with pytest.raises(LatentPatchError, match="format"):
        load_latent_dir(d)
    with pytest.raises(LatentPatchError, match="latentpatch.json"):
        load_latent_dir(tmp_path)


def test_latentpatch_json_round_trip():
    cfg = LatentConfig(
        num_latent=4,
        pad_id=10,
        bot_id=11,
        eot_id=12,
        eos_id=2,
        remove_eos=False,
        answer_prefix="",
        question_template="Q: {question}",
        add_special_tokens=False,
        max_answer_tokens=7,
    )
    meta = latent_meta(cfg, family="llama", prj_dim=None, prj_ln=False, extra={"training": {"steps": 1}})
    assert meta["format"] == MODEL_FORMAT and meta["training"] == {"steps": 1}
    assert config_from_meta(meta) == cfg
    assert config_from_meta(meta, num_latent=2).num_latent == 2
    minimal = {k: meta[k] for k in ("num_latent", "pad_id", "bot_id", "eot_id", "eos_id")}
    assert config_from_meta(minimal) == LatentConfig(4, 10, 11, 12, 2)  # absent keys: LatentConfig's defaults


def test_coconut_checkpoint(tmp_path):
    lm = base_lm("gpt2")
    lm.resize_token_embeddings(V + 3, mean_resizing=False)
    sd = {"base_causallm." + k: v for k, v in lm.state_dict().items()}
    sd["embedding.weight"] = lm.get_input_embeddings().weight
    torch.save(sd, tmp_path / "checkpoint_6")
    m = load_model(f"coconut:{tmp_path / 'checkpoint_6'}", base=str(save_base(tmp_path, "gpt2")), num_latent=K)
    assert isinstance(m.prj, nn.Identity) and (m.config.bot_id, m.config.eot_id) == (V, V + 1)
    prompt = m.prompt_ids([5, 6, 7])
    thoughts, logits = peft_plain_rollout(CODILike(lm, nn.Identity()), prompt, K, m.answer_start_ids())
    r = m.rollout([prompt])
    assert (r.thoughts[0] - thoughts).abs().max() <= 1e-5 and (r.answer_logits[0] - logits).abs().max() <= 1e-5
    del sd["embedding.weight"]
    torch.save(sd, tmp_path / "broken")
    with pytest.raises(LatentPatchError, match="embedding.weight"):
        load_model(f"coconut:{tmp_path / 'broken'}", base=str(save_base(tmp_path, "gpt2")))


def test_load_model_specs_and_errors(tmp_path):
    m = load_model("config:gpt2", num_latent=2)
    assert m.family == "gpt2" and m.num_latent == 2
    assert load_model("config:llama").answer([[5, 6, 7]])  # runs end to end
    with pytest.raises(LatentPatchError, match="unknown kind"):
        load_model("bogus:x")
    with pytest.raises(LatentPatchError, match="no such file"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(LatentPatchError, match="--preset"):
        load_model("config:llama", preset="codi-gpt2")
    with pytest.raises(LatentPatchError, match="--lora-r"):
        load_model("config:llama", lora_r=4)
    with pytest.raises(LatentPatchError, match="--dtype"):
        load_model("config:llama", dtype="float8")
    with pytest.raises(LatentPatchError, match="config:llama"):
        load_model("config:mamba")
    with pytest.raises(LatentPatchError, match="--num-latent"):
        load_model("config:llama", num_latent=0)
    with pytest.raises(LatentPatchError, match="no such GGUF"):
        load_model(f"gguf:{tmp_path / 'x.gguf'}")
    from latentpatch.model.load import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "latentpatch.json").exists():
        with pytest.raises(LatentPatchError, match="default model"):
            load_model("default")


# ------------------------------------------------------------------------------------------------
# the inspect command


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as ex:
        code = ex.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_on_a_checkpoint(tmp_path, capsys):
    module, _ = make_codi("gpt2")
    ckpt = save_ckpt(module.state_dict(), tmp_path / "ckpt")
    base = save_base(tmp_path, "gpt2")
    code, out, err = run_cli(
        capsys,
        "inspect",
        "--model",
        f"codi:{ckpt}",
        "--base",
        str(base),
        "--lora-r",
        str(R),
        "--lora-alpha",
        str(ALPHA),
        "--lora-targets",
        "c_attn,c_proj,c_fc",
        "--eos-id",
        "2",
        "--num-latent",
        "3",
        "--input-ids",
        "5,6,7",
        "--top-k",
        "3",
        "--max-new-tokens",
        "4",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert sum(line.startswith("thought ") for line in lines) == 3
    assert f"prompt ids: [5, 6, 7, {V + 1}]" in out
    assert any(line.startswith("answer ids: [") for line in lines)


def test_inspect_with_a_question(capsys):
    code, out, err = run_cli(
        capsys,
        "inspect",
        "--model",
        "config:llama",
        "--question",
        "What is 2 + 3?",
        "--num-latent",
        "2",
        "--max-new-tokens",
        "3",
    )
    assert code == 0, err
    assert "thought 1:" in out and "answer:" in out and "number:" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "codi:/nonexistent/ckpt", "--base", "gpt2", "--input-ids", "5,6"], "/nonexistent/ckpt"),
        (["--model", "config:llama", "--input-ids", "5,x"], "--input-ids"),
        (["--model", "config:llama", "--input-ids", "5,9999"], "outside the vocabulary"),
        (["--model", "config:llama"], "--question"),
        (["--model", "config:llama", "--input-ids", "5", "--dtype", "int8"], "--dtype"),
        (["--model", "config:llama", "--input-ids", "5", "--top-k", "0"], "--top-k"),
    ],
)
def test_inspect_bad_arguments_exit_2_one_line(capsys, args, needle):
    code, out, err = run_cli(capsys, "inspect", *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert needle in err


def test_inspect_bad_checkpoint_exit_2(tmp_path, llama_ckpt, capsys):
    sd, base, _ = llama_ckpt
    ckpt = save_ckpt({k: v for k, v in sd.items() if k != "prj.1.bias"}, tmp_path / "bad")
    code, out, err = run_cli(
        capsys, "inspect", "--model", f"codi:{ckpt}", "--base", str(base), "--lora-alpha", "8", "--input-ids", "5,6"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "prj.1.bias" in err and str(ckpt) in err
