"""``TrainConfig``: every option of ``latentpatch train``, declared once with its help text.

The defaults are stage 1 of the shipped default model's recipe (``src/latentpatch/default_model/README.md``);
``scripts/train_default.sh`` runs stages 2-4 from it with ``--init-from``.
The CLI generates ``train``'s options from these fields (``cli_options.with_options``), so this
module imports no torch and ``latentpatch train --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from latentpatch.errors import LatentPatchError
from latentpatch.pipeline.options import option

NUMBER_INITS: tuple[str, ...] = ("random", "fourier")


@dataclass
class TrainConfig:
    # schedule
    steps: int = option(3000, "Optimizer steps (the cosine schedule is planned for this many).")
    seed: int = option(0, "Seed of the init, the batch order and the training-only randomness.")
    batch_size: int = option(32, "Problems per optimizer step.")
    lr: float = option(4e-3, "Peak learning rate (AdamW; linear warmup, cosine decay to 5%).")
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only).")
    warmup: int = option(50, "Warmup steps.")
    grad_clip: float = option(1.0, "Gradient-norm clip.")
    teacher_only_steps: int = option(300, "Curriculum: the first steps train the teacher task only.")
    stop_after: int = option(0, "Stop after this step (the schedule is still planned for --steps); 0 = run all.")
    init_from: str = option("", "Continue from a saved model directory (its architecture and tokenizer).")
    # architecture (a LLaMA from scratch + CODI's projection)
    layers: int = option(4, "Transformer layers.")
    d_model: int = option(128, "Hidden width.")
    heads: int = option(4, "Attention heads (must divide --d-model).")
    d_ff: int = option(384, "MLP width.")
    prj_dim: int = option(256, "Width of the projection's hidden layer.")
    prj_dropout: float = option(0.0, "Dropout inside the projection.")
    num_latent: int = option(6, "Continuous thoughts K.")
    vocab_size: int = option(1000, "BPE vocabulary size (every integer 0..200 is one token).")
    number_init: str = option("fourier", "random | fourier: number tokens start with sin/cos features of their value.")
    # objective
    distill_factor: float = option(20.0, "Weight of CODI's hidden-state distillation.")
    ref_factor: float = option(1.0, "Weight of the teacher's CE.")
    latent_aux_factor: float = option(
        1.0, "Weight of the auxiliary loss: latent position j decodes to step result j (not in CODI)."
    )
    thought_aux_factor: float = option(
        1.0, "Weight of the auxiliary loss: fed thought q, read as a token embedding, is step result q-1 (not in CODI)."
    )
    answer_blind_rate: float = option(
        0.5, "Fraction of rows whose answer tokens cannot attend to the question (they must read the thoughts)."
    )
    thought_isolate_rate: float = option(
        0.0, "Fraction of rows whose latent positions see only the question and their own thought."
    )
    hide_spent_numbers: bool = option(
        False, "In those rows, latent position j also cannot see the question numbers only earlier steps read."
    )
    thought_swap_rate: float = option(
        0.5, "Interchange training: fraction of rows fed another row's thought, trained on the counterfactual."
    )
    swap_positions: str = option(
        "", "Comma list of the thoughts p (1..K-1) interchange may swap (default: all of them)."
    )
    swap_same_value: float = option(
        0.25, "Of the swapped rows, the fraction given a donor holding the same value (where the batch has one)."
    )
    swap_token_rate: float = option(
        0.5,
        "Of the swapped rows, the fraction fed the donor value's number-token embedding (at the thought's norm) "
        "instead of the donor's thought.",
    )
    thought_match_factor: float = option(
        1.0, "Weight of 1 - cos(fed thought q, token embedding of step result q-1) (not in CODI)."
    )
    # data and machine
    data_seed: int = option(1, "Seed of the training pool of synthetic problems.")
    train_pool: int = option(200_000, "Problems generated for the pool (less the default pairs' questions).")
    tokenizer_corpus: int = option(20_000, "Problems the tokenizer is trained on.")
    threads: int = option(2, "CPU threads (the same count reproduces a run bit for bit on the same machine).")
    log_every: int = option(10, "Steps between lines of train_log.jsonl.")
    max_answer_tokens: int = option(16, "Answer tokens the saved model decodes at most.")
    ckpt_every: int = option(0, "Save an intermediate model to <out>_ckpt every N steps (0 = never).")

    def validate(self) -> None:
        """One line naming the option and the fix for a value that cannot train."""
        positive = ("steps", "batch_size", "layers", "d_model", "heads", "d_ff", "prj_dim", "num_latent", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise LatentPatchError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.d_model % self.heads:
            raise LatentPatchError(f"--d-model {self.d_model} must be divisible by --heads {self.heads}")
        if self.number_init not in NUMBER_INITS:
            raise LatentPatchError(f"--number-init {self.number_init!r}: use {' or '.join(NUMBER_INITS)}")
        allowed = [str(p) for p in range(1, self.num_latent)]
        if any(p.strip() not in allowed for p in self.swap_positions.split(",") if self.swap_positions):
            raise LatentPatchError(f"--swap-positions {self.swap_positions!r}: use a comma list of {','.join(allowed)}")
        rates = (
            "answer_blind_rate",
            "thought_isolate_rate",
            "thought_swap_rate",
            "swap_same_value",
            "swap_token_rate",
            "prj_dropout",
        )
        for name in rates:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise LatentPatchError(f"--{name.replace('_', '-')} {getattr(self, name)}: use a value in [0, 1]")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
