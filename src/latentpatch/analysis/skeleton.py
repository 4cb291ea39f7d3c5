"""The one skeleton of every experiment's part of ``report.html``, and the quoting of its numbers.

Every experiment that ran gets one :class:`ExperimentSection`: the question it answers, its finding
(one sentence, every number with its CI, generated from ``stats.json``), its figures (maps with the
values on hover), a compact table, the full table folded, and the method's place in docs/method.md.
The page's first screen lists the findings of every section that ran; an experiment that did not
run has no section and no link (:func:`not_run_line` names what else the tool can run).

Numbers in a finding are quoted through :class:`Quote`, which writes each as
``<span class="q" data-stat="PATH">`` where PATH locates the value in ``stats.json`` (keys and list
indices joined by ``/``), so a test can check every number of every sentence against the file; a
comparative word ("more", "less", "no clear difference") is a ``<span class="claim">`` naming the
contrast whose CI it reads (:func:`Quote.compare`).

>>> q = Quote({"contrasts": [{"diff": 0.5, "ci_low": 0.2, "ci_high": 0.8, "n": 6}]})
>>> "more" in q.compare(0) and 'data-stat="contrasts/0/diff"' in q.compare(0)
True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from latentpatch.analysis.html import escape, fmt, fmt_p

#: (id, heading, question) of every experiment section, in page order.
EXPERIMENT_SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("layer", "Layer sweep", "At which layer do the thoughts carry what decides the answer?"),
    ("position", "Position sweep", "Which thought, at which layer, carries it?"),
    (
        "iterative",
        "Iterative patching: cumulative, chained, frozen",
        "Does a patch at the first thought travel through the later thoughts, and by which path?",
    ),
    ("thought", "Thought interventions", "Does the answer follow the thoughts, and which one?"),
    ("early", "Early answers S(k)", "After how many thoughts is the answer decided?"),
    ("influence", "Step influence matrix", "Does each thought depend on the one before it, or on earlier ones too?"),
    ("intermediate", "Intermediate values", "Which thought stores which intermediate value?"),
    ("lens", "Lens: logit and tuned", "Where can each known value be read out as a token?"),
    ("attention", "Attention to the question", "What do the thoughts and the answer attend to?"),
    ("heads", "Per-head patching", "Which attention heads carry the effect?"),
    ("atp", "Attribution patching", "Does the one-backward-pass estimate agree with exact patching?"),
    ("probe", "Probes", "Which value can be read linearly from which site, beyond what a control task allows?"),
    ("steer", "Steering", "Does adding a direction at one site move the answer, more than a random direction?"),
    (
        "edges",
        "Edges between thoughts",
        "Which earlier position does each thought read, and does cutting that edge matter?",
    ),
    ("das", "Distributed alignment search", "Which subspace of which thought does the model use as a given value?"),
    ("stops", "Latent stops", "Where would the family's stop rule end each patched run?"),
)
#: Sections a run has by its model, not by a flag (a family with a stop rule): never listed as not run.
NOT_FLAGGED = ("stops",)
#: How to run each experiment (the closing line of the page names the ones a run lacks).
HOW_TO_RUN: dict[str, str] = {
    **{sid: f"--experiments {sid}" for sid, _, _ in EXPERIMENT_SECTIONS},
    "heads": "--component head_out",
}


def stat_path(*keys: Any) -> str:
    """A value's place in ``stats.json``: keys and list indices joined by ``/``.

    >>> stat_path("steps", "thought", "summary", 3, "mean")
    'steps/thought/summary/3/mean'
    """
    return "/".join(str(k) for k in keys)


def lookup(stats: dict[str, Any], path: str) -> Any:
    """The value at ``path`` (:func:`stat_path`) in ``stats``.

    >>> lookup({"a": [{"b": 2}]}, "a/0/b")
    2
    """
    value: Any = stats
    for key in path.split("/"):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


def count_text(fraction: float, n: int) -> str:
    """A fraction of n things as ``k of n (p%)``.

    >>> count_text(1.0, 6), count_text(0.5, 8), count_text(1 / 3, 3)
    ('6 of 6 (100%)', '4 of 8 (50%)', '1 of 3 (33%)')
    """
    k = round(fraction * n)
    return f"{k} of {n} ({100 * k / n:.0f}%)" if n else "0 of 0"


@dataclass(frozen=True)
class Quote:
    """Numbers of ``stats`` (the ``stats.json`` dict) written into a sentence, each tagged with its place."""

    stats: dict[str, Any]

    def num(self, *keys: Any, digits: int = 3) -> str:
        """The value at ``keys`` as :func:`~latentpatch.analysis.html.fmt` writes it, tagged."""
        path = stat_path(*keys)
        return f'<span class="q" data-stat="{path}">{fmt(lookup(self.stats, path), digits)}</span>'

    def p(self, *keys: Any) -> str:
        """A p-value (2 digits, bold below 0.05), tagged."""
        path = stat_path(*keys)
        return f'<span class="q" data-stat="{path}" data-digits="2">{fmt_p(lookup(self.stats, path))}</span>'

    def count(self, fraction_keys: Sequence[Any], n_keys: Sequence[Any]) -> str:
        """A fraction as ``k of n (p%)`` (:func:`count_text`), tagged with both places."""
        frac, n = stat_path(*fraction_keys), stat_path(*n_keys)
        text = count_text(float(lookup(self.stats, frac)), int(lookup(self.stats, n)))
        return f'<span class="q" data-count="{frac}|{n}">{text}</span>'

    def ci(self, *keys: Any, mean: str = "mean", low: str = "ci_low", high: str = "ci_high") -> str:
        """``mean [95% CI low, high; n = N]`` of the record at ``keys`` (its ``mean``/``ci_low``/
        ``ci_high``/``n``, or the names given), the mean in bold."""
        return (
            f"<b>{self.num(*keys, mean)}</b> [95% CI {self.num(*keys, low)}, {self.num(*keys, high)}; "
            f"n = {self.num(*keys, 'n')}]"
        )

    def compare(self, index: int, more: str = "more", less: str = "less", same: str = "", than: str = "") -> str:
        """The contrast ``stats["contrasts"][index]`` in words, then the difference and its CI: ``more``
        (its CI above 0), ``less`` (below 0) or, when the CI holds 0 (or is unknown), ``same`` (default
        "about as much as" with ``than``, else "no clear difference"). ``than``: what it is compared
        with ("more than X", "about as much as X (no clear difference: ...)")."""
        c = self.stats["contrasts"][index]
        claim = contrast_claim(c)
        same = same or ("about as much as" if than else "no clear difference")
        word = {"more": more, "less": less}.get(claim, same)
        tail = (f" {than}" if claim == "none" else f" than {than}") if than else ""
        note = "no clear difference: " if claim == "none" and than else ""
        return (
            f'<span class="claim" data-claim="{claim}" data-contrast="{index}">{escape(word)}</span>{escape(tail)} '
            f"({note}difference {self.ci('contrasts', index, mean='diff')})"
        )


def contrast_claim(contrast: dict[str, Any]) -> str:
    """What a contrast's CI supports: ``more`` (above 0), ``less`` (below 0) or ``none``.

    >>> contrast_claim({"ci_low": 0.1, "ci_high": 0.3}), contrast_claim({"ci_low": -0.1, "ci_high": 0.3})
    ('more', 'none')
    """
    lo, hi = contrast.get("ci_low"), contrast.get("ci_high")
    if lo is None or hi is None:
        return "none"
    return "more" if lo > 0 else "less" if hi < 0 else "none"


@dataclass(frozen=True)
class ExperimentSection:
    """One experiment's part of the page. Every field is HTML; empty ones are left out.

    ``finding``: the one sentence the first screen repeats. ``figures``: maps and plots.
    ``table``: the compact table. ``folded``: (summary, HTML) blocks shown on a click: the full table,
    per-pair views. ``method``: where docs/method.md describes it.
    """

    sid: str
    finding: str
    figures: str = ""
    table: str = ""
    folded: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    method: str = ""
    notes: str = ""

    @property
    def heading(self) -> str:
        return next(h for s, h, _ in EXPERIMENT_SECTIONS if s == self.sid)

    @property
    def question(self) -> str:
        return next(q for s, _, q in EXPERIMENT_SECTIONS if s == self.sid)

    def html(self) -> str:
        """The ``<section>``: question, finding, notes, figures, compact table, folded blocks, method."""
        folded = "".join(f"<details><summary>{escape(s)}</summary>{body}</details>" for s, body in self.folded)
        method = (
            f'<p class="method">Method: {escape(self.method)} (in the latentpatch docs).</p>' if self.method else ""
        )
        return (
            f'<section id="{self.sid}"><h2>{escape(self.heading)}</h2>'
            f'<p class="question">{escape(self.question)}</p>'
            f'<p class="finding"><b>Finding.</b> {self.finding}</p>'
            f"{self.notes}{self.figures}{self.table}{folded}{method}</section>"
        )


def findings_list(sections: Iterable[ExperimentSection]) -> str:
    """The first screen's list: one item per experiment that ran, its finding and a link to its section."""
    # the heading up to its colon ("Iterative patching"), then the finding
    items = "".join(
        f'<li class="finding"><a href="#{s.sid}">{escape(s.heading.split(":")[0])}</a>: {s.finding}</li>'
        for s in sections
    )
    return f"<ul>{items}</ul>" if items else '<p class="note">This run has no experiment results.</p>'


def not_run_line(ran: Iterable[str]) -> str:
    """One closing line naming the experiments this run did not include and how to add each."""
    done = set(ran)
    rest = [
        f"{sid} (<code>{escape(HOW_TO_RUN[sid])}</code>)"
        for sid, _, _ in EXPERIMENT_SECTIONS
        if sid not in done and sid not in NOT_FLAGGED
    ]
    if not rest:
        return ""
    return (
        f'<p class="note closing">Also available, not in this run: {", ".join(rest)}; docs/method.md §5, §13-§17.</p>'
    )
