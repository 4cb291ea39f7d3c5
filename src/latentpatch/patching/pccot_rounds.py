"""Thought-level patching of PCCoT with the round chosen (docs/method.md "SIM-CoT and PCCoT").

A PCCoT thought is a slot's input in one Jacobi round, so a thought site is (round, slot). For
one pair and the rounds asked, every cell replaces the target run's slot input at (round, slot)
by the source run's input at the same (round, slot) and reads the answer: one
:meth:`~latentpatch.model.pccot.PCCoTModel.parallel_rollout` per round, its N rows the N slots
(a row's numbers do not depend on the batch: every pass keeps the mask). The metric is the
answer's log-probability difference LD = log p(A_clean) - log p(A_corrupted) (teacher-forced,
summed over the number's tokens) and recovery = (LD_patched - LD_target) / (LD_source - LD_target),
as the engine's ``answer_logprob_diff`` and ``recovery`` (:mod:`latentpatch.patching.metrics`).

This runs from Python; ``latentpatch run`` patches the slots of one round, ``--pccot-round``
(:meth:`~latentpatch.model.pccot.PCCoTModel.run_thoughts`, docs/method.md "Every experiment on the rounds").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentpatch.errors import LatentPatchError
from latentpatch.model.pccot import ParallelRollout, PCCoTModel
from latentpatch.patching.metrics import answer_logprob, recovery


def _ld(model: PCCoTModel, r: ParallelRollout, answers: Sequence[tuple[list[int], int]]) -> list[float]:
    """LD of every row of ``r``: log p(A_clean) - log p(A_corrupted) (each from its number's first token)."""
    (clean, c0), (corr, r0) = answers
    rows = r.answer_logits.shape[0]
    scored = model.score(r.state, r.answer_logits, [[clean, corr]] * rows)
    return [answer_logprob(s[0], clean, c0) - answer_logprob(s[1], corr, r0) for s in scored]


@torch.no_grad()
def round_thought_sweep(
    model: PCCoTModel,
    target: Sequence[int],
    source: Sequence[int],
    clean_answer: float | str,
    corrupted_answer: float | str,
    rounds: Sequence[int] | None = None,
) -> list[dict[str, float | int]]:
    """One cell per (round, slot) of ``rounds`` (default: every round 1..T) x the N slots: the
    target prompt's run with slot ``slot``'s input at round ``round`` taken from the source
    prompt's run (prompts: question ids + [BOT]). Each cell: ``round``, ``slot``,
    ``answer_logprob_diff``, ``recovery``.

    >>> from latentpatch.model.loaders import random_model
    >>> base = random_model("gpt2", num_latent=2)
    >>> m = PCCoTModel(base.lm, base.prj, base.config, base.tokenizer, rounds=2, latent_id=65)
    >>> bot = m.config.bot_id
    >>> cells = round_thought_sweep(m, [49, 50, bot], [51, 50, bot], 3, 4, rounds=[2])
    >>> [(c["round"], c["slot"]) for c in cells]
    [(2, 0), (2, 1)]
    """
    T, N = model.rounds, model.num_latent
    chosen = list(range(1, T + 1)) if rounds is None else [int(r) for r in rounds]
    if not chosen or any(not 1 <= r <= T for r in chosen):
        raise LatentPatchError(f"PCCoT rounds {chosen}: a thought lives in rounds 1..{T}; fix: choose among them")
    answers = [model.answer_ids(clean_answer), model.answer_ids(corrupted_answer)]
    src = model.parallel_rollout([list(source)])
    tgt = model.parallel_rollout([list(target)])
    ld_source, ld_target = _ld(model, src, answers)[0], _ld(model, tgt, answers)[0]
    every = torch.eye(N, dtype=torch.bool, device=model.device)  # row j patches slot j

    cells: list[dict[str, float | int]] = []
    for r in chosen:
        value = src.thoughts[0, r - 1]  # [N, d] the source's inputs of round r

        def hook(at: int, slots: torch.Tensor, r: int = r, value: torch.Tensor = value) -> torch.Tensor:
            return torch.where(every[:, :, None], value[None].to(slots.dtype), slots) if at == r else slots

        patched = model.parallel_rollout([list(target)] * N, round_hook=hook)
        for slot, ld in enumerate(_ld(model, patched, answers)):
            cells.append(
                {"round": r, "slot": slot, "answer_logprob_diff": ld, "recovery": recovery(ld, ld_target, ld_source)}
            )
    return cells
