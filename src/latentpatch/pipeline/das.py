"""The ``das`` experiment of a run (docs/method.md §20): distributed alignment search per site and k.

1. Problems: both questions of every pair the run keeps (a pair is one group), each with its
   synthetic program (``extra["program"]``) where it has one; with ``--questions``, the question
   set's (:mod:`~latentpatch.pipeline.das_questions`: GSM8K worked solutions bring their parsed
   ``<<...>>`` chain as program); only the problems the model answers
   right (an interchange of a value the model does not compute says nothing).
2. Groups are split once (seeded): 30% held out. Interchange examples (base, source, counterfactual)
   are drawn within each side by the high-level variable (``--das-variable``):
   ``intermediate:S``: the base program recomputed with step S forced to the source's value
   (:func:`~latentpatch.data.synthetic.program_results`; for a worked solution
   :meth:`Chain.forced <latentpatch.data.chain.Chain.forced>`); ``answer``: the source's answer;
   ``column:NAME``: each pair's clean side (base) and corrupted side (source), the counterfactual in the
   clean variant's field NAME. Only examples whose counterfactual differs from the base answer are kept.
3. Per site (``--das-sites``) and k (``--das-k``): a subspace trained on the training examples
   (:func:`~latentpatch.probing.das.train_subspace`), one of the same k trained on shuffled
   counterfactuals, and a random one; each scored on the held-out examples (IIA terms). Per site also
   the full interchange (k = d) and the base run (k = 0). Each (site, k) commits
   ``results/das/<site>.k<k>.json`` and the basis ``.safetensors`` (``--resume`` skips them), then
   ``results/das.parquet`` (:data:`~latentpatch.names.DAS_COLUMNS`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from latentpatch.data.chain import Chain
from latentpatch.data.pairs import VARIANTS, Pair
from latentpatch.data.synthetic import program_results
from latentpatch.errors import LatentPatchError
from latentpatch.files import write_json, write_parquet
from latentpatch.model.latent import LatentModel
from latentpatch.model.streams import pair_stream
from latentpatch.names import DAS_COLUMNS, DAS_DIR, DAS_EXPERIMENT, DAS_FILE
from latentpatch.patching.metrics import same_number
from latentpatch.pipeline.das_options import (
    DEFAULT_PAIRS,
    DEFAULT_SITES,
    DEFAULT_STEPS,
    das_ks,
    das_variable,
)
from latentpatch.pipeline.manifest import RunContext
from latentpatch.pipeline.options import parse_shard
from latentpatch.probing.das import (
    DasSet,
    DasSite,
    Example,
    Interchange,
    Subspace,
    Training,
    full_interchange,
    interchange_answers,
    parse_das_sites,
    save_subspace,
)

#: The share of groups held out, and the batch of a training step (fixed: they change the numbers).
TEST_FRACTION, DAS_BATCH, DAS_LR = 0.3, 16, 0.01
#: Seed offsets: the random control's basis and the shuffled control's permutation differ from the fit's.
RANDOM_SEED, SHUFFLE_SEED = 1_000_003, 2_000_003


@dataclass(frozen=True)
class Problem:
    """One question of a pair: its prompt ids, answer, step results (None: no program), group, fields."""

    prompt: tuple[int, ...]
    answer: float
    program: Any
    results: tuple[int | float, ...] | None
    group: str
    extra: dict


def problems_of(model: LatentModel, pairs: Sequence[Pair]) -> list[Problem]:
    """Both sides of every pair as problems (group = the pair id)."""
    out = []
    for pair in pairs:
        for name in VARIANTS:
            v = pair.variant(name)
            program = v.extra.get("program")
            results = program_results(program) if program else None
            out.append(
                Problem(
                    tuple(model.prompt_ids(v.question)),
                    float(v.answer),
                    program,
                    tuple(results) if results else None,
                    pair.pair_id,
                    dict(v.extra),
                )
            )
    return out


def split_groups(groups: Sequence[str], seed: int) -> set[str]:
    """The held-out groups: a seeded :data:`TEST_FRACTION` of the distinct groups (at least one).

    >>> sorted(split_groups(["a", "b", "c", "d"], 0)) == sorted(split_groups(["d", "c", "b", "a"], 0))
    True
    """
    distinct = sorted(set(groups))
    random.Random(seed).shuffle(distinct)
    return set(distinct[: max(1, math.ceil(TEST_FRACTION * len(distinct)))])


def counterfactual(kind: str, arg: str, base: Problem, source: Problem) -> float | None:
    """The high-level model's answer for ``base`` with the variable taken from ``source`` (None: no such
    interchange: a step missing, an invalid recomputation, the same value).

    >>> p = Problem((), 20, [("add", 2, 3), ("mul", "#0", 4)], (5, 20), "a", {})
    >>> s = Problem((), 9, [("add", 1, 5), ("add", "#0", 3)], (6, 9), "b", {})
    >>> counterfactual("intermediate", "0", p, s), counterfactual("answer", "", p, s)
    (24.0, 9.0)
    """
    if kind == "answer":
        return None if same_number(base.answer, source.answer) else float(source.answer)
    step = int(arg)
    if base.results is None or source.results is None or step >= min(len(base.results), len(source.results)):
        return None
    if base.results[step] == source.results[step]:
        return None
    if isinstance(base.program, Chain):  # a GSM8K worked solution (data/chain.py)
        values = base.program.recompute(step, source.results[step])
        valid = values is not None and min(values) >= 0  # as program_results: no negative count
        return float(values[base.program.answer_step]) if valid and values is not None else None
    forced = program_results(base.program, forced={step: int(source.results[step])})
    return None if forced is None else float(forced[-1])


def draw_examples(problems: Sequence[Problem], variable: tuple[str, str], n: int, seed: int) -> list[Example]:
    """Up to ``n`` distinct seeded (base, source) examples among ``problems`` (different groups) whose
    counterfactual exists and differs from the base answer."""
    kind, arg = variable
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    out: list[Example] = []
    for _ in range(50 * n):
        if len(out) >= n or len(problems) < 2:
            break
        i, j = rng.sample(range(len(problems)), 2)
        b, s = problems[i], problems[j]
        if (i, j) in seen or b.group == s.group:
            continue
        seen.add((i, j))
        cf = counterfactual(kind, arg, b, s)
        if cf is not None and not same_number(cf, b.answer):
            out.append(Example(b.prompt, s.prompt, cf, b.group, s.group))
    return out


def column_examples(problems: Sequence[Problem], name: str) -> list[Example]:
    """``column:NAME``: each pair's clean (base) <- corrupted (source), the counterfactual its clean
    side's field ``name`` (a pair without it is left out)."""
    out = []
    for clean, corrupted in zip(problems[0::2], problems[1::2]):
        value = clean.extra.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(Example(clean.prompt, corrupted.prompt, float(value), clean.group))
    return out


def make_examples(ctx: RunContext, pairs: Sequence[Pair]) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples of the run's pairs (module docstring, steps 1-2)."""
    model, config = ctx.model, ctx.config
    kind, arg = das_variable(config.das_variable)
    if config.questions:  # the question set's problems (pipeline/das_questions.py)
        from latentpatch.pipeline.das_questions import question_problems

        problems = question_problems(ctx)
    else:
        problems = problems_of(model, pairs)
    preds: list[float | None] = []
    for start in range(0, len(problems), 64):
        chunk = problems[start : start + 64]  # each problem's own draw stream (docs/method.md §21)
        preds += model.answer([list(p.prompt) for p in chunk], streams=[pair_stream(p.group) for p in chunk])
    right = [p for p, pred in zip(problems, preds) if same_number(pred, p.answer)]
    held = split_groups([p.group for p in problems], config.seed)
    n = config.das_pairs or DEFAULT_PAIRS
    if kind == "column":
        if not any(arg in p.extra for p in problems):
            raise LatentPatchError(
                f"--das-variable column:{arg}: no pair has a field {arg!r}; fix: add it to the clean side"
            )
        every = column_examples(problems, arg)
        train = [e for e in every if e.group not in held][:n]
        test = [e for e in every if e.group in held][: max(1, n // 2)]
    else:
        train = draw_examples([p for p in right if p.group not in held], (kind, arg), n, config.seed)
        test = draw_examples([p for p in right if p.group in held], (kind, arg), max(1, n // 2), config.seed + 1)
    if len(train) < 4 or not test:
        raise LatentPatchError(
            f"--experiments das: only {len(train)} training and {len(test)} held-out interchange pairs for "
            f"--das-variable {config.das_variable or 'intermediate:0'}; fix: give more pairs (with a program per "
            "question for intermediate:S) or another variable"
        )
    return train, test


def site_file(ctx: RunContext, site: DasSite, tag: str) -> Path:
    return ctx.paths.results / DAS_DIR / f"{site}.{tag}.json"


def _rows(
    site: DasSite, k: int, method: str, variable: str, test: DasSet, preds: list[float | None], loss: float
) -> list[dict[str, Any]]:
    return [
        {
            "site": str(site),
            "component": site.component,
            "layer": site.layer,
            "position": site.position,
            "k": k,
            "method": method,
            "variable": variable,
            "example": i,
            "group": e.group,
            "counterfactual": e.counterfactual,
            "pred_answer": math.nan if pred is None else float(pred),
            "hit": same_number(pred, e.counterfactual),
            "train_loss": loss,
        }
        for i, (e, pred) in enumerate(zip(test.examples, preds))
    ]


def run_site(ctx: RunContext, site: DasSite, train: DasSet, test: DasSet, ks: Sequence[int], variable: str) -> None:
    """Every k at ``site`` not yet committed, then the full interchange and base run."""
    config, d = ctx.config, ctx.model.d_model
    settings = Training(steps=config.das_steps or DEFAULT_STEPS, batch=DAS_BATCH, lr=DAS_LR, seed=config.seed)

    def score(fn: Interchange) -> list[float | None]:
        return interchange_answers(test, site, fn)

    for k in ks:
        path = site_file(ctx, site, f"k{k}")
        if path.is_file():
            continue
        fit, losses = _fit(train, site, k, settings, shuffle=False)
        shuffled, shuffled_losses = _fit(train, site, k, settings, shuffle=True)
        rnd = Subspace(d, k, seed=config.seed + RANDOM_SEED)
        info = {"site": str(site), "k": k, "variable": variable, "model": ctx.model.name, "d_model": d}
        info.update(training=asdict(settings), n_train=len(train), final_loss=losses[-1] if losses else None)
        save_subspace(path.with_suffix(".safetensors"), fit, info)
        last = losses[-1] if losses else math.nan
        rows = _rows(site, k, "das", variable, test, score(fit), last)
        rows += _rows(site, k, "random", variable, test, score(rnd), math.nan)
        rows += _rows(
            site, k, "shuffled", variable, test, score(shuffled), shuffled_losses[-1] if shuffled_losses else math.nan
        )
        write_json(path, {"site": str(site), "k": k, "rows": rows})
        ctx.progress.advance(1)
    path = site_file(ctx, site, "full")
    if not path.is_file():
        rows = _rows(site, d, "full", variable, test, score(full_interchange), math.nan)
        rows += _rows(site, 0, "base", variable, test, score(Subspace(d, 0)), math.nan)
        write_json(path, {"site": str(site), "k": d, "rows": rows})


def _fit(train: DasSet, site: DasSite, k: int, settings: Training, shuffle: bool) -> tuple[Subspace, list[float]]:
    from latentpatch.probing.das import train_subspace

    if shuffle:
        settings = Training(settings.steps, settings.batch, settings.lr, settings.seed + SHUFFLE_SEED)
    return train_subspace(train, site, k, settings, shuffle_labels=shuffle)


def assemble_das(results: Path) -> None:
    """``results/das.parquet`` from every committed ``results/das/*.json`` (sorted by name)."""
    rows: list[dict[str, Any]] = []
    for path in sorted((results / DAS_DIR).glob("*.json")):
        rows += json.loads(path.read_text())["rows"]
    write_parquet(results / DAS_FILE, rows, DAS_COLUMNS)


def sweep_das(ctx: RunContext, all_pairs: Sequence[Pair]) -> None:
    """The das experiment, when ``--experiments`` names it (a default run never calls it)."""
    if DAS_EXPERIMENT not in ctx.config.experiments:
        return
    model, config = ctx.model, ctx.config
    try:
        sites = parse_das_sites(config.das_sites or DEFAULT_SITES, model.n_layers, model.num_latent)
    except ValueError as err:
        raise LatentPatchError(f"--das-sites: {err}") from None
    if any(s.component == "thought_pre" for s in sites) and not model.feedback.has_pre_site:
        raise LatentPatchError("--das-sites thought_pre: this model feeds its states back unchanged; fix: use thought")
    if config.shard:  # a shard fits its share of the sites on every pair's examples (merge joins the files)
        index, n_shards = parse_shard(config.shard)
        sites = [s for j, s in enumerate(sites) if j % n_shards == index]
    ks = [k for k in das_ks(config.das_k) if k < model.d_model]
    variable = config.das_variable or "intermediate:0"
    t = time.perf_counter()
    todo = [s for s in sites if not all(site_file(ctx, s, tag).is_file() for tag in [*(f"k{k}" for k in ks), "full"])]
    if not todo:  # a resumed run whose every (site, k) is committed, or a shard without a site
        assemble_das(ctx.paths.results)
        return
    train_examples, test_examples = make_examples(ctx, all_pairs)
    train, test = DasSet(model, train_examples, sites), DasSet(model, test_examples, sites)
    ctx.progress.stage("das", sum(not site_file(ctx, s, f"k{k}").is_file() for s in sites for k in ks))
    with torch.random.fork_rng(devices=[]):
        for site in todo:
            run_site(ctx, site, train, test, ks, variable)
    assemble_das(ctx.paths.results)
    ctx.timings["das_s"] = time.perf_counter() - t
