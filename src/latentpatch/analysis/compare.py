"""Compare two runs: side-by-side layer and position maps and their difference (A − B).

:func:`compare_runs` reads two run directories (docs/ARCHITECTURE.md), averages every metric over
pairs per cell, and writes into ``OUT``: ``compare.json`` (per cell and metric: n and mean in A
and B, and A − B), ``figures/compare_layer.{png,svg}``,
``figures/compare_position_{metric}.{png,svg}`` and a small self-contained ``compare.html``.
The runs must share their layer x position grid for every experiment compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from latentpatch.analysis.figures import HEATMAP_METRICS, colour_norm, draw_heatmap, page_formats, save_figure
from latentpatch.analysis.html import CSS, embed_png, escape, fmt, table
from latentpatch.analysis.selection import all_positions_rows, mode_rows, primary_component_of, used_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.files import atomic_write_text, json_safe
from latentpatch.names import CELL_KEYS, METRIC_LABELS, POSITION_MODE, SUMMARY_METRICS
from latentpatch.rundir import read_cells, read_manifest

GROUP = ["experiment", "mode", "component"]


def cell_means(cells: pd.DataFrame, metrics: Iterable[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """Long table of per-cell means over pairs: (experiment, mode, component, layer, position, metric, n, mean)."""
    metrics = [m for m in metrics if m in cells.columns]
    long = cells.melt(id_vars=CELL_KEYS + ["pair_id"], value_vars=metrics, var_name="metric", value_name="value")
    long = long.dropna(subset=["value"])
    long["value"] = long["value"].astype(float)
    g = long.groupby(CELL_KEYS + ["metric"], sort=True)["value"]
    return pd.DataFrame({"n": g.size(), "mean": g.mean()}).reset_index()


def _grid(cells: pd.DataFrame) -> dict[tuple, set]:
    return {k: set(zip(g["layer"], g["position"])) for k, g in cells.groupby(GROUP)}


def _describe(grid: set) -> str:
    layers = sorted({layer for layer, _ in grid})
    positions = sorted({p for _, p in grid})
    return f"layers {layers[0]}..{layers[-1]} ({len(layers)}), positions {positions}"


def check_grids(cells_a: pd.DataFrame, cells_b: pd.DataFrame, name_a: str, name_b: str) -> list[tuple]:
    """The (experiment, mode, component) groups both runs have; LatentPatchError if their grids differ."""
    ga, gb = _grid(cells_a), _grid(cells_b)
    common = sorted(set(ga) & set(gb))
    if not common and {k[:2] for k in ga} == {k[:2] for k in gb}:
        comp_a, comp_b = sorted({k[2] for k in ga}), sorted({k[2] for k in gb})
        raise LatentPatchError(
            f"{name_a} and {name_b} differ only in component ({name_a}: {', '.join(comp_a)}; {name_b}: "
            f"{', '.join(comp_b)}), and compare matches cells of the same component; "
            "fix: compare runs made with the same --component"
        )
    if not common:
        raise LatentPatchError(
            f"{name_a} has {sorted(set(ga))} and {name_b} has {sorted(set(gb))}: no experiment in common to compare; "
            "run the same experiments in both"
        )
    for key in common:
        if ga[key] != gb[key]:
            raise LatentPatchError(
                f"layer/position grids differ for {'/'.join(key)}: {name_a} has {_describe(ga[key])}, {name_b} has "
                f"{_describe(gb[key])}; compare runs of models with the same layers and latent thoughts"
            )
    return common


def compare_tables(cells_a: pd.DataFrame, cells_b: pd.DataFrame, groups: list[tuple]) -> pd.DataFrame:
    """Per cell and metric: n_a, mean_a, n_b, mean_b and diff = mean_a − mean_b (for the given groups)."""
    ma, mb = cell_means(cells_a), cell_means(cells_b)
    keep = pd.MultiIndex.from_tuples(groups, names=GROUP)
    ma = ma[ma.set_index(GROUP).index.isin(keep)]
    mb = mb[mb.set_index(GROUP).index.isin(keep)]
    merged = pd.merge(ma, mb, on=CELL_KEYS + ["metric"], how="inner", suffixes=("_a", "_b"))
    merged["diff"] = merged["mean_a"] - merged["mean_b"]
    return merged


def _layer_figure(tab: pd.DataFrame, out_dir: Path, label_a: str, label_b: str, formats) -> list[Path]:
    """Per layer (all latent positions patched): A and B side by side, and A − B, for each metric."""
    d = all_positions_rows(tab)
    if d.empty:
        return []
    comp = primary_component_of(d)
    d = d[d["component"] == comp]
    metrics = [m for m in HEATMAP_METRICS if (d["metric"] == m).any()]
    fig = Figure(figsize=(11, 2.9 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), 2, squeeze=False)
    for row, metric in zip(axes, metrics):
        m = d[d["metric"] == metric].sort_values("layer")
        x = m["layer"].to_numpy()
        row[0].bar(x - 0.2, m["mean_a"], 0.4, label=f"A: {label_a}", color="#4c72b0")
        row[0].bar(x + 0.2, m["mean_b"], 0.4, label=f"B: {label_b}", color="#dd8452")
        row[0].set_ylabel(METRIC_LABELS[metric], fontsize=9)
        row[0].legend(fontsize=8)
        diff = m["diff"].to_numpy(float)
        row[1].bar(x, diff, color=np.where(diff >= 0, "#4c72b0", "#c44e52"))
        row[1].set_ylabel(f"A − B: {metric}", fontsize=9)
        for ax in row:
            ax.axhline(0, color="black", lw=0.6)
            ax.set_xticks(x)
            ax.tick_params(axis="x", labelsize=8)
    axes[-1, 0].set_xlabel("layer")
    axes[-1, 1].set_xlabel("layer")
    fig.suptitle(f"All latent positions patched at one layer ({comp}): mean over pairs, A vs B and A − B")
    return save_figure(fig, out_dir, "compare_layer", formats)


def _position_figures(tab: pd.DataFrame, out_dir: Path, label_a: str, label_b: str, formats) -> list[Path]:
    """Layer x position heatmaps of A and B (one colour scale) and of A − B (diverging, centred at 0)."""
    d = mode_rows(tab, "position", POSITION_MODE)
    if d.empty:
        return []
    comp = primary_component_of(d)
    d = d[d["component"] == comp]
    paths: list[Path] = []
    for metric in HEATMAP_METRICS:
        m = d[d["metric"] == metric]
        if m.empty:
            continue
        grids = {
            k: m.pivot(index="layer", columns="position", values=k).sort_index().sort_index(axis=1)
            for k in ("mean_a", "mean_b", "diff")
        }
        layers, positions = grids["diff"].index.to_numpy(), grids["diff"].columns.to_numpy()
        both = np.concatenate([grids["mean_a"].to_numpy(float).ravel(), grids["mean_b"].to_numpy(float).ravel()])
        norm, cmap = colour_norm(metric, both)
        dnorm, dcmap = colour_norm("recovery", grids["diff"].to_numpy(float))  # signed: diverging around 0
        fig = Figure(figsize=(3 * (1.4 + 0.55 * len(positions)) + 1.5, 1.8 + 0.3 * len(layers)), layout="constrained")
        axes = fig.subplots(1, 3)
        for ax, key, title in ((axes[0], "mean_a", f"A: {label_a}"), (axes[1], "mean_b", f"B: {label_b}")):
            im = draw_heatmap(ax, grids[key].to_numpy(float), layers, positions, metric, norm, cmap, top=3)
            ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=axes[:2], label=METRIC_LABELS[metric], shrink=0.9)
        im = draw_heatmap(axes[2], grids["diff"].to_numpy(float), layers, positions, metric, dnorm, dcmap, top=0)
        axes[2].set_title("A − B", fontsize=9)
        fig.colorbar(im, ax=axes[2], label=f"A − B: {metric}", shrink=0.9)
        fig.suptitle(f"Position sweep ({comp}): mean {metric} over pairs")
        paths += save_figure(fig, out_dir, f"compare_position_{metric}", formats)
    return paths


def _run_summary(manifest: dict, cells: pd.DataFrame, run_dir: Path) -> dict:
    model = manifest.get("model") or {}
    return {
        "run_dir": str(run_dir),
        "model": model.get("name"),
        "n_layers": model.get("n_layers"),
        "num_latent": model.get("num_latent"),
        "n_pairs": int(cells["pair_id"].nunique()),
        "experiments": sorted(cells["experiment"].unique().tolist()),
        "finished": manifest.get("finished"),
        "command": manifest.get("command"),
    }


def _check_layers(run_a: Path, man_a: dict, run_b: Path, man_b: dict) -> None:
    """LatentPatchError if the manifests record different numbers of layers."""
    na, nb = (man_a.get("model") or {}).get("n_layers"), (man_b.get("model") or {}).get("n_layers")
    if na is not None and nb is not None and na != nb:
        raise LatentPatchError(
            f"{run_a} has {na} layers and {run_b} has {nb}: the layer grids differ; "
            "compare runs of models with the same layers"
        )


def _largest_differences(tab: pd.DataFrame, k: int = 10) -> list[list[str]]:
    """Table rows of the ``k`` cells whose recovery differs most between A and B (by |A − B|)."""
    rec = tab[tab["metric"] == "recovery"]
    top = rec.reindex(rec["diff"].abs().sort_values(ascending=False).index).head(k)
    return [
        [
            escape(r["experiment"]),
            escape(r["mode"]),
            str(r["layer"]),
            "all" if r["position"] == -1 else str(r["position"]),
            fmt(r["mean_a"]),
            fmt(r["mean_b"]),
            fmt(r["diff"]),
        ]
        for _, r in top.iterrows()
    ]


def _compare_page(
    summaries: tuple[dict, dict], compared: list[str], tab: pd.DataFrame, paths: list[Path], labels: tuple[str, str]
) -> str:
    """The HTML of ``compare.html``: the two runs, the largest recovery differences, the figures."""
    (summary_a, summary_b), (label_a, label_b) = summaries, labels
    runs_rows = [[escape(k), escape(summary_a[k]), escape(summary_b[k])] for k in summary_a if k != "command"]
    runs_rows.append(
        ["command", f"<code>{escape(summary_a['command'])}</code>", f"<code>{escape(summary_b['command'])}</code>"]
    )
    runs = table(["", "A", "B"], runs_rows, left=3)
    largest = table(["experiment", "mode", "layer", "pos", "A", "B", "A − B"], _largest_differences(tab), left=2)
    figs_html = "".join(embed_png(p, p.stem.replace("_", " ")) for p in paths if p.suffix == ".png")
    figs_html = figs_html or '<p class="note">No layer or position sweep in common.</p>'
    title = f"latentpatch compare: {escape(label_a)} vs {escape(label_b)}"
    sub = "differences are A − B, means over pairs"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style></head>
<body><header><h1>Compare A = {escape(label_a)} vs B = {escape(label_b)}</h1><div class="sub">{sub}</div></header>
<main><section id="runs"><h2>Runs</h2>{runs}<p>Compared: {escape(", ".join(compared))}</p></section>
<section id="largest"><h2>Largest recovery differences</h2>{largest}</section>
<section id="figures"><h2>Figures</h2>{figs_html}</section>
</main></body></html>
"""


def compare_runs(
    run_a: Path | str,
    run_b: Path | str,
    out: Path | str,
    exclude_flagged: bool = False,
    formats: Iterable[str] = ("png", "svg"),
) -> Path:
    """Compare runs A and B; write compare.json, figures and compare.html into ``out``; return compare.html.

    Raises :class:`LatentPatchError` if a run directory is missing/corrupt or the runs' layer x
    position grids differ for an experiment both have (or they share no experiment).
    """
    run_a, run_b, out = Path(run_a), Path(run_b), Path(out)
    man_a, man_b = read_manifest(run_a), read_manifest(run_b)
    cells_a = used_pairs(read_cells(run_a), exclude_flagged)
    cells_b = used_pairs(read_cells(run_b), exclude_flagged)
    _check_layers(run_a, man_a, run_b, man_b)
    groups = check_grids(cells_a, cells_b, str(run_a), str(run_b))
    tab = compare_tables(cells_a, cells_b, groups)

    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    formats = page_formats(formats)
    label_a, label_b = run_a.name, run_b.name
    paths = _layer_figure(tab, fig_dir, label_a, label_b, formats)
    paths += _position_figures(tab, fig_dir, label_a, label_b, formats)

    summaries = _run_summary(man_a, cells_a, run_a), _run_summary(man_b, cells_b, run_b)
    result = json_safe(
        {
            "run_a": summaries[0],
            "run_b": summaries[1],
            "exclude_flagged": exclude_flagged,
            "compared": ["/".join(g) for g in groups],
            "cells": tab.to_dict(orient="records"),
            "figures": [str(p.relative_to(out)) for p in paths],
        }
    )
    atomic_write_text(out / "compare.json", json.dumps(result, indent=1, allow_nan=False))
    html_path = out / "compare.html"
    atomic_write_text(html_path, _compare_page(summaries, result["compared"], tab, paths, (label_a, label_b)))
    return html_path
