"""The ``steer`` experiment of a run (docs/method.md §16) through the one stage runner.

Every pair's target run gets ``alpha * scale * v`` added at each site (the run's ``--component`` at
every ``--steer-layers`` layer and thought p), for each ``--steer-alphas`` alpha, with the direction
``v`` (``meandiff``: the pool's mean source - target difference at the site; or ``--steer-vector``)
and ``--steer-controls`` random directions of the same norm. One file per pair
(``results/steer/NNNNN.json``, ``--resume`` skips finished pairs), assembled into
``results/steer.parquet`` (:data:`~latentpatch.names.STEER_COLUMNS`). The directions and scales pool
every pair of the run (every shard's, for a shard), as the ``mean`` replacement does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from latentpatch.data.pairs import Pair
from latentpatch.errors import LatentPatchError
from latentpatch.names import STEER_DIR, STEER_EXPERIMENT
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference
from latentpatch.patching.metrics import same_number
from latentpatch.patching.specs import PatchSpec
from latentpatch.patching.steering import (
    RANDOM,
    load_direction,
    random_directions,
    site_differences,
    spec_alpha,
    steer_specs,
    steer_values,
    unit,
)
from latentpatch.pipeline.manifest import RunContext
from latentpatch.pipeline.stages import Done, Plan, Stage, run_stage
from latentpatch.pipeline.values import run_value_pool


def steer_rows(base, specs: Sequence[PatchSpec], cells: Sequence[dict], direction: str) -> list[dict[str, Any]]:
    """Rows of ``steer.parquet`` for one pair (its flags, the answer metrics of each spec)."""
    truth = base.corrupted_answer if base.direction == "denoise" else base.clean_answer
    source_answer = base.clean_answer if base.direction == "denoise" else base.corrupted_answer
    flagged = not (base.clean_correct and base.corrupted_correct)
    return [
        {
            "pair_id": base.pair_id,
            "direction": spec.mode,
            "control": spec.mode != direction,
            "component": spec.component,
            "layer": spec.layer,
            "position": spec.index,
            "alpha": spec_alpha(spec),
            "kl": m["kl"],
            "answer_logit_diff": m["answer_logit_diff"],
            "recovery": m["recovery"],
            "pred_answer": m["pred_answer"],
            "flipped": list(m["answer_ids"]) != list(base.target.answer_ids),
            "correct": same_number(m["pred_answer"], truth),
            "to_source": same_number(m["pred_answer"], source_answer),
            "flagged": flagged,
        }
        for spec, m in zip(specs, cells)
    ]


def steer_stage(ctx: RunContext, all_pairs: Sequence[Pair]) -> Stage:
    """Steering as a stage: directions and scales from the run's pool, then every pair's specs."""
    model, config = ctx.model, ctx.config
    component = config.component
    direction = "file" if config.steer_vector else (config.steer_direction or "meandiff")

    def prepare() -> Plan:
        pool = run_value_pool(ctx, all_pairs)
        diffs = site_differences(pool.pool, component)  # [n, L, K, d]
        scale = diffs.norm(dim=-1).mean(0)  # [L, K]: the typical patch size at each site
        shape = tuple(diffs.shape[1:])
        if config.steer_vector:
            v = load_direction(config.steer_vector, shape)  # type: ignore[arg-type]
        elif direction != "meandiff":
            v = question_direction(ctx, direction)
        else:
            v = diffs.mean(0)
        directions = {direction: unit(v)}
        for k in range(config.steer_control_count):
            directions[f"{RANDOM}{k}"] = random_directions(shape, config.seed, k)  # type: ignore[arg-type]
        specs = steer_specs(
            model.n_layers,
            model.num_latent,
            component,
            config.steer_alpha_values,
            config.steer_control_count,
            direction,
            config.steer_layer_values,
        )

        def work(group: Sequence[int]) -> list[Done]:
            return [Done(_steer_pair(ctx, i, specs, directions, scale, direction)) for i in group]

        return Plan(work=work, units=len(specs))

    return Stage("steering", STEER_DIR, "rows", "steer_s", prepare)


def question_direction(ctx: RunContext, direction: str) -> torch.Tensor:
    """[L, K, d] of a ``label:``/``probe:`` direction, from this run's probe activations and question labels
    (the steered component at the thought positions)."""
    import pandas as pd

    from latentpatch.names import ACTIVATIONS_DIR, QUESTIONS_FILE
    from latentpatch.probing.activations import read_sites
    from latentpatch.probing.directions import label_difference, parse_direction, probe_weights

    kind, label, values = parse_direction(direction)
    table = pd.read_parquet(ctx.paths.results / QUESTIONS_FILE)
    column = label if label in table.columns else f"label_{label}"
    if column not in table.columns:
        known = ", ".join(c for c in table.columns if c not in ("question_id", "group", "question"))
        raise LatentPatchError(
            f"--steer-direction {direction}: the questions have no label {label!r}; fix: use {known}"
        )
    labels = [None if v is None or v != v else v for v in table[column]]
    sites = read_sites(sorted((ctx.paths.results / ACTIVATIONS_DIR).glob("*.safetensors")))
    acts = sites[ctx.config.component][:, :, : ctx.model.num_latent].numpy()  # [n, L, K, d]: the thought positions
    if kind == "label":
        v = label_difference(acts, labels, values[0], values[1], label)
    else:
        v = probe_weights(acts, labels, values[0], ctx.config.seed, label)
    return torch.as_tensor(v, dtype=torch.float32)


def _steer_pair(
    ctx: RunContext,
    i: int,
    specs: list[PatchSpec],
    directions: dict[str, torch.Tensor],
    scale: torch.Tensor,
    direction: str,
) -> dict[str, Any]:
    base = ctx.bases[i]
    values = steer_values(base.target.acts[ctx.config.component], directions, scale)
    if ctx.config.engine == "fast":
        cells = sweep_fast(ctx.model, base, specs, values, EngineOptions(ctx.batch_size))
    else:
        cells = sweep_reference(ctx.model, base, specs, values)
    return {"pair_id": base.pair_id, "index": ctx.indices[i], "rows": steer_rows(base, specs, cells, direction)}


def sweep_steer(ctx: RunContext, all_pairs: Sequence[Pair]) -> None:
    """The steer experiment, when ``--experiments`` names it (a default run never calls it)."""
    if STEER_EXPERIMENT in ctx.config.experiments:
        run_stage(ctx, steer_stage(ctx, all_pairs))
