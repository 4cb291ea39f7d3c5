"""What a continuous-thought model feeds back after each latent step (docs/method.md §1).

After latent step p the model's final hidden state ``h`` [B, d] (after the final norm) becomes
the input embedding of step p + 1 through the model's *feedback* object, ``model.feedback``:

- :class:`ProjectionFeedback` (CODI): ``thought = prj(h)``, CODI's ``Dropout -> Linear -> GELU ->
  Linear [-> LayerNorm]`` (:func:`~latentpatch.model.config.build_prj`). Its state-dict keys are
  the projection's own (``1.*``, ``3.*``, ``ln.*``; ``prj.1.*`` ... in checkpoint files and model
  directories), so every file loads as before, and ``model.prj`` is the same module.
- :class:`IdentityFeedback` (Coconut, GGUF): ``thought = h``. There is no state before the
  feedback that differs from the thought, so no ``thought_pre`` site.

:func:`as_feedback` turns what the loaders build (``build_prj``'s ``nn.Sequential`` or
``nn.Identity``) into one; :func:`feedback_by_name` builds one from the name that
``latentpatch.json`` records.

The seam for other families (a mixture of projections, a Gaussian head that samples the
thought): subclass :class:`Feedback`, give it a new :attr:`Feedback.name`, a ``forward(h [B, d])
-> thought [B, d]`` (a stochastic head decides there how it is made deterministic for patching,
e.g. its mean), and :attr:`Feedback.has_pre_site` True when ``thought_pre`` (``h``) differs from
the thought; then register it in :data:`FEEDBACK_NAMES` and in :func:`feedback_by_name` so model
directories can record and rebuild it. The latent loop
(:meth:`~latentpatch.model.latent.LatentModel.run_thoughts`), the patching engine and training
only call the object, never look inside it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

#: the feedback names ``latentpatch.json`` may record (key ``"feedback"``)
FEEDBACK_NAMES = ("projection", "identity")


class Feedback(nn.Module):
    """Base of the feedback objects: ``forward(h [B, d]) -> thought [B, d]`` (any leading shape
    ``[..., d]`` works), a :attr:`name`, and :attr:`has_pre_site`.

    >>> IdentityFeedback().name, IdentityFeedback().has_pre_site
    ('identity', False)
    """

    #: what ``latentpatch.json`` records ("projection" | "identity")
    name: ClassVar[str] = ""

    @property
    def has_pre_site(self) -> bool:
        """Does a ``thought_pre`` site exist, i.e. is the state before the feedback (the final
        hidden state ``h``) a different value from the thought fed back?"""
        return True

    def feed(
        self, h: torch.Tensor, step: int | Sequence[int], streams: Sequence[int | None] | None = None
    ) -> torch.Tensor:
        """The thought fed at latent ``step`` made from ``h`` [B, d] (the final hidden state before
        it): what the latent loop calls. ``step`` is one int for every row or one per row of ``h``.
        Deterministic feedback ignores it (this default is ``forward(h)``); a random one
        (:mod:`latentpatch.model.mixture`) takes the draws of that step from its seeded stream,
        so a run restarted at step p (the engine's shared prefix) draws what a full run draws.
        ``streams``: each row's draw-stream key (its pair's, :mod:`latentpatch.model.streams`;
        None, or None for a row: the run's one stream); deterministic feedback ignores them too.

        >>> h = torch.ones(2, 4)
        >>> bool(torch.equal(IdentityFeedback().feed(h, 3), h))
        True
        """
        return self(h)

    @property
    def random(self) -> bool:
        """Does :meth:`feed` draw random numbers (so a row's draw stream decides its thoughts)?"""
        return False

    def reseed(self, seed: int) -> None:
        """Start the feedback's random stream from ``seed`` (``--seed``); deterministic feedback
        has none, so this default does nothing."""

    def cache_identity(self) -> str:
        """What, beyond the LM's weights and config, decides this feedback's outputs (its kind,
        settings and seed): part of the activation cache's model key. "" (this default) for
        feedback whose parameters say it all, so the keys of existing models stay as they were."""
        return ""


class ProjectionFeedback(Feedback, nn.Sequential):
    """CODI's feedback: ``prj(h)``. Wraps the ``nn.Sequential`` of
    :func:`~latentpatch.model.config.build_prj` (the same child modules, so the same parameters,
    state-dict keys, indexing ``[1]``/``[3]`` and ``.ln``), and is itself an ``nn.Sequential``.

    >>> from latentpatch.model.config import build_prj
    >>> f = ProjectionFeedback(build_prj(8, 16))
    >>> f.name, f.has_pre_site, sorted(f.state_dict())
    ('projection', True, ['1.bias', '1.weight', '3.bias', '3.weight', 'ln.bias', 'ln.weight'])
    """

    name: ClassVar[str] = "projection"

    def __init__(self, prj: nn.Module | OrderedDict[str, nn.Module]) -> None:
        children = OrderedDict(prj.named_children()) if isinstance(prj, nn.Module) else prj
        nn.Sequential.__init__(self, children)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.Sequential.forward(self, h)

    @property
    def prj_dim(self) -> int:
        """The hidden width of the projection (its first Linear's ``out_features``)."""
        linear = self[1]
        assert isinstance(linear, nn.Linear)
        return int(linear.out_features)

    @property
    def layer_norm(self) -> bool:
        """Does the projection end in a LayerNorm (``prj.ln.*``)?"""
        return "ln" in self._modules


class IdentityFeedback(Feedback, nn.Identity):
    """Coconut's (and GGUF's) feedback: the final hidden state itself. An ``nn.Identity``, so code
    that asks ``isinstance(model.prj, nn.Identity)`` still gets True."""

    name: ClassVar[str] = "identity"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h

    @property
    def has_pre_site(self) -> bool:
        return False


def as_feedback(module: nn.Module) -> Feedback:
    """The feedback object of what a loader built: a :class:`Feedback` as is, ``nn.Identity`` ->
    :class:`IdentityFeedback`, an ``nn.Sequential`` (``build_prj``) -> :class:`ProjectionFeedback`
    (the same child modules: nothing is copied).

    >>> as_feedback(nn.Identity()).name
    'identity'
    """
    if isinstance(module, Feedback):
        return module
    if isinstance(module, nn.Identity):
        return IdentityFeedback().train(module.training)
    if isinstance(module, nn.Sequential):
        return ProjectionFeedback(module).train(module.training)
    raise TypeError(
        f"feedback: expected a Feedback, nn.Identity or build_prj's nn.Sequential, got {type(module).__name__}"
    )


def feedback_by_name(
    name: str, d_model: int, prj_dim: int | None = None, layer_norm: bool = True, dropout: float = 0.0
) -> Feedback:
    """A fresh feedback object of kind ``name`` (``"projection"`` needs ``prj_dim``), as model
    directories rebuild it from ``latentpatch.json``."""
    from latentpatch.model.config import build_prj

    if name == "identity":
        return IdentityFeedback()
    if name == "projection":
        if prj_dim is None:
            raise ValueError("feedback 'projection' needs prj_dim")
        return ProjectionFeedback(build_prj(d_model, prj_dim, layer_norm=layer_norm, dropout=dropout))
    raise ValueError(f"feedback {name!r}: expected one of {', '.join(FEEDBACK_NAMES)}")
