"""The unpatched runs of a pair, and the values a patch writes into them.

Contract: everything a sweep needs from a pair is computed here once, before any patch.

- :func:`record_run`: one unpatched rollout of one prompt, kept as a :class:`RunRecord` (its latent
  activations ``[n_layers, K, d]`` per component, thoughts, greedy answer). The run cache
  (:mod:`latentpatch.pipeline.cache`) stores these.
- :func:`prepare_pair`: the clean and corrupted records of a pair as a :class:`PairBaseline`, with
  the target/source roles of a direction, the three answer strings (:func:`answer_strings`), the
  target's teacher-forced answer logits and LD_target / LD_source (docs/method.md §6).
- :func:`replacement_values` (and :func:`own_values` for the identity check): a :data:`ValueFn`,
  ``spec -> [len(spec.positions), d]``, the values the engine writes at a spec's sites, taken
  from the baselines (source run, zeros, dataset mean, or another pair's source run).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from latentpatch.model.config import extract_number
from latentpatch.model.latent import LatentModel, Rollout, RolloutState
from latentpatch.names import COMPONENTS
from latentpatch.patching.greedy import decode_rest, verify_guess
from latentpatch.patching.metrics import AnswerLogits, answer_logit_diff, same_number
from latentpatch.patching.specs import EngineConfig, PatchSpec

#: ``"base"``/``"clean"``/``"corr"`` -> (token ids of the answer string, index of its first number token).
AnswerStrings = dict[str, tuple[list[int], int]]


@dataclass
class RunRecord:
    """What a sweep needs from one unpatched run of one question.

    ``prompt``: its prompt ids; ``thoughts``: [K, d] input embeddings fed at the latent positions;
    ``acts[component]``: [n_layers, K, d] activations at the latent positions; ``answer_ids``:
    its greedy answer; ``pred``: the number in it (None if none); ``thought_pre``: [K, d] the states
    the thoughts were made from (the step-level experiments read both from here, no second
    rollout). ``rollout``: the unpatched
    rollout itself (its KV state, no recordings) while :func:`prepare_pair` may still reuse it;
    never cached (a record read from the cache has none).
    """

    prompt: list[int]
    thoughts: torch.Tensor
    acts: dict[str, torch.Tensor]
    answer_ids: list[int]
    pred: float | None
    rollout: Rollout | None = field(default=None, repr=False, compare=False)
    #: [K, d] the state each thought was made from (the final hidden state before the feedback; p = 0:
    #: the last prompt position): the ``thought_pre`` site, recorded with the other activations
    thought_pre: torch.Tensor | None = None
    #: the draw-stream key the run was made with (its pair's, :mod:`latentpatch.model.streams`; None:
    #: the run's one stream): a random feedback's draws, which every later run of the pair reuses
    stream: int | None = None


@dataclass
class PairBaseline:
    """Clean and corrupted baselines of one pair, and the target/source roles for a direction."""

    pair_id: str
    clean_answer: float
    corrupted_answer: float
    clean: RunRecord
    corrupted: RunRecord
    direction: str = "denoise"
    answers: AnswerStrings = field(default_factory=dict)
    target_logits: AnswerLogits | None = None
    ld_target: float = math.nan
    ld_source: float = math.nan
    #: the target's unpatched rollout (batch of one), kept by :func:`prepare_pair` so the sweep
    #: continues from it instead of rolling the target out again (the same computation, the same bits)
    target_rollout: Rollout | None = field(default=None, repr=False, compare=False)
    #: the pair's draw-stream key (its records', :mod:`latentpatch.model.streams`): every run of the
    #: pair, clean, corrupted and patched, draws from it (common random numbers, docs/method.md §21)
    stream: int | None = None

    @property
    def target(self) -> RunRecord:
        """The run that is patched: corrupted when denoising, clean when noising."""
        return self.corrupted if self.direction == "denoise" else self.clean

    @property
    def source(self) -> RunRecord:
        """The run whose activations are patched in."""
        return self.clean if self.direction == "denoise" else self.corrupted

    @property
    def clean_correct(self) -> bool:
        return same_number(self.clean.pred, self.clean_answer)

    @property
    def corrupted_correct(self) -> bool:
        return same_number(self.corrupted.pred, self.corrupted_answer)


# ---- baselines -------------------------------------------------------------------------------
@torch.no_grad()
def record_run(
    model: LatentModel,
    prompt: Sequence[int],
    components: Sequence[str] = COMPONENTS,
    keep_rollout: bool = False,
    guess: float | int | None = None,
    stream: int | None = None,
) -> RunRecord:
    """Unpatched rollout of one prompt: its latent activations for ``components`` and answer.

    ``keep_rollout``: keep the rollout itself on the record, for :func:`prepare_pair` to reuse.
    ``guess``: the expected answer (the pair file's): ``answer_prefix + guess`` is checked with one
    forward and taken if greedy decoding would emit it (:mod:`latentpatch.patching.greedy`; the
    same ids), else the answer is decoded step by step. ``stream``: the pair's draw-stream key
    (:func:`~latentpatch.model.streams.pair_stream`; None: the run's one stream)."""
    keys = [(c, layer) for c in components for layer in range(model.n_layers)]
    r = model.rollout([list(prompt)], record=keys, streams=[stream])
    assert r.hooks is not None  # rollout always returns the hooks it ran with
    lat = slice(r.prompt_len, r.prompt_len + model.num_latent)
    acts = {c: torch.stack([r.hooks.recorded(c, layer)[0, lat] for layer in range(model.n_layers)]) for c in components}
    gen: list[list[int] | None] = [None]
    if guess is not None and model.tokenizer is not None:
        verify_guess(model, r.state, r.answer_logits, model.answer_ids(guess)[0], gen)
    ids = decode_rest(model, r.state, r.answer_logits, gen)[0]
    pred = extract_number(model.decode(ids)) if model.tokenizer is not None else None
    # The recording hooks only copy activations, so this rollout is the one prepare_pair would
    # compute again: keep it (without the recordings) for that.
    kept = dataclasses.replace(r, hooks=None) if keep_rollout else None
    pre = r.thought_source_hidden()[0]
    return RunRecord(list(prompt), r.thoughts[0], acts, ids, pred, kept, thought_pre=pre, stream=stream)


def answer_strings(model: LatentModel, base: PairBaseline) -> AnswerStrings:
    """``A_base`` (the target baseline's own greedy answer), ``A_clean``, ``A_corr`` as ids."""
    base_ids = list(base.target.answer_ids) or [model.config.eos_id]
    return {
        "base": (base_ids, model.number_start(base_ids)),
        "clean": model.answer_ids(base.clean_answer),
        "corr": model.answer_ids(base.corrupted_answer),
    }


def to_answer_logits(scored: Sequence[torch.Tensor], answers: AnswerStrings, pred: float | None) -> AnswerLogits:
    """One row of :meth:`LatentModel.score` on (``A_base``, ``A_clean``, ``A_corr``) as :class:`AnswerLogits`.

    ``scored[0]`` may run past ``A_base`` (the engine scores it with a closing [EOS]): it is cut.
    """
    n_base = len(answers["base"][0])
    return AnswerLogits(
        scored[0][:n_base],
        scored[1],
        scored[2],
        answers["base"][0],
        answers["clean"][0],
        answers["corr"][0],
        answers["base"][1],
        answers["clean"][1],
        answers["corr"][1],
        pred,
    )


def score_answer_strings(
    model: LatentModel,
    state: RolloutState,
    first: torch.Tensor,
    answers: AnswerStrings,
    preds: Sequence[float | None],
) -> list[AnswerLogits]:
    """Teacher-force the three answer strings on every row of ``state``.

    ``first``: [B, V] logits of the first answer token; ``preds``: each row's greedy number.
    """
    conts = [answers["base"][0], answers["clean"][0], answers["corr"][0]]
    scored = model.score(state, first, [conts] * state.batch_size)
    return [to_answer_logits(sc, answers, pred) for sc, pred in zip(scored, preds)]


@torch.no_grad()
def prepare_pair(
    model: LatentModel,
    pair_id: str,
    clean: RunRecord,
    corrupted: RunRecord,
    clean_answer: float,
    corrupted_answer: float,
    direction: str = "denoise",
) -> PairBaseline:
    """Baseline metrics of a pair: the target's unpatched answer logits, LD_target, LD_source.

    Reuses the records' rollouts where :func:`record_run` kept them (else rolls out again) and
    keeps the target's as ``target_rollout`` for the sweep; the records let go of theirs. The pair's
    draw stream is its records' (both recorded with the same key)."""
    if clean.stream != corrupted.stream:
        raise ValueError(f"pair {pair_id}: clean and corrupted runs recorded with different draw streams")
    base = PairBaseline(pair_id, float(clean_answer), float(corrupted_answer), clean, corrupted, direction)
    base.stream = clean.stream
    base.answers = answer_strings(model, base)
    logits = {}
    for role, rec in (("target", base.target), ("source", base.source)):
        r = rec.rollout if rec.rollout is not None else model.rollout([rec.prompt], streams=[base.stream])
        logits[role] = score_answer_strings(model, r.state, r.answer_logits, base.answers, [rec.pred])[0]
        if role == "target":
            base.target_rollout = r
    clean.rollout = corrupted.rollout = None  # only the target's is needed later (memory)
    base.target_logits = logits["target"]
    base.ld_target = answer_logit_diff(logits["target"])
    base.ld_source = answer_logit_diff(logits["source"])
    return base


# ---- replacement values ----------------------------------------------------------------------
#: ``spec -> [len(spec.positions), d]``: the values written at a spec's sites, in position order.
ValueFn = Callable[[PatchSpec], torch.Tensor]


def replacement_values(
    base: PairBaseline,
    config: EngineConfig,
    mean_acts: dict[str, torch.Tensor] | None = None,
    resample_from: PairBaseline | None = None,
) -> ValueFn:
    """``spec -> [len(spec.positions), d]``: the values written at the spec's sites.

    ``mean_acts`` (for ``mean``): :func:`mean_activations` of the run's pairs; ``resample_from``
    (for ``resample``): the partner pair whose source run supplies the values.
    """

    def values(spec: PatchSpec) -> torch.Tensor:
        pos = list(spec.positions)
        if config.replacement == "source":
            return base.source.acts[spec.component][spec.layer, pos]
        if config.replacement == "zero":
            return torch.zeros_like(base.source.acts[spec.component][spec.layer, pos])
        if config.replacement == "mean":
            if mean_acts is None:
                raise ValueError("replacement 'mean' needs dataset mean activations")
            return mean_acts[spec.component][spec.layer, pos]
        if resample_from is None:
            raise ValueError("replacement 'resample' needs another pair")
        return resample_from.source.acts[spec.component][spec.layer, pos]

    return values


def own_values(base: PairBaseline) -> ValueFn:
    """The target's own activations: the identity check (docs/method.md §8.1)."""
    return lambda spec: base.target.acts[spec.component][spec.layer, list(spec.positions)]


def mean_activations(bases: Sequence[PairBaseline]) -> dict[str, torch.Tensor]:
    """Dataset mean of the *source* runs' latent activations, per component: [n_layers, K, d]."""
    comps = bases[0].source.acts.keys()
    return {
        c: torch.stack([b.source.acts[c].float() for b in bases]).mean(0).to(bases[0].source.acts[c].dtype)
        for c in comps
    }


def resample_partner(n: int, seed: int) -> list[int]:
    """A seeded derangement: pair i takes its resampled values from pair ``partner[i] != i``."""
    if n < 2:
        return list(range(n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for k in range(n):  # a cycle through a random order has no fixed point
        partner[order[k]] = order[(k + 1) % n]
    return partner
