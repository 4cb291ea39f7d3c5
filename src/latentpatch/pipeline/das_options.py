"""The checks and readings of the ``das`` options (docs/method.md §20), which :meth:`RunConfig.validate
<latentpatch.pipeline.config.RunConfig.validate>` runs; the options themselves are defined once, in
:class:`~latentpatch.pipeline.config.RunConfig`. No torch.

>>> das_ks(None), das_variable("answer"), das_variable(None)
((1, 2, 4, 8, 16), ('answer', ''), ('intermediate', '0'))
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from latentpatch.errors import LatentPatchError
from latentpatch.names import COMPONENTS, DAS_EXPERIMENT, THOUGHT_SITES

if TYPE_CHECKING:
    from latentpatch.pipeline.config import RunConfig

#: The defaults of the das options.
DEFAULT_SITES, DEFAULT_KS, DEFAULT_VARIABLE = "thought.t*", (1, 2, 4, 8, 16), "intermediate:0"
DEFAULT_STEPS, DEFAULT_PAIRS = 100, 256
#: The variables ``--das-variable`` accepts (``kind`` or ``kind:arg``).
VARIABLE_KINDS = ("intermediate", "answer", "column")


def das_ks(text: str | None) -> tuple[int, ...]:
    """``--das-k`` as sorted distinct sizes (LatentPatchError naming the option on a bad one)."""
    if text is None:
        return DEFAULT_KS
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise LatentPatchError(f"--das-k {text!r}: use a comma list of sizes >= 1, e.g. 1,2,4,8,16")
    return tuple(ks)


def das_variable(text: str | None) -> tuple[str, str]:
    """``--das-variable`` as (kind, argument)."""
    kind, _, arg = (text or DEFAULT_VARIABLE).partition(":")
    ok = (kind == "intermediate" and arg.isdigit()) or (kind == "answer" and not arg) or (kind == "column" and arg)
    if not ok:
        raise LatentPatchError(f"--das-variable {text!r}: use intermediate:S (S a step index), answer, or column:NAME")
    return kind, arg


def check_das_sites(text: str) -> None:
    """The form of ``--das-sites`` (the ranges need the model: the stage checks them).

    >>> check_das_sites("thought.t*,resid_out.L2.t1")
    """
    thought = "|".join(THOUGHT_SITES)
    block = "|".join(COMPONENTS)
    form = re.compile(rf"(?:{thought})\.t(?:\d+|\*)|(?:{block})\.L(?:\d+|\*)\.t(?:\d+|\*)")
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if not form.fullmatch(x)] or ([] if items else [text])
    if bad:
        raise LatentPatchError(
            f"--das-sites: site {bad[0]!r}: use thought.tP, thought_pre.tP or COMPONENT.LN.tP (COMPONENT one of "
            f"{', '.join(COMPONENTS)}; P or N may be *)"
        )


def check_das_options(cfg: RunConfig) -> None:
    """The das options: only with ``--experiments das``, parseable, positive counts; no ``--shard`` (the
    subspace is trained on every pair at once)."""
    names = ("das_sites", "das_k", "das_variable", "das_steps", "das_pairs")
    given = [n.replace("_", "-") for n in names if getattr(cfg, n) is not None]
    if DAS_EXPERIMENT not in cfg.experiments:
        if given:
            raise LatentPatchError(
                f"--{given[0]} applies to the das experiment only; fix: add das to --experiments, or drop it"
            )
        return
    das_ks(cfg.das_k)
    check_das_sites(cfg.das_sites or DEFAULT_SITES)
    das_variable(cfg.das_variable)
    for name in ("das_steps", "das_pairs"):
        value = getattr(cfg, name)
        if value is not None and value < (1 if name == "das_steps" else 4):
            least = 1 if name == "das_steps" else 4
            raise LatentPatchError(f"--{name.replace('_', '-')} must be >= {least} (got {value})")
