"""The sections of ``report.html``, one function each, in page order (:data:`SECTIONS`).

Each ``*_section`` function returns one ``<section id=...>`` as HTML text, built from the run's
manifest, its statistics (the ``stats.json`` dict of :func:`latentpatch.analysis.stats.stats_from_cells`)
and the figures already drawn into ``figures/``. The statistics section is in
:mod:`latentpatch.analysis.stats_section`; the page around them in :mod:`latentpatch.analysis.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from latentpatch.analysis.html import embed_png, escape, fmt, kv_list, table
from latentpatch.analysis.skeleton import EXPERIMENT_SECTIONS

#: (id, heading) of every section of the page, in order.
SECTIONS: list[tuple[str, str]] = [
    ("findings", "Findings"),
    ("checks", "Built-in checks"),
    ("baselines", "Baselines"),
    *((sid, heading) for sid, heading, _ in EXPERIMENT_SECTIONS),
    ("statistics", "Statistics"),
    ("flagged", "Flagged pairs"),
    ("thoughts", "Decoded thoughts"),
    ("summary", "Model and data"),
    ("config", "Run configuration"),
    ("reproduce", "Reproduce"),
]

#: The key metrics (:data:`latentpatch.names.KEY_METRICS`) in the order of the report's tables.
TABLE_METRICS: tuple[str, ...] = ("recovery", "kl", "answer_logit_diff")
CHECKS_NOTE = (
    '<p class="note">identity: KL of a self-patch; full_restoration: max |Δlogit| of a layer-0 full patch; '
    "live_thoughts: thoughts differ and ablating them changes answers; "
    "engine_reference: fast engine vs one rollout per patch; steps_engine_reference, edges_engine_reference: "
    "the same for the step-level and edge experiments, when they run (docs/method.md §8).</p>"
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
        "pairs": (
            f"{stats['n_pairs_total']} in results ({stats['n_pairs_used']} used"
            + (", flagged excluded" if stats["settings"].get("exclude_flagged") else "")
            + f"); manifest n_pairs = {base.get('n_pairs', '?')}"
            if "n_pairs_total" in stats
            else f"manifest n_pairs = {base.get('n_pairs', '?')}"
        ),
        "flagged pairs": len(stats.get("flagged_pairs", base.get("flagged_pairs") or [])),
        "sweep experiments (cells.parquet)": ", ".join(stats.get("experiments", [])) or "none",
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


def figure(fig_dir: Path, name: str, caption: str) -> str:
    """``figures/<name>.png`` embedded with its caption ("" if the run has no such figure)."""
    return embed_png(fig_dir / f"{name}.png", caption)


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
