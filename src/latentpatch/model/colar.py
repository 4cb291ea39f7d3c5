"""CoLaR (xiaomi-research/colar at 4b6ae9a): a Gaussian latent head fed back (docs/method.md §21).

After latent step p the final hidden state ``h`` [B, d] goes through the latent policy
(``src/modules/projector.py`` ``LatentPolicy``): ``z = LayerNorm(Linear(GELU(Linear(h))))``
(keys ``fc.0``, ``fc.2``, ``fc.3``), ``mu = mean(z)``, ``std = exp(log_std(z)) * temperature``
(a deterministic head: std 1e-9), and the thought is ``(mu + std * eps) * EMB_STD[model]``
(``src/models/model_base.py`` ``latent_generate``: ``distributions.rsample() * self.embeds_std``).
After each latent a stop token is *sampled* from ``softmax(logits)`` over the whole vocabulary
(``[PAD]`` included); ``###`` ends the row's latent phase, the latent just fed counted.

Randomness order per step (the official one for a batch of one): ``d`` normals, then ``V`` Exp(1)
draws (``torch.multinomial``'s), from :class:`~latentpatch.model.mixture.DrawStream`: each row's
pair's own stream (:mod:`latentpatch.model.streams`), the run's one stream for a row without a key.
The rule is :class:`SeparatorStop` (``feedback.stop_rule``): a run gives each pair its target run's
own count by it, at most ``--num-latent`` (default: the checkpoint's ``max_n_latent_forward``, 64),
and records where it would stop each patched run (docs/method.md §22); :func:`colar_latent_count`
gives one question's count.

The checkpoint (:func:`load_colar_checkpoint`): a Lightning ``.ckpt`` whose ``state_dict`` holds
only the trainable parameters: LoRA (q_proj, v_proj; r 128, alpha 32) under
``llm.base_model.model.*`` and ``latent_policy.*``. Pitfalls, named: the base weights come from
``--base`` (Llama-3.2-1B-Instruct), not the file; the ``[PAD]`` row the training code appended
(``resize_token_embeddings``, randomly initialised by transformers' mean resizing) is not in the
file, so it is set here to the mean of the other rows (it enters the stop softmax: the official
model redraws it at every load); the deterministic head's config key is spelled
``lp_determinisitc``; the official loader's ``strict=False`` would hide any other key, this one
refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from latentpatch.errors import LatentPatchError
from latentpatch.model.feedback import Feedback
from latentpatch.model.mixture import DrawStream
from latentpatch.model.stops import StopRule, rule_latent_counts

#: ``src/utils/constants.py`` ``MODEL_EMB_STD``: the per-model scale of the fed latents
EMB_STD = {
    "DeepSeek-R1-Distill-Qwen-1.5B": 0.03,
    "Llama-3.2-1B-Instruct": 0.018,
    "Llama-3.2-3B-Instruct": 0.018,
    "Llama-3.1-8B-Instruct": 0.008,
    "gpt2": 0.12,
}
#: the preset `latentpatch models` lists (what it is, the command); the hub path is unverified
PRESETS: dict[str, tuple[str, str]] = {
    "colar-llama1b": (
        "CoLaR on Llama-3.2-1B-Instruct (xiaomi-research/colar; Lightning .ckpt, LoRA q/v r 128 alpha 32, "
        "scale 0.018, compression 5); weights: AlbertTan/CoLaR (unverified path)",
        "latentpatch run --model colar:PATH/last.ckpt --base meta-llama/Llama-3.2-1B-Instruct",
    ),
}
QUESTION_TEMPLATE = "Question: {question} Let's think step by step:(Thinking speed: {speed})###"
SEPARATOR = "###"
LORA_PREFIX = "llm.base_model.model."


class LatentPolicy(nn.Module):
    """The official latent head's modules and keys (``fc.0``, ``fc.2``, ``fc.3``, ``mean``,
    ``log_std``; no ``log_std`` when deterministic).

    >>> sorted(LatentPolicy(8, 4, deterministic=True).state_dict())[:2]
    ['fc.0.bias', 'fc.0.weight']
    """

    def __init__(self, d_model: int, intermediate: int, deterministic: bool = False) -> None:
        super().__init__()
        self.deterministic = deterministic
        self.fc = nn.Sequential(
            nn.Linear(d_model, intermediate),
            nn.GELU(),
            nn.Linear(intermediate, intermediate),
            nn.LayerNorm(intermediate),
        )
        self.mean = nn.Linear(intermediate, d_model)
        if not deterministic:
            self.log_std = nn.Linear(intermediate, d_model)

    def forward(self, h: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) [B, d] of the latent's Gaussian at ``h`` [B, d]."""
        z = self.fc(h)
        mu = self.mean(z)
        if self.deterministic:
            return mu, torch.ones_like(mu) * 1e-9
        return mu, self.log_std(z).exp() * temperature


class CoLaRFeedback(Feedback):
    """``feed(h, step) = (mu + std * eps_step) * emb_std`` with the step's normals from the row's
    stream (its pair's: the same ``eps`` in the pair's every run, common random numbers).
    ``thought_pre`` is ``h``.

    >>> f = CoLaRFeedback(LatentPolicy(8, 4), emb_std=0.12, vocab=10)
    >>> f.name, tuple(f.feed(torch.zeros(2, 8), 3).shape)
    ('colar', (2, 8))
    """

    name: ClassVar[str] = "colar"

    @property
    def random(self) -> bool:
        return True

    def __init__(self, policy: LatentPolicy, emb_std: float, vocab: int, temperature: float = 1.0, seed: int = 0):
        super().__init__()
        self.latent_policy = policy
        self.emb_std, self.vocab, self.temperature = float(emb_std), int(vocab), float(temperature)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        d = self.latent_policy.mean.out_features
        self.stream = DrawStream(seed, d, plan=[("normal", d), ("exponential", self.vocab)])

    def cache_identity(self) -> str:
        return f"colar|T={self.temperature}|emb_std={self.emb_std}|vocab={self.vocab}|seed={self.stream.seed}"

    def feed(
        self, h: torch.Tensor, step: int | Sequence[int], streams: Sequence[int | None] | None = None
    ) -> torch.Tensor:
        steps = [int(step)] * h.shape[0] if isinstance(step, int) else [int(s) for s in step]
        mu, std = self.latent_policy(h, self.temperature)
        eps = self.stream.rows(steps, streams, 0).to(mu)  # [B, d]: each row's stream (its pair's)
        return (mu + eps * std) * self.emb_std

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.feed(h, 0)

    def stops(self, logits: torch.Tensor, step: int, streams: Sequence[int | None] | None = None) -> torch.Tensor:
        """[B] bool: does the stop token sampled after latent ``step`` (logits [B, V]) equal ``###``?
        Row b draws from stream ``streams[b]`` (None: the run's). Needs :attr:`separator_id` set
        (the loader sets it)."""
        p = torch.softmax(logits.float(), -1)
        q = self.stream.rows([step] * p.shape[0], streams, 1).to(p.device)  # multinomial(p, 1) = argmax(p / q)
        return (p / q).argmax(-1) == self.separator_id

    separator_id: int = -1

    @property
    def stop_rule(self) -> StopRule:
        """CoLaR's stop (:class:`SeparatorStop`): a token sampled after each latent is ``###``."""
        return SeparatorStop(self)


class SeparatorStop(StopRule):
    """CoLaR's rule (``latent_generate``): after each latent a token is sampled from
    ``softmax(logits)`` over the whole vocabulary with the step's draws of the feedback's stream;
    the row stops when it is ``###`` (that latent counted)."""

    name: ClassVar[str] = "colar_separator"

    def __init__(self, feedback: CoLaRFeedback) -> None:
        self.feedback = feedback

    def fires(
        self, logits: torch.Tensor, step: int, memory: dict[str, Any], streams: Sequence[int] | None = None
    ) -> torch.Tensor:
        return self.feedback.stops(logits, step, streams)

    def describe(self) -> str:
        return f"{self.name}(sampled '###' id {self.feedback.separator_id})"


def colar_latent_count(model: Any, question: str, max_latent: int = 64, stream: int | None = None) -> int:
    """The latent count of ``question`` by CoLaR's stop rule (1..``max_latent``): the first latent
    after which the sampled token is ``###`` (that latent counted), as the official loop does for
    a batch of one with the same stream (:func:`~latentpatch.model.stops.rule_latent_counts`;
    ``stream``: a pair's key, None: the run's stream)."""
    return rule_latent_counts(model, [model.prompt_ids(question)], max_latent, [stream])[0]


def _hparams(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """The run's ``model_kwargs``: the checkpoint's ``hyper_parameters`` or an ``hparams.yaml``
    beside it (or one folder up, Lightning's log layout)."""
    hp = ckpt.get("hyper_parameters")
    if hp is None:
        for cand in (path.parent / "hparams.yaml", path.parent.parent / "hparams.yaml"):
            if cand.is_file():
                import yaml

                hp = yaml.safe_load(cand.read_text())
                break
    if not isinstance(hp, dict) or "model_kwargs" not in hp:
        raise LatentPatchError(
            f"{path}: no hyper_parameters with model_kwargs in the checkpoint and no hparams.yaml beside it; "
            "fix: put the run's hparams.yaml next to the .ckpt"
        )
    return dict(hp["model_kwargs"])


def load_colar_checkpoint(
    path: str | Path,
    base: str | None,
    *,
    num_latent: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """A CoLaR Lightning checkpoint on its ``base`` (a transformers directory or hub name) as a
    :class:`~latentpatch.model.latent.LatentModel` with :class:`CoLaRFeedback`, strictly."""
    from latentpatch.model.checkpoint import LoraSpec, load_weights_strict, preview
    from latentpatch.model.config import LatentConfig
    from latentpatch.model.hf import base_config_and_tokenizer, build_lm, check_device, move_to, parse_dtype
    from latentpatch.model.latent import LatentModel
    from latentpatch.model.sites import embedding_matrix

    path = Path(path)
    if not path.is_file():
        raise LatentPatchError(f"{path}: no such CoLaR checkpoint file; fix: check the path after colar:")
    if base is None:
        raise LatentPatchError(f"{path}: which base model? fix: pass --base (CoLaR's release: Llama-3.2-1B-Instruct)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise LatentPatchError(f"{path}: no 'state_dict' in this file: not a Lightning checkpoint; fix: pass the .ckpt")
    kw = _hparams(ckpt, path)
    foreign = [k for k in sd if not k.startswith((LORA_PREFIX, "latent_policy."))]
    if foreign:
        raise LatentPatchError(
            f"{path}: {len(foreign)} key(s) outside llm.base_model.model.* and latent_policy.* ({preview(foreign)}); "
            "fix: not a CoLaR checkpoint (CoLaR saves LoRA and the latent policy only)"
        )
    policy_kw, gen_kw = dict(kw.get("latent_policy_config") or {}), dict(kw.get("latent_generation_config") or {})
    lora_kw = dict(kw.get("lora_config") or {"r": 128, "lora_alpha": 32})
    model_id = str(kw.get("model_id", ""))
    if model_id not in EMB_STD:
        raise LatentPatchError(f"{path}: model_id {model_id!r} has no CoLaR scale; fix: one of {', '.join(EMB_STD)}")
    dtype, dev = parse_dtype(dtype), check_device(device)
    config, tokenizer = base_config_and_tokenizer(str(base))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    sep = tokenizer.convert_tokens_to_ids(SEPARATOR)
    V = int(config.vocab_size)
    from transformers import AutoModelForCausalLM

    lm = build_lm(config, torch.float32)

    where = Path(base)
    if not where.exists():  # a hub name: the whole snapshot (CoLaR's file has no base weights)
        from latentpatch.model.hub import resolve_repo

        repo, _, rev = str(base).partition("@")
        where = resolve_repo(repo, rev or None, what=f"--base {base}")
    base_lm = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32)
    with torch.no_grad():  # the unsaved [PAD] row: the mean of the others (pitfall, see the module doc)
        mean = embedding_matrix(base_lm).mean(0)
        base_lm.resize_token_embeddings(V + 1, mean_resizing=False)
        embedding_matrix(base_lm)[V] = mean
    lm.resize_token_embeddings(V + 1, mean_resizing=False)
    d = int(config.hidden_size)
    det = bool(policy_kw.get("lp_determinisitc", False))  # sic: the official key
    policy = LatentPolicy(d, int(policy_kw.get("lp_intermediate_size", d)), deterministic=det)
    lora = LoraSpec(int(lora_kw.get("r", 128)), float(lora_kw.get("lora_alpha", 32)), ("q_proj", "v_proj"))
    full = {LORA_PREFIX + _base_layer(k): v for k, v in base_lm.state_dict().items()}
    full.update({k: v for k, v in sd.items() if k.startswith(LORA_PREFIX)})
    full.update({"prj." + k[len("latent_policy.") :]: v for k, v in sd.items() if k.startswith("latent_policy.")})
    load_weights_strict(lm, policy, full, file=path, prefix=LORA_PREFIX, lora=lora, hint="wrong --base?")
    speed = gen_kw.get("compression_factor", 5)
    cfg = LatentConfig(
        # the cap of the sampled stop (max_n_latent_forward, official default 64): each pair runs its own
        # count below it (--latent-count target, docs/method.md §22)
        num_latent=int(num_latent) if num_latent is not None else int(gen_kw.get("max_n_latent_forward", 64)),
        pad_id=V,
        bot_id=V,
        eot_id=V,
        eos_id=int(tokenizer.eos_token_id),
        remove_eos=True,
        answer_prefix="Answer:",
        question_template=QUESTION_TEMPLATE.replace("{speed}", str(speed)),
        add_special_tokens=False,
        max_answer_tokens=16,  # answer_generation_config.max_new_tokens
        question_text="raw",
        prompt_end=(),
        answer_start=(int(sep),),
    )
    feedback = CoLaRFeedback(policy, EMB_STD[model_id], V + 1, float(gen_kw.get("latent_temperature", 1.0)))
    feedback.separator_id = int(sep)
    move_to(lm, dtype)
    move_to(lm, dev)
    feedback.to(dtype).to(dev)
    return LatentModel(lm.eval(), feedback.eval(), cfg, tokenizer, name=f"colar:{path}")


def _base_layer(key: str) -> str:
    """peft's name of a base weight: ``...q_proj.weight`` -> ``...q_proj.base_layer.weight``."""
    if key.endswith(("q_proj.weight", "v_proj.weight")):
        return key[: -len("weight")] + "base_layer.weight"
    return key
