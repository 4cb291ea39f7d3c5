"""Every generated sentence of report.html checked against the numbers it quotes (issue: a report
that reads right): each number against stats.json, each comparative word against the CI of its
difference, each count as "k of n (p%)"; sections only for what ran. The issue's cases are
recomputed here from the results files with plain pandas (no report code).

Runs of the shipped model: the issue's ``thought,early,influence --limit 6``, and a run of every
experiment on pairs with intermediates (plus a per-head run).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from latentpatch.analysis.html import fmt

#: Words that compare; outside a claim span (whose CI the test checks) a finding may not use them.
COMPARATIVES = ("more", "less", "higher", "lower", "local", "direct", "larger than", "smaller than")
EVERY = ("layer", "position", "iterative", "thought", "early", "influence", "intermediate", "lens", "attention", "atp")


def _run(tmp: Path, name: str, **options) -> Path:
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    cfg = RunConfig(out=str(tmp / name), use_cache=False, threads=1, **options)
    return run_experiments(cfg, progress=False, command="test")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from latentpatch.data.pairs import save_pairs
    from latentpatch.data.synthetic import generate_pairs

    tmp = tmp_path_factory.mktemp("sentences")
    save_pairs(generate_pairs(57, seed=0, intermediates=True)[:8], tmp / "pairs.json")
    return {
        "issue": _run(tmp, "issue", limit=6, experiments=("thought", "early", "influence")),
        "every": _run(tmp, "every", pairs=str(tmp / "pairs.json"), experiments=EVERY),
        "heads": _run(tmp, "heads", limit=3, experiments=("layer",), component="head_out"),
    }


class Sentences(HTMLParser):
    """The findings of a page: per sentence, its quoted numbers, claims and the text outside them."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[dict] = []
        self.stack: list[tuple[str, dict]] = []  # open tags inside a finding
        self.depth = 0  # > 0 while inside a finding

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0 and tag in ("p", "li") and a.get("class") == "finding":
            self.items.append({"quotes": [], "claims": [], "plain": "", "html_tag": tag})
            self.depth = 1
            self.stack = []
            return
        if self.depth:
            self.stack.append((tag, a))
            if a.get("class") == "q":
                self.items[-1]["quotes"].append({**a, "text": ""})
            if a.get("class") == "claim":
                self.items[-1]["claims"].append({**a, "text": ""})

    def handle_endtag(self, tag):
        if not self.depth:
            return
        if not self.stack:
            self.depth = 0
            return
        self.stack.pop()

    def _inside(self, cls: str) -> bool:
        return any(a.get("class") == cls for _, a in self.stack)

    def handle_data(self, data):
        if not self.depth:
            return
        item = self.items[-1]
        if self._inside("q"):
            item["quotes"][-1]["text"] += data
        elif self._inside("claim"):
            item["claims"][-1]["text"] += data
        else:
            item["plain"] += data


def lookup(stats: dict, path: str):
    """The value at ``a/0/b`` in stats.json (written here, not the report's helper)."""
    value = stats
    for key in path.split("/"):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


def findings_of(run: Path) -> tuple[list[dict], dict, str]:
    page = (run / "report.html").read_text()
    parser = Sentences()
    parser.feed(page)
    return parser.items, json.loads((run / "stats.json").read_text()), page


def check_sentences(run: Path) -> list[dict]:
    """Every finding's numbers, counts and claims agree with stats.json; no untagged number or comparative."""
    items, stats, _ = findings_of(run)
    assert items
    for item in items:
        for q in item["quotes"]:
            if "data-stat" in q:
                value = lookup(stats, q["data-stat"])
                assert q["text"] == fmt(value, int(q.get("data-digits", 3))), (q, value)
            else:
                frac_path, n_path = q["data-count"].split("|")
                n = int(lookup(stats, n_path))
                k = int(round(float(lookup(stats, frac_path)) * n))
                assert q["text"] == f"{k} of {n} ({100 * k / n:.0f}%)", q
        for c in item["claims"]:
            if "data-contrast" in c:
                con = stats["contrasts"][int(c["data-contrast"])]
                expected = "more" if con["ci_low"] > 0 else "less" if con["ci_high"] < 0 else "none"
                assert c["data-claim"] == expected, (c, con)
                words = {
                    "more": ("more", "more often", "higher"),
                    "less": ("less", "less often", "lower"),
                    "none": ("no clear difference", "about as much as", "about the same as", "about as often as"),
                }
                assert c["text"] in words[expected], c
            else:  # a verdict over several contrasts
                cons = [stats["contrasts"][int(k)] for k in c["data-contrasts"].split(",")]
                local = [x["ci_low"] > 0 for x in cons]
                expected = "local" if all(local) else "mixed" if any(local) else "not local"
                assert c["data-claim"] == expected, (c, cons)
        plain = item["plain"].replace("95% CI", "").replace("relative L2", "")  # names, not numbers
        assert not re.search(r"\d", plain), f"a number not quoted from stats.json: {plain!r}"
        for word in COMPARATIVES:
            assert not re.search(rf"\b{word}\b", plain), f"comparative {word!r} outside a claim: {plain!r}"
    return items


def sections_of(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', page)


@pytest.mark.parametrize("name", ["issue", "every", "heads"])
def test_every_sentence_quotes_stats_json(runs, name):
    check_sentences(runs[name])


@pytest.mark.parametrize("name", ["issue", "every", "heads"])
def test_one_finding_per_experiment_that_ran_and_no_empty_section(runs, name):
    items, stats, page = findings_of(runs[name])
    ran = {
        "issue": ["thought", "early", "influence"],
        "every": list(EVERY),
        "heads": ["layer", "heads"],
    }[name]
    ids = sections_of(page)
    experiments = [s for s in ids if s in EVERY + ("heads",)]
    assert experiments == ran
    # the first screen: one list item per experiment section, linking to it; then the section's own sentence
    first = [i for i in items if i["html_tag"] == "li"]
    assert len(first) == len(ran) and len([i for i in items if i["html_tag"] == "p"]) == len(ran)
    for sid in ran:
        assert f'<li class="finding"><a href="#{sid}">' in page
    nav = re.search(r"<nav>(.*?)</nav>", page, re.S).group(1)
    assert re.findall(r'href="#([^"]+)"', nav) == ids
    assert "This run has no" not in page
    assert page.index('id="findings"') < page.index('id="checks"')
    for sid in ids:  # no section is only its heading
        body = page[page.index(f'<section id="{sid}">') :]
        body = body[: body.index("</section>")]
        assert len(re.sub(r"<[^>]+>", "", body.split("</h2>", 1)[1]).strip()) > 20, sid
    closing = re.search(r'<p class="note closing">(.*?)</p>', page)
    assert (closing is None) == (len(ran) == len(EVERY) + 1)
    if closing:
        assert all(f"{sid} (" not in closing.group(1) for sid in ran)


def test_the_issue_cases_read_right(runs):
    """The issue's run: "1 of the 6 pairs" (a fraction printed as a count), "mean at thought: 1 of pairs",
    and "influence is local" by any margin; each recomputed here from the results files."""
    run = runs["issue"]
    items, stats, page = findings_of(run)
    steps = pd.read_parquet(run / "results" / "steps.parquet")
    thought = next(i for i in items if i["html_tag"] == "p" and "source run" in i["plain"])
    # every thought from the source run: the pairs right on both sides that give the source's answer
    ok = steps[~steps["flagged"]]
    thought_rows = ok[(ok["experiment"] == "thought") & (ok["site"] == "thought")]
    every = thought_rows[(thought_rows["replacement"] == "source") & (thought_rows["position"] == -1)]
    k, n = int(every["to_source"].sum()), every["pair_id"].nunique()
    count = next(q["text"] for q in thought["quotes"] if "data-count" in q)
    assert count == f"{k} of {n} ({100 * k / n:.0f}%)" and n == 6
    assert "of pairs" not in page and "1 of the 6" not in page
    # the largest single-thought flip rate: the max over (site, replacement, position >= 0) of the mean
    single = steps[(steps["experiment"] == "thought") & (steps["position"] >= 0)]
    top = single.groupby(["site", "replacement", "position"])["flipped"].mean().max()
    assert fmt(top) in [q["text"] for q in thought["quotes"]]
    # influence: next thought vs 2+ steps later, per pair, per replacement; "local" only if every CI is above 0
    inf = pd.read_parquet(run / "results" / "influence.parquet")
    sentence = next(i for i in items if i["html_tag"] == "p" and "next thought" in i["plain"])
    verdict = next(c for c in sentence["claims"] if "data-contrasts" in c)
    for rep, g in inf.groupby("replacement"):
        per_pair = {}
        for pid, gp in g.groupby("pair_id"):
            nxt = [r.thought_rel_l2 for r in gp.itertuples() if r.later == r.step + 1]
            far = [r.thought_rel_l2 for r in gp.itertuples() if r.later >= r.step + 2]
            per_pair[pid] = np.mean(nxt) - np.mean(far)
        con = next(
            c for c in stats["contrasts"] if c["experiment"] == "influence" and c["where"].get("replacement") == rep
        )
        assert con["diff"] == pytest.approx(np.mean(list(per_pair.values())), abs=1e-9)
        assert con["ci_low"] <= con["diff"] <= con["ci_high"]
    cons = [stats["contrasts"][int(k)] for k in verdict["data-contrasts"].split(",")]
    if any(c["ci_low"] <= 0 for c in cons):
        assert verdict["data-claim"] != "local" and "influence is local (" not in page


def test_findings_are_unchanged_numbers_of_stats_json(runs):
    """The statistics the report had before its findings were added are still there, and every contrast
    a finding reads is a paired difference whose mean is the difference of its two means."""
    stats = json.loads((runs["every"] / "stats.json").read_text())
    assert {"cells", "comparisons", "additivity", "top_cells", "steps", "lens", "atp", "attention"} <= set(stats)
    for c in stats["contrasts"]:
        if c["n"]:
            assert c["diff"] == pytest.approx(c["mean_a"] - c["mean_b"], abs=1e-9)


def layout_checker():
    """scripts/check_report_layout.py as a module."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_report_layout.py"
    spec = importlib.util.spec_from_file_location("check_report_layout", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_layout(run: Path) -> None:
    """Where Chromium is installed: the page fits 1,280 px with every folded block open, no empty section."""
    if shutil.which("chromium") is None:
        return
    layout = layout_checker()
    measured = layout.measure(run / "report.html", 1280)
    assert layout.problems(measured) == [], measured


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install -y chromium)")
def test_pages_fit_1280_px_with_no_empty_section_in_chromium(runs, tmp_path):
    """scripts/check_report_layout.py in headless Chromium: every folded block opened, nothing wider than
    1,280 px and no section without text; and the check itself flags a page that overflows."""
    layout = layout_checker()
    for name, run in runs.items():
        measured = layout.measure(run / "report.html", 1280)
        assert layout.problems(measured) == [], (name, measured)
        assert measured["sections"] == sections_of((run / "report.html").read_text())
    wide = tmp_path / "report.html"
    page = (runs["issue"] / "report.html").read_text()
    extra = '<div style="width:2000px">wide</div><section id="x"><h2>x</h2></section>'
    wide.write_text(page.replace("</main>", extra + "</main>"))
    found = layout.problems(layout.measure(wide, 1280))
    assert any("horizontal overflow" in p for p in found) and any("empty sections: x" in p for p in found)


@pytest.fixture(scope="module")
def edges_run(tmp_path_factory) -> Path:
    """A run of the edges experiment (docs/method.md §17) on 2 pairs of the shipped model."""
    return _run(tmp_path_factory.mktemp("edges"), "edges", limit=2, experiments=("edges",))


def test_the_edges_sentence_reads_right(edges_run):
    """The edges finding: every number from stats.json, its claim from the path-vs-frozen CI; the quoted
    knockout count and the path's mean recomputed here from edges.parquet with plain pandas."""
    items = check_sentences(edges_run)
    _, stats, page = findings_of(edges_run)
    assert "edges" in sections_of(page)
    sentence = next(i for i in items if i["html_tag"] == "p" and "attention edge" in i["plain"])
    edges = pd.read_parquet(edges_run / "results" / "edges.parquet")
    every = edges[(edges["kind"] == "knockout") & (edges["head"] == -1)]
    rate = every.groupby(["query", "key"])["flipped"].mean()
    k, n = int(round(rate.max() * 2)), every["pair_id"].nunique()
    count = next(q["text"] for q in sentence["quotes"] if "data-count" in q)
    assert count == f"{k} of {n} ({100 * k / n:.0f}%)" and n == 2
    # the strongest path (senders before the last thought) by |mean ld_change|, recomputed
    K = int(edges.loc[edges["kind"] == "path", "query"].max())
    paths = edges[(edges["kind"] == "path") & (edges["sender"] < K - 1)]
    change = paths.groupby(["sender", "query"])["ld_change"].mean()
    assert fmt(change.loc[change.abs().idxmax()]) in [q["text"] for q in sentence["quotes"]]
    claim = sentence["claims"][0]
    con = stats["contrasts"][int(claim["data-contrast"])]
    assert con["experiment"] == "edges" and con["diff"] == pytest.approx(con["mean_a"] - con["mean_b"], abs=1e-9)
    # ld_change is the edge's logit difference minus the same pair's unpatched one
    spread = (edges["answer_logit_diff"] - edges["ld_change"]).groupby(edges["pair_id"]).agg(np.ptp)
    assert spread.max() < 1e-4
