"""``latentpatch train``: trains the project's small shipped default model with the CODI objective.

Model: a :class:`~latentpatch.model.latent.LatentModel` = a small LLaMA
(``transformers.LlamaForCausalLM``) from scratch + the CODI projection of
:func:`~latentpatch.model.config.build_prj`. Sequences: :mod:`latentpatch.training.data`;
loss: :mod:`latentpatch.training.objective`. The model directory is written by
``save_latent_dir`` (the one writer; ``load_model("dir:PATH")`` reads it back strictly).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from latentpatch.model.config import LatentConfig, build_prj
from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import embedding_matrix
from latentpatch.training.config import TrainConfig
from latentpatch.training.data import (
    ANSWER_PREFIX,
    NUMBER_TOKENS_UP_TO,
    Codec,
    make_batch,
    normalize_question,
    save_tokenizer,
    train_tokenizer,
    training_pool,
)
from latentpatch.training.objective import codi_loss

# --------------------------------------------------------------------------------------------
# model


def llama_config(cfg: TrainConfig, codec: Codec):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=codec.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=codec.pad_id,
        bos_token_id=codec.eos_id,
        eos_token_id=codec.eos_id,
        attention_dropout=0.0,
    )


def latent_config(cfg: TrainConfig, codec: Codec) -> LatentConfig:
    """How the trained model is run: no BOS, ``remove_eos``, the training answer prefix."""
    return LatentConfig(
        num_latent=cfg.num_latent,
        pad_id=codec.pad_id,
        bot_id=codec.bot_id,
        eot_id=codec.eot_id,
        eos_id=codec.eos_id,
        remove_eos=True,
        answer_prefix=ANSWER_PREFIX,
        question_template="{question}",
        add_special_tokens=False,
        max_answer_tokens=cfg.max_answer_tokens,
    )


def build_model(cfg: TrainConfig, codec: Codec) -> LatentModel:
    """A freshly initialised model (uses the torch RNG: LM first, then ``prj``).

    No tokenizer on the model: training tokenizes with ``codec``, and :func:`save_trained` writes
    the tokenizer files.
    """
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(llama_config(cfg, codec))
    prj = build_prj(cfg.d_model, cfg.prj_dim, layer_norm=True, dropout=cfg.prj_dropout)
    return LatentModel(lm, prj, latent_config(cfg, codec), name="training")


NUMBER_PERIODS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 100)
"""Periods of the value features of :func:`init_number_embeddings` (one cos/sin pair each)."""


@torch.no_grad()
def init_number_embeddings(model: LatentModel, codec: Codec, scale: float = 0.1) -> None:
    """Overwrite the first ``2 * len(NUMBER_PERIODS)`` embedding dims of every number token n
    (0..NUMBER_TOKENS_UP_TO) with ``scale * [cos(2 pi n / T), sin(2 pi n / T)]`` for each period T.

    Embeddings are tied, so the LM head reads values through the same features: adding m to n
    is a rotation of each pair, and a hidden state holding the phases of a value scores that value's
    token highest. The rest of each row keeps its random init (a token identity). Training is free
    to change everything; this only gives number tokens a shared geometry to start from.
    """
    emb = embedding_matrix(model.lm)  # [V, d]
    periods = torch.tensor(NUMBER_PERIODS, dtype=torch.float64)
    width = 2 * len(NUMBER_PERIODS)
    if width > emb.shape[1]:
        raise ValueError(f"d_model {emb.shape[1]} < {width} dims of number features")
    for n in range(NUMBER_TOKENS_UP_TO + 1):
        ids = codec.encode(str(n))
        angle = 2 * math.pi * n / periods
        emb[ids[0], :width] = (scale * torch.cat([angle.cos(), angle.sin()])).to(emb.dtype)


def initial_model(cfg: TrainConfig, pool: list) -> tuple[LatentModel, Codec]:
    """A fresh model + a tokenizer trained on the pool's first problems, or ``cfg.init_from``'s."""
    from latentpatch.model.latent_dir import load_latent_dir

    if cfg.init_from:  # continue training a saved model (its architecture and tokenizer)
        codec = Codec.from_dir(cfg.init_from)
        saved = load_latent_dir(cfg.init_from)
        return LatentModel(saved.lm, saved.feedback, latent_config(cfg, codec), name="training"), codec
    corpus = [
        normalize_question(p.question) + " " + p.cot + " " + ANSWER_PREFIX + str(p.answer)
        for p in pool[: cfg.tokenizer_corpus]
    ]
    codec = Codec(train_tokenizer(corpus, cfg.vocab_size))
    model = build_model(cfg, codec)
    if cfg.number_init == "fourier":
        init_number_embeddings(model, codec)
    return model, codec


def save_trained(model: LatentModel, codec: Codec, cfg: TrainConfig, out, extra_meta: dict | None = None) -> Path:
    """Write the model directory: weights, ``config.json`` and ``latentpatch.json`` (with the
    training config under ``"training"``) by ``save_latent_dir``, the tokenizer by ``save_tokenizer``."""
    from latentpatch.model.latent_dir import save_latent_dir

    out = save_latent_dir(model, out, extra={"training": {**asdict(cfg), **(extra_meta or {})}})
    save_tokenizer(codec.tok, out)
    return out


# --------------------------------------------------------------------------------------------
# training loop


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``cfg.warmup`` steps, then cosine decay to 5% of ``cfg.lr`` at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def optimizer(model: LatentModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )


class BatchOrder:
    """Batches of ``batch_size`` problems in a shuffled order, reshuffled when the pool runs out."""

    def __init__(self, pool: list, batch_size: int, rng: random.Random):
        self.pool, self.batch_size, self.rng = pool, batch_size, rng
        self.order = list(range(len(pool)))
        rng.shuffle(self.order)
        self.cursor = 0

    def next(self) -> list:
        if self.cursor + self.batch_size > len(self.order):
            self.rng.shuffle(self.order)
            self.cursor = 0
        chunk = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return [self.pool[i] for i in chunk]


def train(cfg: TrainConfig, out, progress: bool = True, pool=None) -> dict:
    """Train and save to ``out``. Returns a summary dict (final losses, wall time)."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    t0 = time.time()
    if pool is None:
        pool = training_pool(cfg)
    model, codec = initial_model(cfg, pool)
    model.train()
    opt = optimizer(model, cfg)
    batches = BatchOrder(pool, cfg.batch_size, rng)
    summary: dict = {}
    ema = None
    with (out / "train_log.jsonl").open("w") as log:
        bar = tqdm(range(cfg.steps), disable=not progress, dynamic_ncols=True)
        for step in bar:
            b = make_batch(batches.next(), codec, cfg.num_latent if cfg.latent_aux_factor else 0)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            loss, parts = codi_loss(model, b, cfg, teacher_only=step < cfg.teacher_only_steps, codec=codec)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                rec = {
                    "step": step,
                    "loss": loss.item(),
                    "lr": lr_at(cfg, step),
                    "elapsed_s": round(time.time() - t0, 1),
                    **parts,
                }
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
            summary = {"final_loss": loss.item(), "final_loss_ema": ema, **parts}
            if cfg.ckpt_every and step and step % cfg.ckpt_every == 0:
                model.eval()
                save_trained(model, codec, cfg, out.parent / (out.name + "_ckpt"), {"step": step})
                model.train()
            if cfg.stop_after and step >= cfg.stop_after:
                break  # schedule planned for cfg.steps, stopped early (reproduces a stopped run)
    wall = time.time() - t0
    summary["wall_s"] = round(wall, 1)
    model.eval()
    save_trained(model, codec, cfg, out, {"wall_s": round(wall, 1)})
    return summary
