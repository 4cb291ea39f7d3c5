"""The report's sweep experiments (layer, position, iterative; docs/method.md §5) in the one skeleton.

Each ``*_section`` returns an :class:`~latentpatch.analysis.skeleton.ExperimentSection` (None when the
run lacks the experiment). Findings quote ``stats.json``'s ``cells`` and ``contrasts`` (the recovery
of the primary component); the figures were drawn into ``figures/`` by the report.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from latentpatch.analysis.contrasts import find_contrast
from latentpatch.analysis.findings import FINDING_METRIC, run_terms
from latentpatch.analysis.hover import heatmap_shows_change, hover_figure
from latentpatch.analysis.html import escape, fmt, fmt_p, table
from latentpatch.analysis.sections import TABLE_METRICS, figure, position_label
from latentpatch.analysis.skeleton import ExperimentSection, Quote
from latentpatch.names import KEY_METRICS

TOP_SHOWN = 5  # top cells listed per metric in the experiment sections
#: Metrics of the chained/frozen top-cell tables.
ITERATIVE_TABLE_METRICS: tuple[str, ...] = ("recovery", "kl", "act_bias")
ITERATIVE_INTRO = (
    "<p><b>Cumulative</b>: positions 0..n patched at one layer. "
    "<b>Chained</b>: position 0 patched, later thoughts generated from the patched state. "
    "<b>Frozen</b>: as chained but later thoughts' inputs held at their corrupted values (attention path only). "
    "<b>Parallel</b>: all positions patched (= layer sweep).</p>"
)
METHOD = "docs/method.md §5 (experiments), §10 (statistics)"


def primary_component(stats: dict) -> str | None:
    """The component the findings and tables show: ``resid_out`` if patched, else the first."""
    comps = sorted({c["component"] for c in stats.get("cells", [])})
    return "resid_out" if "resid_out" in comps else (comps[0] if comps else None)


def indexed_cells(stats: dict, experiment: str, mode: str, metric: str = FINDING_METRIC) -> list[tuple[int, dict]]:
    """(index in ``stats["cells"]``, cell) of one experiment/mode/metric of the primary component."""
    component = primary_component(stats)
    return [
        (i, c)
        for i, c in enumerate(stats.get("cells", []))
        if (c["experiment"], c["mode"], c["metric"], c["component"]) == (experiment, mode, metric, component)
        and c.get("mean") is not None
    ]


def strongest(cells: list[tuple[int, dict]]) -> tuple[int, dict] | None:
    """The (index, cell) with the largest |mean| (ties: the first)."""
    return max(cells, key=lambda ic: abs(ic[1]["mean"]), default=None)


def shown_top(n_cells: int) -> int:
    """How many top cells a table lists: :data:`TOP_SHOWN`, but at most half the cells (a "top 5"
    of 4 layers would be every row).

    >>> shown_top(4), shown_top(24), shown_top(1)
    (2, 5, 1)
    """
    return max(1, min(TOP_SHOWN, n_cells // 2))


def ranked_cells(stats: dict, key: str, metric: str) -> list[dict]:
    """The cells of ``key`` (``"experiment/mode"``, the primary component) and ``metric``, by |mean|."""
    experiment, mode = key.split("/")
    return sorted((c for _, c in indexed_cells(stats, experiment, mode, metric)), key=lambda c: -abs(c["mean"]))


def top_tables(stats: dict, key: str, metrics: Iterable[str]) -> str:
    """Side-by-side tables of the top cells of ``key`` (``"experiment/mode"``), one per metric,
    ranked by effect size (|mean|, not the signed value)."""
    blocks = []
    for metric in metrics:
        rows = ranked_cells(stats, key, metric)
        if not rows:
            continue
        body = [
            [
                str(i + 1),
                str(r["layer"]),
                position_label(r["position"]),
                fmt(r["mean"]),
                f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                fmt_p(r["p_holm"]),
                fmt_p(r["p_bh"]),
            ]
            for i, r in enumerate(rows[: shown_top(len(rows))])
        ]
        blocks.append(
            f"<div><h3>Top {len(body)} of {len(rows)} by |{escape(metric)}|</h3>"
            + table(["#", "layer", "pos", "mean", "95% CI", "p Holm", "p BH"], body)
            + "</div>"
        )
    return f'<div class="row">{"".join(blocks)}</div>' if blocks else ""


def layer_section(stats: dict, fig_dir: Path, config: dict | None = None) -> ExperimentSection | None:
    """The layer sweep: the layer where patching every thought restores most, bars, per-pair map, top layers."""
    if "layer" not in stats["experiments"]:
        return None
    q, cells = Quote(stats), indexed_cells(stats, "layer", "all")
    best = strongest(cells)
    if best is None:
        finding = "The layer sweep has no recovery values."
    else:
        i, cell = best
        finding = (
            f"Patching every thought at one layer restores the most at <b>layer {q.num('cells', i, 'layer')}</b>: "
            f"recovery {q.ci('cells', i)}, p (Holm) {q.p('cells', i, 'p_holm')}"
        )
        j, ceiling = max(cells, key=lambda ic: ic[1]["mean"])
        if j != i:
            finding += f"; the largest signed recovery is {q.ci('cells', j)} at layer {q.num('cells', j, 'layer')}"
        finding += ". The question's tokens are never patched: this is as much as the thoughts alone carry."
    terms = run_terms(config)
    return ExperimentSection(
        "layer",
        finding,
        notes=f"<p>Every latent position at one layer: {terms['component']} {escape(terms['values'])}.</p>",
        figures=figure(fig_dir, "layer_bars", "Mean over pairs per layer with 95% bootstrap CI.")
        + figure(fig_dir, "pairs_layers", "Per pair (rows) and layer (columns); * marks flagged pairs."),
        table=top_tables(stats, "layer/all", TABLE_METRICS),
        method=METHOD,
    )


def _additivity_table(stats: dict) -> str:
    """Sum of single-position effects vs all positions at once, per layer."""
    add = [r for r in stats["additivity"] if r["metric"] in TABLE_METRICS]
    rows = [
        [
            str(r["layer"]),
            escape(r["metric"]),
            str(r["n"]),
            fmt(r["mean_sum_single"]),
            fmt(r["mean_all"]),
            fmt(r["mean_diff"]),
            fmt(r["ratio"]),
            fmt_p(r["p_wilcoxon"]),
        ]
        for r in sorted(add, key=lambda r: (r["metric"], r["layer"]))
    ]
    if not rows:
        return ""
    return "<p>ratio = mean of sums / mean all-positions effect; p: Wilcoxon of sum − all.</p>" + table(
        ["layer", "metric", "n", "Σ single", "all", "Σ − all", "ratio", "p"], rows, left=2
    )


def position_section(stats: dict, fig_dir: Path, config: dict | None = None) -> ExperimentSection | None:
    """The position sweep: mean heatmaps (hover: mean, CI, n), top cells, per-pair heatmaps and additivity folded."""
    if "position" not in stats["experiments"]:
        return None
    q, terms = Quote(stats), run_terms(config)
    best = strongest(indexed_cells(stats, "position", "single"))
    if best is None:
        finding = "The position sweep has no recovery values."
    else:
        i, _ = best
        finding = (
            f"The strongest single cell is <b>layer {q.num('cells', i, 'layer')}, thought "
            f"{q.num('cells', i, 'position')}</b>: recovery {q.ci('cells', i)}, p (Holm) {q.p('cells', i, 'p_holm')}."
        )
    heatmaps = "".join(
        hover_figure(
            fig_dir,
            f"position_heatmap_{metric}",
            f"Position sweep, mean {metric} over pairs (layer x latent position)"
            + (
                f", as the change from the unpatched {terms['target']} run."
                if heatmap_shows_change(fig_dir, metric)
                else "."
            ),
            ranked_cells(stats, "position/single", metric),
        )
        for metric in KEY_METRICS
    )
    per_pair = "".join(
        figure(
            fig_dir,
            f"position_heatmap_pairs_{metric}",
            f"Position sweep per pair: {metric}; colours clipped at the 2nd and 98th percentile of all pairs' "
            "values, so outliers do not flatten the rest.",
        )
        for metric in KEY_METRICS
    )
    folded = [("Per-pair heatmaps (first pairs)", per_pair)] if per_pair else []
    additivity = _additivity_table(stats)
    if additivity:
        folded.append(("Additivity: sum of single-position effects vs all positions at once, per layer", additivity))
    return ExperimentSection(
        "position",
        finding,
        notes=f"<p>One latent position at one layer: {terms['component']} {escape(terms['values'])}. "
        "Boxes mark the top-5 cells by |mean|; hover a cell for its mean, CI and n.</p>",
        figures=f'<div class="row figs">{heatmaps}</div>',
        table=top_tables(stats, "position/single", TABLE_METRICS),
        folded=tuple(folded),
        method=METHOD,
    )


def _modes_finding(stats: dict) -> str:
    """Chained patching where it restores most, compared with parallel and frozen at that layer (with CIs)."""
    q = Quote(stats)
    best = strongest(indexed_cells(stats, "iterative", "chained"))
    if best is None:
        return "The run has no chained patching to compare."
    i, chained = best
    layer, component = chained["layer"], chained["component"]
    text = (
        f"At layer {q.num('cells', i, 'layer')}, where it restores most, patching the first thought and letting the "
        f"later thoughts follow (chained) restores {q.ci('cells', i)}"
    )
    parts = []
    for other in ("parallel", "frozen"):
        k = find_contrast(stats, "iterative", f"chained vs {other}", layer=layer, component=component)
        if k is not None:
            label = (
                "patching every thought (parallel)"
                if other == "parallel"
                else "the same patch with the later thoughts' inputs held (frozen)"
            )
            parts.append(q.compare(k, than=label))
    if parts:
        text += "; it restores " + ", and ".join(parts)
    return text + "."


def iterative_section(stats: dict, fig_dir: Path) -> ExperimentSection | None:
    """Cumulative, chained and frozen patching: the modes compared with CIs, figures, chained/frozen top cells."""
    if "iterative" not in stats["experiments"]:
        return None
    tables = "".join(
        f"<h3>{escape(key.split('/')[1])}</h3>" + top_tables(stats, key, ITERATIVE_TABLE_METRICS)
        for key in ("iterative/chained", "iterative/frozen")
        if key in stats["top_cells"]
    )
    return ExperimentSection(
        "iterative",
        _modes_finding(stats),
        notes=ITERATIVE_INTRO,
        figures=figure(
            fig_dir,
            "cumulative_trajectories",
            "Cumulative patching: effect vs the last patched position, one line per layer.",
        )
        + figure(
            fig_dir,
            "chained_similarity",
            "Chained/frozen: cosine similarity of the generated activations to the clean and corrupted runs.",
        )
        + figure(fig_dir, "modes_comparison", "Chained vs parallel vs frozen per layer (mean ± 95% CI)."),
        table=tables,
        method=METHOD,
    )


def sweep_sections(stats: dict[str, Any], fig_dir: Path, config: dict | None) -> list[ExperimentSection]:
    """The sections of the sweep experiments the run has, in page order."""
    made = (layer_section(stats, fig_dir, config), position_section(stats, fig_dir, config))
    return [s for s in (*made, iterative_section(stats, fig_dir)) if s is not None]
