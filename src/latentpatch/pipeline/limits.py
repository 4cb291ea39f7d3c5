"""What the model can take, checked before a run's work, and what its limits cut, counted after.

- :func:`check_tokenizer`: ``run`` reads questions as text, so a model without a tokenizer is
  refused at once (one line naming the base directory and the fix).
- :func:`check_question_lengths`: every question's prompt, thoughts and answer strings must fit
  the model's positions (``LatentModel.max_positions``), else one line naming the pair.
- :func:`cut_answers`: greedy decoding stops at the model's last position
  (``LatentModel.answer_room``); the manifest's ``answers_cut`` says how many answers that cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from latentpatch.errors import LatentPatchError
from latentpatch.rundir import RunPaths, read_pair_result

if TYPE_CHECKING:
    from latentpatch.data.pairs import Pair
    from latentpatch.model.latent import LatentModel
    from latentpatch.patching.baselines import PairBaseline
    from latentpatch.pipeline.config import RunConfig


def check_tokenizer(model: LatentModel, config: RunConfig) -> None:
    """``run`` reads the pair file's questions as text: a model without a tokenizer is refused
    before any work."""
    if model.tokenizer is not None:
        return
    where = f"--base {config.base}" if config.base else f"--model {config.model}"
    raise LatentPatchError(
        f"{where}: no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json or tokenizer.model), "
        "and run needs one to read the pair file's questions; fix: pass a --base directory or hub name "
        "that holds the base model's tokenizer files (inspect --input-ids works without one)"
    )


def check_question_lengths(model: LatentModel, pairs: Sequence[Pair]) -> None:
    """Refuse, before any work, a question whose prompt, thoughts and answer strings do not fit the
    model's positions: its rollout, or the scoring of ``A_clean``/``A_corr`` on it, would index past
    the position embedding. Greedy answers need no room here: decoding stops at the last position."""
    limit = model.max_positions
    if limit is None:
        return
    for pair in pairs:
        strings = [model.answer_ids(pair.variant(side).answer)[0] for side in ("clean", "corrupted")]
        longest = max(len(ids) for ids in strings)
        for side in ("clean", "corrupted"):
            prompt = model.prompt_ids(pair.variant(side).question)
            model.check_fits([prompt], names=[f"of pair {pair.pair_id} ({side})"])
            room = limit - model.positions_before_answer(len(prompt))
            if longest - 1 > room:  # the last token of a scored string is only predicted, not fed
                raise LatentPatchError(
                    f"question of pair {pair.pair_id} ({side}): its prompt is {len(prompt)} tokens and the "
                    f"answer strings to score are up to {longest}, which with {model.num_latent} thoughts pass "
                    f"the model's {limit} positions; fix: shorten the question or leave the pair out"
                )


def cut_answers(model: LatentModel, bases: Sequence[PairBaseline], indices: Sequence[int], out: Any) -> dict:
    """The manifest's ``answers_cut``: greedy answers stopped by the model's last position rather
    than by ``[EOS]`` or ``max_answer_tokens``, among the unpatched runs (``baselines``: clean and
    corrupted of every pair) and the patched cells of ``results/pairs/`` (``patched``).

    An answer was cut when it fills its room and the room is shorter than ``max_answer_tokens``.
    The patched cells are read only for pairs whose target leaves less room than that (none on a
    model whose positions are never reached)."""
    cap = model.config.max_answer_tokens
    baselines = patched = 0
    paths = RunPaths(out)
    for base, index in zip(bases, indices):
        rooms = {}
        for side, record in (("clean", base.clean), ("corrupted", base.corrupted)):
            rooms[side] = model.room_at(model.positions_before_answer(len(record.prompt)))
            baselines += rooms[side] < cap and len(record.answer_ids) >= rooms[side]
        room = rooms["corrupted" if base.direction == "denoise" else "clean"]  # the patched run's
        if room < cap:
            result = read_pair_result(paths.pair_result(index)) or {}
            patched += sum(len(row.get("answer_ids") or []) >= room for row in result.get("cells", []))
    return {"max_positions": model.max_positions, "baselines": int(baselines), "patched": int(patched)}


def check_pccot_run(model: LatentModel, experiments: Sequence[str]) -> None:
    """Refuse, in one line before anything runs, the experiments that are not defined on PCCoT's
    rounds (:data:`~latentpatch.model.pccot.PCCOT_EXPERIMENTS` run, with the sites of round
    ``site_round``; :data:`~latentpatch.model.pccot.PCCOT_REFUSED` gives each refusal's reason).
    Other models pass."""
    from latentpatch.model.pccot import PCCOT_EXPERIMENTS, PCCOT_REFUSED, PCCoTModel

    if not isinstance(model, PCCoTModel):
        return
    bad = [e for e in experiments if e not in PCCOT_EXPERIMENTS]
    if bad:
        why = "; ".join(f"{e}: {PCCOT_REFUSED[e]}" for e in bad if e in PCCOT_REFUSED) or "not implemented there"
        raise LatentPatchError(
            f"--experiments {','.join(bad)}: not defined on PCCoT's parallel rounds ({why}); "
            f"fix: choose among {','.join(PCCOT_EXPERIMENTS)} (sites of round --pccot-round, default the last)"
        )
