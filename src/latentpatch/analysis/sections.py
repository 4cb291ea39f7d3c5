"""The sections of ``report.html``, one function each, in page order (:data:`SECTIONS`).

Each ``*_section`` function returns one ``<section id=...>`` as HTML text, built from the run's
manifest, its statistics (the ``stats.json`` dict of :func:`latentpatch.analysis.stats.stats_from_cells`)
and the figures already drawn into ``figures/``. The statistics section is in
:mod:`latentpatch.analysis.stats_section`; the page around them in :mod:`latentpatch.analysis.report`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.analysis.findings import findings_section_body, run_terms
from latentpatch.analysis.hover import heatmap_shows_change, hover_figure
from latentpatch.analysis.html import embed_png, escape, fmt, fmt_p, kv_list, table
from latentpatch.names import KEY_METRICS

#: (id, heading) of every section of the page, in order.
SECTIONS: list[tuple[str, str]] = [
    ("findings", "Findings"),
    ("checks", "Built-in checks"),
    ("baselines", "Baselines"),
    ("layer", "Layer sweep"),
    ("position", "Position sweep"),
    ("iterative", "Iterative patching: cumulative, chained, frozen"),
    ("thought", "Thought interventions"),
    ("early", "Early answers S(k)"),
    ("influence", "Step influence matrix"),
    ("intermediate", "Intermediate values"),
    ("lens", "Logit lens"),
    ("attention", "Attention to the question"),
    ("heads", "Per-head patching"),
    ("atp", "Attribution patching"),
    ("statistics", "Statistics"),
    ("flagged", "Flagged pairs"),
    ("thoughts", "Decoded thoughts"),
    ("summary", "Model and data"),
    ("config", "Run configuration"),
    ("reproduce", "Reproduce"),
]

TOP_SHOWN = 5  # top cells listed per metric in the experiment sections
#: The key metrics (:data:`latentpatch.names.KEY_METRICS`) in the order of the report's tables.
TABLE_METRICS: tuple[str, ...] = ("recovery", "kl", "answer_logit_diff")
#: Metrics of the chained/frozen top-cell tables.
ITERATIVE_TABLE_METRICS: tuple[str, ...] = ("recovery", "kl", "act_bias")

CHECKS_NOTE = (
    '<p class="note">identity: KL of a self-patch; full_restoration: max |Δlogit| of a layer-0 full patch; '
    "live_thoughts: thoughts differ and ablating them changes answers; "
    "engine_reference: fast engine vs one rollout per patch (docs/method.md §8).</p>"
)
ITERATIVE_INTRO = (
    "<p><b>Cumulative</b>: positions 0..n patched at one layer. "
    "<b>Chained</b>: position 0 patched, later thoughts generated from the patched state. "
    "<b>Frozen</b>: as chained but later thoughts' inputs held at their corrupted values (attention path only). "
    "<b>Parallel</b>: all positions patched (= layer sweep).</p>"
)


def section(sid: str, body: str) -> str:
    """``body`` wrapped as the section ``sid`` with its heading from :data:`SECTIONS`."""
    heading = dict(SECTIONS)[sid]
    return f'<section id="{sid}"><h2>{escape(heading)}</h2>{body}</section>'


def note(text: str) -> str:
    """A grey italic paragraph (``text`` is inserted as given)."""
    return f'<p class="note">{text}</p>'


def position_label(position: int) -> str:
    """A cell's position for a table: ``"all"`` for the all-positions patch (-1), else the index."""
    return "all" if position == -1 else str(position)


def findings_section(manifest: dict, stats: dict) -> str:
    """What was run and what was found (the page's first screen)."""
    return section("findings", findings_section_body(manifest, stats))


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
    comps = sorted({c["component"] for c in stats.get("cells", [])})
    component = "resid_out" if "resid_out" in comps else (comps[0] if comps else None)
    cells = [
        c
        for c in stats.get("cells", [])
        if (c["experiment"], c["mode"], c["metric"], c["component"]) == (experiment, mode, metric, component)
        and c.get("mean") is not None
    ]
    return sorted(cells, key=lambda c: -abs(c["mean"]))


def summary_section(manifest: dict, stats: dict, run_dir: Path) -> str:
    """Model, data and versions of the run."""
    model = manifest.get("model") or {}
    base = manifest.get("baselines") or {}
    info = {
        "run directory": str(run_dir),
        "status": manifest.get("status", "unknown"),
        "model": model.get("name", "?"),
        "family": model.get("family", "?"),
        "layers": model.get("n_layers", "?"),
        "latent thoughts (K)": model.get("num_latent", "?"),
        "d_model": model.get("d_model", "?"),
        "device / dtype": f"{manifest.get('device', '?')} / {manifest.get('dtype', '?')}",
        "pairs": f"{stats['n_pairs_total']} in results ({stats['n_pairs_used']} used"
        + (", flagged excluded" if stats["settings"]["exclude_flagged"] else "")
        + f"); manifest n_pairs = {base.get('n_pairs', '?')}",
        "flagged pairs": len(stats["flagged_pairs"]),
        "experiments in results": ", ".join(stats["experiments"]) or "none",
        "seed": manifest.get("seed", "?"),
        "git commit": manifest.get("git_commit", "?"),
    }
    body = kv_list(info)
    if manifest.get("versions"):
        body += "<h3>Versions</h3>" + kv_list(manifest["versions"])
    if manifest.get("timings"):
        body += "<h3>Timings</h3>" + kv_list(manifest["timings"])
    return section("summary", body)


def _badge(passed: Any) -> str:
    if passed:
        return '<span class="badge pass">PASS</span>'
    return '<span class="badge failb">FAIL</span>' if passed is False else "–"


def checks_section(manifest: dict) -> tuple[str, int]:
    """The built-in checks (docs/method.md §8) and how many failed."""
    checks = manifest.get("checks") or {}
    if not checks:
        return section("checks", note("The manifest records no checks.")), 0
    rows, classes, n_fail = [], [], 0
    for name, c in checks.items():
        c = c if isinstance(c, dict) else {"passed": c}
        passed = c.get("passed")
        n_fail += passed is False
        rows.append(
            [
                escape(name),
                _badge(passed),
                fmt(c.get("value"), 3),
                fmt(c.get("threshold"), 3),
                escape(c.get("detail", "")),
            ]
        )
        classes.append("fail" if passed is False else "")
    banner = (
        f'<div class="banner bad">{n_fail} check(s) failed: the results below may not mean what they say.</div>'
        if n_fail
        else ""
    )
    header = ["check", "result", "value", "threshold", "detail"]
    body = banner + table(header, rows, left={0, 1, 4}, row_classes=classes) + CHECKS_NOTE
    return section("checks", body), n_fail


def baselines_section(manifest: dict) -> str:
    """Clean/corrupted accuracy and the number of flagged pairs, as the manifest records them."""
    b = manifest.get("baselines") or {}
    flagged = b.get("flagged_pairs")
    n_flagged = len(flagged) if isinstance(flagged, list) else flagged
    rows = [
        ["clean accuracy", fmt(b.get("clean_accuracy"))],
        ["corrupted accuracy", fmt(b.get("corrupted_accuracy"))],
        ["pairs", fmt(b.get("n_pairs"))],
        ["flagged pairs (model gets clean or corrupted wrong)", fmt(n_flagged)],
    ]
    return section("baselines", table(["baseline", "value"], rows, left=1))


def config_section(manifest: dict) -> str:
    """The run's configuration as recorded in the manifest."""
    return section("config", kv_list(manifest.get("config") or {}))


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
            f"<div><h3>Top {len(body)} of {len(rows)} by |{escape(metric)}|</h3>"  # the run's meaning: findings
            + table(["#", "layer", "pos", "mean", "95% CI", "p Holm", "p BH"], body)
            + "</div>"
        )
    return f'<div class="row">{"".join(blocks)}</div>' if blocks else ""


def figure(fig_dir: Path, name: str, caption: str) -> str:
    """``figures/<name>.png`` embedded with its caption ("" if the run has no such figure)."""
    return embed_png(fig_dir / f"{name}.png", caption)


def layer_section(stats: dict, fig_dir: Path, config: dict | None = None) -> str:
    """The layer sweep: bars, per-pair map and top layers (``config``: the run's, for the wording)."""
    if "layer" not in stats["experiments"]:
        return section("layer", note("This run has no layer sweep."))
    terms = run_terms(config)
    body = f"<p>Every latent position at one layer: {terms['component']} {escape(terms['values'])}.</p>"
    body += figure(fig_dir, "layer_bars", "Mean over pairs per layer with 95% bootstrap CI.")
    body += figure(fig_dir, "pairs_layers", "Per pair (rows) and layer (columns); * marks flagged pairs.")
    body += top_tables(stats, "layer/all", TABLE_METRICS)
    return section("layer", body)


def _additivity_table(stats: dict) -> str:
    """Sum of single-position effects vs all positions at once, per layer (collapsed)."""
    add = [r for r in stats["additivity"] if r["metric"] in TABLE_METRICS]
    if not add:
        return ""
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
    return (
        "<h3>Additivity: sum of single-position effects vs all positions at once</h3>"
        "<details><summary>Show table "
        "(ratio = mean of sums / mean all-positions effect; p: Wilcoxon of sum − all)</summary>"
        + table(["layer", "metric", "n", "Σ single", "all", "Σ − all", "ratio", "p"], rows, left=2)
        + "</details>"
    )


def position_section(stats: dict, fig_dir: Path, config: dict | None = None) -> str:
    """The position sweep: mean heatmaps, top cells, per-pair heatmaps and additivity."""
    if "position" not in stats["experiments"]:
        return section("position", note("This run has no position sweep."))
    terms = run_terms(config)
    body = (
        f"<p>One latent position at one layer: {terms['component']} {escape(terms['values'])}. "
        "Boxes mark the top-5 cells by |mean|; hover a cell for its mean, CI and n.</p>"
    )
    heatmaps = (
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
    body += '<div class="row figs">' + "".join(heatmaps) + "</div>"
    body += top_tables(stats, "position/single", TABLE_METRICS)
    body += "<details><summary>Per-pair heatmaps (first pairs)</summary>"
    for metric in KEY_METRICS:
        body += figure(
            fig_dir,
            f"position_heatmap_pairs_{metric}",
            f"Position sweep per pair: {metric}; colours clipped at the 2nd and 98th percentile of all pairs' "
            "values, so outliers do not flatten the rest.",
        )
    body += "</details>"
    body += _additivity_table(stats)
    return section("position", body)


def iterative_section(stats: dict, fig_dir: Path) -> str:
    """Cumulative, chained and frozen patching: figures and chained/frozen top cells."""
    if "iterative" not in stats["experiments"]:
        return section("iterative", note("This run has no iterative experiment."))
    body = ITERATIVE_INTRO
    body += figure(
        fig_dir,
        "cumulative_trajectories",
        "Cumulative patching: effect vs the last patched position, one line per layer.",
    )
    body += figure(
        fig_dir,
        "chained_similarity",
        "Chained/frozen: cosine similarity of the generated activations to the clean and corrupted runs.",
    )
    body += figure(fig_dir, "modes_comparison", "Chained vs parallel vs frozen per layer (mean ± 95% CI).")
    for key in ("iterative/chained", "iterative/frozen"):
        if key in stats["top_cells"]:
            body += f"<h3>{escape(key.split('/')[1])}</h3>" + top_tables(stats, key, ITERATIVE_TABLE_METRICS)
    return section("iterative", body)


def flagged_section(stats: dict, cells: pd.DataFrame) -> str:
    """The flagged pairs (docs/method.md §6.7) and whether the statistics include them."""
    ids = stats["flagged_pairs"]
    if not ids:
        return section(
            "flagged", "<p>No pair is flagged: the model answers every clean and corrupted prompt correctly.</p>"
        )
    per = cells[cells["pair_id"].isin(ids)].drop_duplicates("pair_id")
    rows = []
    for _, r in per.iterrows():
        rows.append(
            [
                escape(r["pair_id"]),
                fmt(bool(r["clean_correct"])) if "clean_correct" in r else "?",
                fmt(bool(r["corrupted_correct"])) if "corrupted_correct" in r else "?",
            ]
        )
    note_text = (
        "These pairs are <b>excluded</b> from the statistics and figures (--exclude-flagged)."
        if stats["settings"]["exclude_flagged"]
        else "These pairs are <b>included</b>; rebuild with "
        "<code>latentpatch report RUN_DIR --exclude-flagged</code> to drop them."
    )
    return section(
        "flagged",
        f"<p>{len(ids)} pair(s) where the model gets the clean or the corrupted answer wrong. {note_text}</p>"
        + table(["pair", "clean correct", "corrupted correct"], rows, left=1),
    )


def _show_token(tok: Any) -> str:
    """A decoded token with its spaces and newlines made visible."""
    return f"<code>{escape(str(tok).replace(' ', '␣').replace(chr(10), '⏎'))}</code>"


def _thought_rows(clean: list, corr: list) -> list[list[str]]:
    """One row per thought index: its top tokens in the clean and the corrupted run."""
    rows = []
    for i in range(max(len(clean), len(corr))):
        c = " ".join(_show_token(t) for t in (clean[i] if i < len(clean) else []))
        k = " ".join(_show_token(t) for t in (corr[i] if i < len(corr) else []))
        rows.append([str(i), c, k])
    return rows


def thoughts_section(
    thoughts: dict | None,
    pairs: dict[str, dict[str, Any]],
    max_pairs: int = 5,
    predictions: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Top decoded tokens of each thought for the first ``max_pairs`` pairs, with their questions,
    gold answers and (``predictions``: the manifest's ``baselines.per_pair``) the model's answers."""
    if not thoughts:
        return section("thoughts", note("This run recorded no decoded thoughts (results/thoughts.json)."))
    body = (
        "<p>Top decoded tokens of each continuous thought "
        "(the thought's hidden state through the LM head).</p>"
        '<div class="row">'
    )
    for pid, d in list(thoughts.items())[:max_pairs]:
        rows = _thought_rows(d.get("clean") or [], d.get("corrupted") or [])
        q = pairs.get(str(pid), {})
        pred = (predictions or {}).get(str(pid), {})
        qtxt = "".join(
            f"<div><b>{escape(v)}</b>: {escape(q[v].get('question', ''))} "
            f"→ gold <b>{escape(q[v].get('answer', ''))}</b>"
            + (f", model <b>{fmt(pred.get(f'{v}_pred'))}</b>" if f"{v}_pred" in pred else "")
            + "</div>"
            for v in ("clean", "corrupted")
            if v in q
        )
        body += (
            f"<div><h3>pair {escape(pid)}</h3>{qtxt}"
            + table(["thought", "clean", "corrupted"], rows, left=3)
            + "</div>"
        )
    return section("thoughts", body + "</div>")


def reproduce_section(manifest: dict, run_dir: Path, exclude_flagged: bool) -> str:
    """The command of the run and the command that rebuilds this page."""
    cmd = manifest.get("command") or "(the manifest records no command)"
    if isinstance(cmd, list):
        cmd = " ".join(map(str, cmd))
    rebuild = f"latentpatch report {run_dir}" + (" --exclude-flagged" if exclude_flagged else "")
    return section(
        "reproduce",
        f"<p>The run:</p><pre>{escape(cmd)}</pre><p>This page (from the results only):</p><pre>{escape(rebuild)}</pre>",
    )
