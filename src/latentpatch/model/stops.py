"""Rules that end a family's latent phase: per-pair latent counts (docs/method.md §22).

CODI and Coconut run a fixed number of latents. Other families end the latent phase by a rule
read after each latent step: CoLaR samples a token and stops on ``###``; Soft Thinking stops
when the top-1 id is ``</think>``'s or after a run of low-entropy steps (the cold stop). A
:class:`StopRule` is that rule, owned by the model's feedback (``model.feedback.stop_rule``;
None: a fixed count). It is read, never run as a second loop: :func:`rule_latent_counts` drives
the one latent loop (:meth:`~latentpatch.model.latent.LatentModel.run_thoughts`) with an
``observe`` callback that asks the rule after every step.

Convention (CoLaR's, which counts the latent whose step fired): the rule is asked after latent
step ``p`` with the LM head's logits [B, V] at that step's final hidden state; if it fires the
row's latent phase has ``p + 1`` latents. A rule that never fires gives ``max_latent``.

>>> rule = FirstIdStop(token_id=2)
>>> memory = rule.begin(2)
>>> rule.fires(torch.tensor([[0.0, 1.0, 5.0], [3.0, 0.0, 0.0]]), 0, memory).tolist()
[True, False]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch


class StopRule:
    """Decides after each latent step whether a row's latent phase ends there.

    ``begin(batch)`` gives the rule's per-run memory (a stateful rule, e.g. the cold stop's count
    of low-entropy steps, keeps it there); ``fires(logits [B, V], step, memory, streams)`` gives
    [B] bool. ``streams``: the rows' draw-stream keys for a random rule (their pairs',
    :mod:`latentpatch.model.streams`; None: the run's stream).
    """

    #: what the manifest records
    name: ClassVar[str] = ""
    #: is the rule also asked at the prompt's last position (``step`` -1; firing there: 0 latents)?
    #: Soft Thinking's official loop checks it (the first output token may be ``</think>``); CoLaR's
    #: and J1mL1's loops check only after a latent.
    checks_prompt: bool = False

    def begin(self, batch: int) -> dict[str, Any]:
        return {}

    def fires(
        self, logits: torch.Tensor, step: int, memory: dict[str, Any], streams: Sequence[int] | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the manifest and the report."""
        return self.name


class FirstIdStop(StopRule):
    """Stop when the top-1 id of the step's logits is ``token_id`` (a deterministic rule; Soft
    Thinking's ``</think>`` rule is one with that token's id)."""

    name: ClassVar[str] = "first_id"

    def __init__(self, token_id: int) -> None:
        self.token_id = int(token_id)

    def fires(
        self, logits: torch.Tensor, step: int, memory: dict[str, Any], streams: Sequence[int] | None = None
    ) -> torch.Tensor:
        return logits.argmax(-1) == self.token_id

    def describe(self) -> str:
        return f"{self.name}(id {self.token_id})"


def stop_rule_of(model: Any) -> StopRule | None:
    """The model's stop rule (its feedback's ``stop_rule``), None for a fixed-count family."""
    rule = getattr(model.feedback, "stop_rule", None)
    return rule if isinstance(rule, StopRule) else None


class StopObserver:
    """The ``observe(step, h [B, d])`` callback of :meth:`~latentpatch.model.latent.LatentModel.run_thoughts`
    that asks ``rule`` after each step and keeps each row's latent count at the first firing
    (``first`` [B]: step + 1, 0 at the prompt position ``step`` -1; -1: not fired yet). A run
    restarted at a patch is given the steps before it first (:mod:`latentpatch.patching.stop_cells`)."""

    def __init__(
        self,
        model: Any,
        rule: StopRule,
        batch: int,
        streams: Sequence[int | None] | None = None,
        memory: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.rule, self.streams = model, rule, streams
        self.memory = rule.begin(batch) if memory is None else memory
        self.first = torch.full((batch,), -1, dtype=torch.long)

    def __call__(self, step: int, h: torch.Tensor) -> None:
        keys = cast("Sequence[int] | None", self.streams)  # a None key: that row reads the run's stream
        fired = self.rule.fires(self.model.logits(h), step, self.memory, keys).cpu()
        self.first = torch.where((self.first < 0) & fired, torch.full_like(self.first, step + 1), self.first)

    def prompt(self, h: torch.Tensor) -> None:
        """Ask a rule that :attr:`StopRule.checks_prompt` at the prompt's last position (``h`` [B, d])."""
        if self.rule.checks_prompt:
            self(-1, h)

    def counts(self, max_latent: int) -> list[int]:
        """Each row's latent count: where the rule first fired, ``max_latent`` where it never did."""
        return [int(f) if f >= 0 else int(max_latent) for f in self.first.tolist()]


@torch.no_grad()
def rule_latent_counts(
    model: Any, prompts: Sequence[Sequence[int]], max_latent: int, streams: Sequence[int | None] | None = None
) -> list[int]:
    """Each prompt's latent count by the model's stop rule (0..``max_latent``; 0 only for a rule
    that checks the prompt position): the unpatched
    loop run to ``max_latent`` steps, the rule asked after each. A fixed-count family (no rule)
    gives ``max_latent`` for every prompt. Rows are independent (masks and position ids skip the
    padding; ``streams[b]``: row b's draw-stream key, its pair's), so a batch gives each prompt's
    count alone.

    >>> from latentpatch.model.loaders import random_model
    >>> rule_latent_counts(random_model("gpt2", num_latent=3), [[5, 6, 7]], 3)
    [3]
    """
    rule = stop_rule_of(model)
    if rule is None:
        return [int(max_latent)] * len(prompts)
    state, h = model.prefill(prompts, streams=streams)
    observer = StopObserver(model, rule, len(prompts), state.streams)
    observer.prompt(h)
    model.run_thoughts(
        state, model.feedback.feed(h, 0, state.streams), 0, stop=max_latent, observe=observer, next_thought=False
    )
    return observer.counts(max_latent)
