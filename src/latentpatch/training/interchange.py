"""Interchange training of the thoughts (not in CODI; ``TrainConfig.thought_swap_rate``).

The auxiliary loss (:mod:`latentpatch.training.objective`) asks the final hidden state at latent
position j to decode to step result j, so the thought fed at position p = j + 1 (``prj`` of that
state) should *hold* result j. Decoding alone does not make the rest of the chain *use* it: a model
can decode the value and still recompute the answer from the question. Interchange training
(Geiger et al., 2022, "Inducing causal structure for interpretable neural networks") makes the
stored value causal: in a fraction of the rows, the thought fed at one position p is replaced by
the thought another row of the batch computed at the same position, and the row is trained on the
*counterfactual* targets, i.e. its program recomputed with step result p − 1 forced to the donor's
value (the answer, and the auxiliary targets of the later positions). A donor whose value equals
the row's own therefore leaves the targets unchanged, and one whose value differs changes them,
which is the behaviour the ``intermediate`` experiment measures (``docs/method.md`` §13).

Rows are swapped at one position per batch, chosen from the torch RNG (so a seeded run is
reproducible); a row whose counterfactual program is invalid (negative, inexact, too large) or
whose donor is itself is not swapped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from latentpatch.data.synthetic import program_results
from latentpatch.training.data import ANSWER_PREFIX, Batch, Codec, latent_values, number_ids


class ThoughtSwap:
    """One batch's interchange: rows, donors, position and the counterfactual targets.

    ``position`` p (1..K-1): the latent position whose fed thought is swapped. ``rows`` [B] bool;
    ``donor`` [B] long (row i is fed ``thought[donor[i], p]``). ``answer_ids``/``answer_labels``
    [B, T_a], ``latent_targets`` [B, K] and ``thought_targets`` [B, K] (see
    :func:`thought_targets`): the batch's, with the swapped rows' counterfactuals.
    """

    def __init__(
        self,
        position: int,
        rows,
        donor,
        answer_ids,
        answer_labels,
        latent_targets,
        thought_targets,
        token_rows=None,
        token_ids=None,
    ):
        self.position, self.rows, self.donor = position, rows, donor
        self.answer_ids, self.answer_labels = answer_ids, answer_labels
        self.latent_targets, self.thought_targets = latent_targets, thought_targets
        self.token_rows, self.token_ids = token_rows, token_ids  # [B] bool, [B] long: fed a number token

    def apply(self, step: int, thought: torch.Tensor, embed: torch.nn.Module | None = None) -> torch.Tensor:
        """The thought to feed at latent ``step`` ([B, d] or [B, 1, d] in, the same shape out): a
        step hook of :meth:`~latentpatch.model.latent.LatentModel.run_thoughts` as it stands, or
        with ``functools.partial(swap.apply, embed=...)``. ``embed`` (the model's token embedding):
        for the rows fed the donor value's token."""
        if step != self.position:
            return thought
        rows = (-1,) + (1,) * (thought.dim() - 1)  # [B, 1] or [B, 1, 1]
        fed = torch.where(self.rows.view(rows), thought[self.donor], thought)
        if self.token_rows is None or embed is None:
            return fed
        token = embed(self.token_ids).view(thought.shape)  # at the row's own thought's norm
        token = token * (thought.norm(dim=-1, keepdim=True) / token.norm(dim=-1, keepdim=True))
        return torch.where(self.token_rows.view(rows), token, fed)


def thought_targets(latent_targets: torch.Tensor) -> torch.Tensor:
    """[B, K] token ids the fed thoughts should hold: thought q = ``prj`` of latent position q-1's
    final state, so it holds that position's value; thought 0 (``prj`` of ``<bot>``) holds none (-100).

    >>> thought_targets(torch.tensor([[5, 6, 7]]))
    tensor([[-100,    5,    6]])
    """
    out = torch.full_like(latent_targets, -100)
    out[:, 1:] = latent_targets[:, :-1]
    return out


class Counterfactual(NamedTuple):
    """Row i's latent values [K] and answer after forcing step result ``step`` to ``value``."""

    values: list[int]
    answer: int


def counterfactual(program, step: int, value: int, num_latent: int) -> Counterfactual | None:
    """The values a row's thoughts should hold and its answer when step result ``step`` is
    ``value`` (past the last step, the thoughts hold the answer, so the answer becomes ``value``);
    None when the recomputed program is invalid.

    >>> counterfactual([("add", 2, 3), ("mul", "#0", 4)], 0, 6, 4)
    Counterfactual(values=[6, 24, 24, 24], answer=24)
    >>> counterfactual([("add", 2, 3)], 2, 7, 4)
    Counterfactual(values=[5, 5, 7, 7], answer=7)
    """
    results = program_results(program)
    if results is None:
        return None
    if step >= len(results):  # the thought holds the answer: later positions copy the new value
        values = latent_values(results, num_latent)
        values[step:] = [value] * (num_latent - step)
        return Counterfactual(values, value)
    forced = program_results(program, forced={step: value})
    if forced is None:
        return None
    return Counterfactual(latent_values(forced, num_latent), forced[-1])


def plan_swap(
    b: Batch,
    codec: Codec,
    rate: float,
    num_latent: int,
    same_value: float = 0.0,
    positions: list[int] | None = None,
    token_rate: float = 0.0,
) -> ThoughtSwap | None:
    """Pick the position, rows and donors of one batch (torch RNG) and their counterfactual targets.

    ``same_value``: the fraction of swapped rows whose donor is re-drawn among the rows that hold the
    same value at the swapped thought (their targets stay the row's own), so that what the thought
    holds besides its value is trained not to matter; with 0 no extra random numbers are drawn.
    ``positions``: the thoughts that may be swapped (default 1..K-1; the same draw either way).
    ``token_rate``: the fraction of swapped rows fed the donor value's number-token embedding
    instead of the donor's thought (same targets), so that a position learns to compute from a
    value it is fed; with 0 no extra random numbers are drawn."""
    n = b.q_ids.size(0)
    if rate <= 0 or n < 2 or num_latent < 2 or b.latent_targets is None:
        return None
    allowed = positions or list(range(1, num_latent))
    position = allowed[int(torch.randint(0, len(allowed), ()))]
    donor = torch.randperm(n)
    chosen = torch.rand(n) < rate
    if same_value > 0:
        donor = same_value_donors(b, donor, position - 1, same_value, num_latent)
    rows = torch.zeros(n, dtype=torch.bool)
    answer_ids, answer_labels = b.a_ids.clone(), b.a_labels.clone()
    targets = b.latent_targets.clone()
    thoughts = thought_targets(b.latent_targets)
    number_at = 1 + len(codec.encode(ANSWER_PREFIX))  # <eot> prefix N <eos>: N's index
    token_ids = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        j = int(donor[i])
        if not chosen[i] or j == i:
            continue
        donor_values = latent_values(program_results(b.programs[j]) or [0], num_latent)
        cf = counterfactual(b.programs[i], position - 1, donor_values[position - 1], num_latent)
        answer_id = number_ids([cf.answer], codec)[0] if cf else -100
        if cf is None or answer_id < 0:
            continue
        rows[i] = True
        answer_ids[i, number_at] = answer_labels[i, number_at] = answer_id
        cf_ids = torch.tensor(number_ids(cf.values, codec))
        targets[i, position:] = cf_ids[position:]
        thoughts[i, position:] = cf_ids[position - 1 : -1]  # the swapped thought holds the donor's value
        token_ids[i] = cf_ids[position - 1]
    if not rows.any():
        return None
    token_rows = rows & (torch.rand(n) < token_rate) if token_rate > 0 else None
    return ThoughtSwap(position, rows, donor, answer_ids, answer_labels, targets, thoughts, token_rows, token_ids)


def same_value_donors(b: Batch, donor: torch.Tensor, step: int, fraction: float, num_latent: int) -> torch.Tensor:
    """``donor`` [B] with a ``fraction`` of rows (torch RNG) re-drawn among the other rows whose
    step result ``step`` equals theirs; rows without such a partner keep their donor."""
    values = [latent_values(program_results(p) or [0], num_latent)[step] for p in b.programs]
    redraw = torch.rand(len(values)) < fraction
    picks = torch.rand(len(values))  # one uniform per row: index into its partners
    out = donor.clone()
    for i, v in enumerate(values):
        partners = [j for j, w in enumerate(values) if w == v and j != i]
        if redraw[i] and partners:
            out[i] = partners[min(int(picks[i] * len(partners)), len(partners) - 1)]
    return out
