"""What a latent model is, apart from its weights: :class:`LatentConfig` (special ids, rollout and
decoding settings; read from and written to ``latentpatch.json`` by :mod:`latentpatch.model.latent_dir`),
the family rules for greedy decoding and question text, CODI's projection :func:`build_prj`, and how an
answer number is read from text and written after the prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

Number = float | int

#: ``LatentConfig.decoding`` values (docs/checkpoints.md, "Greedy decoding")
DECODING_RULES = ("latentpatch", "codi", "coconut")
#: ``LatentConfig.question_text`` values
QUESTION_TEXT_RULES = ("collapse", "codi", "raw")


@dataclass
class LatentConfig:
    """Everything besides weights that defines how a continuous-thought model is run.

    ``answer_prefix`` is the text the model emits before the number ("The answer is: "; "" for a
    model that answers with the number alone). ``question_template`` formats a question before
    tokenization. ``add_special_tokens`` is passed to the tokenizer (LLaMA: adds BOS).

    ``decoding`` and ``question_text`` are the family's rules (docs/checkpoints.md), set by the loaders:

    - ``decoding``: which ids greedy decoding may not choose and when [EOS] stops it.
      ``"latentpatch"`` bans pad/bot/eot (the latentpatch model directory); ``"codi"`` bans only
      the last vocabulary row ([EOT]), as CODI's ``test.py`` slices ``logits[..., :V-1]``;
      ``"coconut"`` bans nothing and, as Coconut's ``generate``, keeps a first token that is
      [EOS] (only later [EOS] stop). Decoding otherwise stops at [EOS] for every rule.
    - ``question_text``: ``"collapse"`` turns every whitespace run into one space (latentpatch);
      ``"codi"`` strips and replaces each double space by one (CODI's evaluation); ``"raw"``
      leaves it as given (Coconut's dataset code).

    ``prompt_end`` / ``answer_start`` (None: CODI's layout): the ids that end the prompt instead of
    ([EOS]) [BOT], and the ids fed after the thoughts instead of [EOT] ([EOS]); the mixture
    families (:mod:`latentpatch.model.mixture`) end the prompt with the chat template and start
    the answer with the ids of ``</think>``.

    Fields at their defaults are left out of :meth:`to_dict` (so manifests and cache keys of
    models that existed before these fields are unchanged).
    """

    num_latent: int
    pad_id: int
    bot_id: int
    eot_id: int
    eos_id: int
    remove_eos: bool = True
    answer_prefix: str = "The answer is: "
    question_template: str = "{question}"
    add_special_tokens: bool = True
    max_answer_tokens: int = 32
    decoding: str = "latentpatch"
    question_text: str = "collapse"
    prompt_end: tuple[int, ...] | None = None
    answer_start: tuple[int, ...] | None = None

    #: fields added after the format was fixed: written only when not at their default
    OPTIONAL_DEFAULTS: ClassVar[dict[str, Any]] = {
        "decoding": "latentpatch",
        "question_text": "collapse",
        "prompt_end": None,
        "answer_start": None,
    }

    def __post_init__(self) -> None:
        if self.decoding not in DECODING_RULES:
            raise ValueError(f"decoding {self.decoding!r}: expected one of {', '.join(DECODING_RULES)}")
        if self.question_text not in QUESTION_TEXT_RULES:
            raise ValueError(f"question_text {self.question_text!r}: expected one of {', '.join(QUESTION_TEXT_RULES)}")

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for key, default in self.OPTIONAL_DEFAULTS.items():
            if d.get(key) == default:
                del d[key]
        return d

    def banned_ids(self, vocab: int) -> list[int]:
        """Ids greedy decoding never chooses, for logits over ``vocab`` rows (the family's rule)."""
        if self.decoding == "codi":
            return [vocab - 1]  # CODI's test.py: logits[..., : vocab_size - 1]
        if self.decoding == "coconut":
            return []  # Coconut's generate: a plain argmax
        return sorted(i for i in {self.pad_id, self.bot_id, self.eot_id} if 0 <= i < vocab)

    def eos_stops(self, step: int) -> bool:
        """Does [EOS] chosen at decoding step ``step`` (0 = first answer token) end the answer?"""
        return not (self.decoding == "coconut" and step == 0)

    def question_string(self, question: str) -> str:
        """The question text as the family's evaluation writes it (before ``question_template``)."""
        if self.question_text == "codi":
            return question.strip().replace("  ", " ")  # CODI's test.py, exactly
        if self.question_text == "raw":
            return question  # Coconut: question + "\n" as stored
        return " ".join(question.strip().split())


def build_prj(d_model: int, prj_dim: int | None, layer_norm: bool = True, dropout: float = 0.0) -> nn.Module:
    """CODI's projection ``Dropout -> Linear(d, prj_dim) -> GELU -> Linear(prj_dim, d) [-> ln]``.

    ``prj_dim=None`` gives Coconut's identity. Keys match the official checkpoints:
    ``prj.1.*``, ``prj.3.*``, ``prj.ln.*``. GELU is the exact (erf) one, LayerNorm eps 1e-5.
    """
    if prj_dim is None:
        return nn.Identity()
    prj = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, prj_dim), nn.GELU(), nn.Linear(prj_dim, d_model))
    if layer_norm:
        prj.add_module("ln", nn.LayerNorm(d_model, eps=1e-5))
    return prj


_NUMBER = re.compile(r"-?\d+\.?\d*")


def extract_number(text: str) -> float | None:
    """The reference's answer extraction: last ``-?\\d+\\.?\\d*`` after removing commas."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:
        return None


def format_number(x: Number) -> str:
    """``18.0 -> "18"``, ``2.5 -> "2.5"``: how an answer is written after the prefix."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)
