"""The reading experiments of a run (docs/method.md §14): ``--experiments lens,attention``, and the
per-head preparation of ``--component head_out``.

:func:`sweep_reading` runs after the other sweeps, only when ``lens`` or ``attention`` is named: per
pair and variant (clean, corrupted) one unpatched rollout each, committed as one file per pair and
experiment (``results/lens/NNNNN.json``, ``results/attention/NNNNN.json``; ``--resume`` skips them),
each experiment a stage of :mod:`latentpatch.pipeline.stages`, then assembled
(``assembly.assemble_reading``) into ``results/lens.parquet``, ``results/lens_top.parquet`` and
``results/attention.parquet`` (columns in :mod:`latentpatch.names`). Attention maps are reduced per
pair before the next pair starts (never a whole run's maps in memory). A default run never calls it.
"""

from __future__ import annotations

from typing import Any

from latentpatch.data.pairs import Pair
from latentpatch.model.heads import head_shape
from latentpatch.model.latent import LatentModel
from latentpatch.names import ATTENTION_DIR, HEAD_COMPONENT, LENS_DIR, READING_EXPERIMENTS
from latentpatch.patching.heads import add_head_acts, expand_heads
from latentpatch.patching.reading import attention_run, known_values, lens_run, role_mass, token_roles, value_token
from latentpatch.pipeline.manifest import RunContext
from latentpatch.pipeline.stages import Done, Plan, Stage, run_stage

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


def reading_stage(ctx: RunContext, name: str) -> Stage:
    """``lens`` or ``attention`` as a stage: one file per pair under ``results/lens/`` or
    ``results/attention/`` (both variants' unpatched rollouts, reduced before the next pair)."""
    entry_of = lens_entry if name == "lens" else attention_entry

    def one(i: int) -> Done:
        entry = entry_of(ctx.model, ctx.pairs[i])
        return Done({"pair_id": ctx.bases[i].pair_id, "index": ctx.indices[i], **entry})

    def prepare() -> Plan:
        return Plan(work=lambda group: [one(i) for i in group])

    folder, key = (LENS_DIR, "lens") if name == "lens" else (ATTENTION_DIR, "rows")
    return Stage(name, folder, key, "reading_s", prepare)


def sweep_reading(ctx: RunContext) -> None:
    """Run the requested reading experiments on every pair not yet committed (``rundir`` assembles them)."""
    for name in READING_EXPERIMENTS:
        if name in ctx.config.experiments:
            run_stage(ctx, reading_stage(ctx, name))
