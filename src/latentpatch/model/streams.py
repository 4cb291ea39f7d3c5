"""One seeded draw stream per pair (docs/method.md §21): the keys rows carry through the latent loop.

A random feedback (Multiplex, CoLaR) draws at every latent step. The draws of a pair's clean,
corrupted and every patched run come from one stream of their own (common random numbers within
the pair) and different pairs' streams are independent draws. A row names its stream by an integer
**key**: :func:`pair_stream` of its pair's id, a stable hash (the same in every process, shard,
worker, Ray replica and resumed run; not Python's salted ``hash``). The rows of a batch carry their
keys as :attr:`~latentpatch.model.state.RolloutState.streams` (``None`` for a row, or for the whole
state: the run's one stream of before, what a notebook calling ``model.rollout`` directly gets).

The stream of key ``k`` under ``--seed S`` is one ``torch.Generator`` seeded with
``stream_seed(S, k)``, drawing step 0's draws, then step 1's, ... in the family's official order for
a batch of one. To reproduce a pair's thoughts outside the tool::

    gen = torch.Generator().manual_seed(stream_seed(seed, pair_stream(pair_id)))
    # then, per latent step, the family's draws from gen, in order (Multiplex: V exponentials)

>>> pair_stream("p0") == pair_stream("p0") != pair_stream("p1")
True
>>> 0 <= stream_seed(0, pair_stream("p0")) < 2**63
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

#: the draw-stream keys of a batch's rows (None for a row: the run's one stream); None: every row's
Streams = tuple[int | None, ...] | None
#: what callers pass: one key per row (a list, a tuple) or None
StreamKeys = Sequence[int | None] | None


def _hash63(text: str) -> int:
    """A stable 63-bit integer of ``text`` (blake2b; a valid ``torch.Generator.manual_seed``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def pair_stream(pair_id: str) -> int:
    """The draw-stream key of pair ``pair_id``: the same integer in every process and run."""
    return _hash63(f"pair:{pair_id}")


def stream_seed(seed: int, key: int) -> int:
    """The generator seed of stream ``key`` under run seed ``seed`` (``--seed``): another seed gives
    every pair another stream."""
    return _hash63(f"stream:{int(seed)}:{int(key)}")


def as_streams(streams: Sequence[int | None] | None, batch: int) -> Streams:
    """``streams`` as a state's keys (a tuple of ``batch`` keys, or None when no row has one).

    >>> as_streams([None, None], 2) is None, as_streams([3, None], 2)
    (True, (3, None))
    """
    if streams is None:
        return None
    keys = tuple(None if k is None else int(k) for k in streams)
    if len(keys) != batch:
        raise ValueError(f"{len(keys)} stream keys for a batch of {batch} rows")
    return None if all(k is None for k in keys) else keys


def row_streams(streams: Sequence[int | None] | None, batch: int) -> list[int | None]:
    """One key per row (None: the run's stream) of a batch of ``batch`` rows.

    >>> row_streams(None, 2), row_streams((5,), 1)
    ([None, None], [5])
    """
    return [None] * batch if streams is None else list(streams)


def repeat_streams(parts: Sequence[tuple[Streams, int, int]]) -> Streams:
    """The keys of states stacked row by row: per part ``(streams, rows, repeats)``, each of its
    ``rows`` keys repeated ``repeats`` times (row b -> rows b*r .. b*r + r - 1), parts in order.

    >>> repeat_streams([((1, 2), 2, 2), (None, 1, 1)])
    (1, 1, 2, 2, None)
    """
    keys = [k for s, n, r in parts for k in row_streams(s, n) for _ in range(r)]
    return as_streams(keys, len(keys))
