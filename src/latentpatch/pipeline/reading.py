"""The reading experiments of a run (docs/method.md §14): ``--experiments lens,attention``, and the
per-head preparation of ``--component head_out``.

:func:`sweep_reading` runs after the other sweeps, only when ``lens`` or ``attention`` is named: per
pair and variant (clean, corrupted) one unpatched rollout each, committed as one file per pair and
experiment (``results/lens/NNNNN.json``, ``results/attention/NNNNN.json``; ``--resume`` skips them),
then assembled into ``results/lens.parquet``, ``results/lens_top.parquet`` and
``results/attention.parquet`` (columns in :mod:`latentpatch.names`). Attention maps are reduced per
pair before the next pair starts (never a whole run's maps in memory). A default run never calls it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from latentpatch.data.pairs import Pair
from latentpatch.files import write_json, write_parquet
from latentpatch.model.heads import head_shape
from latentpatch.model.latent import LatentModel
from latentpatch.names import (
    ATTENTION_COLUMNS,
    ATTENTION_DIR,
    ATTENTION_FILE,
    HEAD_COMPONENT,
    LENS_COLUMNS,
    LENS_DIR,
    LENS_FILE,
    LENS_TOP_COLUMNS,
    LENS_TOP_FILE,
    READING_EXPERIMENTS,
)
from latentpatch.patching.heads import add_head_acts, expand_heads
from latentpatch.patching.reading import attention_run, known_values, lens_run, role_mass, token_roles, value_token
from latentpatch.pipeline.manifest import RunContext
from latentpatch.rundir import RunPaths

VARIANTS = ("clean", "corrupted")
#: Tokens listed per lens cell.
LENS_TOP_K = 5


def prepare_heads(ctx: RunContext) -> None:
    """With ``--component head_out``: one spec per head, and per-head activations on every baseline."""
    if ctx.config.component != HEAD_COMPONENT:
        return
    ctx.specs = expand_heads(ctx.specs, head_shape(ctx.model.lm)[0])
    add_head_acts(ctx.model, [rec for b in ctx.bases for rec in (b.clean, b.corrupted)])


def lens_entry(model: LatentModel, pair: Pair, k: int = LENS_TOP_K) -> dict[str, list[dict]]:
    """``{"lens": rows, "lens_top": rows}`` of both variants of ``pair`` (rows without ``pair_id``)."""
    lens: list[dict] = []
    top: list[dict] = []
    for name in VARIANTS:
        v = pair.variant(name)
        inter = v.extra.get("intermediates")
        values = known_values(v.question, float(v.answer), inter if isinstance(inter, list) else None)
        tokens = [value_token(model, x) for _, _, x in values] if model.tokenizer is not None else []
        res = lens_run(model, model.prompt_ids(v.question), tokens, k)
        for li, layer in enumerate(res.layers):
            for q in range(res.top_ids.shape[1]):
                for j, (kind, index, value) in enumerate(values if tokens else []):
                    lens.append(
                        dict(variant=name, layer=layer, position=q, kind=kind, index=index, value=value)
                        | dict(token_id=tokens[j], rank=int(res.ranks[li, q, j]), prob=float(res.probs[li, q, j]))
                    )
                for r in range(k):
                    t = int(res.top_ids[li, q, r])
                    text = model.tokenizer.decode([t]) if model.tokenizer is not None else str(t)
                    top.append(
                        dict(variant=name, layer=layer, position=q, k=r, token_id=t, token=text)
                        | dict(prob=float(res.top_probs[li, q, r]))
                    )
    return {"lens": lens, "lens_top": top}


def attention_entry(model: LatentModel, pair: Pair) -> dict[str, Any]:
    """Role masses (mean over heads) of both variants and each variant's map over the prompt tokens,
    ``maps[variant]`` = ``{tokens, roles, weights: [L][Q][T_q]}`` (mean over heads)."""
    rows: list[dict] = []
    maps: dict[str, dict] = {}
    for name in VARIANTS:
        question = pair.variant(name).question
        prompt = model.prompt_ids(question)
        weights, T_q = attention_run(model, prompt)  # [L, H, Q, T]
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
    return {"rows": rows, "maps": maps}


def sweep_reading(ctx: RunContext) -> None:
    """Run the requested reading experiments on every pair not yet committed, then assemble."""
    names = [e for e in READING_EXPERIMENTS if e in ctx.config.experiments]
    if not names:
        return
    t = time.perf_counter()
    results = RunPaths(ctx.out).results
    ctx.progress.stage("reading", len(ctx.bases) * len(names))
    for i, (base, k) in enumerate(zip(ctx.bases, ctx.indices)):
        for name in names:
            path = results / (LENS_DIR if name == "lens" else ATTENTION_DIR) / f"{k:05d}.json"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                pair = ctx.pairs[i]
                entry = lens_entry(ctx.model, pair) if name == "lens" else attention_entry(ctx.model, pair)
                write_json(path, {"pair_id": base.pair_id, "index": k, **entry})
            ctx.progress.advance()
    ctx.timings["reading_s"] = time.perf_counter() - t
    assemble_reading(ctx.out)


def _rows(folder: Path, key: str) -> list[dict]:
    rows: list[dict] = []
    for f in sorted(folder.glob("*.json")):
        entry = json.loads(f.read_text())
        rows += [{"pair_id": entry["pair_id"], **row} for row in entry[key]]
    return rows


def assemble_reading(out: Path | str) -> None:
    """Per-pair reading files (global pair order) -> ``lens.parquet``, ``lens_top.parquet``, ``attention.parquet``."""
    results = RunPaths(out).results
    if (results / LENS_DIR).is_dir():
        write_parquet(results / LENS_FILE, _rows(results / LENS_DIR, "lens"), LENS_COLUMNS)
        write_parquet(results / LENS_TOP_FILE, _rows(results / LENS_DIR, "lens_top"), LENS_TOP_COLUMNS)
    if (results / ATTENTION_DIR).is_dir():
        write_parquet(results / ATTENTION_FILE, _rows(results / ATTENTION_DIR, "rows"), ATTENTION_COLUMNS)
