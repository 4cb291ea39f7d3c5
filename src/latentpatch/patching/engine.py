"""The patching engine: one mechanism behind every experiment (design.md §2, §3, §6).

A :class:`PatchSpec` says *which* sites are overwritten (a component, one layer, a set of latent
positions) and how the rest of the rollout behaves (``frozen``: later thoughts' input embeddings
are held at the target run's values, cutting the recurrent path). The run-level
:class:`EngineConfig` says with *what* (``replacement``) and in which ``direction``.

Two engines compute the same numbers:

- ``fast`` (default): a patch whose earliest site is latent position p leaves every position
  before p as in the target baseline, so the target's KV cache up to p is computed once per pair
  and shared: specs are sorted by p, and each chunk of ``batch_size`` specs is one batched
  continuation from the cached prefix before the chunk's smallest p (the cache repeated along
  the batch).
- ``reference``: one full rollout per spec with hooks. Used for design.md §5 check 4 and benchmarks.

Per pair, :func:`prepare_pair` runs the clean and corrupted baselines once and keeps their latent
activations ([n_layers, K, d] per component), greedy answers and teacher-forced answer logits.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from latentpatch.patching.metrics import AnswerLogits, answer_logit_diff, answer_metrics, cosine, same_number
from latentpatch.model.latent import LatentModel, Rollout, RolloutState, extract_number
from latentpatch.model.sites import COMPONENTS, ActivationHooks, Write

DIRECTIONS = ("denoise", "noise")
REPLACEMENTS = ("source", "zero", "mean", "resample")


@dataclass(frozen=True)
class PatchSpec:
    """One patch: overwrite ``component`` at ``layer`` at every latent position in ``positions``.

    ``experiment``/``mode``/``index`` only label the result (``index`` = the position shown in
    tables: -1 for "all latent positions", p for a single position, n for cumulative S_n).
    ``frozen``: after the first patched position, feed the target's own thoughts (no recurrence).
    ``track``: record the regenerated activation at ``layer`` at every later latent position.
    """

    experiment: str
    mode: str
    component: str
    layer: int
    positions: tuple[int, ...]
    index: int
    frozen: bool = False
    track: bool = False

    @property
    def start(self) -> int:
        return min(self.positions)

    @property
    def key(self) -> str:
        """The innermost key of ``results[pair_id][layer][key]``."""
        if self.mode == "all":
            return "all"
        if self.mode == "single":
            return str(self.index)
        if self.mode == "cumulative":
            return f"cumulative_{self.index}"
        return self.mode

    @property
    def computation(self) -> tuple:
        """Specs with equal ``computation`` give identical patched runs (computed once)."""
        return (self.component, self.layer, self.positions, self.frozen)


@dataclass
class EngineConfig:
    direction: str = "denoise"
    replacement: str = "source"
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}")


@dataclass
class RunRecord:
    """What a sweep needs from one unpatched run of one question.

    ``acts[component]``: [n_layers, K, d] activations at the latent positions; ``answer_ids``:
    its greedy answer; ``pred``: the number in it (None if none).
    """

    prompt: list[int]
    thoughts: torch.Tensor
    acts: dict[str, torch.Tensor]
    answer_ids: list[int]
    pred: float | None


@dataclass
class PairBaseline:
    """Clean and corrupted baselines of one pair, and the target/source roles for a direction."""

    pair_id: str
    clean_answer: float
    corrupted_answer: float
    clean: RunRecord
    corrupted: RunRecord
    direction: str = "denoise"
    answers: dict = field(default_factory=dict)  # "base"/"clean"/"corr" -> (ids, number_start)
    target_logits: AnswerLogits | None = None
    ld_target: float = math.nan
    ld_source: float = math.nan

    @property
    def target(self) -> RunRecord:
        return self.corrupted if self.direction == "denoise" else self.clean

    @property
    def source(self) -> RunRecord:
        return self.clean if self.direction == "denoise" else self.corrupted

    @property
    def clean_correct(self) -> bool:
        return same_number(self.clean.pred, self.clean_answer)

    @property
    def corrupted_correct(self) -> bool:
        return same_number(self.corrupted.pred, self.corrupted_answer)


# ---- baselines -------------------------------------------------------------------------------
@torch.no_grad()
def record_run(model: LatentModel, prompt: Sequence[int], components: Sequence[str] = COMPONENTS) -> RunRecord:
    """Unpatched rollout of one prompt: its latent activations for ``components`` and answer."""
    keys = [(c, layer) for c in components for layer in range(model.n_layers)]
    r = model.rollout([list(prompt)], record=keys)
    lat = slice(r.prompt_len, r.prompt_len + model.num_latent)
    acts = {c: torch.stack([r.hooks.recorded(c, layer)[0, lat] for layer in range(model.n_layers)]) for c in components}
    ids = model.generate(r.state, r.answer_logits)[0]
    pred = extract_number(model.decode(ids)) if model.tokenizer is not None else None
    return RunRecord(list(prompt), r.thoughts[0], acts, ids, pred)


def answer_strings(model: LatentModel, base: PairBaseline) -> dict:
    """``A_base`` (the target baseline's own greedy answer), ``A_clean``, ``A_corr`` as ids."""
    base_ids = list(base.target.answer_ids) or [model.config.eos_id]
    return {
        "base": (base_ids, model.number_start(base_ids)),
        "clean": model.answer_ids(base.clean_answer),
        "corr": model.answer_ids(base.corrupted_answer),
    }


def _answer_logits(model: LatentModel, state: RolloutState, first: torch.Tensor, answers: dict, preds: list) -> list[AnswerLogits]:
    """Teacher-force the three answer strings on every row of ``state``."""
    conts = [answers["base"][0], answers["clean"][0], answers["corr"][0]]
    scored = model.score(state, first, [conts] * state.batch_size)
    return [_as_answer_logits(sc, answers, pred) for sc, pred in zip(scored, preds)]


def _as_answer_logits(scored: list[torch.Tensor], answers: dict, pred) -> AnswerLogits:
    n_base = len(answers["base"][0])
    return AnswerLogits(scored[0][:n_base], scored[1], scored[2], answers["base"][0], answers["clean"][0],
                        answers["corr"][0], answers["base"][1], answers["clean"][1], answers["corr"][1], pred)


#: A teacher-forced argmax stands in for a greedy step only when it wins by more than this many
#: logits (fp32), so float noise between one forward over a string and step-by-step decoding
#: cannot flip the choice.
GREEDY_MARGIN = 1e-3


def _reproduces_greedy(model: LatentModel, logits: torch.Tensor, seq: list[int]) -> bool:
    """Would greedy decoding emit exactly ``seq`` (ending in [EOS])? ``logits[j]`` predicts ``seq[j]``."""
    cfg = model.config
    logits = logits.clone()
    banned = [i for i in {cfg.pad_id, cfg.bot_id, cfg.eot_id} if i is not None and 0 <= i < logits.shape[-1]]
    logits[:, banned] = float("-inf")
    top = logits.topk(2, dim=-1)
    ids = torch.tensor(seq, device=logits.device)
    return bool((top.indices[:, 0] == ids).all() and (top.values[:, 0] - top.values[:, 1] > GREEDY_MARGIN).all())


def _score_and_generate(model: LatentModel, base: PairBaseline, state: RolloutState, first: torch.Tensor):
    """Greedy answers and teacher-forced answer logits for every row of a finished rollout.

    ``A_base`` is scored with its closing [EOS]; a row whose teacher-forced argmaxes reproduce
    ``A_base`` + [EOS] would decode exactly ``A_base`` greedily, so only the other rows (the
    patches that changed the answer) are decoded step by step.
    """
    eos = model.config.eos_id
    greedy_base = list(base.target.answer_ids)
    answers = dict(base.answers)
    base_scored = greedy_base + [eos]
    conts = [base_scored, answers["clean"][0], answers["corr"][0]]
    scored = model.score(state, first, [conts] * state.batch_size)
    gen: list[list[int] | None] = [list(greedy_base) if _reproduces_greedy(model, sc[0], base_scored) else None
                                   for sc in scored]
    rest = [b for b, g in enumerate(gen) if g is None]
    if rest:
        rows = torch.tensor(rest, device=first.device)
        for b, ids in zip(rest, model.generate(state.fork(rows=rows), first[rows])):
            gen[b] = ids
    preds = [extract_number(model.decode(ids)) if model.tokenizer is not None else None for ids in gen]
    return gen, [_as_answer_logits(sc, answers, pred) for sc, pred in zip(scored, preds)]


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
    """Baseline metrics of a pair: the target's unpatched answer logits, LD_target, LD_source."""
    base = PairBaseline(pair_id, float(clean_answer), float(corrupted_answer), clean, corrupted, direction)
    base.answers = answer_strings(model, base)
    logits = {}
    for role, rec in (("target", base.target), ("source", base.source)):
        r = model.rollout([rec.prompt])
        logits[role] = _answer_logits(model, r.state, r.answer_logits, base.answers, [rec.pred])[0]
    base.target_logits = logits["target"]
    base.ld_target = answer_logit_diff(logits["target"])
    base.ld_source = answer_logit_diff(logits["source"])
    return base


# ---- replacement values ----------------------------------------------------------------------
ValueFn = Callable[[PatchSpec], torch.Tensor]


def replacement_values(
    base: PairBaseline,
    config: EngineConfig,
    mean_acts: dict[str, torch.Tensor] | None = None,
    resample_from: PairBaseline | None = None,
) -> ValueFn:
    """``spec -> [len(spec.positions), d]``: the values written at the spec's sites."""

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
    """The target's own activations: the identity check (design.md §5.1)."""
    return lambda spec: base.target.acts[spec.component][spec.layer, list(spec.positions)]


def mean_activations(bases: Sequence[PairBaseline]) -> dict[str, torch.Tensor]:
    """Dataset mean of the *source* runs' latent activations, per component: [n_layers, K, d]."""
    comps = bases[0].source.acts.keys()
    return {c: torch.stack([b.source.acts[c].float() for b in bases]).mean(0).to(bases[0].source.acts[c].dtype) for c in comps}


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


# ---- the sweeps ------------------------------------------------------------------------------
def _writes_for(specs: Sequence[PatchSpec], values: ValueFn, prompt_len: int, device) -> list[Write]:
    """One :class:`Write` per (component, layer, position), with a row mask over the chunk."""
    grouped: dict[tuple[str, int, int], dict[int, torch.Tensor]] = defaultdict(dict)
    for row, spec in enumerate(specs):
        vals = values(spec)
        for i, q in enumerate(spec.positions):
            grouped[(spec.component, spec.layer, q)][row] = vals[i]
    writes = []
    B = len(specs)
    for (component, layer, q), rows in grouped.items():
        d = next(iter(rows.values())).shape[-1]
        value = torch.zeros(B, d, dtype=next(iter(rows.values())).dtype, device=device)
        mask = torch.zeros(B, dtype=torch.bool, device=device)
        for row, v in rows.items():
            value[row] = v.to(device)
            mask[row] = True
        writes.append(Write(component, layer, torch.full((B,), prompt_len + q, device=device), mask, value))
    return writes


def _freeze(specs: Sequence[PatchSpec], target_thoughts: torch.Tensor, K: int):
    """Override tensors for frozen specs: later thoughts fed from the target run."""
    if not any(s.frozen for s in specs):
        return None, None
    B = len(specs)
    mask = torch.zeros(B, K, dtype=torch.bool, device=target_thoughts.device)
    for row, spec in enumerate(specs):
        if spec.frozen:
            mask[row, max(spec.positions) + 1:] = True
    return target_thoughts[None].expand(B, -1, -1), mask


def _cell_results(
    model: LatentModel, base: PairBaseline, specs: Sequence[PatchSpec], state: RolloutState,
    answer_logits: torch.Tensor, tracked: dict[int, torch.Tensor], decode_all: bool = False,
) -> list[dict]:
    """Metrics for each row of a patched, finished rollout (after [EOT]).

    ``decode_all`` (the reference): greedy-decode every row step by step, the plain way, instead
    of only the rows whose teacher-forced argmaxes do not reproduce ``A_base``.
    """
    if decode_all:
        gen = model.generate(state, answer_logits)
        preds = [extract_number(model.decode(ids)) if model.tokenizer is not None else None for ids in gen]
        patched = _answer_logits(model, state, answer_logits, base.answers, preds)
    else:
        gen, patched = _score_and_generate(model, base, state, answer_logits)
    out = []
    for row, spec in enumerate(specs):
        m = answer_metrics(patched[row], base.target_logits, base.ld_target, base.ld_source,
                           base.clean_answer, base.corrupted_answer)
        m["answer_ids"] = gen[row]
        if spec.track and row in tracked:
            acts = tracked[row]  # [n_later, d] at positions max(positions)+1 .. K-1
            later = list(range(max(spec.positions) + 1, model.num_latent))
            clean = base.clean.acts[spec.component][spec.layer, later]
            corr = base.corrupted.acts[spec.component][spec.layer, later]
            cc, cr = cosine(acts, clean), cosine(acts, corr)
            m["act_positions"] = later
            m["act_cos_clean_by_position"] = [float(x) for x in cc]
            m["act_cos_corr_by_position"] = [float(x) for x in cr]
            m["act_cos_clean"] = float(cc.mean()) if len(later) else math.nan
            m["act_cos_corr"] = float(cr.mean()) if len(later) else math.nan
            m["act_bias"] = m["act_cos_clean"] - m["act_cos_corr"]
        out.append(m)
    return out


@torch.no_grad()
def sweep_fast(
    model: LatentModel, base: PairBaseline, specs: Sequence[PatchSpec], values: ValueFn, batch_size: int = 64,
    target: Rollout | None = None,
) -> list[dict]:
    """Metrics for every spec on one pair, sharing the target's KV prefix (design.md §6).

    Specs with the same :attr:`PatchSpec.computation` are computed once. Returns one metric dict
    per spec, in order.
    """
    target = target or model.rollout([base.target.prompt])
    T_q, K = target.prompt_len, model.num_latent
    unique: dict[tuple, PatchSpec] = {}
    for s in specs:
        u = unique.get(s.computation)
        unique[s.computation] = s if u is None or s.track else u
    # Chunks of batch_size specs in order of their first patched position; a chunk continues from
    # the prefix before its earliest start (rows starting later rerun a few unpatched thoughts,
    # which equal the target's), so small start groups share one batch (fewer, fuller passes).
    ordered = sorted(unique.values(), key=lambda s: s.start)
    results: dict[tuple, dict] = {}
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i: i + batch_size]
        start, B = chunk[0].start, len(chunk)
        state = target.state.fork(length=T_q + start, repeats=B)
        writes = _writes_for(chunk, values, T_q, model.device)
        record = sorted({(s.component, s.layer) for s in chunk if s.track})
        override, mask = _freeze(chunk, target.thoughts[0], K)
        with ActivationHooks(model.lm, writes=writes, record=record) as hooks:
            first = target.thoughts[0, start][None].expand(B, -1)
            model.run_thoughts(state, first, start, hooks=hooks, thought_override=override, override_mask=mask)
            end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), B), hooks=hooks)
        tracked = {}
        for row, s in enumerate(chunk):
            if s.track:
                acts = hooks.recorded(s.component, s.layer)  # from index T_q + start
                lo = max(s.positions) + 1 - start
                tracked[row] = acts[row, lo: K - start]
        cells = _cell_results(model, base, chunk, state, model.logits(end[:, -1]), tracked)
        for s, cell in zip(chunk, cells):
            results[s.computation] = cell
    return [dict(results[s.computation]) for s in specs]


@torch.no_grad()
def sweep_reference(model: LatentModel, base: PairBaseline, specs: Sequence[PatchSpec], values: ValueFn) -> list[dict]:
    """The plain method: one full hooked rollout per spec (no sharing, no batching), greedy
    decoding of every cell's answer."""
    out = []
    K = model.num_latent
    for spec in specs:
        T_q = len(base.target.prompt)  # batch of one: no padding
        writes = _writes_for([spec], values, T_q, model.device)
        override, mask = _freeze([spec], base.target.thoughts, K)
        record = [(spec.component, spec.layer)] if spec.track else []
        r = model.rollout([base.target.prompt], writes=writes, record=record, thought_override=override, override_mask=mask)
        tracked = {}
        if spec.track:
            acts = r.hooks.recorded(spec.component, spec.layer)[0]
            tracked[0] = acts[T_q + max(spec.positions) + 1: T_q + K]
        out.extend(_cell_results(model, base, [spec], r.state, r.answer_logits, tracked, decode_all=True))
    return out
