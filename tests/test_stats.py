"""Statistics: known answers computed by hand, and the tables on a synthetic run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from fake_run import write_fake_run
from scipy import stats as sps

from latentpatch.analysis import stats as st
from latentpatch.rundir import read_cells


def test_bootstrap_ci_equals_plain_numpy_resampling():
    x = np.array([0.3, 1.2, -0.4, 2.2, 0.9, 1.7, 0.1, 0.8, 1.1, -0.2, 0.5, 1.9])
    seed, B = 7, 2000
    lo, hi = st.bootstrap_mean_ci(x[None, :], seed, n_resamples=B)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, (B, x.size))  # scipy: one row of n indices per resample
    expected = np.quantile(x[idx].mean(axis=1), [0.025, 0.975])
    assert lo[0] == pytest.approx(expected[0], abs=1e-12)
    assert hi[0] == pytest.approx(expected[1], abs=1e-12)
    assert lo[0] < x.mean() < hi[0]


def test_bootstrap_rows_match_per_row_calls():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 9))
    lo, hi = st.bootstrap_mean_ci(m, seed=3, n_resamples=500)
    for i in range(4):
        l1, h1 = st.bootstrap_mean_ci(m[i : i + 1], seed=3, n_resamples=500)
        assert (lo[i], hi[i]) == pytest.approx((l1[0], h1[0]), abs=1e-12)
    lo1, hi1 = st.bootstrap_mean_ci(np.array([[1.0]]), seed=0)
    assert math.isnan(lo1[0]) and math.isnan(hi1[0])  # n < 2: no interval


def test_wilcoxon_p_equals_exact_enumeration():
    x = np.array([1.5, -0.3, 2.2, 0.8, -1.1, 3.0, 0.4])  # no ties, no zeros
    ranks = sps.rankdata(np.abs(x))
    w_obs = ranks[x > 0].sum()
    w_all = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=x.size)])
    p_exact = min(1.0, 2 * min((w_all <= w_obs).mean(), (w_all >= w_obs).mean()))
    _, p = st.wilcoxon_p(x)
    assert p == pytest.approx(p_exact, abs=1e-12)
    assert all(math.isnan(v) for v in st.wilcoxon_p(np.zeros(5)))


def test_holm_and_bh_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    # Holm: sorted 0.005*5=.025, 0.01*4=.04, 0.03*3=.09, 0.04*2=.08 -> running max .09, 0.2*1=.2
    assert st.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.2])
    # BH: sorted p*m/i = .025, .025, .05, .05, .2 -> running min from the top
    assert st.benjamini_hochberg(p) == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.2])
    h = st.holm([np.nan, 0.01, 0.02])
    assert math.isnan(h[0]) and h[1:] == pytest.approx([0.02, 0.02])


def test_paired_effect_sizes_by_hand():
    a = np.array([2.0, 1.0, 5.0, 6.0, 1.5])
    b = np.array([1.0, 3.0, 2.0, 2.0, 2.0])
    d = a - b  # [1, -2, 3, 4, -0.5]
    n = d.size
    mean = d.sum() / n
    sd = math.sqrt(((d - mean) ** 2).sum() / (n - 1))
    out = st.paired_test(a, b)
    assert out["n"] == 5
    assert out["mean_diff"] == pytest.approx(mean)
    assert out["cohens_dz"] == pytest.approx(mean / sd)
    assert out["t_stat"] == pytest.approx(mean / (sd / math.sqrt(n)))
    # |d| ranks: 0.5->1, 1->2, 2->3, 3->4, 4->5; W+ = 2+4+5 = 11, W- = 3+1 = 4
    assert out["rank_biserial"] == pytest.approx((11 - 4) / 15)
    # a NaN on either side drops that pair
    assert st.paired_test(np.append(a, np.nan), np.append(b, 1.0))["n"] == 5


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_run(tmp_path_factory.mktemp("stats") / "run", n_pairs=6, n_layers=3, K=3, seed=5, flagged=(2,))


def test_cell_summary_on_fake_run(fake):
    cells = read_cells(fake)
    summary = st.summarize_cells(cells, seed=0, n_resamples=300)
    n_cells = cells.groupby(st.CELL_KEYS).ngroups
    # act_bias only exists for chained/frozen: 3 layers x 2 modes
    assert len(summary) == n_cells * 5 + 3 * 2
    assert (summary["n"] == 6).all()
    ok = summary.dropna(subset=["p_wilcoxon"])
    assert (ok["p_holm"] >= ok["p_wilcoxon"] - 1e-15).all()
    assert (ok["p_bh"] >= ok["p_wilcoxon"] - 1e-15).all()
    assert (ok["p_bh"] <= ok["p_holm"] + 1e-15).all()
    assert ((summary["ci_low"] <= summary["mean"]) & (summary["mean"] <= summary["ci_high"])).all()
    one = cells[(cells["experiment"] == "position") & (cells["layer"] == 1) & (cells["position"] == 2)]
    row = summary[
        (summary["experiment"] == "position")
        & (summary["layer"] == 1)
        & (summary["position"] == 2)
        & (summary["metric"] == "kl")
    ].iloc[0]
    assert row["mean"] == pytest.approx(one["kl"].mean())
    assert row["median"] == pytest.approx(one["kl"].median())
    assert row["std"] == pytest.approx(one["kl"].std(ddof=1))
    # the Holm family of a position-sweep metric is the whole 3 x 3 grid
    fam = summary[(summary["experiment"] == "position") & (summary["metric"] == "kl")]
    assert st.holm(fam["p_wilcoxon"]) == pytest.approx(fam["p_holm"].to_numpy())


def test_comparisons_additivity_top(fake):
    cells = read_cells(fake)
    comps = st.compare_modes(cells)
    assert set(comps["comparison"]) == {"chained vs parallel", "chained vs frozen", "parallel vs frozen"}
    assert len(comps[comps["metric"] == "recovery"]) == 3 * 3
    r = comps[
        (comps["comparison"] == "chained vs frozen") & (comps["layer"] == 0) & (comps["metric"] == "recovery")
    ].iloc[0]
    ch = cells[(cells["mode"] == "chained") & (cells["layer"] == 0)].set_index("pair_id")["recovery"]
    fr = cells[(cells["mode"] == "frozen") & (cells["layer"] == 0)].set_index("pair_id")["recovery"]
    assert r["mean_diff"] == pytest.approx((ch - fr).mean())
    assert r["cohens_dz"] == pytest.approx((ch - fr).mean() / (ch - fr).std(ddof=1))

    add = st.additivity(cells)
    a = add[(add["layer"] == 2) & (add["metric"] == "recovery")].iloc[0]
    single = cells[(cells["experiment"] == "position") & (cells["layer"] == 2)].groupby("pair_id")["recovery"].sum()
    allpos = cells[(cells["experiment"] == "layer") & (cells["layer"] == 2)].set_index("pair_id")["recovery"]
    assert a["mean_sum_single"] == pytest.approx(single.mean())
    assert a["mean_all"] == pytest.approx(allpos.mean())
    assert a["n_positions"] == 3

    top = st.top_cells(st.summarize_cells(cells, n_resamples=200), k=2)
    best = top["position/single"]["recovery"]
    assert len(best) == 2 and best[0]["mean"] >= best[1]["mean"]


def test_compute_stats_files_json_safe_and_seeded(fake):
    s1 = st.compute_stats(fake, n_resamples=300)
    text = (fake / "stats.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["settings"]["seed"] == 5  # manifest seed
    for name in ("cells", "comparisons", "additivity"):
        assert len(pd.read_csv(fake / "stats" / f"{name}.csv")) > 0
    s2 = st.compute_stats(fake, n_resamples=300, write=False)
    assert s1["cells"] == s2["cells"]  # same seed, same intervals
    ex = st.compute_stats(fake, n_resamples=300, exclude_flagged=True, write=False)
    assert (ex["n_pairs_used"], s1["n_pairs_used"]) == (5, 6)
    assert ex["flagged_pairs"] == ["p002"]


def test_partial_run_only_layer_sweep(tmp_path):
    run = write_fake_run(tmp_path / "run", n_pairs=4, n_layers=2, K=2, experiments=("layer",))
    s = st.compute_stats(run, n_resamples=200)
    assert s["experiments"] == ["layer"]
    assert s["comparisons"] == [] and s["additivity"] == []
    assert {c["metric"] for c in s["cells"]} == {"kl", "recovery", "answer_logit_diff", "logit_l2", "pred_change_rate"}


def test_wilcoxon_p_equals_scipy_on_the_unsorted_sample():
    """wilcoxon_p caches on the sorted sample: the same statistic and p as scipy on the sample as given
    (ties and zeros included, n <= 13 where scipy runs its exact permutation null, and n > 50)."""
    import numpy as np
    from scipy import stats as sps

    from latentpatch.analysis.inference import wilcoxon_p

    rng = np.random.default_rng(0)
    samples = [rng.integers(-1, 2, n).astype(float) for n in (5, 9, 12, 30, 60)]
    samples += [rng.normal(size=n) for n in (7, 40)]
    for x in samples:
        if np.all(x == 0):
            continue
        ref = sps.wilcoxon(x)
        assert wilcoxon_p(x) == (float(ref.statistic), float(ref.pvalue))
        assert wilcoxon_p(x[::-1]) == wilcoxon_p(x)
