"""The wording of what a run patched (component, direction, replacement), so every title, caption
and finding follows the run, and the first screen's paragraph on what was run. The findings
themselves are each experiment section's (:mod:`latentpatch.analysis.skeleton`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentpatch.analysis.html import escape
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
        reference = {i: row for i, row in enumerate(_ragged_mean(cos).tolist())} if cos else {}
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


def what_was_run(manifest: dict, stats: dict) -> str:
    """One paragraph: model, pairs, flagged pairs and whether the means include them, and (when sweep
    experiments ran) what the sweeps patched and what recovery 1 means."""
    model = manifest.get("model") or {}
    terms = run_terms(manifest.get("config"))
    config = manifest.get("config") or {}
    baselines = manifest.get("baselines") or {}
    flagged_ids = stats.get("flagged_pairs", baselines.get("flagged_pairs") or [])
    n_flagged = len(flagged_ids) if isinstance(flagged_ids, list) else int(flagged_ids)
    excluded = stats["settings"].get("exclude_flagged")
    n_total = stats.get("n_pairs_total", baselines.get("n_pairs", "?"))
    flagged = (
        "no pair is flagged"
        if not n_flagged
        else f"{n_flagged} pair(s) flagged (the model gets one side wrong), "
        + ("<b>excluded</b> from the means" if excluded else "<b>included</b> in the means")
    )
    text = (
        f"<p><b>Run.</b> Model {escape(model.get('name', '?'))} ({model.get('n_layers', '?')} layers, "
        f"{model.get('num_latent', '?')} continuous thoughts); {stats.get('n_pairs_used', n_total)} of "
        f"{n_total} pairs used ({escape(config.get('pairs', '?'))}); {flagged}."
    )
    if stats.get("cells"):
        text += (
            f" Sweeps: direction {escape(config.get('direction', 'denoise'))}, the {terms['component']} "
            f"activations of the {terms['target']} run {escape(terms['values'])}; recovery: "
            f"{escape(terms['recovery'])}."
        )
    return text + "</p>"


def _ragged_mean(per_pair: list[list[list[float]]]) -> np.ndarray:
    """[L, K] mean over pairs of per-pair [L, K_i] tables, each position over the pairs that have it
    (pairs of a family with a stop rule run their own latent counts K_i, docs/method.md §22).

    >>> _ragged_mean([[[1.0, 2.0]], [[3.0]]]).tolist()
    [[2.0, 2.0]]
    """
    L, K = len(per_pair[0]), max(len(row) for table in per_pair for row in table)
    x = np.full((len(per_pair), L, K), np.nan)
    for i, table in enumerate(per_pair):
        for layer, row in enumerate(table):
            x[i, layer, : len(row)] = row
    return np.nanmean(x, axis=0)
