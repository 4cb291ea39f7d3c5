"""Steering (docs/method.md §16): add alpha x a direction at one site, through the loop, beside random
directions of the same norm.

A steering spec adds ``alpha * scale * v`` to ``component`` at ``layer`` at one thought position p,
where ``v`` is a unit direction *of that site* (the site names component, layer and position once, so
a direction can only be added where it was computed: the research code's mistake of taking a
direction at one layer and adding it at another cannot be written) and ``scale`` is the site's
typical patch size, the mean over the pool's pairs of ``||source - target||`` there (so alpha = 1
moves the activation as far as a typical clean/corrupted difference). The later thoughts regenerate.

Adding a vector at one position is exactly a write of the target run's own activation there plus the
vector: nothing before position p (and nothing at p below ``layer``) changes, so the activation the
hook sees is the unpatched one. The engine therefore runs a steering spec as an
:class:`~latentpatch.patching.interventions.ActivationPatch` whose value is that sum.

Directions: ``meandiff`` (the pool's mean of source - target at the site: clean - corrupted when
denoising) or ``file`` (``--steer-vector``: [d] for every site, or [L, K, d]); controls ``random<k>``:
seeded Gaussian directions, one per control and site, added with the same alpha and scale.

>>> specs = steer_specs(n_layers=2, num_latent=3, component="resid_out", alphas=(1.0,), n_controls=1)
>>> len(specs), specs[0].mode, specs[1].mode, specs[0].replacement, spec_alpha(specs[1])
(12, 'meandiff', 'random0', 'meandiff:1', 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from latentpatch.errors import LatentPatchError
from latentpatch.patching.baselines import PairBaseline, ValueFn
from latentpatch.patching.specs import PatchSpec

#: The steering experiment's name (spec ``experiment``) and its default alphas and random controls.
STEER = "steer"
DEFAULT_ALPHAS: tuple[float, ...] = (-2.0, -1.0, 1.0, 2.0)
DEFAULT_CONTROLS = 2
#: The direction of a random control ``k`` is ``f"{RANDOM}{k}"``.
RANDOM = "random"


def alpha_label(alpha: float) -> str:
    """An alpha as the spec's (and the table's) label: ``1``, ``-0.5``.

    >>> alpha_label(2.0), alpha_label(-0.5)
    ('2', '-0.5')
    """
    return f"{alpha:g}"


def spec_alpha(spec: PatchSpec) -> float:
    """The alpha of a steering spec (its ``replacement`` is ``"<direction>:<alpha>"``)."""
    return float(spec.replacement.rpartition(":")[2])


def steer_specs(
    n_layers: int,
    num_latent: int,
    component: str,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_controls: int = DEFAULT_CONTROLS,
    direction: str = "meandiff",
    layers: Sequence[int] | None = None,
) -> list[PatchSpec]:
    """Per layer and thought p: the direction, then each random control, at every alpha."""
    names = [direction] + [f"{RANDOM}{k}" for k in range(n_controls)]
    return [
        # the replacement names direction and alpha: specs with equal computations are computed once
        PatchSpec(STEER, name, component, layer, (p,), p, replacement=f"{name}:{alpha_label(a)}")
        for layer in (range(n_layers) if layers is None else layers)
        for p in range(num_latent)
        for name in names
        for a in alphas
    ]


def site_differences(pool: Sequence[PairBaseline], component: str) -> torch.Tensor:
    """[n, L, K, d] fp32: per pool pair, source - target activation of ``component`` at every site."""
    diffs = [(b.source.acts[component].float() - b.target.acts[component].float()) for b in pool]
    return torch.stack(diffs)


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v`` over its last axis's norm (a zero vector stays zero)."""
    norm = v.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, v / norm.clamp_min(1e-30), v)


def random_directions(shape: tuple[int, int, int], seed: int, k: int) -> torch.Tensor:
    """[L, K, d] seeded unit Gaussian directions of random control ``k`` (CPU generator: the same on every device)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (k + 1))
    return unit(torch.randn(shape, generator=g))


def load_direction(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """``--steer-vector FILE`` (.npy or .pt: [d] for every site, or [L, K, d]; or a one-dimensional DAS
    subspace, ``results/das/<site>.k1.safetensors``: its basis vector) as [L, K, d] fp32."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from latentpatch.probing.das import subspace_direction

        return subspace_direction(p, shape)
    try:
        raw = np.load(p) if p.suffix == ".npy" else torch.load(p, map_location="cpu", weights_only=True)
    except Exception as ex:
        raise LatentPatchError(
            f"--steer-vector {p}: cannot read it ({ex}); fix: save a [d] or [L, K, d] .npy or .pt"
        ) from None
    v = torch.as_tensor(np.asarray(raw), dtype=torch.float32)
    L, K, d = shape
    if tuple(v.shape) == (d,):
        return v.expand(L, K, d).clone()
    if tuple(v.shape) == (L, K, d):
        return v
    raise LatentPatchError(
        f"--steer-vector {p}: shape {tuple(v.shape)}; fix: use [{d}] or [{L}, {K}, {d}] (layers, thoughts, d_model)"
    )


def steer_values(target_acts: torch.Tensor, directions: dict[str, torch.Tensor], scale: torch.Tensor) -> ValueFn:
    """``spec -> [1, d]``: the target's own activation at the spec's site plus ``alpha * scale * v``.

    ``target_acts`` [L, K, d]: the target run's activations of the steered component; ``directions``:
    name -> unit [L, K, d]; ``scale`` [L, K]: the site's typical patch size."""

    def values(spec: PatchSpec) -> torch.Tensor:
        (p,) = spec.positions
        alpha = spec_alpha(spec)
        v = directions[spec.mode][spec.layer, p].to(target_acts.device)
        added = alpha * float(scale[spec.layer, p]) * v
        return (target_acts[spec.layer, p].float() + added).to(target_acts.dtype)[None]

    return values
