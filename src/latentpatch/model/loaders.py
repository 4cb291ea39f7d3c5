"""One loader per checkpoint family (the front door that picks one is :mod:`latentpatch.model.load`):

- ``codi:``     an official CODI checkpoint: :mod:`latentpatch.model.codi`
- ``coconut:``  a Coconut checkpoint (identity projection)
- ``dir:``      a latentpatch model directory (:mod:`latentpatch.model.latent_dir`), like ``default``
- ``gguf:``     a pretrained GGUF LM, untrained for latent reasoning (identity projection)
- ``config:``   a small random model for demos

Every weight file goes through the strict core of :mod:`latentpatch.model.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentpatch.errors import LatentPatchError
from latentpatch.model.checkpoint import load_weights_strict, preview, read_state_dict, split_known_unused
from latentpatch.model.config import LatentConfig, build_prj
from latentpatch.model.feedback import IdentityFeedback
from latentpatch.model.hf import (
    base_config_and_tokenizer,
    build_lm,
    check_device,
    check_special_ids,
    move_to,
    parse_dtype,
    resolve_eos_id,
)
from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import embedding_matrix

# ------------------------------------------------------------------------------------------------
# Coconut


def load_coconut_checkpoint(
    path: str | Path,
    base: str | None = "gpt2",
    *,
    num_latent: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
    known_unused: Sequence[str] = (),
) -> LatentModel:
    """Load a Coconut checkpoint (facebookresearch/coconut): ``torch.save`` of the full state dict,
    keys ``base_causallm.<hf keys>`` + ``embedding.weight`` (three tied copies of the embedding),
    identity projection. Tokens ``<|start-latent|>`` = V, ``<|end-latent|>`` = V+1, ``<|latent|>`` =
    V+2 (V = base vocabulary); bot = start-latent, eot = end-latent, pad = eos (as in Coconut).
    Prompt ``question\\n`` + start-latent, answer ``### N``. ``known_unused``: key prefixes the
    file may hold that inference never uses (SIM-CoT's ``expainable_llm.*``,
    :mod:`latentpatch.model.simcot`): named in a log line and left out.
    """
    dtype = parse_dtype(dtype)
    dev = check_device(device)
    if base is None:
        raise LatentPatchError(f"{path}: which base model? fix: pass --base (Coconut's released code uses gpt2)")
    sd, file = read_state_dict(path)
    if not known_unused and any(k.startswith("expainable_llm.") for k in sd):
        raise LatentPatchError(
            f"{file}: expainable_llm.* keys (SIM-CoT's training-only step decoder) in a Coconut checkpoint; "
            "fix: pass --preset simcot-coconut-gpt2"
        )
    sd, _ = split_known_unused(sd, known_unused, file=file)
    if not any(k.startswith("base_causallm.") for k in sd):
        raise LatentPatchError(
            f"{file}: no base_causallm.* keys (keys look like {preview(sorted(sd), 3)}): not a "
            "Coconut checkpoint; fix: for CODI use codi:DIR"
        )
    config, tokenizer = base_config_and_tokenizer(str(base))
    V = int(config.vocab_size)
    config.vocab_size = V + 3
    lm = build_lm(config, dtype)
    prj = IdentityFeedback()
    load_weights_strict(
        lm, prj, sd, file=file, prefix="base_causallm.", tied_copies=("embedding.weight",), hint="wrong --base?"
    )
    eos = resolve_eos_id(tokenizer, config, where=f"--base {base}", fix="pass the --base the model was trained from")
    cfg = LatentConfig(
        num_latent=6 if num_latent is None else int(num_latent),
        pad_id=eos,
        bot_id=V,
        eot_id=V + 1,
        eos_id=eos,
        remove_eos=True,
        answer_prefix="### ",
        question_template="{question}\n",
        max_answer_tokens=64,  # Coconut's run.py on GSM8k: max_new_tokens 64
        decoding="coconut",  # a plain argmax; pad == eos must not be banned
        question_text="raw",
    )
    check_special_ids(cfg, lm, str(file))
    move_to(lm, dev)
    return LatentModel(lm, prj, cfg, tokenizer, name=name or f"coconut:{path}")


# ------------------------------------------------------------------------------------------------
# GGUF (a real pretrained LM, untrained for latent reasoning: identity projection, Coconut-style)


def load_gguf(
    path: str | Path,
    *,
    num_latent: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> LatentModel:
    """A GGUF causal LM (dequantised by transformers) as a Coconut-style LatentModel: identity
    ``prj``, ``num_latent`` default 6.

    Special ids follow CODI's convention: the embeddings are resized by +3 and pad/bot/eot =
    V, V+1, V+2 (V = the GGUF vocabulary). Those rows (input and, if untied, output) are set
    deterministically to the mean of the existing embedding rows; the model was never trained
    with them, so this is a structural (not a reasoning) model. eos = the tokenizer's eos.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    dev = check_device(device)
    path = Path(path)
    if not path.is_file():
        raise LatentPatchError(f"{path}: no such GGUF file; fix: check the path after gguf:")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LatentPatchError(
            "reading GGUF files needs the gguf package; fix: pip install 'latentpatch[gguf]'"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as err:
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise LatentPatchError(
            f"{path}: cannot load this GGUF file ({type(err).__name__}: {first_line}); fix: use "
            "a LLaMA- or GPT-2-family GGUF model"
        ) from None
    V = int(embedding_matrix(lm).shape[0])
    with torch.no_grad():
        mean = embedding_matrix(lm).mean(0)  # [d]
        out_mean = lm.get_output_embeddings().weight.mean(0)
        lm.resize_token_embeddings(V + 3, mean_resizing=False)
        embedding_matrix(lm)[V:] = mean
        if lm.get_output_embeddings().weight is not embedding_matrix(lm):
            lm.get_output_embeddings().weight[V:] = out_mean
    move_to(lm, dtype)
    lm.eval()
    eos = resolve_eos_id(tokenizer, lm.config, where=str(path), fix="use a GGUF model whose tokenizer has an eos token")
    cfg = LatentConfig(
        num_latent=6 if num_latent is None else int(num_latent),
        pad_id=V,
        bot_id=V + 1,
        eot_id=V + 2,
        eos_id=eos,
        remove_eos=True,
        answer_prefix="",
    )
    check_special_ids(cfg, lm, str(path))
    move_to(lm, dev)
    return LatentModel(lm, IdentityFeedback(), cfg, tokenizer, name=f"gguf:{path.name}")


# ------------------------------------------------------------------------------------------------
# a small random model from a config (demos without any checkpoint)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with no merges: 256 byte tokens, ``<eos>`` = 256, then ``<pad>``,
    ``<bot>``, ``<eot>`` = 257, 258, 259 (CODI's V, V+1, V+2 with V = 257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<pad>", "<bot>", "<eot>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", additional_special_tokens=["<bot>", "<eot>"]
    )


def random_model(
    family: str = "llama",
    *,
    num_latent: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> LatentModel:
    """A small random CODI-shaped model (2 layers, d=64, byte tokenizer) built from a config.

    For demos and smoke tests before a trained model is at hand: its thoughts and answers are noise.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

    dtype = parse_dtype(dtype)
    dev = check_device(device)
    tok = byte_tokenizer()
    V = 257  # bytes + <eos>
    lm: PreTrainedModel
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family == "llama":
            lm = LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=V + 3,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=512,
                    tie_word_embeddings=True,
                    bos_token_id=256,
                    eos_token_id=256,
                    pad_token_id=257,
                )
            )
        elif family == "gpt2":
            lm = GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=V + 3,
                    n_embd=64,
                    n_layer=2,
                    n_head=4,
                    n_positions=512,
                    bos_token_id=256,
                    eos_token_id=256,
                    resid_pdrop=0.0,
                    embd_pdrop=0.0,
                    attn_pdrop=0.0,
                )
            )
        else:
            raise LatentPatchError(f"--model config:{family}: unknown family; fix: use config:llama or config:gpt2")
        prj = build_prj(64, 128, layer_norm=True)
    cfg = LatentConfig(
        num_latent=6 if num_latent is None else int(num_latent),
        pad_id=V,
        bot_id=V + 1,
        eot_id=V + 2,
        eos_id=256,
        remove_eos=True,
        add_special_tokens=False,
    )
    check_special_ids(cfg, lm, f"config:{family}")
    move_to(lm, dtype)
    move_to(lm, dev)
    return LatentModel(lm.eval(), prj.to(dtype).to(dev).eval(), cfg, tok, name=f"config:{family}")
