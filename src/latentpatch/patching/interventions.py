"""What a patch does to the rollout, as types the engine dispatches on (docs/method.md §5, §13).

A :class:`~latentpatch.patching.specs.PatchSpec` labels a result row with strings (its
``component``, ``replacement``: the run directory's columns). What the engine *does* with it is
its :attr:`~latentpatch.patching.specs.PatchSpec.intervention`, one of:

- :class:`ActivationPatch`: overwrite a hook site (component x layer) at latent positions with a
  value (``resid_out``, ``attn_out``, ``head_out.h``, ...), through
  :class:`~latentpatch.model.sites.Write`;
- :class:`ThoughtReplacement`: feed a value as continuous thought p instead of what the feedback
  made (site ``thought``), or feed a value *through* the feedback (site ``thought_pre``: the
  state the feedback maps to thought p; CODI's projection input);
- :class:`EarlyExit`: ``[EOT]`` after k thoughts (the early answer S(k)).

and the value it writes is a :class:`Replacement` (the run's kind, or a donor question's thought).
An intervention whose new value is a *function* of the activation (add a steering vector, rotate
and interchange a subspace) goes through :class:`~latentpatch.model.sites.Edit`, the function-valued
counterpart of ``Write`` at the same hook sites.

>>> from latentpatch.patching.specs import PatchSpec
>>> PatchSpec("position", "single", "resid_out", 2, (3,), 3).intervention
ActivationPatch(component='resid_out', layer=2, positions=(3,))
>>> PatchSpec("thought", "single", "thought_pre", -1, (1,), 1, replacement="zero").intervention
ThoughtReplacement(site='thought_pre', positions=(1,))
>>> Replacement.parse("same:2"), Replacement.parse("mean").label
(Replacement(kind='same', intermediate=2), 'mean')
"""

from __future__ import annotations

from dataclasses import dataclass

from latentpatch.names import DONOR_REPLACEMENTS, EARLY_SITE, THOUGHT_SITES


@dataclass(frozen=True)
class ActivationPatch:
    """Overwrite ``component`` at ``layer`` at every latent position in ``positions``."""

    component: str
    layer: int
    positions: tuple[int, ...]


@dataclass(frozen=True)
class ThoughtReplacement:
    """Feed a value as thought p for every p in ``positions``: the value itself (site ``thought``)
    or the feedback of it (site ``thought_pre``); later thoughts are regenerated from it."""

    site: str
    positions: tuple[int, ...]

    @property
    def through_feedback(self) -> bool:
        """True when the value is a state before the feedback (``thought_pre``) and is fed through it."""
        return self.site == THOUGHT_SITES[1]


@dataclass(frozen=True)
class EarlyExit:
    """``[EOT]`` right after thought ``after - 1`` (the early answer S(after); S(K) is the unpatched run)."""

    after: int


Intervention = ActivationPatch | ThoughtReplacement | EarlyExit


def intervention_of(component: str, layer: int, positions: tuple[int, ...]) -> Intervention:
    """The intervention a spec's ``component`` names (the one place that reads it as a kind)."""
    if component in THOUGHT_SITES:
        return ThoughtReplacement(component, positions)
    if component == EARLY_SITE:
        return EarlyExit(positions[0])
    return ActivationPatch(component, layer, positions)


@dataclass(frozen=True)
class Replacement:
    """What a step-level spec feeds: a ``kind`` (``source``, ``zero``, ``mean``, ``step_mean``,
    ``noise``, ``resample``, the vocabulary-space kinds; "" = the run's ``--replacement``) or a donor
    question's thought, ``same`` or ``diff`` intermediate value ``intermediate`` (the ``intermediate``
    experiment); ``number:s`` / ``number_plus1:s`` also name an intermediate (its token's embedding)."""

    kind: str
    intermediate: int | None = None

    @classmethod
    def parse(cls, text: str) -> Replacement:
        """A spec's ``replacement`` string (``"zero"``, ``"same:0"``) as a typed value."""
        kind, sep, index = text.partition(":")
        return cls(kind, int(index)) if sep else cls(kind)

    @property
    def is_donor(self) -> bool:
        """A donor question's thought (``same``/``diff``), not a value of the pair's own runs."""
        return self.intermediate is not None and self.kind in DONOR_REPLACEMENTS

    @property
    def label(self) -> str:
        """The string the run directory's ``replacement`` column holds (inverse of :meth:`parse`)."""
        return self.kind if self.intermediate is None else f"{self.kind}:{self.intermediate}"
