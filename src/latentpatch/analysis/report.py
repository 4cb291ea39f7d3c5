"""``report.html``: one self-contained page per run, rebuilt from the results alone (no model).

:func:`build_report` reads the run directory (docs/ARCHITECTURE.md), recomputes the statistics
(:mod:`latentpatch.analysis.stats`) and the figures (:mod:`latentpatch.analysis.figures`) and writes
``RUN_DIR/report.html``. Figures are embedded as base64 PNG; the page loads nothing from the
network. Section ids (for links and tests) are in :data:`SECTIONS`.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.analysis import figures as figs
from latentpatch.analysis import stats as st
from latentpatch.analysis.html import CSS, embed_png, escape, fmt, fmt_p, kv_list, table
from latentpatch.analysis.selection import all_positions_rows, used_pairs
from latentpatch.names import KEY_METRICS, METRIC_LABELS
from latentpatch.rundir import (
    RunPaths,
    atomic_write_text,
    check_result_files,
    read_cells,
    read_manifest,
    read_pairs_json,
    read_thoughts,
    read_trajectories,
)

#: (id, heading) of every section of the page, in order.
SECTIONS: list[tuple[str, str]] = [
    ("summary", "Model and data"),
    ("checks", "Built-in checks"),
    ("baselines", "Baselines"),
    ("config", "Run configuration"),
    ("layer", "Layer sweep"),
    ("position", "Position sweep"),
    ("iterative", "Iterative patching: cumulative, chained, frozen"),
    ("statistics", "Statistics"),
    ("flagged", "Flagged pairs"),
    ("thoughts", "Decoded thoughts"),
    ("reproduce", "Reproduce"),
]

TOP_SHOWN = 5  # top cells listed per metric in the experiment sections
#: The key metrics (:data:`latentpatch.names.KEY_METRICS`) in the order of the report's tables.
TABLE_METRICS: tuple[str, ...] = ("recovery", "kl", "answer_logit_diff")
#: Metrics of the chained/frozen top-cell tables.
ITERATIVE_TABLE_METRICS: tuple[str, ...] = ("recovery", "kl", "act_bias")


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _section(sid: str, body: str) -> str:
    heading = dict(SECTIONS)[sid]
    return f'<section id="{sid}"><h2>{escape(heading)}</h2>{body}</section>'


def _summary(manifest: dict, stats: dict, run_dir: Path) -> str:
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
    return _section("summary", body)


def _checks(manifest: dict) -> tuple[str, int]:
    checks = manifest.get("checks") or {}
    if not checks:
        return _section("checks", '<p class="note">The manifest records no checks.</p>'), 0
    rows, classes, n_fail = [], [], 0
    for name, c in checks.items():
        c = c if isinstance(c, dict) else {"passed": c}
        passed = c.get("passed")
        n_fail += passed is False
        badge = (
            '<span class="badge pass">PASS</span>'
            if passed
            else ('<span class="badge failb">FAIL</span>' if passed is False else "–")
        )
        rows.append(
            [escape(name), badge, fmt(c.get("value"), 3), fmt(c.get("threshold"), 3), escape(c.get("detail", ""))]
        )
        classes.append("fail" if passed is False else "")
    banner = (
        f'<div class="banner bad">{n_fail} check(s) failed: the results below may not mean what they say.</div>'
        if n_fail
        else ""
    )
    return _section(
        "checks",
        banner
        + table(["check", "result", "value", "threshold", "detail"], rows, left={0, 1, 4}, row_classes=classes)
        + '<p class="note">identity: KL of a self-patch; full_restoration: max |Δlogit| of a layer-0 full patch; '
        "live_thoughts: thoughts differ and ablating them changes answers; engine_reference: fast engine vs one rollout per patch (docs/method.md §8).</p>",
    ), n_fail


def _baselines(manifest: dict) -> str:
    b = manifest.get("baselines") or {}
    flagged = b.get("flagged_pairs")
    n_flagged = len(flagged) if isinstance(flagged, list) else flagged
    rows = [
        ["clean accuracy", fmt(b.get("clean_accuracy"))],
        ["corrupted accuracy", fmt(b.get("corrupted_accuracy"))],
        ["pairs", fmt(b.get("n_pairs"))],
        ["flagged pairs (model gets clean or corrupted wrong)", fmt(n_flagged)],
    ]
    return _section("baselines", table(["baseline", "value"], rows, left=1))


def _config(manifest: dict) -> str:
    return _section("config", kv_list(manifest.get("config") or {}))


def _top_tables(stats: dict, key: str, metrics: Iterable[str]) -> str:
    top = stats["top_cells"].get(key, {})
    blocks = []
    for metric in metrics:
        rows = top.get(metric)
        if not rows:
            continue
        body = [
            [
                str(i + 1),
                str(r["layer"]),
                "all" if r["position"] == -1 else str(r["position"]),
                fmt(r["mean"]),
                f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                fmt_p(r["p_holm"]),
                fmt_p(r["p_bh"]),
            ]
            for i, r in enumerate(rows[:TOP_SHOWN])
        ]
        blocks.append(
            f"<div><h3>Top {len(body)} by {escape(METRIC_LABELS.get(metric, metric))}</h3>"
            + table(["#", "layer", "pos", "mean", "95% CI", "p Holm", "p BH"], body)
            + "</div>"
        )
    return f'<div class="row">{"".join(blocks)}</div>' if blocks else ""


def _fig(fig_dir: Path, name: str, caption: str) -> str:
    return embed_png(fig_dir / f"{name}.png", caption)


def _layer(stats: dict, fig_dir: Path) -> str:
    if "layer" not in stats["experiments"]:
        return _section("layer", '<p class="note">This run has no layer sweep.</p>')
    body = "<p>Every latent position at one layer patched with its clean value (resid_out unless configured otherwise).</p>"
    body += _fig(fig_dir, "layer_bars", "Mean over pairs per layer with 95% bootstrap CI.")
    body += _fig(fig_dir, "pairs_layers", "Per pair (rows) and layer (columns); * marks flagged pairs.")
    body += _top_tables(stats, "layer/all", TABLE_METRICS)
    return _section("layer", body)


def _position(stats: dict, fig_dir: Path) -> str:
    if "position" not in stats["experiments"]:
        return _section("position", '<p class="note">This run has no position sweep.</p>')
    body = "<p>One latent position at one layer patched with its clean value. Boxes mark the top-5 cells.</p>"
    body += (
        '<div class="row figs">'
        + "".join(
            _fig(
                fig_dir,
                f"position_heatmap_{metric}",
                f"Position sweep, mean {metric} over pairs (layer x latent position).",
            )
            for metric in KEY_METRICS
        )
        + "</div>"
    )
    body += _top_tables(stats, "position/single", TABLE_METRICS)
    body += "<details><summary>Per-pair heatmaps (first pairs)</summary>"
    for metric in KEY_METRICS:
        body += _fig(fig_dir, f"position_heatmap_pairs_{metric}", f"Position sweep per pair: {metric}.")
    body += "</details>"
    add = [r for r in stats["additivity"] if r["metric"] in TABLE_METRICS]
    if add:
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
        body += (
            "<h3>Additivity: sum of single-position effects vs all positions at once</h3>"
            "<details><summary>Show table (ratio = mean of sums / mean all-positions effect; p: Wilcoxon of sum − all)</summary>"
            + table(["layer", "metric", "n", "Σ single", "all", "Σ − all", "ratio", "p"], rows, left=2)
            + "</details>"
        )
    return _section("position", body)


def _iterative(stats: dict, fig_dir: Path) -> str:
    if "iterative" not in stats["experiments"]:
        return _section("iterative", '<p class="note">This run has no iterative experiment.</p>')
    body = (
        "<p><b>Cumulative</b>: positions 0..n patched at one layer. <b>Chained</b>: position 0 patched, later thoughts generated "
        "from the patched state. <b>Frozen</b>: as chained but later thoughts' inputs held at their corrupted values (attention path only). "
        "<b>Parallel</b>: all positions patched (= layer sweep).</p>"
    )
    body += _fig(
        fig_dir,
        "cumulative_trajectories",
        "Cumulative patching: effect vs the last patched position, one line per layer.",
    )
    body += _fig(
        fig_dir,
        "chained_similarity",
        "Chained/frozen: cosine similarity of the generated activations to the clean and corrupted runs.",
    )
    body += _fig(fig_dir, "modes_comparison", "Chained vs parallel vs frozen per layer (mean ± 95% CI).")
    for key in ("iterative/chained", "iterative/frozen"):
        if key in stats["top_cells"]:
            body += f"<h3>{escape(key.split('/')[1])}</h3>" + _top_tables(stats, key, ITERATIVE_TABLE_METRICS)
    return _section("iterative", body)


def _statistics(stats: dict) -> str:
    s = stats["settings"]
    body = (
        f"<p>Per cell (experiment, mode, layer, position) over {stats['n_pairs_used']} pairs: mean, {int(s['confidence'] * 100)}% "
        f"bootstrap CI ({escape(s['ci_method'])}, {s['n_resamples']} resamples, seed {s['seed']}), {escape(s['cell_test'])}; "
        f"{escape(s['corrections'])}. Bold: p &lt; 0.05.</p>"
    )
    cells = pd.DataFrame(stats["cells"])
    if not cells.empty:
        lay = all_positions_rows(cells)
        if not lay.empty:
            mets = [m for m in TABLE_METRICS if m in set(lay["metric"])]
            rows = []
            for layer, g in lay.groupby("layer"):
                row = [str(layer)]
                for m in mets:
                    r = g[g["metric"] == m]
                    if r.empty:
                        row += ["–", "–"]
                        continue
                    r = r.iloc[0]
                    row += [f"{fmt(r['mean'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]", fmt_p(r["p_holm"])]
                rows.append(row)
            header = ["layer"] + [x for m in mets for x in (f"{m} mean [CI]", "p Holm")]
            body += "<h3>All latent positions patched, per layer</h3>" + table(header, rows, left=1)
    comps = pd.DataFrame(stats["comparisons"])
    if not comps.empty:
        body += (
            "<h3>Chained vs parallel vs frozen (paired, per layer)</h3>"
            "<p>Δ = mean over pairs of a − b; p: paired Wilcoxon, Holm-corrected across layers; d<sub>z</sub> = mean / sd of "
            "the paired differences. Paired t-tests, BH and the rank-biserial correlation are in the full table and stats/comparisons.csv.</p>"
        )
        blocks = []
        for metric in [m for m in TABLE_METRICS if m in set(comps["metric"])]:
            sub = comps[comps["metric"] == metric]
            names = list(dict.fromkeys(sub["comparison"]))
            rows = []
            for layer, g in sub.groupby("layer"):
                row = [str(layer)]
                for name in names:
                    r = g[g["comparison"] == name]
                    row += (
                        ["–"] * 3
                        if r.empty
                        else [
                            fmt(r.iloc[0]["mean_diff"]),
                            fmt_p(r.iloc[0]["p_wilcoxon_holm"]),
                            fmt(r.iloc[0]["cohens_dz"]),
                        ]
                    )
                rows.append(row)
            header = ["layer"] + [x for n in names for x in (f"{n}: Δ", "p", "d_z")]
            blocks.append(
                f"<div><h3>{escape(METRIC_LABELS.get(metric, metric))}</h3>" + table(header, rows, left=1) + "</div>"
            )
        body += f'<div class="row">{"".join(blocks)}</div>'
        rows = [
            [
                escape(r["metric"]),
                escape(r["comparison"]),
                str(r["layer"]),
                str(r["n"]),
                fmt(r["mean_a"]),
                fmt(r["mean_b"]),
                fmt(r["mean_diff"]),
                fmt_p(r["p_wilcoxon"]),
                fmt_p(r["p_wilcoxon_holm"]),
                fmt_p(r["p_wilcoxon_bh"]),
                fmt_p(r["p_ttest"]),
                fmt_p(r["p_ttest_holm"]),
                fmt_p(r["p_ttest_bh"]),
                fmt(r["cohens_dz"]),
                fmt(r["rank_biserial"]),
            ]
            for r in stats["comparisons"]
        ]
        body += (
            f"<details><summary>Every comparison ({len(rows)} rows)</summary>"
            + table(
                [
                    "metric",
                    "comparison",
                    "layer",
                    "n",
                    "mean a",
                    "mean b",
                    "mean a−b",
                    "p W",
                    "p W Holm",
                    "p W BH",
                    "p t",
                    "p t Holm",
                    "p t BH",
                    "d_z",
                    "r_rb",
                ],
                rows,
                left=2,
            )
            + "</details>"
        )
    if not cells.empty:
        rows = [
            [
                escape(r["experiment"]),
                escape(r["mode"]),
                escape(r["component"]),
                str(r["layer"]),
                "all" if r["position"] == -1 else str(r["position"]),
                escape(r["metric"]),
                str(r["n"]),
                fmt(r["mean"]),
                fmt(r["median"]),
                f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                fmt_p(r["p_wilcoxon"]),
                fmt_p(r["p_holm"]),
                fmt_p(r["p_bh"]),
            ]
            for r in stats["cells"]
        ]
        body += (
            f"<details><summary>Every cell ({len(rows)} rows; also in stats/cells.csv)</summary>"
            + table(
                [
                    "experiment",
                    "mode",
                    "component",
                    "layer",
                    "pos",
                    "metric",
                    "n",
                    "mean",
                    "median",
                    "95% CI",
                    "p",
                    "p Holm",
                    "p BH",
                ],
                rows,
                left=3,
            )
            + "</details>"
        )
    return _section("statistics", body)


def _flagged(stats: dict, cells: pd.DataFrame) -> str:
    ids = stats["flagged_pairs"]
    if not ids:
        return _section(
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
    note = (
        "These pairs are <b>excluded</b> from the statistics and figures (--exclude-flagged)."
        if stats["settings"]["exclude_flagged"]
        else "These pairs are <b>included</b>; rebuild with <code>latentpatch report RUN_DIR --exclude-flagged</code> to drop them."
    )
    return _section(
        "flagged",
        f"<p>{len(ids)} pair(s) where the model gets the clean or the corrupted answer wrong. {note}</p>"
        + table(["pair", "clean correct", "corrupted correct"], rows, left=1),
    )


def _show_token(tok: Any) -> str:
    return f"<code>{escape(str(tok).replace(' ', '␣').replace(chr(10), '⏎'))}</code>"


def _thoughts(thoughts: dict | None, pairs: dict[str, dict[str, Any]], max_pairs: int = 5) -> str:
    if not thoughts:
        return _section(
            "thoughts", '<p class="note">This run recorded no decoded thoughts (results/thoughts.json).</p>'
        )
    body = '<p>Top decoded tokens of each continuous thought (the thought\'s hidden state through the LM head).</p><div class="row">'
    for pid, d in list(thoughts.items())[:max_pairs]:
        clean, corr = d.get("clean") or [], d.get("corrupted") or []
        rows = []
        for i in range(max(len(clean), len(corr))):
            c = " ".join(_show_token(t) for t in (clean[i] if i < len(clean) else []))
            k = " ".join(_show_token(t) for t in (corr[i] if i < len(corr) else []))
            rows.append([str(i), c, k])
        q = pairs.get(str(pid), {})
        qtxt = "".join(
            f"<div><b>{escape(v)}</b>: {escape(q[v].get('question', ''))} → <b>{escape(q[v].get('answer', ''))}</b></div>"
            for v in ("clean", "corrupted")
            if v in q
        )
        body += (
            f"<div><h3>pair {escape(pid)}</h3>{qtxt}"
            + table(["thought", "clean", "corrupted"], rows, left=3)
            + "</div>"
        )
    return _section("thoughts", body + "</div>")


def _reproduce(manifest: dict, run_dir: Path, exclude_flagged: bool) -> str:
    cmd = manifest.get("command") or "(the manifest records no command)"
    if isinstance(cmd, list):
        cmd = " ".join(map(str, cmd))
    rebuild = f"latentpatch report {run_dir}" + (" --exclude-flagged" if exclude_flagged else "")
    return _section(
        "reproduce",
        f"<p>The run:</p><pre>{escape(cmd)}</pre><p>This page (from the results only):</p><pre>{escape(rebuild)}</pre>",
    )


# ---------------------------------------------------------------------------------------------


def build_report(
    run_dir: Path | str,
    exclude_flagged: bool = False,
    n_resamples: int = 9999,
    ci_method: str = "percentile",
    formats: Iterable[str] = ("png", "svg"),
) -> Path:
    """Rebuild ``stats.json``, ``stats/*.csv``, ``figures/*`` and ``report.html`` from a run's results.

    Needs ``manifest.json`` and ``results/cells.parquet``; uses ``results/trajectories.parquet``,
    ``results/thoughts.json`` and ``pairs.json`` when present. A missing or corrupt file raises
    :class:`LatentPatchError` naming it. Returns the path of ``report.html``.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    check_result_files(run_dir)
    all_cells = read_cells(run_dir)
    trajectories = read_trajectories(run_dir)
    thoughts = read_thoughts(run_dir)
    pairs = read_pairs_json(run_dir)

    stats = st.stats_from_cells(all_cells, st.run_seed(manifest), exclude_flagged, n_resamples, ci_method=ci_method)
    st.write_stats(run_dir, stats)
    cells = used_pairs(all_cells, exclude_flagged)
    if trajectories is not None and exclude_flagged:
        trajectories = trajectories[trajectories["pair_id"].astype(str).isin(set(cells["pair_id"]))]
    figs.make_figures(run_dir, pd.DataFrame(stats["cells"]), cells, trajectories, formats=figs.page_formats(formats))

    fig_dir = RunPaths(run_dir).figures
    checks_html, n_fail = _checks(manifest)
    banners = ""
    if manifest.get("status") != "complete":
        banners += f'<div class="banner warn">Run status is "{escape(manifest.get("status", "unknown"))}": the results may be partial.</div>'
    if n_fail:
        banners += f'<div class="banner bad">{n_fail} built-in check(s) failed — see <a href="#checks">Built-in checks</a>.</div>'
    model = manifest.get("model") or {}
    title = f"latentpatch report: {run_dir.name}"
    nav = "".join(f'<a href="#{sid}">{escape(h.split(":")[0])}</a>' for sid, h in SECTIONS)
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head>
<body><header><h1>{escape(title)}</h1><div class="sub">model {escape(model.get("name", "?"))} · {stats["n_pairs_used"]} pairs · experiments: {escape(", ".join(stats["experiments"]) or "none")} · generated {generated}</div></header>
<nav>{nav}</nav><main>{banners}
{_summary(manifest, stats, run_dir)}
{checks_html}
{_baselines(manifest)}
{_config(manifest)}
{_layer(stats, fig_dir)}
{_position(stats, fig_dir)}
{_iterative(stats, fig_dir)}
{_statistics(stats)}
{_flagged(stats, all_cells)}
{_thoughts(thoughts, pairs)}
{_reproduce(manifest, run_dir, exclude_flagged)}
</main></body></html>
"""
    out = RunPaths(run_dir).report
    atomic_write_text(out, page)
    return out
