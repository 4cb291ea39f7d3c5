"""Where a patched run's family rule would end its latent phase (docs/method.md §22).

A family with a stop rule (:mod:`latentpatch.model.stops`: CoLaR's sampled ``###``, Soft
Thinking's ``</think>``) runs each pair with its target run's own latent count K (``--latent-count
target``) or ``--num-latent`` (``fixed``). A patch may change where the rule fires. The engine
keeps K for every patched run (``--patched-stop keep``: the sites stay comparable) and records,
per cell, where the rule fires in the patched run (:data:`~latentpatch.names.STOP_COLUMNS`):

- :func:`primed_observer`: a :class:`~latentpatch.model.stops.StopObserver` over a chunk's rows
  that has already seen the target's own steps before the chunk's restart point (those steps are
  the target's, unpatched: a stateful rule's memory and an earlier firing come from them);
- :func:`stop_columns`: the cell columns from the observer's first firing steps.

With ``--patched-stop rule`` the cells whose rule fires elsewhere are computed again by
:func:`~latentpatch.patching.engine.rule_stopped_cells`: one plain hooked rollout per cell, run
to the cap, cut after the rule's count and answered there (the reference engine's path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentpatch.model.latent import LatentModel
from latentpatch.model.stops import StopObserver, stop_rule_of
from latentpatch.names import LATENT_COUNT, RULE_LATENTS, STOPS_ELSEWHERE
from latentpatch.patching.baselines import PairBaseline


def primed_observer(model: LatentModel, rows: Sequence[PairBaseline], start: int) -> StopObserver | None:
    """An observer for a batch whose row b continues ``rows[b]``'s target from latent ``start``,
    fed the target's own final hidden states of steps ``0..start-1`` first; None when the model's
    family has no stop rule."""
    rule = stop_rule_of(model)
    if rule is None:
        return None
    observer = StopObserver(model, rule, len(rows), [b.stream for b in rows])  # each row's pair's draws (§21)
    observer.prompt(torch.stack([_thought_pre(b)[0] for b in rows]).to(model.device))  # the prompt's last h
    for step in range(start):  # h of step j is what thought j + 1 was made from (RunRecord.thought_pre)
        h = torch.stack([_thought_pre(b)[step + 1] for b in rows]).to(model.device)  # [B, d]
        observer(step, h)
    return observer


def _thought_pre(base: PairBaseline) -> torch.Tensor:
    pre = base.target.thought_pre
    if pre is None:
        raise ValueError(f"pair {base.pair_id}: its target record has no thought_pre (needed by the stop rule)")
    return pre


def stop_columns(observer: StopObserver, K: int, cap: int | None = None) -> list[dict[str, int | bool]]:
    """Per row: ``latent_count`` K, ``rule_latents`` (the rule's count within K latents, -1 when
    it did not fire by latent K - 1) and ``stops_elsewhere`` (the rule's count is not K; a run at
    the cap ``cap`` that never fired stops where it is)."""
    out = []
    for count in observer.first.tolist():
        same = count == K or (count == -1 and cap is not None and K >= cap)
        out.append({LATENT_COUNT: K, RULE_LATENTS: count, STOPS_ELSEWHERE: not same})
    return out
