"""The first screen of ``report.html``: what was run and what was found, in sentences generated
from the statistics (``stats.json``), each number with its CI; and the wording of what a run patched
(component, direction, replacement), so every title and caption follows the run.

Numbers come from ``stats["cells"]`` and ``stats["comparisons"]`` as written (no recomputation), and
are shown with :func:`latentpatch.analysis.html.fmt`, so a test can find ``fmt(value)`` in the page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentpatch.analysis.html import escape, fmt, fmt_p
from latentpatch.names import METRIC_LABELS

#: The metric the findings are told in (docs/method.md §6: the fraction of the answer logit
#: difference between the two unpatched runs that a patch restores).
FINDING_METRIC = "recovery"


def run_terms(config: dict[str, Any] | None) -> dict[str, str]:
    """How the run patched, in words: ``component``, ``source``/``target`` run names, ``values``
    (what was written in) and ``recovery`` (what recovery 1 means).

    >>> run_terms({"direction": "noise", "replacement": "zero"})["values"]
    'set to zero'
    >>> run_terms({})["values"]
    'patched with its clean value'
    """
    config = config or {}
    source, target = ("corrupted", "clean") if config.get("direction") == "noise" else ("clean", "corrupted")
    values = {
        "source": f"patched with its {source} value",
        "zero": "set to zero",
        "mean": f"set to its mean over the {source} runs of all pairs",
        "resample": f"patched with the {source} value of another pair",
    }.get(str(config.get("replacement", "source")), f"patched ({config.get('replacement')})")
    return {
        "component": str(config.get("component") or "resid_out"),
        "source": source,
        "target": target,
        "values": values,
        "recovery": f"1 = the unpatched {source} run's answer logit diff restored, 0 = {target} run unchanged",
    }


@dataclass(frozen=True)
class RunLabels:
    """What the run patched, for titles and axis labels: component, values written in, run names,
    and the mean answer logit diff of the unpatched target run (None if unknown)."""

    component: str = "resid_out"
    values: str = "patched with its clean value"
    source: str = "clean"
    target: str = "corrupted"
    baseline_ld: float | None = None
    labels: dict[str, str] = field(default_factory=dict)
    #: layer -> per latent position, mean over the pairs of the unpatched cos(clean, corrupted)
    reference_cos: dict[int, list[float]] = field(default_factory=dict)

    @classmethod
    def of(cls, manifest: dict[str, Any], pair_ids: set[str] | None = None) -> RunLabels:
        """From a run's manifest; ``pair_ids``: the pairs the figures use (for the baseline)."""
        terms = run_terms(manifest.get("config"))
        per_pair = (manifest.get("baselines") or {}).get("per_pair") or {}
        key = f"ld_{terms['target']}_run"
        lds = [v[key] for p, v in per_pair.items() if (pair_ids is None or p in pair_ids) and v.get(key) is not None]
        labels = {"recovery": f"recovery (1 = {terms['source']} restored)"}
        cos = [v.get("cos_clean_corrupted") for p, v in per_pair.items() if (pair_ids is None or p in pair_ids)]
        cos = [c for c in cos if c]
        reference = {i: row for i, row in enumerate(np.mean(np.array(cos, float), axis=0).tolist())} if cos else {}
        return cls(
            terms["component"],
            terms["values"],
            terms["source"],
            terms["target"],
            float(np.mean(lds)) if lds else None,
            labels,
            reference,
        )

    def label(self, metric: str) -> str:
        return self.labels.get(metric, METRIC_LABELS.get(metric, metric))


def _cells(stats: dict, experiment: str, mode: str, metric: str = FINDING_METRIC) -> list[dict]:
    component = _component(stats)
    return [
        c
        for c in stats.get("cells", [])
        if c["experiment"] == experiment
        and c["mode"] == mode
        and c["metric"] == metric
        and c["component"] == component
        and c.get("mean") is not None
    ]


def _component(stats: dict) -> str | None:
    comps = sorted({c["component"] for c in stats.get("cells", [])})
    return "resid_out" if "resid_out" in comps else (comps[0] if comps else None)


def with_ci(cell: dict) -> str:
    """``mean [ci_low, ci_high]`` of a stats cell (n pairs)."""
    return f"<b>{fmt(cell['mean'])}</b> [95% CI {fmt(cell['ci_low'])}, {fmt(cell['ci_high'])}; n = {cell['n']}]"


def strongest(cells: list[dict]) -> dict | None:
    """The cell with the largest |mean| (ties: the first)."""
    return max(cells, key=lambda c: abs(c["mean"]), default=None)


def what_was_run(manifest: dict, stats: dict) -> str:
    """One paragraph: model, pairs, what was patched, flagged pairs and whether the means include them."""
    model = manifest.get("model") or {}
    terms = run_terms(manifest.get("config"))
    config = manifest.get("config") or {}
    n_flagged = len(stats.get("flagged_pairs", []))
    excluded = stats["settings"].get("exclude_flagged")
    flagged = (
        "no pair is flagged"
        if not n_flagged
        else f"{n_flagged} pair(s) flagged (the model gets one side wrong), "
        + ("<b>excluded</b> from the means" if excluded else "<b>included</b> in the means")
    )
    return (
        f"<p><b>Run.</b> Model {escape(model.get('name', '?'))} ({model.get('n_layers', '?')} layers, "
        f"{model.get('num_latent', '?')} continuous thoughts); {stats['n_pairs_used']} of "
        f"{stats['n_pairs_total']} pairs used ({escape(config.get('pairs', '?'))}); direction "
        f"{escape(config.get('direction', 'denoise'))}: the {terms['component']} activations of the "
        f"{terms['target']} run {escape(terms['values'])}; {flagged}. Recovery: {escape(terms['recovery'])}.</p>"
    )


def what_was_found(stats: dict) -> list[str]:
    """Sentences (HTML) about the strongest layer and cell, the ceiling, and the iterative modes."""
    out = []
    layers = _cells(stats, "layer", "all") or _cells(stats, "iterative", "parallel")
    best = strongest(layers)
    if best is not None:
        ceiling = max(layers, key=lambda c: c["mean"])
        out.append(
            f"Patching every thought at one layer restores the most at <b>layer {best['layer']}</b>: "
            f"recovery {with_ci(best)}, p (Holm) {fmt_p(best['p_holm'])}."
        )
        out.append(
            f"Ceiling: patching <i>all</i> thoughts restores at best {with_ci(ceiling)} (layer {ceiling['layer']}); "
            "the question tokens are never patched, so this is as much as the thoughts alone carry."
        )
    cell = strongest(_cells(stats, "position", "single"))
    if cell is not None:
        out.append(
            f"The strongest single cell is <b>layer {cell['layer']}, thought {cell['position']}</b>: "
            f"recovery {with_ci(cell)}, p (Holm) {fmt_p(cell['p_holm'])}."
        )
    out += _modes_sentences(stats)
    return out


def _modes_sentences(stats: dict) -> list[str]:
    """Chained vs parallel vs frozen at the layer where chained patching restores most."""
    chained = strongest(_cells(stats, "iterative", "chained"))
    if chained is None:
        return []
    layer = chained["layer"]
    frozen = next((c for c in _cells(stats, "iterative", "frozen") if c["layer"] == layer), None)
    parallel = next((c for c in _cells(stats, "iterative", "parallel") if c["layer"] == layer), None)
    comps = {
        c["comparison"]: c
        for c in stats.get("comparisons", [])
        if c["layer"] == layer and c["metric"] == FINDING_METRIC and c["component"] == _component(stats)
    }
    text = (
        f"At layer {layer}, patching thought 0 and letting later thoughts follow (chained) restores {with_ci(chained)}"
    )
    if parallel is not None:
        text += f"; patching every thought (parallel) {with_ci(parallel)}"
    if frozen is not None:
        text += f"; chained with later thoughts' inputs held corrupted (frozen) {with_ci(frozen)}"
    tests = [
        f"{name}: p (Wilcoxon, Holm across layers) {fmt_p(comps[name]['p_wilcoxon_holm'])}"
        for name in ("chained vs parallel", "chained vs frozen")
        if name in comps
    ]
    out = [text + "." + (" " + "; ".join(tests) + "." if tests else "")]
    if chained["ci_low"] is not None and chained["ci_low"] <= 0 <= (chained["ci_high"] or 0):
        out.append(
            "Reading: chained patching has no clear effect at any layer (its CI includes 0), "
            "so the split between the recurrent and the attention path is not read."
        )
    elif frozen is not None:
        share = (chained["mean"] - frozen["mean"]) / chained["mean"]
        out.append(
            f"Reading: the recurrent path (each thought fed into the next) carries <b>{100 * share:.0f}%</b> "
            f"of the chained effect at layer {layer}; the rest reaches the answer through attention alone."
        )
    return out


def findings_section_body(manifest: dict, stats: dict) -> str:
    """The findings: what was run, then what was found (a list of sentences)."""
    found = what_was_found(stats)
    items = "".join(f"<li>{s}</li>" for s in found) or "<li>The run has no recovery statistics to summarise.</li>"
    return what_was_run(manifest, stats) + f"<p><b>Found.</b></p><ul>{items}</ul>"
