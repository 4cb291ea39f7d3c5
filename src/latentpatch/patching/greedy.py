"""Greedy answers without step-by-step decoding, where a guess can be checked instead.

``generate`` decodes one token per forward. When the answer is known in advance up to a check
(the unpatched answer ``A_base`` for a patch that changes nothing; ``A_clean``/``A_corr`` for one
that flips it; the pair file's answer for an unpatched run), one forward over the guess gives
the logits greedy decoding would see at every step: if each step's argmax is the guess's next
token (and then ``[EOS]``) by more than :data:`GREEDY_MARGIN`, greedy decoding would emit exactly
the guess (docs/method.md §7.3). Only the answer ids come from here; no metric reads these logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentpatch.model.latent import LatentModel, RolloutState

#: A teacher-forced argmax stands in for a greedy step only when it wins by more than this many
#: logits (fp32), so float noise between one forward over a string and step-by-step decoding
#: cannot flip the choice.
GREEDY_MARGIN = 1e-3


# ---- answers of a patched rollout ------------------------------------------------------------
def reproduces_greedy(model: LatentModel, logits: torch.Tensor, seq: list[int], room: int | None = None) -> bool:
    """Would greedy decoding emit exactly ``seq[:-1]``? ``seq`` ends in [EOS]; ``logits[j]`` ([len, V])
    predicts ``seq[j]``.

    Uses the model's decoding rule (``LatentConfig.banned_ids``/``eos_stops``), as ``generate`` does.
    ``room``: the answer tokens the row may hold (:meth:`LatentModel.answer_room`; default
    ``max_answer_tokens``). An answer of ``room`` tokens is one that ``generate`` cut off
    (docs/method.md §7.3): greedy decoding stops there whatever comes next, so only those tokens
    must be reproduced, and the closing [EOS] is not looked at."""
    cfg = model.config
    cap = cfg.max_answer_tokens if room is None else room
    if len(seq) - 1 >= cap:
        seq, logits = seq[:cap], logits[:cap]
        if any(t == cfg.eos_id and cfg.eos_stops(j) for j, t in enumerate(seq)):
            return False  # generate would have stopped before the cut
    elif any(t == cfg.eos_id and cfg.eos_stops(j) for j, t in enumerate(seq[:-1])):
        return False  # generate would have stopped before the end of seq
    elif not cfg.eos_stops(len(seq) - 1):
        return False  # the closing [EOS] would not stop generate here
    return argmaxes_are(model, logits, seq)


def argmaxes_are(model: LatentModel, logits: torch.Tensor, seq: list[int]) -> bool:
    """Is ``seq[j]`` the argmax of ``logits[j]`` ([len(seq), V]) among the ids ``generate`` may
    emit, by more than :data:`GREEDY_MARGIN`, at every j?"""
    logits = logits.clone()
    logits[:, model.config.banned_ids(logits.shape[-1])] = float("-inf")  # the ids generate() never emits
    top = logits.topk(2, dim=-1)  # values/indices [len, 2]
    ids = torch.tensor(seq, device=logits.device)
    return bool((top.indices[:, 0] == ids).all() and (top.values[:, 0] - top.values[:, 1] > GREEDY_MARGIN).all())


def verify_guess(
    model: LatentModel,
    state: RolloutState,
    first: torch.Tensor,
    guess: list[int],
    gen: list[list[int] | None],
    guess_logits: list[torch.Tensor] | None = None,
    room: Sequence[int] | None = None,
) -> None:
    """Set ``gen[b] = guess`` for the undecided rows (``gen[b] is None``) of ``state`` whose greedy
    answer is ``guess``: one forward of ``guess`` on those rows shows its tokens and then [EOS]
    as the argmaxes (``first`` [B, V]: the logits of the first answer token), every step by the
    :data:`GREEDY_MARGIN`. ``guess_logits[b]`` ([len, V], optional): teacher-forced logits of the
    guess already computed; rows whose argmaxes do not give it are not tried. ``room[b]``: the
    answer tokens row b may hold (default: :meth:`LatentModel.answer_room` of ``state``); a guess
    that fills it would be cut off, so it is left to ``generate``. ``state`` is not modified."""
    room = model.answer_room(state) if room is None else room
    if not guess:
        return
    rows = [
        b
        for b, ids in enumerate(gen)
        if ids is None
        and len(guess) < room[b]  # a cut-off answer is left to generate
        and (guess_logits is None or reproduces_prefix(model, guess_logits[b], guess))
    ]
    if rows:
        _check_guesses(model, state, first, rows, [guess] * len(gen), gen, room)


def verify_guesses(
    model: LatentModel,
    state: RolloutState,
    first: torch.Tensor,
    guesses: Sequence[list[int]],
    gen: list[list[int] | None],
    guess_logits: Sequence[torch.Tensor],
    pairs: Sequence[Sequence[int]],
    room: Sequence[int] | None = None,
) -> None:
    """:func:`verify_guess` for several pairs in one batch: ``pairs`` lists each pair's rows,
    ``guesses[b]`` is row b's pair's guess and ``guess_logits[b]`` its teacher-forced logits.

    The rows to try of every pair that has two or more run in one forward per guess length
    (from two rows up a row's bits do not depend on the batch: docs/method.md §7.1); a pair with
    one row to try runs it alone, as it would on its own (a batch of one sums differently).
    ``room``: as in :func:`verify_guess`."""
    room = model.answer_room(state) if room is None else room
    shared: dict[int, list[int]] = {}
    for rows in pairs:
        guess = guesses[rows[0]]
        if not guess:
            continue
        tried = [
            b
            for b in rows
            if gen[b] is None
            and len(guess) < room[b]  # a cut-off answer is left to generate
            and reproduces_prefix(model, guess_logits[b], guess)
        ]
        if len(tried) == 1:
            _check_guesses(model, state, first, tried, guesses, gen, room)
        else:
            shared.setdefault(len(guess), []).extend(tried)
    for tried in shared.values():
        if tried:
            _check_guesses(model, state, first, tried, guesses, gen, room)


def _check_guesses(
    model: LatentModel,
    state: RolloutState,
    first: torch.Tensor,
    rows: list[int],
    guesses: Sequence[list[int]],
    gen: list[list[int] | None],
    room: Sequence[int],
) -> None:
    """One forward of ``guesses[b]`` (all of one length, shorter than ``room[b]``, so every token
    has a position) on ``rows`` of ``state``; ``gen[b] = guesses[b]`` where greedy decoding would
    emit exactly it (tokens, then [EOS])."""
    idx = torch.tensor(rows, device=first.device)
    ids = torch.tensor([guesses[b] for b in rows], device=first.device)  # [B', len]
    logits = model.logits(model.advance(state.fork(rows=idx), input_ids=ids))  # [B', len, V]
    for j, b in enumerate(rows):
        guess = guesses[b]
        if reproduces_greedy(model, torch.cat([first[b][None], logits[j]], 0), guess + [model.config.eos_id], room[b]):
            gen[b] = list(guess)


def decode_rest(
    model: LatentModel,
    state: RolloutState,
    first: torch.Tensor,
    gen: list[list[int] | None],
    among: Sequence[int] | None = None,
) -> list[list[int]]:
    """``gen`` with its undecided rows (None) greedy-decoded step by step (``generate``) in one
    batch; ``among``: only these rows, the others are left as they are (the engine passes one
    pair's rows of a shared batch, so the decoding batch holds what it would for that pair alone)."""
    rest = [b for b in (range(len(gen)) if among is None else among) if gen[b] is None]
    out = [ids or [] for ids in gen]
    if rest:
        rows = torch.tensor(rest, device=first.device)
        for b, ids in zip(rest, model.generate(state if len(rest) == len(gen) else state.fork(rows=rows), first[rows])):
            out[b] = ids
    return out


def reproduces_prefix(model: LatentModel, logits: torch.Tensor, seq: list[int]) -> bool:
    """Do the argmaxes of ``logits`` [len(seq), V] give ``seq`` by the margin (no [EOS] before it)?"""
    cfg = model.config
    if any(t == cfg.eos_id and cfg.eos_stops(j) for j, t in enumerate(seq)):
        return False
    return argmaxes_are(model, logits, seq)
