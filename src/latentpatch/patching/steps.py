"""Step-level analyses of the latent chain (docs/method.md §13): spec generators, values, result rows.

Four experiments, each a list of :class:`~latentpatch.patching.specs.PatchSpec` run by the one engine
(:func:`~latentpatch.patching.engine.sweep_fast`, shared prefix, batched):

- ``thought``: replace continuous thought p (site ``thought``: the input embedding; site
  ``thought_pre``: the final hidden state ``prj`` maps to it, CODI only) by one of
  :data:`~latentpatch.names.STEP_REPLACEMENTS`, per step p and at every step at once; then (site
  ``thought`` only) by a vocabulary-space value (:mod:`latentpatch.patching.vocab`);
- ``early``: the early answer S(k): [EOT] after k = 0..K thoughts;
- ``influence``: replace thought i (zero, noise, source) and measure every thought j and the answer;
- ``intermediate``: patch thought p from a donor question that shares (or not) an intermediate value.

The values come from :class:`StepRecord` s (one unpatched run's thoughts and pre-``prj`` states);
:func:`step_values` is the :data:`~latentpatch.patching.baselines.ValueFn` of one pair.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from latentpatch.data.pairs import Pair
from latentpatch.model.latent import LatentModel
from latentpatch.names import (
    ALL_POSITIONS,
    DONOR_REPLACEMENTS,
    EARLY_SITE,
    INFLUENCE_REPLACEMENTS,
    NO_LAYER,
    NOISE_SCALE,
    STEP_REPLACEMENTS,
    THOUGHT_SITES,
)
from latentpatch.patching.baselines import PairBaseline, RunRecord, ValueFn
from latentpatch.patching.interventions import ThoughtReplacement
from latentpatch.patching.metrics import same_number
from latentpatch.patching.specs import PatchSpec
from latentpatch.patching.vocab import Vocabulary, is_vocab, vocab_value


@dataclass
class StepRecord:
    """One unpatched run's chain: ``thought`` [K, d] (the fed input embeddings) and ``thought_pre``
    [K, d] (the final hidden state each was projected from; p = 0: the last prompt position)."""

    thought: torch.Tensor
    thought_pre: torch.Tensor

    def site(self, site: str) -> torch.Tensor:
        """[K, d] values of ``site`` (``thought`` or ``thought_pre``)."""
        return self.thought if site == "thought" else self.thought_pre


@torch.no_grad()
def step_record(model: LatentModel, prompt: Sequence[int]) -> StepRecord:
    """The chain of one unpatched rollout of ``prompt`` (ids with separators)."""
    r = model.rollout([list(prompt)])
    return StepRecord(r.thoughts[0], r.thought_source_hidden()[0])


def recorded_chain(record: RunRecord) -> StepRecord:
    """The chain of a recorded unpatched run (``record_run`` keeps both sites): no second rollout."""
    if record.thought_pre is None:
        raise ValueError("this run record has no thought_pre (record it with record_run)")
    return StepRecord(record.thoughts, record.thought_pre)


def thought_sites(model: LatentModel) -> tuple[str, ...]:
    """``thought`` and, where the feedback has a pre-feedback site (CODI's projection), ``thought_pre``."""
    return THOUGHT_SITES if model.feedback.has_pre_site else THOUGHT_SITES[:1]


# ---- spec generators -----------------------------------------------------------------------------
def thought_specs(num_latent: int, sites: Sequence[str] = THOUGHT_SITES) -> list[PatchSpec]:
    """Per site and replacement: thought p alone (p = 0..K-1), then every thought at once (-1)."""
    every = tuple(range(num_latent))
    specs = []
    for site in sites:
        for rep in STEP_REPLACEMENTS:
            specs += [PatchSpec("thought", "single", site, NO_LAYER, (p,), p, replacement=rep) for p in every]
            specs.append(PatchSpec("thought", "all", site, NO_LAYER, every, ALL_POSITIONS, replacement=rep))
    return specs


def early_specs(num_latent: int) -> list[PatchSpec]:
    """S(k), k = 0..K: [EOT] after k thoughts (S(K) is the unpatched run)."""
    return [PatchSpec("early", "early", EARLY_SITE, NO_LAYER, (k,), k) for k in range(num_latent + 1)]


def influence_specs(num_latent: int) -> list[PatchSpec]:
    """Thought i replaced (zero, noise, source), i = 0..K-1; later thoughts regenerated."""
    return [
        PatchSpec("influence", "single", "thought", NO_LAYER, (i,), i, replacement=rep)
        for rep in INFLUENCE_REPLACEMENTS
        for i in range(num_latent)
    ]


def intermediate_specs(num_latent: int, n_intermediates: int) -> list[PatchSpec]:
    """Thought p from a donor with the same (``same:s``) or a different (``diff:s``) intermediate s."""
    return [
        PatchSpec("intermediate", "single", "thought", NO_LAYER, (p,), p, replacement=f"{kind}:{s}")
        for s in range(n_intermediates)
        for kind in DONOR_REPLACEMENTS
        for p in range(num_latent)
    ]


# ---- values ----------------------------------------------------------------------------------------
@dataclass
class StepPool:
    """What a pair's values need from the whole run: per site, the dataset mean [d] (over pairs and
    steps) and the per-step mean [K, d] (over pairs) of the source runs."""

    mean: dict[str, torch.Tensor]
    step_mean: dict[str, torch.Tensor]


def step_pool(sources: Sequence[StepRecord]) -> StepPool:
    """Means of the source runs' chains (fp32, cast back to the model dtype)."""
    mean, step_mean = {}, {}
    for site in THOUGHT_SITES:
        stack = torch.stack([r.site(site).float() for r in sources])  # [n, K, d]
        dtype = sources[0].site(site).dtype
        step_mean[site] = stack.mean(0).to(dtype)
        mean[site] = stack.mean((0, 1)).to(dtype)
    return StepPool(mean, step_mean)


def noise(shape: tuple[int, ...], seed: int, pair_index: int, site: str) -> torch.Tensor:
    """Seeded standard normal draws [K, d] for one pair and site (CPU generator: device-independent)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + pair_index * 7 + THOUGHT_SITES.index(site))
    return torch.randn(shape, generator=g)


def step_values(
    target: StepRecord,
    source: StepRecord,
    pool: StepPool,
    *,
    partner: StepRecord | None = None,
    donors: dict[str, StepRecord] | None = None,
    seed: int = 0,
    pair_index: int = 0,
    noise_scale: float = NOISE_SCALE,
    vocab: Vocabulary | None = None,
    intermediates: Sequence[float] | None = None,
) -> ValueFn:
    """``spec -> [len(positions), d]``: the values a step-level spec feeds at its site.

    ``noise``: the target's own value plus Gaussian noise whose expected norm is ``noise_scale``
    times that value's norm (a fixed scale would mean nothing: Coconut thoughts are far larger
    than token embeddings). ``partner``: the resample pair's source run; ``donors``: the donor
    runs of the intermediate contrast, by ``spec.replacement``. ``vocab``: the run's
    :class:`~latentpatch.patching.vocab.Vocabulary` and ``intermediates``: the target run's
    intermediate values, for the vocabulary-space kinds (:func:`~latentpatch.patching.vocab.vocab_value`).
    """
    memo: dict[str, torch.Tensor] = {}  # vocabulary-space values of every target thought, per kind

    def values(spec: PatchSpec) -> torch.Tensor:
        iv, rep = spec.intervention, spec.replacement_value
        if not isinstance(iv, ThoughtReplacement):
            raise ValueError(f"step values are for thought replacements, not {iv}")
        pos, site = list(iv.positions), iv.site
        own = target.site(site)  # [K, d]
        if is_vocab(rep):
            return vocab_value(vocab, rep, site, own, pos, intermediates, memo)
        if rep.is_donor:
            if donors is None or rep.label not in donors:
                raise ValueError(f"no donor for {rep.label!r}")
            return donors[rep.label].site(site)[pos]
        if rep.kind == "source":
            return source.site(site)[pos]
        if rep.kind == "zero":
            return torch.zeros_like(own[pos])
        if rep.kind == "mean":
            return pool.mean[site][None].expand(len(pos), -1)
        if rep.kind == "step_mean":
            return pool.step_mean[site][pos]
        if rep.kind == "noise":
            eps = noise(tuple(own.shape), seed, pair_index, site)[pos].to(own.device)  # [n, d]
            scale = own[pos].float().norm(dim=-1, keepdim=True) / math.sqrt(own.shape[-1])
            return (own[pos].float() + noise_scale * scale * eps).to(own.dtype)
        if rep.kind == "resample":
            if partner is None:
                raise ValueError("replacement 'resample' needs another pair")
            return partner.site(site)[pos]
        raise ValueError(f"unknown step replacement {rep.label!r}")

    return values


def run_intermediates(pairs: Sequence[Pair]) -> list[list[float] | None]:
    """Per run of a pool of pairs (pair i's clean at 2i, corrupted at 2i+1): its ``intermediates``
    (the variant's extra field, docs/method.md §9.1), None where it has none."""
    out: list[list[float] | None] = []
    for pair in pairs:
        for name in ("clean", "corrupted"):
            vals = pair.variant(name).extra.get("intermediates")
            out.append([float(v) for v in vals] if isinstance(vals, list) else None)
    return out


def pick_donors(
    intermediates: Sequence[Sequence[float] | None], target: int, n_intermediates: int, seed: int
) -> dict[str, int]:
    """Donor runs for run ``target`` (indices into ``intermediates``, one entry per run of the pool):
    ``same:s`` = a run with the same value at intermediate s, ``diff:s`` = one with a different
    value; seeded choice; absent when no run qualifies (or the target has no intermediates)."""
    mine = intermediates[target]
    out: dict[str, int] = {}
    if mine is None:
        return out
    rng = random.Random(seed * 1_000_003 + target)
    for s in range(min(n_intermediates, len(mine))):
        for kind in DONOR_REPLACEMENTS:
            cands = [
                j
                for j, other in enumerate(intermediates)
                if j != target
                and other is not None
                and len(other) > s
                and (math.isclose(other[s], mine[s]) == (kind == "same"))
            ]
            if cands:
                out[f"{kind}:{s}"] = rng.choice(cands)
    return out


# ---- result rows -----------------------------------------------------------------------------------
def step_rows(base: PairBaseline, specs: Sequence[PatchSpec], cells: Sequence[dict]) -> tuple[list, list]:
    """Rows of ``steps.parquet`` and ``influence.parquet`` (docs/ARCHITECTURE.md) for one pair.

    ``replacement``: the kind (``same``/``diff`` of the intermediate experiment) or the label
    (``number:s``: the thought experiment groups rows by replacement); ``intermediate``: s or -1."""
    flags = {
        "clean_correct": base.clean_correct,
        "corrupted_correct": base.corrupted_correct,
        "flagged": not (base.clean_correct and base.corrupted_correct),
    }
    truth = base.corrupted_answer if base.direction == "denoise" else base.clean_answer
    # the source run's answer: "the patched run now gives the clean answer" when denoising
    source_answer = base.clean_answer if base.direction == "denoise" else base.corrupted_answer
    rows, influence = [], []
    for spec, m in zip(specs, cells):
        flipped = list(m["answer_ids"]) != list(base.target.answer_ids)
        if spec.experiment == "influence":
            for j, (c, r) in enumerate(zip(m["thought_cos"], m["thought_rel_l2"])):
                influence.append(
                    {
                        "pair_id": base.pair_id,
                        "replacement": spec.replacement,
                        "step": spec.index,
                        "later": j,
                        "thought_cos": c,
                        "thought_rel_l2": r,
                        "kl": m["kl"],
                        "flipped": flipped,
                        "flagged": flags["flagged"],
                    }
                )
            continue
        rep = spec.replacement_value
        rows.append(
            {
                "pair_id": base.pair_id,
                "experiment": spec.experiment,
                "site": spec.component,
                "replacement": rep.kind if rep.is_donor else rep.label,  # number:s keeps s (one group per s)
                "position": spec.index,
                "intermediate": -1 if rep.intermediate is None else rep.intermediate,
                "kl": m["kl"],
                "answer_logit_diff": m["answer_logit_diff"],
                "recovery": m["recovery"],
                "logprob_final": m["logprob_final"],
                "p_final": math.exp(m["logprob_final"]),
                "pred_answer": m["pred_answer"],
                "flipped": flipped,
                "correct": same_number(m["pred_answer"], truth),
                "to_source": same_number(m["pred_answer"], source_answer),
                **flags,
            }
        )
    return rows, influence
