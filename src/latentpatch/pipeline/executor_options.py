"""The checks of the executor options (``--executor``, ``--ray-address``, ``--gpus-per-worker``), which
:meth:`RunConfig.validate <latentpatch.pipeline.config.RunConfig.validate>` runs; the options
themselves are declared once, in :class:`~latentpatch.pipeline.config.RunConfig`. No torch, no Ray
import (whether Ray is installed is asked of the import system only).

>>> from latentpatch.pipeline.config import RunConfig
>>> check_executor_options(RunConfig(executor="fork"))
>>> check_executor_options(RunConfig(executor="slurm"))
Traceback (most recent call last):
...
latentpatch.errors.LatentPatchError: --executor 'slurm': use fork or ray (SLURM arrays: latentpatch launch slurm)
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING

from latentpatch.errors import LatentPatchError

if TYPE_CHECKING:
    from latentpatch.pipeline.config import RunConfig

#: The values of ``--executor``.
EXECUTORS = ("fork", "ray")


def ray_installed() -> bool:
    """Whether ``import ray`` can work (``sys.modules["ray"] = None`` counts as not installed, as Python does)."""
    if "ray" in sys.modules:
        return sys.modules["ray"] is not None
    return importlib.util.find_spec("ray") is not None


def check_executor_options(cfg: RunConfig) -> None:
    """``--executor`` one of :data:`EXECUTORS`; the Ray options only with ``--executor ray``, which
    needs Ray installed; ``--gpus-per-worker`` positive."""
    if cfg.executor is not None and cfg.executor not in EXECUTORS:
        raise LatentPatchError(
            f"--executor {cfg.executor!r}: use {' or '.join(EXECUTORS)} (SLURM arrays: latentpatch launch slurm)"
        )
    given = [
        n for n, v in (("ray-address", cfg.ray_address), ("gpus-per-worker", cfg.gpus_per_worker)) if v is not None
    ]
    if cfg.executor != "ray":
        if given:
            raise LatentPatchError(f"--{given[0]} applies to --executor ray only; fix: add --executor ray, or drop it")
        return
    if not ray_installed():
        raise LatentPatchError(
            "--executor ray: Ray is not installed; fix: pip install 'latentpatch[ray]' (or run without --executor ray)"
        )
    if cfg.gpus_per_worker is not None and cfg.gpus_per_worker <= 0:
        raise LatentPatchError(f"--gpus-per-worker must be > 0 (got {cfg.gpus_per_worker})")
    if cfg.ray_address is not None:  # before any work: an address that does not answer is one line
        from latentpatch.pipeline.ray_executor import check_reachable

        check_reachable(cfg.ray_address)
