"""The pairs a run patches: its pair file, then filtering, ``--limit`` and ``--shard`` (no torch).

Contract: :func:`load_run_pairs` reads ``config.pairs`` (``default``: the shipped file,
:func:`default_pairs_path`); :func:`pairs_to_run` filters, limits and shards them into
``(global_index, pair)``, where the global index is the pair's place in the unsharded run (it
names the pair's result file), so shard run directories merge back into exactly the unsharded run.
Reads no model and imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from latentpatch.data.pairs import Pair, filter_pairs, load_pairs
from latentpatch.pipeline.options import parse_shard

if TYPE_CHECKING:
    from latentpatch.pipeline.config import RunConfig


def shard_pairs(pairs: Sequence[Pair], shard: str | None) -> list[tuple[int, Pair]]:
    """Deterministic split: pair k (in file order, after filtering) goes to shard k mod N.

    Returns ``(k, pair)``: k is the pair's global index, which names its result file, so shard
    run directories merge back into exactly the unsharded run.
    """
    indexed = list(enumerate(pairs))
    if shard is None:
        return indexed
    i, n = parse_shard(shard)
    return [(k, p) for k, p in indexed if k % n == i]


def default_pairs_path() -> Path:
    """The shipped pair file (``latentpatch/default_data/pairs.json``)."""
    return Path(str(resources.files("latentpatch") / "default_data" / "pairs.json"))


def load_run_pairs(config: RunConfig) -> list[Pair]:
    """The pairs of ``config.pairs`` (``default``: the shipped file), before filtering."""
    return load_pairs(default_pairs_path() if config.pairs == "default" else Path(config.pairs))


def pairs_to_run(pairs: Sequence[Pair], config: RunConfig) -> tuple[list[tuple[int, Pair]], list[tuple[str, str]]]:
    """Filter (same-answer pairs out unless kept), limit to the first N, then shard.

    Returns ``(global_index, pair)`` for this process, and the removed pairs with reasons.
    """
    removed: list[tuple[str, str]] = []
    if not config.keep_same_answer:
        pairs, removed = filter_pairs(pairs)
    pairs = list(pairs)
    if config.limit is not None:
        pairs = pairs[: config.limit]
    return shard_pairs(pairs, config.shard), removed
