"""Figures of the reading experiments and per-head patching (docs/method.md §14).

Files (``<name>.png`` and ``<name>.svg`` under ``figures/``):
- ``lens_ranks``: layer x position heatmaps of the median lens rank (over pairs and variants) of the
  final answer's first number token and of each intermediate result's; with a ``lens`` column
  (``--lens both``) one row of panels per lens, on one colour scale per value.
- ``attention_roles``: per query position (thoughts, answer), layer x token role mean attention mass.
- ``attention_pair_<n>``: one pair's (clean) attention over its prompt tokens, mean over layers and heads.
- ``heads_<experiment>``: layer x head maps of mean recovery, one panel per latent position
  (``position``) or one for every position at once (``layer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from latentpatch.analysis.figures import DPI, save_figure
from latentpatch.names import LENS_COLUMN, METRIC_LABELS, THOUGHT_LAYER

#: Intermediate results drawn in ``lens_ranks`` (the first few; later ones are in the table).
MAX_INTERMEDIATES = 3


def position_name(position: int, num_latent: int) -> str:
    """``t0``..``t{K-1}`` for thoughts, ``ans`` for the first answer position."""
    return "ans" if position >= num_latent else f"t{position}"


def _layer_labels(layers: Sequence[int]) -> list[str]:
    return ["thought" if layer == THOUGHT_LAYER else str(layer) for layer in layers]


def _median_ranks(lens: pd.DataFrame, name: str | None, kind: str, index: int) -> pd.DataFrame:
    """[layers, positions] median rank of one value (of lens ``name``'s rows; None: every row)."""
    sel = lens if name is None else lens[lens[LENS_COLUMN] == name]
    sel = sel[(sel["kind"] == kind) & (sel["index"] == index)]
    return sel.groupby(["layer", "position"])["rank"].median().unstack("position").sort_index()


def lens_ranks(lens: pd.DataFrame, num_latent: int, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """``lens``: rows of ``lens.parquet``. One panel per value (answer, intermediates); with a ``lens``
    column one row of panels per lens (logit first), each value's panels on one colour scale."""
    groups = [("answer", 0)] + [("intermediate", i) for i in range(MAX_INTERMEDIATES)]
    groups = [g for g in groups if ((lens["kind"] == g[0]) & (lens["index"] == g[1])).any()]
    if not groups:
        return []
    names: list[str | None] = [None]
    if LENS_COLUMN in lens.columns:
        names = sorted(set(lens[LENS_COLUMN]), key=lambda n: (n != "logit", n))
    fig = Figure(figsize=(3.6 * len(groups) + 0.8, 4.2 * len(names)), dpi=DPI)
    axes = fig.subplots(len(names), len(groups), squeeze=False)
    medians = {(name, g): _median_ranks(lens, name, *g) for name in names for g in groups}
    for row, name in enumerate(names):
        for ax, (kind, index) in zip(axes[row], groups):
            med = medians[(name, (kind, index))]
            scale = {}
            if len(names) > 1:  # the lenses of one value on one scale
                top = max(float(np.nanmax(medians[(n, (kind, index))].to_numpy(float))) for n in names)
                scale = {"vmin": 0.0, "vmax": float(np.log10(top + 1)) or 1.0}
            im = ax.imshow(np.log10(med.to_numpy(float) + 1), cmap="viridis_r", aspect="auto", origin="lower", **scale)
            ax.set_xticks(range(med.shape[1]), [position_name(int(p), num_latent) for p in med.columns])
            ax.set_yticks(range(med.shape[0]), _layer_labels(med.index))
            ax.set_xlabel("position")
            ax.set_ylabel("layer")
            title = "final answer" if kind == "answer" else f"intermediate {index}"
            ax.set_title(title if name is None else f"{name} lens: {title}")
            fig.colorbar(im, ax=ax, label="log10(median rank + 1)")
    if names == [None]:
        fig.suptitle("Logit lens: rank of the value's first number token")
    else:
        lenses = " and ".join(str(n) for n in names).capitalize()
        fig.suptitle(f"{lenses} lens:\nrank of the value's first number token")
    fig.tight_layout()
    return save_figure(fig, out_dir, "lens_ranks", formats)


def _role_order(roles: Sequence[str]) -> list[str]:
    numbers = sorted((r for r in roles if r.startswith("number ")), key=lambda r: int(r.split()[1]))
    return numbers + [r for r in ("operator", "other", "special", "thoughts") if r in roles]


def attention_roles(att: pd.DataFrame, num_latent: int, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """``att``: rows of ``attention.parquet``; mean over pairs and variants, one panel per query position."""
    if att.empty:
        return []
    roles = _role_order(att["role"].unique())
    positions = sorted(att["position"].unique())
    fig = Figure(figsize=(2.6 * len(positions) + 1, 0.28 * len(roles) + 2.4), dpi=DPI)
    axes = fig.subplots(1, len(positions), squeeze=False, sharey=True)[0]
    mean = att.groupby(["position", "role", "layer"])["weight"].mean()
    im = None
    for ax, p in zip(axes, positions):
        mat = mean.loc[p].unstack("layer").reindex(roles)  # [roles, layers]
        im = ax.imshow(mat.to_numpy(float), cmap="magma", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(mat.shape[1]), [str(c) for c in mat.columns], fontsize=7)
        ax.set_yticks(range(len(roles)), roles)
        ax.set_xlabel("layer")
        ax.set_title(position_name(int(p), num_latent))
    if im is not None:
        fig.colorbar(im, ax=list(axes), label="attention mass (mean over heads, pairs)")
    return save_figure(fig, out_dir, "attention_roles", formats)


def attention_pair(entry: dict, n: int, num_latent: int, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """``entry``: a per-pair attention file; its clean map, mean over layers, query positions x tokens."""
    m = entry["maps"]["clean"]
    w = np.asarray(m["weights"], dtype=float).mean(0)  # [Q, T_q]
    tokens = [t.replace("\n", "⏎") for t in m["tokens"]]
    fig = Figure(figsize=(max(6.0, 0.22 * len(tokens) + 1.5), 0.35 * w.shape[0] + 2.2), dpi=DPI)
    ax = fig.add_subplot()
    im = ax.imshow(w, cmap="magma", vmin=0, aspect="auto")
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(w.shape[0]), [position_name(q, num_latent) for q in range(w.shape[0])])
    ax.set_title(f"{entry['pair_id']} (clean): attention on the prompt, mean over layers and heads")
    fig.colorbar(im, ax=ax, label="attention")
    fig.tight_layout()
    return save_figure(fig, out_dir, f"attention_pair_{n}", formats)


def head_maps(cells: pd.DataFrame, experiment: str, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """``cells``: ``cells.parquet`` rows of one experiment with a ``head`` column; mean recovery."""
    metric = "recovery"
    positions = sorted(cells["position"].unique())
    fig = Figure(figsize=(2.8 * len(positions) + 1, 3.8), dpi=DPI)
    axes = fig.subplots(1, len(positions), squeeze=False, sharey=True)[0]
    mean = cells.groupby(["position", "layer", "head"])[metric].mean()
    lim = float(np.nanmax(np.abs(mean.to_numpy(float)))) or 1.0
    im = None
    for ax, p in zip(axes, positions):
        mat = mean.loc[p].unstack("head").sort_index()  # [layers, heads]
        im = ax.imshow(mat.to_numpy(float), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
        ax.set_xlabel("head")
        ax.set_title("all positions" if p < 0 else f"t{p}")
    axes[0].set_ylabel("layer")
    if im is not None:
        fig.colorbar(im, ax=list(axes), label=METRIC_LABELS[metric])
    return save_figure(fig, out_dir, f"heads_{experiment}", formats)


def thought_maps(heads: pd.DataFrame, K: int, out_dir: Path, formats: Sequence[str]) -> list[int]:
    """``thought_attention_L<layer>``: per layer, one small K+1 x (K+3) map per head (queries: the thoughts
    and the first answer position; keys: question, [BOT], the thoughts, the answer-start tokens), mean
    over pairs and runs. Returns the layers drawn."""
    if heads.empty:
        return []
    keys = ["question", "bot"] + [f"t{p}" for p in range(K)] + ["answer_start"]
    drawn = []
    for layer, g in heads.groupby("layer", sort=True):
        n_heads = int(g["head"].max()) + 1
        cols = min(4, n_heads)
        rows = -(-n_heads // cols)
        fig = Figure(figsize=(2.9 * cols + 0.8, 2.6 * rows + 0.5), dpi=DPI)
        axes = fig.subplots(rows, cols, squeeze=False)
        im = None
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            if h >= n_heads:
                ax.axis("off")
                continue
            grid = g[g["head"] == h].pivot_table(index="query", columns="key", values="mean").reindex(columns=keys)
            im = ax.imshow(grid.to_numpy(float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(f"head {h}", fontsize=8)
            ax.set_xticks(range(len(keys)), ["Q", "B", *[str(p) for p in range(K)], "A"], fontsize=6)
            ax.set_yticks(range(len(grid.index)), [position_name(int(q), K) for q in grid.index], fontsize=6)
        if im is not None:
            fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
        fig.suptitle(
            f"Layer {layer}: attention of each thought (rows) on the question (Q), [BOT] (B), each thought, "
            "and the answer start (A)",
            fontsize=8,
        )
        save_figure(fig, out_dir, f"thought_attention_L{layer}", formats)
        drawn.append(int(layer))
    return drawn
