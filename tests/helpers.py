"""Tiny random models for tests: LLaMA and GPT-2 trees built from a config (no downloads)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from latentpatch.model.config import LatentConfig, build_prj
from latentpatch.model.latent import LatentModel

VOCAB = 40  # ids VOCAB, VOCAB+1, VOCAB+2 = pad, bot, eot as in CODI's +3 resize


def tiny_lm(family: str, n_layers: int = 3, d: int = 32, seed: int = 0, vocab: int = VOCAB + 3, scale: float = 3.0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,  # RoPE: values do not depend on it; long pair questions fit
            tie_word_embeddings=False,
        )
        lm = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=d,
            n_layer=n_layers,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        lm = GPT2LMHeadModel(cfg)
    # Random init is small; scale up so that patches have visible effects.
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return lm.eval()


def tiny_latent_model(
    family: str = "llama",
    n_layers: int = 3,
    d: int = 32,
    num_latent: int = 4,
    seed: int = 0,
    prj_dim: int | None = 48,
    remove_eos: bool = True,
) -> LatentModel:
    lm = tiny_lm(family, n_layers, d, seed)
    torch.manual_seed(seed + 1)
    prj = build_prj(d, prj_dim, layer_norm=True)
    cfg = LatentConfig(
        num_latent=num_latent,
        pad_id=VOCAB,
        bot_id=VOCAB + 1,
        eot_id=VOCAB + 2,
        eos_id=2,
        remove_eos=remove_eos,
        answer_prefix="",
    )
    return LatentModel(lm, prj.eval(), cfg)


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII + pad/bot/eot/eos), built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<eos>": 0, "<unk>": 1}
    vocab.update({ch: i + 2 for i, ch in enumerate(chars)})
    for name in ("<pad>", "<bot>", "<eot>"):
        vocab[name] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<bot>", "<eot>"],
    )


def tiny_text_model(
    family: str = "llama", n_layers: int = 3, d: int = 32, num_latent: int = 4, seed: int = 0, answer_prefix: str = "= "
) -> LatentModel:
    """A tiny random model with a real (character) tokenizer, so text questions and answers work."""
    tok = tiny_tokenizer()
    V = len(tok)
    lm = tiny_lm(family, n_layers, d, seed, vocab=V, scale=10.0)  # large enough for visible patch effects
    torch.manual_seed(seed + 1)
    prj = build_prj(d, 2 * d, layer_norm=True)
    cfg = LatentConfig(
        num_latent=num_latent,
        pad_id=tok.convert_tokens_to_ids("<pad>"),
        bot_id=tok.convert_tokens_to_ids("<bot>"),
        eot_id=tok.convert_tokens_to_ids("<eot>"),
        eos_id=0,
        remove_eos=True,
        answer_prefix=answer_prefix,
        add_special_tokens=False,
        max_answer_tokens=6,
    )
    return LatentModel(lm, prj.eval(), cfg, tokenizer=tok, name=f"tiny-{family}")
