"""The reading experiments of a run (docs/method.md §14): ``--experiments lens,attention``, and the
per-head preparation of ``--component head_out``.

:func:`sweep_reading` runs after the other sweeps, only when ``lens`` or ``attention`` is named: per
pair and variant (clean, corrupted) one unpatched rollout each, committed as one file per pair and
experiment (``results/lens/NNNNN.json``, ``results/attention/NNNNN.json``; ``--resume`` skips them),
each experiment a stage of :mod:`latentpatch.pipeline.stages`, then assembled
(``assembly.assemble_reading``) into ``results/lens.parquet``, ``results/lens_top.parquet`` and
``results/attention.parquet`` (columns in :mod:`latentpatch.names`). Attention maps are reduced per
pair before the next pair starts (never a whole run's maps in memory). A default run never calls it.

``--lens tuned|both`` (docs/method.md §14.1): before the lens stage's pairs, the tuned lens is loaded
from the activation cache folder or trained (:func:`run_tuned_lens`) on the questions of every pair the
run selects (both variants, every shard's, before ``--only-correct``; a pair's two questions are held
out together), and its report goes to the manifest's ``tuned_lens``. Each lens row then carries a
``lens`` column ("logit" / "tuned"); with the default ``--lens logit`` the rows and files are as before.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from latentpatch.data.pairs import Pair
from latentpatch.errors import LatentPatchError
from latentpatch.model.heads import head_shape
from latentpatch.model.latent import LatentModel
from latentpatch.model.streams import pair_stream
from latentpatch.names import (
    ATTENTION_DIR,
    DEFAULT_LENS,
    HEAD_COMPONENT,
    LENS_COLUMN,
    LENS_DIR,
    LENS_KINDS,
    READING_EXPERIMENTS,
)
from latentpatch.patching.heads import add_head_acts, expand_heads
from latentpatch.patching.reading import (
    attention_run,
    known_values,
    lens_read,
    lens_streams,
    role_mass,
    thought_attention,
    thought_keys,
    token_roles,
    value_token,
)
from latentpatch.pipeline.cache import default_cache_dir
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.manifest import RunContext
from latentpatch.pipeline.selection import load_run_pairs, pairs_to_run
from latentpatch.pipeline.stages import Done, Plan, Stage, run_stage
from latentpatch.probing.tuned_lens import LensSettings, TrainedLens, TunedLens, tuned_lens

VARIANTS = ("clean", "corrupted")
#: Tokens listed per lens cell.
LENS_TOP_K = 5
#: How a run (and ``inspect --lens tuned``) trains its tuned lens; the seed is the run's ``--seed``.
RUN_LENS_SETTINGS = LensSettings()


def prepare_heads(ctx: RunContext) -> None:
    """With ``--component head_out``: one spec per head, and per-head activations on every baseline."""
    if ctx.config.component != HEAD_COMPONENT:
        return
    ctx.specs = expand_heads(ctx.specs, head_shape(ctx.model.lm)[0])
    add_head_acts(ctx.model, [rec for b in ctx.bases for rec in (b.clean, b.corrupted)])


def lens_entry(
    model: LatentModel, pair: Pair, k: int = LENS_TOP_K, lenses: Mapping[str, TunedLens | None] | None = None
) -> dict[str, list[dict]]:
    """``{"lens": rows, "lens_top": rows}`` of both variants of ``pair`` (rows without ``pair_id``).

    ``lenses``: name -> tuned lens (None: the logit lens), each row tagged ``lens`` = its name; None (the
    default run): the logit lens alone, rows without a ``lens`` key (the files as before)."""
    lens: list[dict] = []
    top: list[dict] = []
    for name in VARIANTS:
        v = pair.variant(name)
        inter = v.extra.get("intermediates")
        values = known_values(v.question, float(v.answer), inter if isinstance(inter, list) else None)
        tokens = [value_token(model, x) for _, _, x in values] if model.tokenizer is not None else []
        # one rollout, read with every lens; the pair's draw stream (docs/method.md §21)
        streams = lens_streams(model, model.prompt_ids(v.question), pair_stream(pair.pair_id))
        for lens_name, reader in (lenses or {DEFAULT_LENS: None}).items():
            tag = {LENS_COLUMN: lens_name} if lenses is not None else {}
            res = lens_read(model, streams, tokens, k, reader)
            for li, layer in enumerate(res.layers):
                for q in range(res.top_ids.shape[1]):
                    for j, (kind, index, value) in enumerate(values if tokens else []):
                        lens.append(
                            tag
                            | dict(variant=name, layer=layer, position=q, kind=kind, index=index, value=value)
                            | dict(token_id=tokens[j], rank=int(res.ranks[li, q, j]), prob=float(res.probs[li, q, j]))
                        )
                    for r in range(k):
                        t = int(res.top_ids[li, q, r])
                        text = model.tokenizer.decode([t]) if model.tokenizer is not None else str(t)
                        top.append(
                            tag
                            | dict(variant=name, layer=layer, position=q, k=r, token_id=t, token=text)
                            | dict(prob=float(res.top_probs[li, q, r]))
                        )
    return {"lens": lens, "lens_top": top}


def lens_questions(
    model: LatentModel, all_pairs: Sequence[Pair], config: RunConfig
) -> tuple[list[list[int]], list[str]]:
    """The prompts a run's tuned lens trains on and their groups (pair ids): both variants of every pair
    the run selects (every shard's; ``--only-correct`` drops none: the lens reads the model, right or wrong).
    A run needs two pairs at least (one is held out)."""
    selected, _ = pairs_to_run(all_pairs, dataclasses.replace(config, shard=None))
    if len(selected) < 2:
        raise LatentPatchError(
            f"--lens {config.lens}: the tuned lens trains on the run's pairs and holds some out, so it needs 2 pairs "
            f"at least (the run has {len(selected)}); fix: run more pairs (--limit), or use --lens logit"
        )
    prompts = [model.prompt_ids(p.variant(v).question) for _, p in selected for v in VARIANTS]
    return prompts, [p.pair_id for _, p in selected for _ in VARIANTS]


def lens_cache_dir(cache_dir: str | None, use_cache: bool) -> Path | None:
    """Where trained lenses are kept: the activation cache directory (None with ``--no-use-cache``)."""
    return Path(cache_dir or default_cache_dir()) if use_cache else None


def manifest_entry(trained: TrainedLens, cache_dir: Path | None) -> dict[str, Any]:
    """The manifest's ``tuned_lens``: whether it was loaded, its cache folder (relative to the cache
    directory), and its report (settings, split sizes, held-out KL per layer)."""
    where = str(trained.path.relative_to(cache_dir)) if trained.path is not None and cache_dir is not None else None
    return {"loaded": trained.loaded, "cache": where, **trained.report}


def shipped_pairs_lens(model: LatentModel) -> TrainedLens:
    """``inspect --lens tuned``: the tuned lens a ``run --experiments lens --lens tuned`` on the shipped pairs
    (every other option at its default) uses, loaded from the default cache directory or trained and stored."""
    if model.tokenizer is None:
        raise LatentPatchError(
            "--lens tuned trains on the shipped pairs' questions and this model has no tokenizer; fix: use --lens logit"
        )
    config = RunConfig(experiments=("lens",), lens="tuned")
    prompts, groups = lens_questions(model, load_run_pairs(config), config)
    settings = dataclasses.replace(RUN_LENS_SETTINGS, seed=config.seed)
    return tuned_lens(model, prompts, lens_cache_dir(None, True), settings=settings, groups=groups)


def run_tuned_lens(ctx: RunContext, all_pairs: Sequence[Pair]) -> TunedLens:
    """The run's tuned lens (loaded or trained, :func:`latentpatch.probing.tuned_lens.tuned_lens`), its
    report in ``ctx.tuned_lens`` and its time in ``ctx.timings["tuned_lens_s"]``."""
    t = time.perf_counter()
    prompts, groups = lens_questions(ctx.model, all_pairs, ctx.config)
    cache_dir = lens_cache_dir(ctx.config.cache_dir, ctx.config.use_cache)
    ctx.progress.message("tuned lens: loading or training (docs/method.md §14.1) ...")
    settings = dataclasses.replace(RUN_LENS_SETTINGS, seed=ctx.config.seed)
    trained = tuned_lens(ctx.model, prompts, cache_dir, settings=settings, groups=groups)
    ctx.tuned_lens = manifest_entry(trained, cache_dir)
    ctx.timings["tuned_lens_s"] = time.perf_counter() - t
    return trained.lens


def attention_entry(model: LatentModel, pair: Pair) -> dict[str, Any]:
    """Role masses (mean over heads) of both variants and each variant's map over the prompt tokens,
    ``maps[variant]`` = ``{tokens, roles, weights: [L][Q][T_q]}`` (mean over heads)."""
    rows: list[dict] = []
    thoughts: list[dict] = []
    maps: dict[str, dict] = {}
    keys = thought_keys(model.num_latent)
    for name in VARIANTS:
        question = pair.variant(name).question
        prompt = model.prompt_ids(question)
        weights, T_q = attention_run(model, prompt, pair_stream(pair.pair_id))  # [L, H, Q, T]
        per_head = thought_attention(weights, T_q, model.num_latent)  # [L, H, Q, K + 3]
        thoughts += [
            dict(variant=name, layer=layer, head=h, query=q, key=key, weight=round(float(per_head[layer, h, q, j]), 6))
            for layer in range(per_head.shape[0])
            for h in range(per_head.shape[1])
            for q in range(per_head.shape[2])
            for j, key in enumerate(keys)
        ]
        mean = weights.mean(1)  # [L, Q, T]
        roles = token_roles(model, prompt, len(model.question_ids(question)))
        for role, mass in role_mass(mean, roles).items():  # [L, Q]
            rows += [
                dict(variant=name, layer=layer, position=q, role=role, weight=float(mass[layer, q]))
                for layer in range(mass.shape[0])
                for q in range(mass.shape[1])
            ]
        tok = model.tokenizer
        maps[name] = {
            "tokens": [tok.decode([t]) if tok is not None else str(t) for t in prompt],
            "roles": roles,
            "weights": [[[round(float(x), 6) for x in row[:T_q]] for row in layer] for layer in mean],
        }
    return {"rows": rows, "maps": maps, "thoughts": thoughts}


def reading_stage(ctx: RunContext, name: str, all_pairs: Sequence[Pair] = ()) -> Stage:
    """``lens`` or ``attention`` as a stage: one file per pair under ``results/lens/`` or
    ``results/attention/`` (both variants' unpatched rollouts, reduced before the next pair). With
    ``--lens tuned|both`` the lens stage first loads or trains the tuned lens on ``all_pairs``' questions."""
    lenses: dict[str, TunedLens | None] | None = None

    def one(i: int) -> Done:
        if name == "lens":
            entry = lens_entry(ctx.model, ctx.pairs[i], lenses=lenses)
        else:
            entry = attention_entry(ctx.model, ctx.pairs[i])
        return Done({"pair_id": ctx.bases[i].pair_id, "index": ctx.indices[i], **entry})

    def prepare() -> Plan:
        nonlocal lenses
        if name == "lens" and ctx.config.lens != DEFAULT_LENS:
            tuned = run_tuned_lens(ctx, all_pairs or ctx.pairs)
            lenses = {kind: (tuned if kind == "tuned" else None) for kind in LENS_KINDS[ctx.config.lens]}
        return Plan(work=lambda group: [one(i) for i in group])

    folder, key = (LENS_DIR, "lens") if name == "lens" else (ATTENTION_DIR, "rows")
    return Stage(name, folder, key, "reading_s", prepare)


def sweep_reading(ctx: RunContext, all_pairs: Sequence[Pair] = ()) -> None:
    """Run the requested reading experiments on every pair not yet committed (``rundir`` assembles them);
    ``all_pairs``: the run's pair file (the tuned lens's questions; default: this process's pairs)."""
    for name in READING_EXPERIMENTS:
        if name in ctx.config.experiments:
            run_stage(ctx, reading_stage(ctx, name, all_pairs))
