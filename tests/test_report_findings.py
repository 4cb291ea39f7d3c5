"""The report tells the finding: sentences from stats.json with CIs, labels that follow the run,
readable figures (colour scales, |effect| ranking, hover), model answers, --exclude-flagged beside."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from fake_run import write_fake_run

from latentpatch.analysis.figures import colour_norm
from latentpatch.analysis.html import fmt
from latentpatch.analysis.report import build_report


def section_text(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return page[start : page.index("</section>", start)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = write_fake_run(tmp_path_factory.mktemp("findings") / "run", n_pairs=5, n_layers=4, K=3, seed=2)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["baselines"]["per_pair"] = {  # what a real run records (the fake run leaves it out)
        f"p{i:03d}": {"clean_pred": 40.0 + i, "corrupted_pred": None, "ld_clean_run": 3.0, "ld_corrupted_run": -3.0}
        for i in range(5)
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    build_report(path, n_resamples=300, formats=("png",))
    return path


def _cells(stats, experiment, mode, metric="recovery"):
    return [
        c
        for c in stats["cells"]
        if (c["experiment"], c["mode"], c["metric"], c["component"]) == (experiment, mode, metric, "resid_out")
    ]


def test_findings_come_first_and_quote_stats_json(run):
    page = (run / "report.html").read_text()
    stats = json.loads((run / "stats.json").read_text())
    assert page.index('<section id="findings">') < page.index('<section id="checks">') < page.index('id="summary"')
    text = re.sub(r"</?span[^>]*>", "", section_text(page, "findings"))
    best = max(_cells(stats, "layer", "all"), key=lambda c: abs(c["mean"]))
    assert f"layer {best['layer']}</b>: recovery <b>{fmt(best['mean'])}</b> [95% CI {fmt(best['ci_low'])}, " in text
    cell = max(_cells(stats, "position", "single"), key=lambda c: abs(c["mean"]))
    assert f"layer {cell['layer']}, thought {cell['position']}</b>: recovery <b>{fmt(cell['mean'])}</b>" in text
    chained = max(_cells(stats, "iterative", "chained"), key=lambda c: abs(c["mean"]))
    assert f"At layer {chained['layer']}, where it restores most, patching the first thought" in text
    # chained vs frozen at that layer: the paired difference over pairs, computed here from cells.parquet
    cells = pd.read_parquet(run / "results" / "cells.parquet")
    at = cells[(cells["layer"] == chained["layer"]) & (cells["component"] == "resid_out")]
    per_mode = {
        m: at[(at["experiment"] == "iterative") & (at["mode"] == m) & (at["position"] == 0)].set_index("pair_id")
        for m in ("chained", "frozen")
    }
    diff = (per_mode["chained"]["recovery"] - per_mode["frozen"]["recovery"]).mean()
    con = next(
        c for c in stats["contrasts"] if c["name"] == "chained vs frozen" and c["where"]["layer"] == chained["layer"]
    )
    assert con["diff"] == pytest.approx(diff, abs=1e-9)
    word = "more than" if con["ci_low"] > 0 else "less than" if con["ci_high"] < 0 else "about as much as"
    assert f"{word} the same patch with the later thoughts&#x27; inputs held (frozen) (" in text
    assert f"difference <b>{fmt(con['diff'])}</b> [95% CI {fmt(con['ci_low'])}" in text
    assert "5 of 5 pairs used" in text and "1 pair(s) flagged" in text and "<b>included</b> in the means" in text


def test_labels_follow_the_run(tmp_path):
    path = write_fake_run(tmp_path / "run", n_pairs=4, n_layers=3, K=2, seed=3, experiments=("layer", "position"))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["config"].update(replacement="zero", component="attn_out", direction="noise")
    (path / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(path, n_resamples=200, formats=("png",)).read_text()
    assert "patched with its clean value" not in page and "set to zero" in page
    assert "attn_out activations of the clean run set to zero" in section_text(page, "findings")
    assert "1 = the unpatched corrupted run" in page and "1 = clean restored" not in page


def test_top_tables_rank_by_effect_size_and_not_every_row(run):
    page = (run / "report.html").read_text()
    layer = section_text(page, "layer")
    # 4 layers: the top table lists 2, not all 4
    assert "Top 2 of 4 by |recovery|" in layer and "Top 4" not in layer
    position = section_text(page, "position")
    tables = re.findall(r"<h3>Top (\d+) of (\d+) by \|([^|]+)\|</h3>(<table>.*?</table>)", position)
    assert tables
    for shown, _total, _, html in tables:
        means = [float(x) for x in re.findall(r"<tr><td>\d+</td><td>\d+</td><td>[^<]+</td><td>([^<]+)</td>", html)]
        assert len(means) == int(shown) <= 5
        assert [abs(m) for m in means] == sorted((abs(m) for m in means), reverse=True)


def test_heatmap_cells_hover_with_value_ci_and_n(run):
    page = (run / "report.html").read_text()
    stats = json.loads((run / "stats.json").read_text())
    position = section_text(page, "position")
    assert position.count('class="cell"') == 3 * 4 * 3  # 3 heatmaps x 4 layers x 3 positions
    c = next(c for c in _cells(stats, "position", "single") if (c["layer"], c["position"]) == (2, 1))
    tip = f"layer 2, thought 1: mean {fmt(c['mean'])}, 95% CI [{fmt(c['ci_low'])}, {fmt(c['ci_high'])}], n {c['n']}"
    assert f'title="{tip}"' in position
    assert "<script" not in page.lower() or "src=" not in page.lower().split("<script", 1)[1][:100]


def test_decoded_thoughts_show_the_models_answer(run):
    page = (run / "report.html").read_text()
    thoughts = section_text(page, "thoughts")
    assert "→ gold <b>" in thoughts and ", model <b>40</b>" in thoughts and ", model <b>–</b>" in thoughts
    heatmap = section_text(page, "position")
    assert "as the change from the unpatched corrupted run" in heatmap


def test_exclude_flagged_writes_beside_the_full_report(run):
    before = {f: (run / f).read_bytes() for f in ("report.html", "stats.json")}
    out = build_report(run, exclude_flagged=True, n_resamples=300, formats=("png",))
    assert out == run / "exclude_flagged" / "report.html"
    assert {f: (run / f).read_bytes() for f in before} == before
    excluded = json.loads((run / "exclude_flagged" / "stats.json").read_text())
    assert excluded["settings"]["exclude_flagged"] and excluded["n_pairs_used"] == 4
    assert (run / "exclude_flagged" / "figures" / "layer_bars.png").is_file()
    assert "<b>excluded</b> from the means" in section_text(out.read_text(), "findings")


def test_colour_scale_diverges_only_when_values_straddle_zero():
    assert colour_norm("answer_logit_diff", np.array([-9.0, -6.5, -4.0]))[1] == "viridis"
    norm, cmap = colour_norm("answer_logit_diff", np.array([-9.0, 2.0]))
    assert cmap == "RdBu_r" and norm.vcenter == 0
    assert colour_norm("kl", np.array([0.1, 3.0]))[1] == "viridis"


def test_reference_cosine_is_the_mean_over_the_used_pairs():
    from latentpatch.analysis.findings import RunLabels

    per_pair = {
        "a": {"ld_corrupted_run": -2.0, "cos_clean_corrupted": [[1.0, 0.5], [0.9, 0.1]]},
        "b": {"ld_corrupted_run": -4.0, "cos_clean_corrupted": [[1.0, 0.7], [0.7, 0.3]]},
        "c": {"ld_corrupted_run": 9.0, "cos_clean_corrupted": [[0.0, 0.0], [0.0, 0.0]]},
    }
    labels = RunLabels.of({"config": {"replacement": "source"}, "baselines": {"per_pair": per_pair}}, {"a", "b"})
    assert labels.baseline_ld == -3.0
    assert np.allclose(labels.reference_cos[0], [1.0, 0.6]) and np.allclose(labels.reference_cos[1], [0.8, 0.2])
