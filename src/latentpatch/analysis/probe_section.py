"""The report's probe section (docs/method.md §16) in the one skeleton.

Per label, two maps over the sites (rows: each recorded component's layers, then the fed thought and
the state it came from; columns: the thoughts, the first answer position, the question's last token):
held-out accuracy and selectivity (accuracy minus the control task's), values on hover. The finding
quotes, per label, the best site's held-out accuracy with its CI beside the majority baseline, the
control task and the selectivity (``stats.json``'s ``probe``); "three readings" puts the probe, the
lens and the donor experiment side by side for each intermediate and thought.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from latentpatch.analysis.hover import grid_hover_figure
from latentpatch.analysis.html import escape, fmt, table
from latentpatch.analysis.sections import note
from latentpatch.analysis.skeleton import ExperimentSection, Quote
from latentpatch.analysis.steps_figures import save_map
from latentpatch.rundir import RunPaths

METHOD = "docs/method.md §16"
#: The two maps per label: (column, title, colour range).
MAPS = (("accuracy", "held-out accuracy", (0.0, 1.0)), ("selectivity", "selectivity (accuracy − control)", (-1.0, 1.0)))


def site_label(component: str, layer: int) -> str:
    """A map row: ``resid_out L2``, or the thought sites by name.

    >>> site_label("resid_out", 2), site_label("thought", -1)
    ('resid_out L2', 'thought')
    """
    return component if layer < 0 else f"{component} L{layer}"


def _grid(rows: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Row labels (components' layers, then the thought sites) and column labels (positions)."""
    comps = [c for c in dict.fromkeys(rows["component"]) if c not in ("thought", "thought_pre")]
    row_labels = [
        site_label(c, int(layer)) for c in comps for layer in sorted(rows.loc[rows["component"] == c, "layer"].unique())
    ]
    row_labels += [c for c in ("thought", "thought_pre") if (rows["component"] == c).any()]
    positions = list(dict.fromkeys(rows["position"]))
    thoughts = sorted((p for p in positions if str(p).startswith("t")), key=lambda p: int(str(p)[1:]))
    return row_labels, thoughts + [p for p in positions if not str(p).startswith("t")]


def label_maps(rows: pd.DataFrame, label: str, fig_dir: Path, formats: Sequence[str], index: int) -> str:
    """The two maps of ``label`` (files ``probe_<index>_<metric>``) with hover tips."""
    sub = rows[rows["label"] == label]
    row_labels, cols = _grid(sub)
    out = []
    for metric, title, (lo, hi) in MAPS:
        grid = np.full((len(row_labels), len(cols)), np.nan)
        tips = {}
        for r in sub.itertuples():
            i, j = row_labels.index(site_label(r.component, int(r.layer))), cols.index(r.position)
            value = getattr(r, metric)
            grid[i, j] = np.nan if value is None else value
            tips[(row_labels[i], r.position)] = (
                f"{label} at {row_labels[i]}, {r.position}: accuracy {fmt(r.accuracy)} "
                f"[{fmt(r.accuracy_ci_low)}, {fmt(r.accuracy_ci_high)}], majority {fmt(r.majority_accuracy)}, "
                f"control {fmt(r.control_accuracy)}, selectivity {fmt(r.selectivity)}, n {r.n}"
            )
        fig = Figure(
            figsize=(max(4.5, 2.4 + 0.6 * len(cols)), max(3.0, 1.4 + 0.3 * len(row_labels))), layout="constrained"
        )
        ax = fig.subplots()
        im = ax.imshow(
            np.ma.masked_invalid(grid),
            aspect="auto",
            origin="upper",
            vmin=lo,
            vmax=hi,
            cmap="viridis",
            interpolation="nearest",
        )
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
        ax.set_title(f"{label}: {title}", fontsize=9)
        fig.colorbar(im, ax=ax)
        name = f"probe_{index}_{metric}"
        save_map(fig, ax, fig_dir, name, formats, row_labels, cols, "upper")
        out.append(grid_hover_figure(fig_dir, name, f"{label}: {title} per site (held out, grouped by problem).", tips))
    return f'<div class="row figs">{"".join(out)}</div>'


def _finding(stats: dict[str, Any]) -> str:
    q, probe = Quote(stats), stats["probe"]
    parts = []
    for b in probe["best"]:
        i, r = b["row"], probe["rows"][b["row"]]
        at = ("probe", "rows", i)
        if r["component"] == "thought":
            where = "the fed thought"
        elif r["component"] == "thought_pre":
            where = "the state before the feedback"
        else:
            where = f"{escape(r['component'])} at layer {q.num(*at, 'layer')}"
        pos = {"ans": "the first answer position", "question": "the question's last token"}.get(
            str(r["position"]), f"thought {q.num(*at, 'position')}"
        )
        parts.append(
            f"{q.num(*at, 'label')} is read best from {where}, {pos}: held-out accuracy "
            f"{q.ci(*at, mean='accuracy', low='accuracy_ci_low', high='accuracy_ci_high')} "
            f"against {q.num(*at, 'majority_accuracy')} for the majority class and {q.num(*at, 'control_accuracy')} "
            f"on the control task (selectivity {q.num(*at, 'selectivity')})"
        )
    return ("; ".join(parts) or "No label had enough questions per value to be probed") + "."


def _best_table(stats: dict[str, Any]) -> str:
    probe = stats["probe"]
    rows = []
    for b in probe["best"]:
        r = probe["rows"][b["row"]]
        rows.append(
            [escape(r["label"]), escape(site_label(r["component"], r["layer"])), escape(r["position"]), str(r["n"])]
            + [f"{fmt(r['accuracy'])} [{fmt(r['accuracy_ci_low'])}, {fmt(r['accuracy_ci_high'])}]"]
            + [fmt(r[k]) for k in ("majority_accuracy", "random_accuracy", "control_accuracy")]
            + [f"{fmt(r['selectivity'])} [{fmt(r['selectivity_ci_low'])}, {fmt(r['selectivity_ci_high'])}]"]
            + [fmt(r["train_accuracy"])]
        )
    header = ["label", "site", "position", "n", "held-out accuracy [95% CI]", "majority", "random vector"]
    header += ["control task", "selectivity [95% CI]", "train accuracy"]
    return table(header, rows, left=3)


def _regression_table(stats: dict[str, Any]) -> str:
    """``--probe-regression``: per numeric label, the site with the highest held-out R^2 and its baselines."""
    reg = stats["probe"].get("regression")
    if not reg:
        return ""
    rows = []
    for b in reg["best"]:
        r = reg["rows"][b["row"]]
        rows.append(
            [escape(r["label"]), escape(site_label(r["component"], r["layer"])), escape(r["position"]), str(r["n"])]
            + [f"{fmt(r['r2'])} [{fmt(r['r2_ci_low'])}, {fmt(r['r2_ci_high'])}]"]
            + [fmt(r[k]) for k in ("mean_baseline_r2", "random_r2", "train_r2")]
        )
    header = ["label", "site", "position", "n", "held-out R² [95% CI]", "training-mean R²", "random vector R²"]
    return "<h3>Magnitudes: ridge regression, best site per label</h3>" + table(header + ["train R²"], rows, left=3)


def _readings_table(stats: dict[str, Any]) -> str:
    readings = stats["probe"].get("readings") or []
    if not any(r["lens_median_rank"] is not None or r["donor_gap"] is not None for r in readings):
        return ""
    rows = [
        [str(r["intermediate"]), f"t{r['position']}"]
        + [fmt(r[k]) for k in ("probe_accuracy", "probe_selectivity", "lens_median_rank", "donor_gap")]
        for r in readings
    ]
    header = ["intermediate", "thought", "probe accuracy", "probe selectivity", "lens median rank", "donor gap"]
    return (
        "<h3>Three readings of each thought</h3><p>Per intermediate and thought: the probe on the fed thought "
        "(questions), the logit lens's median rank of the value at the fed thought (0 = top token), and the "
        "intermediate experiment's flip rate of a different-value donor minus a same-value one (pairs).</p>"
        + table(header, rows, left=2)
    )


def probe_section(run_dir: Path, formats: Sequence[str], stats: dict[str, Any]) -> ExperimentSection | None:
    """The ``probe`` section; None when the run has no probes."""
    if not stats.get("probe"):
        return None
    fig_dir = RunPaths(run_dir).figures
    rows = pd.DataFrame(stats["probe"]["rows"])
    maps = "".join(
        f"<h3>{escape(label)}</h3>" + label_maps(rows, label, fig_dir, formats, i)
        for i, label in enumerate(dict.fromkeys(rows["label"]))
    )
    full = table(
        ["label", "site", "position", "n", "accuracy", "CI", "majority", "random", "control", "selectivity"],
        [
            [escape(r.label), escape(site_label(r.component, int(r.layer))), escape(r.position), str(r.n)]
            + [fmt(r.accuracy), f"[{fmt(r.accuracy_ci_low)}, {fmt(r.accuracy_ci_high)}]"]
            + [fmt(r.majority_accuracy), fmt(r.random_accuracy), fmt(r.control_accuracy), fmt(r.selectivity)]
            for r in rows.itertuples()
        ],
        left=3,
    )
    return ExperimentSection(
        "probe",
        _finding(stats),
        notes=note(
            "A standardised logistic-regression probe per site, cross-validated with folds grouped by problem (a "
            "pair's two questions, or a question's group, never straddle train and test); every number is held "
            "out. Baselines: the training folds' majority class, the same probe on random vectors of each row's "
            "norm, and the control task (Hewitt & Liang 2019: each value mapped to a fixed random label); "
            "selectivity = accuracy − control accuracy. Values with too few questions are left out."
        ),
        figures=maps,
        table="<h3>Best site per label</h3>" + _best_table(stats) + _regression_table(stats) + _readings_table(stats),
        folded=((f"Every label and site ({len(rows)} rows)", full),),
        method=METHOD,
    )
