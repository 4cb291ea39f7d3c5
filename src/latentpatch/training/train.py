"""The CODI objective; trains the project's small shipped default model.

Model: a small LLaMA (``transformers.LlamaForCausalLM``) from scratch + the CODI projection
``prj = Sequential(Dropout, Linear(d, prj_dim), GELU, Linear(prj_dim, d), ln=LayerNorm(d))``.

Sequences (``remove_eos=True``, no BOS; ``<bot>``/``<eot>`` as in CODI):

* teacher: ``question <bot> CoT <eot> The answer is: N <eos>``, CE on ``CoT <eot> answer <eos>``.
* student: ``question <bot>``, K continuous thoughts, ``<eot> The answer is: N <eos>``, CE on the
  answer tokens (``The answer is: N <eos>``, predicted from ``<eot>`` onward). Thought ``k`` is
  ``prj(hidden_states[-1][:, -1])`` of the previous position (the ``<bot>`` position for thought 0),
  fed as ``inputs_embeds``; the last produced thought is not fed (exactly codi_format.md
  "Inference"). The student batch is left-padded so every row's ``<bot>`` sits at the same index;
  position ids come from the attention mask, so padding never shifts positions.
* distillation: at the last token of the answer prefix (the lone space token ``"Ġ"`` of
  ``"The answer is: "``, whose next token is the first digit of N), every layer's output hidden
  state (``hidden_states[1:]``) of student vs teacher (detached), SmoothL1, divided by the
  teacher's std per layer, averaged over layers.

Total loss = student CE + ``distill_factor`` * distill + ``ref_factor`` * teacher CE.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentpatch.errors import LatentPatchError

ANSWER_PREFIX = "The answer is: "
SPECIAL = {"eos": "<eos>", "pad": "<pad>", "bot": "<bot>", "eot": "<eot>"}
FORMAT = "latentpatch-codi/1"


# --------------------------------------------------------------------------------------------
# tokenizer


NUMBER_TOKENS_UP_TO = 200
"""Every integer 0..NUMBER_TOKENS_UP_TO is a single token (see :func:`train_tokenizer`)."""


def train_tokenizer(texts, vocab_size: int = 1000):
    """Byte-level BPE; ``<eos>`` = 0, then pad/bot/eot = V, V+1, V+2.

    Digit runs are pre-tokenized apart from the surrounding text (``Digits(individual_digits=False)``
    before ``ByteLevel``), so a number never merges with the space before it, and the corpus is
    augmented so that every integer 0..200 becomes one token. Whole-number tokens make copying a
    number and each arithmetic step a single-token operation: a first run with one token per digit
    had not learned even to copy numbers after 1,000 steps (see the model card). A change 16 -> 17
    keeps the token length.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = list(texts) + [" ".join(str(n) for n in range(NUMBER_TOKENS_UP_TO + 1))] * 200
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL["eos"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([SPECIAL["pad"], SPECIAL["bot"], SPECIAL["eot"]])
    multi = [n for n in range(NUMBER_TOKENS_UP_TO + 1) if len(tok.encode(str(n), add_special_tokens=False).ids) != 1]
    if multi:
        raise ValueError(f"vocab_size {vocab_size} too small: numbers {multi[:5]}... are not single tokens")
    return tok


def save_tokenizer(tok, out: Path) -> None:
    out = Path(out)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": SPECIAL["eos"],
        "pad_token": SPECIAL["pad"],
        "additional_special_tokens": [SPECIAL["bot"], SPECIAL["eot"]],
        "model_max_length": 512,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


class Codec:
    """Thin wrapper around a ``tokenizers.Tokenizer`` with the special ids."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.token_to_id(SPECIAL["eos"])
        self.pad_id = tok.token_to_id(SPECIAL["pad"])
        self.bot_id = tok.token_to_id(SPECIAL["bot"])
        self.eot_id = tok.token_to_id(SPECIAL["eot"])
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def from_dir(cls, path) -> "Codec":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(path) / "tokenizer.json")))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def normalize_question(q: str) -> str:
    return " ".join(q.strip().split())


# --------------------------------------------------------------------------------------------
# model


class Projection(nn.Sequential):
    """``Dropout, Linear(d, prj_dim), GELU, Linear(prj_dim, d)`` + module ``ln`` (keys prj.1/3/ln)."""

    def __init__(self, d: int, prj_dim: int, dropout: float = 0.0, ln: bool = True):
        super().__init__(nn.Dropout(dropout), nn.Linear(d, prj_dim), nn.GELU(), nn.Linear(prj_dim, d))
        if ln:
            self.add_module("ln", nn.LayerNorm(d, eps=1e-5))


class CODI(nn.Module):
    """``codi`` (LlamaForCausalLM) + ``prj``: the official CODI module tree without LoRA."""

    def __init__(self, config, prj_dim: int, dropout: float = 0.0):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.codi = LlamaForCausalLM(config)
        self.prj = Projection(config.hidden_size, prj_dim, dropout)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codi.get_input_embeddings()(ids)


@dataclass
class TrainConfig:
    steps: int = 4600
    seed: int = 0
    batch_size: int = 32
    lr: float = 4e-3
    weight_decay: float = 0.01
    warmup: int = 50
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    d_ff: int = 384
    prj_dim: int = 256
    prj_dropout: float = 0.0
    num_latent: int = 6
    vocab_size: int = 1000
    distill_factor: float = 20.0
    ref_factor: float = 1.0
    teacher_only_steps: int = 300  # curriculum: first steps train the teacher task only
    latent_aux_factor: float = 1.0  # >0: intermediate-result loss on the latent hidden states
    number_init: str = "fourier"  # "fourier": number tokens start with sin/cos features of their value
    stop_after: int = 0  # >0: stop after this step index (lr schedule still planned for `steps`)
    init_from: str = ""  # start from a saved model directory instead of a fresh init
    data_seed: int = 1
    train_pool: int = 200_000
    tokenizer_corpus: int = 20_000
    grad_clip: float = 1.0
    threads: int = 2
    log_every: int = 10
    max_answer_tokens: int = 16
    ckpt_every: int = 0  # >0: save an intermediate model every N steps to <out>_ckpt/


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


NUMBER_PERIODS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 100)
"""Periods of the value features of :func:`init_number_embeddings` (one cos/sin pair each)."""


@torch.no_grad()
def init_number_embeddings(model: "CODI", codec: "Codec", scale: float = 0.1) -> None:
    """Overwrite the first ``2 * len(NUMBER_PERIODS)`` embedding dims of every number token n
    (0..NUMBER_TOKENS_UP_TO) with ``scale * [cos(2 pi n / T), sin(2 pi n / T)]`` for each period T.

    Embeddings are tied, so the LM head reads values through the same features: adding m to n
    is a rotation of each pair, and a hidden state holding the phases of a value scores that value's
    token highest. The rest of each row keeps its random init (a token identity). Training is free
    to change everything; this only gives number tokens a shared geometry to start from.
    """
    emb = model.codi.get_input_embeddings().weight
    periods = torch.tensor(NUMBER_PERIODS, dtype=torch.float64)
    width = 2 * len(NUMBER_PERIODS)
    if width > emb.shape[1]:
        raise ValueError(f"d_model {emb.shape[1]} < {width} dims of number features")
    for n in range(NUMBER_TOKENS_UP_TO + 1):
        ids = codec.encode(str(n))
        angle = 2 * math.pi * n / periods
        emb[ids[0], :width] = (scale * torch.cat([angle.cos(), angle.sin()])).to(emb.dtype)


# --------------------------------------------------------------------------------------------
# batching


@dataclass
class Batch:
    # teacher (right-padded)
    t_ids: torch.Tensor
    t_mask: torch.Tensor
    t_labels: torch.Tensor
    t_distill: torch.Tensor  # [B] index of the distillation position
    # student question (left-padded, ends with <bot>)
    q_ids: torch.Tensor
    q_mask: torch.Tensor
    # student answer part (<eot> The answer is: N <eos>), right-padded
    a_ids: torch.Tensor
    a_mask: torch.Tensor
    a_labels: torch.Tensor
    a_distill: torch.Tensor  # [B] index in the answer part of the distillation position
    # auxiliary latent targets: token id of step result j (answer for j >= n_steps), [B, K]
    latent_targets: Optional[torch.Tensor] = None


def _pad(seqs, value, left=False):
    L = max(len(s) for s in seqs)
    out = torch.full((len(seqs), L), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def make_batch(problems, codec: Codec, num_latent: int = 0) -> Batch:
    from latentpatch.data.synthetic import _run_program

    prefix = codec.encode(ANSWER_PREFIX)
    t_ids, t_lab, t_dis, q_ids, a_ids, a_lab, a_dis, lat = [], [], [], [], [], [], [], []
    for p in problems:
        if num_latent:
            res = _run_program(p.program)
            res = (res + [res[-1]] * num_latent)[:num_latent]
            ids = [codec.encode(str(r)) for r in res]
            lat.append([i[0] if len(i) == 1 else -100 for i in ids])
        q = codec.encode(normalize_question(p.question)) + [codec.bot_id]
        cot = codec.encode(" " + p.cot) if not p.cot.startswith(" ") else codec.encode(p.cot)
        num = codec.encode(str(p.answer))
        ans = [codec.eot_id] + prefix + num + [codec.eos_id]
        t = q + cot + ans
        t_ids.append(t)
        t_lab.append([-100] * len(q) + t[len(q):])  # shifted inside the loss
        t_dis.append(len(q) + len(cot) + len(prefix))  # index of the last prefix token
        q_ids.append(q)
        a_ids.append(ans)
        a_lab.append(ans)
        a_dis.append(len(prefix))
    tI = _pad(t_ids, codec.pad_id)
    aI = _pad(a_ids, codec.pad_id)
    return Batch(
        t_ids=tI, t_mask=_pad([[1] * len(s) for s in t_ids], 0), t_labels=_pad(t_lab, -100),
        t_distill=torch.tensor(t_dis),
        q_ids=_pad(q_ids, codec.pad_id, left=True), q_mask=_pad([[1] * len(s) for s in q_ids], 0, left=True),
        a_ids=aI, a_mask=_pad([[1] * len(s) for s in a_ids], 0),
        a_labels=_pad(a_lab, -100), a_distill=torch.tensor(a_dis),
        latent_targets=torch.tensor(lat) if num_latent else None,
    )


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE: logits[:, i] predicts labels[:, i+1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


# --------------------------------------------------------------------------------------------
# forward passes


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def student_forward(model: CODI, q_ids, q_mask, a_ids, a_mask, num_latent: int,
                    thought_hook=None):
    """The student rollout (== codi_format.md "Inference"), incrementally with a KV cache.

    Returns ``(answer_logits [B, La, V], answer_hidden_states tuple, thoughts [B, K, d],
    latent_hidden [B, K, d])`` (latent_hidden[:, j] = final hidden state at latent position j).
    ``thought_hook(k, emb) -> emb`` may replace thought ``k``'s input embedding (ablations).
    """
    from transformers import DynamicCache

    lm = model.codi
    cache = DynamicCache()
    mask = q_mask
    out = lm(input_ids=q_ids, attention_mask=mask, position_ids=_positions(mask),
             past_key_values=cache, use_cache=True, output_hidden_states=True)
    h = out.hidden_states[-1][:, -1]
    thoughts, latent_hidden = [], []
    for k in range(num_latent):
        emb = model.prj(h).unsqueeze(1)
        if thought_hook is not None:
            emb = thought_hook(k, emb)
        thoughts.append(emb[:, 0])
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], 1)
        pos = _positions(mask)[:, -1:]
        out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                 past_key_values=out.past_key_values, use_cache=True, output_hidden_states=True)
        h = out.hidden_states[-1][:, -1]
        latent_hidden.append(h)
    mask = torch.cat([mask, a_mask], 1)
    pos = _positions(mask)[:, -a_ids.size(1):]
    out = lm(input_ids=a_ids, attention_mask=mask, position_ids=pos,
             past_key_values=out.past_key_values, use_cache=True, output_hidden_states=True)
    return out.logits, out.hidden_states, torch.stack(thoughts, 1), torch.stack(latent_hidden, 1)


def student_forward_reference(model: CODI, q_ids, q_mask, a_ids, a_mask, num_latent: int):
    """Plain no-cache loop (full recompute each step); for tests against :func:`student_forward`."""
    lm = model.codi
    embs = model.embed(q_ids)
    mask = q_mask
    for _ in range(num_latent):
        out = lm(inputs_embeds=embs, attention_mask=mask, position_ids=_positions(mask),
                 output_hidden_states=True, use_cache=False)
        emb = model.prj(out.hidden_states[-1][:, -1]).unsqueeze(1)
        embs = torch.cat([embs, emb], 1)
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], 1)
    embs = torch.cat([embs, model.embed(a_ids)], 1)
    mask = torch.cat([mask, a_mask], 1)
    out = lm(inputs_embeds=embs, attention_mask=mask, position_ids=_positions(mask),
             output_hidden_states=True, use_cache=False)
    return out.logits[:, -a_ids.size(1):]


def codi_loss(model: CODI, b: Batch, cfg: TrainConfig, teacher_only: bool = False):
    lm = model.codi
    t_out = lm(input_ids=b.t_ids, attention_mask=b.t_mask, output_hidden_states=True, use_cache=False)
    t_ce = _ce(t_out.logits, b.t_labels)
    if teacher_only:
        return t_ce, {"teacher_ce": t_ce.item()}
    s_logits, s_hs, _, lat_h = student_forward(model, b.q_ids, b.q_mask, b.a_ids, b.a_mask, cfg.num_latent)
    s_ce = _ce(s_logits, b.a_labels)
    rows = torch.arange(b.t_ids.size(0))
    dl = []
    for th, sh in zip(t_out.hidden_states[1:], s_hs[1:]):
        t = th[rows, b.t_distill].detach()
        s = sh[rows, b.a_distill]
        dl.append(F.smooth_l1_loss(s, t) / (t.std() + 1e-6))
    distill = torch.stack(dl).mean()
    total = s_ce + cfg.distill_factor * distill + cfg.ref_factor * t_ce
    parts = {"student_ce": s_ce.item(), "distill": distill.item(), "teacher_ce": t_ce.item()}
    if cfg.latent_aux_factor and b.latent_targets is not None:
        # auxiliary (not in CODI): the LM head on the final hidden state at latent position j
        # predicts the j-th intermediate result (the answer once the program has no more steps)
        lat_logits = model.codi.lm_head(lat_h).float()
        aux = F.cross_entropy(lat_logits.reshape(-1, lat_logits.size(-1)), b.latent_targets.reshape(-1),
                              ignore_index=-100)
        total = total + cfg.latent_aux_factor * aux
        parts["latent_aux"] = aux.item()
    return total, parts


# --------------------------------------------------------------------------------------------
# saving


def state_dict_codi_layout(model: CODI) -> dict:
    sd = {}
    for k, v in model.codi.state_dict().items():
        if k == "lm_head.weight" and model.codi.config.tie_word_embeddings:
            continue
        sd["codi." + k] = v.detach().float().contiguous().clone()
    for k, v in model.prj.state_dict().items():
        sd["prj." + k] = v.detach().float().contiguous().clone()
    return sd


def save_model(model: CODI, codec: Codec, cfg: TrainConfig, out, extra_meta: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.codi.config.save_pretrained(out)
    save_file(state_dict_codi_layout(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(codec.tok, out)
    meta = {
        "format": FORMAT,
        "family": "llama",
        "num_latent": cfg.num_latent,
        "pad_id": codec.pad_id,
        "bot_id": codec.bot_id,
        "eot_id": codec.eot_id,
        "eos_id": codec.eos_id,
        "remove_eos": True,
        "answer_prefix": ANSWER_PREFIX,
        "question_template": "{question}",
        "add_special_tokens": False,
        "max_answer_tokens": cfg.max_answer_tokens,
        "prj_dim": cfg.prj_dim,
        "prj_ln": True,
        "training": {**asdict(cfg), **(extra_meta or {})},
    }
    (out / "latentpatch.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_trained(path):
    """Load a directory written by :func:`save_model` (own minimal loader, strict)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    path = Path(path)
    if not (path / "latentpatch.json").exists():
        raise LatentPatchError(f"{path}: not a latentpatch model directory (no latentpatch.json)")
    meta = json.loads((path / "latentpatch.json").read_text())
    config = LlamaConfig.from_pretrained(path)
    model = CODI(config, meta["prj_dim"])
    sd = load_file(str(path / "model.safetensors"))
    codi_sd = {k[5:]: v for k, v in sd.items() if k.startswith("codi.")}
    prj_sd = {k[4:]: v for k, v in sd.items() if k.startswith("prj.")}
    missing, unexpected = model.codi.load_state_dict(codi_sd, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise LatentPatchError(f"{path}: missing {missing} unexpected {unexpected}")
    model.prj.load_state_dict(prj_sd, strict=True)
    model.codi.tie_weights()
    model.eval()
    return model, Codec.from_dir(path), meta


# --------------------------------------------------------------------------------------------
# training loop


def training_pool(cfg: TrainConfig):
    """``generate_problems(train_pool, data_seed)`` without the questions of the shipped default
    pairs, so that ``eval`` measures the pairs on questions the model never saw."""
    from latentpatch.data.pairs import load_pairs
    from latentpatch.pipeline.run import default_pairs_path
    from latentpatch.data.synthetic import generate_problems

    held_out = {normalize_question(v.question) for p in load_pairs(default_pairs_path()) for v in (p.clean, p.corrupted)}
    return [p for p in generate_problems(cfg.train_pool, cfg.data_seed) if normalize_question(p.question) not in held_out]


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
    corpus = []
    for p in pool[: cfg.tokenizer_corpus]:
        corpus.append(normalize_question(p.question) + " " + p.cot + " " + ANSWER_PREFIX + str(p.answer))
    if cfg.init_from:  # continue training a saved model (its architecture and tokenizer)
        model, codec, _ = load_trained(cfg.init_from)
    else:
        codec = Codec(train_tokenizer(corpus, cfg.vocab_size))
        model = CODI(llama_config(cfg, codec), cfg.prj_dim, cfg.prj_dropout)
        if cfg.number_init == "fourier":
            init_number_embeddings(model, codec)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    order = list(range(len(pool)))
    rng.shuffle(order)
    cursor = 0
    log_path = out / "train_log.jsonl"
    log = log_path.open("w")
    summary = {}
    ema = None
    bar = tqdm(range(cfg.steps), disable=not progress, dynamic_ncols=True)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            rng.shuffle(order)
            cursor = 0
        batch_probs = [pool[i] for i in order[cursor: cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        b = make_batch(batch_probs, codec, cfg.num_latent if cfg.latent_aux_factor else 0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, parts = codi_loss(model, b, cfg, teacher_only=step < cfg.teacher_only_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": loss.item(), "lr": lr_at(step), "elapsed_s": round(time.time() - t0, 1), **parts}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
        summary = {"final_loss": loss.item(), "final_loss_ema": ema, **parts}
        if cfg.ckpt_every and step and step % cfg.ckpt_every == 0:
            model.eval()
            save_model(model, codec, cfg, out.parent / (out.name + "_ckpt"), {"step": step})
            model.train()
        if cfg.stop_after and step >= cfg.stop_after:
            break  # schedule planned for cfg.steps, stopped early (reproduces a stopped run)
    log.close()
    wall = time.time() - t0
    summary["wall_s"] = round(wall, 1)
    model.eval()
    save_model(model, codec, cfg, out, {"wall_s": round(wall, 1)})
    return summary
