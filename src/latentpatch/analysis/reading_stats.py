"""Logit-lens statistics (docs/method.md §14): ``stats.json``'s ``lens`` (no torch).

From ``results/lens.parquet`` (one row per run x known value x layer x position with the rank of the
value's first number token): :func:`lens_stats` gives, per known value, where (layer, position) its
median rank over runs is lowest, that median, and the top-1 rate there; the report's lens section
reads it from ``stats.json``. A run with ``--lens tuned|both`` has a ``lens`` column (docs/method.md
§14.1): the same per lens under ``by_lens``, and :func:`tuned_lens_report` reads the lens's held-out KL
from the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latentpatch.files import json_safe
from latentpatch.names import ATTENTION_FILE, ATTENTION_THOUGHTS_FILE, LENS_COLUMN, LENS_FILE
from latentpatch.rundir import RunPaths, read_manifest


def read_lens(run_dir: Path | str) -> pd.DataFrame | None:
    """``results/lens.parquet``, or None when the run has none."""
    path = RunPaths(run_dir).results / LENS_FILE
    return pd.read_parquet(path) if path.is_file() else None


def read_attention(run_dir: Path | str) -> pd.DataFrame | None:
    """``results/attention.parquet``, or None when the run has none."""
    path = RunPaths(run_dir).results / ATTENTION_FILE
    return pd.read_parquet(path) if path.is_file() else None


def lens_stats(lens: pd.DataFrame | None) -> dict[str, Any] | None:
    """``{best: [{kind, index, layer, position, median_rank, top1_rate, n}, ...]}``, one row per known
    value (``kind`` answer / intermediate / operand, its ``index``), sorted by value; None without a lens.

    With a ``lens`` column (``--lens tuned|both``) also ``lenses`` (the lenses present, logit first) and
    ``by_lens`` (lens -> the same rows over that lens's rows alone); ``best`` is then the first lens's.

    >>> rows = pd.DataFrame({"kind": ["answer"] * 4, "index": [0] * 4, "layer": [0, 0, 1, 1],
    ...     "position": [2, 2, 2, 2], "rank": [5, 7, 0, 1]})
    >>> lens_stats(rows)["best"]
    [{'kind': 'answer', 'index': 0, 'layer': 1, 'position': 2, 'median_rank': 0.5, 'top1_rate': 0.5, 'n': 2}]
    >>> both = pd.concat([rows.assign(lens="logit"), rows.assign(lens="tuned", rank=[0, 0, 3, 3])])
    >>> [(k, v[0]["layer"]) for k, v in lens_stats(both)["by_lens"].items()]
    [('logit', 1), ('tuned', 0)]
    """
    if lens is None or lens.empty:
        return None
    if LENS_COLUMN not in lens.columns:
        return json_safe({"best": _best(lens)})
    present = set(lens[LENS_COLUMN])
    names = [n for n in ("logit", "tuned") if n in present] + sorted(present - {"logit", "tuned"})
    by_lens = {n: _best(lens[lens[LENS_COLUMN] == n]) for n in names}
    return json_safe({"best": by_lens[names[0]], "lenses": names, "by_lens": by_lens})


def _best(lens: pd.DataFrame) -> list[dict[str, Any]]:
    """Per known value: the (layer, position) of the lowest median rank, that median, the top-1 rate there."""
    best = []
    for (kind, index), grp in lens.groupby(["kind", "index"], sort=True):
        med = grp.groupby(["layer", "position"])["rank"].median()
        layer, position = med.idxmin()
        at = grp[(grp["layer"] == layer) & (grp["position"] == position)]
        best.append(
            {
                "kind": str(kind),
                "index": int(index),
                "layer": int(layer),
                "position": int(position),
                "median_rank": float(med.min()),
                "top1_rate": float((at["rank"] == 0).mean()),
                "n": len(at),
            }
        )
    return best


def tuned_lens_report(run_dir: Path | str) -> dict[str, Any] | None:
    """The manifest's ``tuned_lens`` (``--lens tuned|both``: loaded or trained, settings, held-out KL per
    layer of the tuned and the logit lens), None without one."""
    entry = read_manifest(run_dir).get("tuned_lens")
    return entry if isinstance(entry, dict) else None


def role_group(role: str) -> str:
    """The group a prompt role is summarised in: every ``number k`` of the question is "numbers".

    >>> role_group("number 3"), role_group("thoughts")
    ('numbers', 'thoughts')
    """
    return "numbers" if role.startswith("number") else role


def attention_stats(attention: pd.DataFrame | None, seed: int, n_resamples: int = 9999) -> dict[str, Any] | None:
    """``{summary: [{position, role, n, mean, ci_low, ci_high, p, p_holm}, ...]}``: per query position
    (thought p, or K = the first answer position) and role group (:func:`role_group`), the attention
    mass (mean over heads, layers and the clean/corrupted runs of a pair) summarised over pairs with
    a 95% bootstrap CI; None without attention results."""
    if attention is None or attention.empty:
        return None
    from latentpatch.analysis.step_stats import summarize

    grouped = attention.assign(role=attention["role"].map(role_group))
    # per run and layer: the group's mass (a sum over its roles), then the mean over layers and runs
    mass = grouped.groupby(["pair_id", "variant", "layer", "position", "role"], sort=True)["weight"].sum()
    per_pair = mass.groupby(["pair_id", "position", "role"], sort=True).mean().reset_index()
    summary = summarize(per_pair, ["position", "role"], ["weight"], seed, n_resamples)
    return json_safe({"summary": summary.drop(columns="metric").to_dict(orient="records")})


def read_thought_attention(run_dir: Path | str) -> pd.DataFrame | None:
    """``results/attention_thoughts.parquet``, or None when the run has none."""
    path = RunPaths(run_dir).results / ATTENTION_THOUGHTS_FILE
    return pd.read_parquet(path) if path.is_file() else None


def thought_attention_stats(maps: pd.DataFrame | None, seed: int, n_resamples: int = 9999) -> dict[str, Any] | None:
    """How the thoughts read each other: ``{summary: [{key, n, mean, ci_low, ...}], heads: [{layer, head, query,
    key, mean}]}``. ``summary``: per pair, the mean over thoughts p >= 1, layers, heads and both runs of the
    attention on the thought before (``previous``), on earlier thoughts (``earlier``), on the question
    (``question``), on [BOT] (``bot``) and on itself (``self``), summarised over pairs with a 95% CI;
    ``heads``: the mean over pairs and runs per layer, head, query and key group (the maps)."""
    if maps is None or maps.empty:
        return None
    from latentpatch.analysis.step_stats import summarize

    thoughts = maps[maps["key"].str.match(r"t\d+$")]
    position = thoughts["key"].str[1:].astype(int)
    relation = np.select(
        [position == thoughts["query"] - 1, position < thoughts["query"] - 1, position == thoughts["query"]],
        ["previous", "earlier", "self"],
        "later",
    )
    grouped = pd.concat(
        [
            thoughts.assign(relation=relation)[lambda t: t["relation"] != "later"],
            maps[maps["key"].isin(["question", "bot"])].assign(relation=lambda t: t["key"]),
        ]
    )
    K = int(maps.loc[maps["key"].str.match(r"t\d+$"), "key"].str[1:].astype(int).max()) + 1
    grouped = grouped[(grouped["query"] >= 1) & (grouped["query"] < K)]  # thoughts that have a thought before
    # per run, layer, head and query: the mass of each relation (earlier sums over its thoughts)
    mass = grouped.groupby(["pair_id", "variant", "layer", "head", "query", "relation"], sort=True)["weight"].sum()
    per_pair = mass.groupby(["pair_id", "relation"], sort=True).mean().reset_index()
    summary = summarize(per_pair.rename(columns={"relation": "key"}), ["key"], ["weight"], seed, n_resamples)
    heads = maps.groupby(["layer", "head", "query", "key"], sort=True)["weight"].mean().reset_index()
    return json_safe(
        {
            "summary": summary.drop(columns="metric").to_dict(orient="records"),
            "heads": heads.rename(columns={"weight": "mean"}).to_dict(orient="records"),
        }
    )
