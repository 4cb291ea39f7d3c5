"""Training data: the tokenizer, the teacher/student sequences of a batch, the training pool.

Sequences (``remove_eos=True``, no BOS; ``<bot>``/``<eot>`` as in CODI):

* teacher: ``question <bot> CoT <eot> The answer is: N <eos>``, CE on ``CoT <eot> answer <eos>``.
* student: ``question <bot>``, K continuous thoughts, ``<eot> The answer is: N <eos>``; the question
  part is left-padded (every row's ``<bot>`` at the same index), the answer part right-padded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from latentpatch.training.config import TrainConfig

ANSWER_PREFIX = "The answer is: "
SPECIAL = {"eos": "<eos>", "pad": "<pad>", "bot": "<bot>", "eot": "<eot>"}

NUMBER_TOKENS_UP_TO = 200
"""Every integer 0..NUMBER_TOKENS_UP_TO is a single token (see :func:`train_tokenizer`)."""


# --------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
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
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
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
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` of a model directory.

    Written by hand rather than with ``save_pretrained``: transformers 5 would name its own
    ``TokenizersBackend`` class, which the transformers 4.x this package supports cannot load.
    """
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
    def from_dir(cls, path) -> Codec:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(path) / "tokenizer.json")))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def normalize_question(q: str) -> str:
    return " ".join(q.strip().split())


# --------------------------------------------------------------------------------------------
# batching


@dataclass
class Batch:
    """One training batch. B rows; T_t, T_q, T_a = padded teacher, question and answer lengths."""

    # teacher (right-padded)
    t_ids: torch.Tensor  # [B, T_t]
    t_mask: torch.Tensor  # [B, T_t]
    t_labels: torch.Tensor  # [B, T_t], -100 on the question
    t_distill: torch.Tensor  # [B] index of the distillation position
    # student question (left-padded, ends with <bot>)
    q_ids: torch.Tensor  # [B, T_q]
    q_mask: torch.Tensor  # [B, T_q]
    # student answer part (<eot> The answer is: N <eos>), right-padded
    a_ids: torch.Tensor  # [B, T_a]
    a_mask: torch.Tensor  # [B, T_a]
    a_labels: torch.Tensor  # [B, T_a]
    a_distill: torch.Tensor  # [B] index in the answer part of the distillation position
    # auxiliary latent targets: token id of step result j (answer for j >= n_steps), [B, K]
    latent_targets: torch.Tensor | None = None
    # the problems' programs (for counterfactual targets, training/interchange.py)
    programs: tuple = ()


def pad_rows(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """[len(seqs), longest] long tensor, each row padded with ``value`` on the right (or left)."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _ones(seqs: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    """The attention mask of :func:`pad_rows` ``(seqs, ...)``: 1 on the tokens, 0 on the padding."""
    return pad_rows([[1] * len(s) for s in seqs], 0, left=left)


def step_results(program) -> list[int]:
    """The result of every step of a (valid) program: step i's result is the value of its prefix."""
    from latentpatch.data.synthetic import evaluate_program

    return [evaluate_program(program[: i + 1]) for i in range(len(program))]


def latent_values(results: Sequence[int], num_latent: int) -> list[int]:
    """The value latent position j < K should hold: step result j, the answer once the program has
    no more steps."""
    return (list(results) + [results[-1]] * num_latent)[:num_latent]


def number_ids(values: Sequence[int], codec: Codec) -> list[int]:
    """The token id of each value; -100 where a value is not a single token."""
    ids = [codec.encode(str(v)) for v in values]
    return [i[0] if len(i) == 1 else -100 for i in ids]


def latent_targets(program, codec: Codec, num_latent: int) -> list[int]:
    """Token id of step result j for each latent position j < K (the answer once the program has
    no more steps); -100 where a result is not a single token."""
    return number_ids(latent_values(step_results(program), num_latent), codec)


def is_chain(program) -> bool:
    """Every step after the first reads the step right before it and no other step (``#j-1`` only)."""
    refs = [[int(x[1:]) for x in (a, b) if isinstance(x, str)] for _, a, b in program]
    return all(r == ([j - 1] if j else []) for j, r in enumerate(refs))


def spent_numbers(program, num_latent: int) -> list[set[int]]:
    """For each latent position j < K: the question numbers that only steps before j read (the
    literal operands of steps < j that no step >= j reads), i.e. what a position j needs only to
    recompute earlier results. Past the last step every literal is spent.

    >>> [sorted(s) for s in spent_numbers([("sub", 16, 3), ("mul", "#0", 2)], 3)]
    [[], [3, 16], [2, 3, 16]]
    """
    literals = [{x for x in (a, b) if not isinstance(x, str)} for _, a, b in program]
    out = []
    for j in range(num_latent):
        before = set().union(*literals[:j])
        out.append(before - set().union(*literals[j:]))
    return out


def spent_columns(q_ids: torch.Tensor, programs: Sequence, codec: Codec, num_latent: int) -> torch.Tensor:
    """[B, K, T_q] bool: the question columns (of left-padded ``q_ids`` [B, T_q]) holding a number
    token that :func:`spent_numbers` lists for latent position j; all False in a row whose program
    is not a chain (:func:`is_chain`: a step reading an older result needs its operands)."""
    value_of = {codec.encode(str(n))[0]: n for n in range(NUMBER_TOKENS_UP_TO + 1)}
    out = torch.zeros(q_ids.size(0), num_latent, q_ids.size(1), dtype=torch.bool)
    for i, program in enumerate(programs):
        if not is_chain(program):
            continue
        values = [value_of.get(int(t), -1) for t in q_ids[i]]
        for j, spent in enumerate(spent_numbers(program, num_latent)):
            out[i, j] = torch.tensor([v in spent for v in values])
    return out


def make_batch(problems, codec: Codec, num_latent: int = 0) -> Batch:
    """Teacher and student sequences of ``problems``; ``num_latent`` > 0 adds the latent targets."""
    prefix = codec.encode(ANSWER_PREFIX)
    t_ids, t_lab, t_dis, q_ids, a_ids, a_dis, lat = [], [], [], [], [], [], []
    for p in problems:
        if num_latent:
            lat.append(latent_targets(p.program, codec, num_latent))
        q = codec.encode(normalize_question(p.question)) + [codec.bot_id]
        cot = codec.encode(" " + p.cot) if not p.cot.startswith(" ") else codec.encode(p.cot)
        num = codec.encode(str(p.answer))
        ans = [codec.eot_id] + prefix + num + [codec.eos_id]
        t = q + cot + ans
        t_ids.append(t)
        t_lab.append([-100] * len(q) + t[len(q) :])  # shifted inside the loss
        t_dis.append(len(q) + len(cot) + len(prefix))  # index of the last prefix token
        q_ids.append(q)
        a_ids.append(ans)
        a_dis.append(len(prefix))
    return Batch(
        t_ids=pad_rows(t_ids, codec.pad_id),
        t_mask=_ones(t_ids),
        t_labels=pad_rows(t_lab, -100),
        t_distill=torch.tensor(t_dis),
        q_ids=pad_rows(q_ids, codec.pad_id, left=True),
        q_mask=_ones(q_ids, left=True),
        a_ids=pad_rows(a_ids, codec.pad_id),
        a_mask=_ones(a_ids),
        a_labels=pad_rows(a_ids, -100),
        a_distill=torch.tensor(a_dis),
        latent_targets=torch.tensor(lat) if num_latent else None,
        programs=tuple(p.program for p in problems),
    )


def training_pool(cfg: TrainConfig) -> list:
    """``generate_problems(train_pool, data_seed)`` without the questions of the shipped default
    pairs, so that ``eval`` measures the pairs on questions the model never saw."""
    from latentpatch.data.pairs import load_pairs
    from latentpatch.data.synthetic import generate_problems
    from latentpatch.pipeline.selection import default_pairs_path

    pairs = load_pairs(default_pairs_path())
    held_out = {normalize_question(v.question) for p in pairs for v in (p.clean, p.corrupted)}
    problems = generate_problems(cfg.train_pool, cfg.data_seed)
    return [p for p in problems if normalize_question(p.question) not in held_out]
