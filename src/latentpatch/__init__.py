"""latentpatch: activation patching on continuous chain-of-thought models (CODI, Coconut).

Pipeline, top-down: ``pairs`` (data) -> ``model`` (the latent rollout) -> ``sites``
(where to read/write activations) -> ``engine`` (batched patch sweeps) -> ``metrics`` ->
``stats`` -> ``report``. The ``cli`` module is a thin layer over these.
"""

from latentpatch.errors import LatentPatchError

__version__ = "0.1.0"

__all__ = ["LatentPatchError", "__version__"]
