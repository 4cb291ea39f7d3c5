"""Text <-> token ids of a continuous-thought model: questions, prompts, answer strings, and the
thoughts read as tokens (the CODI paper's probe).

:class:`TextIds` is the part of :class:`~latentpatch.model.latent.LatentModel` that turns text into
the ids its rollout feeds and back, by the family's rules in ``LatentConfig`` (question template and
text rule, the separators after the question and after the thoughts, the answer prefix). It needs
``tokenizer`` and ``config`` from the class it is mixed into (declared below for type checking).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from latentpatch.model.config import LatentConfig, Number, format_number
from latentpatch.model.state import Rollout


class TextIds:
    """Questions, prompts and answer strings as ids (a mixin of ``LatentModel``)."""

    tokenizer: Any
    config: LatentConfig

    if TYPE_CHECKING:

        def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...  # LatentModel's: the LM head, fp32

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids instead of text")
        return self.tokenizer

    def question_ids(self, question: str) -> list[int]:
        """Token ids of a question, its text written by the family's rule (``LatentConfig.question_text``)."""
        tok = self._require_tokenizer()
        text = self.config.question_template.format(question=self.config.question_string(question))
        return list(tok(text, add_special_tokens=self.config.add_special_tokens)["input_ids"])

    def prompt_ids(self, question: str | Sequence[int]) -> list[int]:
        """Question ids + separators: ``[BOT]`` (``[EOS] [BOT]`` when ``remove_eos`` is False)."""
        ids = self.question_ids(question) if isinstance(question, str) else list(question)
        if self.config.prompt_end is not None:  # a family whose prompt ends in other tokens (mixtures)
            return ids + list(self.config.prompt_end)
        return ids + ([] if self.config.remove_eos else [self.config.eos_id]) + [self.config.bot_id]

    def answer_start_ids(self) -> list[int]:
        """Tokens fed after the thoughts: ``[EOT]`` (+ ``[EOS]`` when ``remove_eos`` is False)."""
        if self.config.answer_start is not None:  # e.g. the ids of "</think>" (mixtures)
            return list(self.config.answer_start)
        return [self.config.eot_id] + ([] if self.config.remove_eos else [self.config.eos_id])

    def answer_ids(self, answer: Number | str) -> tuple[list[int], int]:
        """Ids of ``answer_prefix + answer`` and the index of its first *number* token.

        The number starts at the first token whose text holds a digit or a minus sign (BPE may
        merge the space before a number into it, so the split is found on tokens, not text).
        """
        tok = self._require_tokenizer()
        text = answer if isinstance(answer, str) else format_number(answer)
        ids = list(tok(self.config.answer_prefix + text, add_special_tokens=False)["input_ids"])
        return ids, self.number_start(ids)

    def number_start(self, ids: Sequence[int]) -> int:
        tok = self._require_tokenizer()
        for i, t in enumerate(ids):
            piece = tok.decode([t])
            if any(ch.isdigit() or ch == "-" for ch in piece):
                return i
        return len(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._require_tokenizer().decode(list(ids), skip_special_tokens=True)

    @torch.no_grad()
    def decode_thoughts(self, rollout: Rollout, k: int = 5) -> list[list[list[tuple[str, float]]]]:
        """The CODI paper's probe: top-k vocabulary tokens of each thought through the LM head.

        Thought p is decoded from the final hidden state it was projected from. Returns
        ``[b][p] -> [(token_text, probability), ...]``.
        """
        probs = torch.softmax(self.logits(rollout.thought_source_hidden()), -1)
        top = probs.topk(k, dim=-1)
        tok = self.tokenizer
        result = []
        for b in range(probs.shape[0]):
            rows = []
            for p in range(probs.shape[1]):
                ids = top.indices[b, p].tolist()
                names = [tok.decode([i]) if tok is not None else str(i) for i in ids]
                rows.append(list(zip(names, top.values[b, p].tolist(), strict=True)))
            result.append(rows)
        return result
