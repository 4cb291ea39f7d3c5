"""The probe experiment (docs/method.md §16) on the shipped model: activations recorded once per question
equal a plain one-question rollout at every site; the probes read them; resume; the shipped model's
intermediates are read best where its thoughts hold them; the report section."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from latentpatch.names import ACTIVATION_SHARD, probe_position_names

#: Held-out accuracy of the probe of intermediate s on the fed thought p (rows s, columns p) on 200
#: generated questions (seed 11), stored once from the shipped weights (fp32 CPU, one thread).
EXPECTED_ACCURACY: dict = {
    0: [0.15060240963855423, 1.0, 0.24096385542168675, 0.16265060240963855, 0.10240963855421686, 0.1144578313253012],
    1: [
        0.18867924528301888,
        0.27672955974842767,
        0.9937106918238994,
        0.3081761006289308,
        0.15723270440251572,
        0.1320754716981132,
    ],
    2: [
        0.17647058823529413,
        0.19852941176470587,
        0.3897058823529412,
        0.9558823529411765,
        0.6911764705882353,
        0.6102941176470589,
    ],
}
N_PAIRS = 33  # 66 questions in 33 groups: two activation shards


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    from latentpatch.data.pairs import save_pairs
    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    tmp = tmp_path_factory.mktemp("probe")
    pairs = generate_pairs(N_PAIRS, seed=3, intermediates=True)
    save_pairs(pairs, tmp / "pairs.json")
    # steer along the label difference of the two most common first intermediates (read from the probe's shards)
    firsts = pd.Series([v.extra["intermediates"][0] for p in pairs for v in (p.clean, p.corrupted)])
    a, b = firsts.value_counts().index[:2]
    cfg = RunConfig(
        pairs=str(tmp / "pairs.json"),
        experiments=("probe", "steer"),
        out=str(tmp / "run"),
        use_cache=False,
        threads=1,
        probe_min_count=4,
        probe_regression=True,
        limit=4,
        steer_layers="2",
        steer_alphas="2",
        steer_controls=1,
        steer_direction=f"label:intermediate_0={a:g},{b:g}",
    )
    return run_experiments(cfg, progress=False, command="test"), cfg


def test_shards_equal_a_plain_rollout_per_question(probe_run):
    from safetensors import safe_open

    from latentpatch.model.load import load_model

    run, _ = probe_run
    model = load_model("default")
    questions = pd.read_parquet(run / "results" / "questions.parquet")
    assert len(questions) == 2 * N_PAIRS and questions["group"].nunique() == N_PAIRS
    shards = sorted((run / "results" / "activations").glob("*.safetensors"))
    assert len(shards) == -(-len(questions) // ACTIVATION_SHARD)
    K, L = model.num_latent, model.n_layers
    names = probe_position_names(K)
    with safe_open(str(shards[1]), framework="pt") as f:
        meta = json.loads(f.metadata()["latentpatch"])
        resid, thought = f.get_tensor("resid_out"), f.get_tensor("thought")
        pre = f.get_tensor("thought_pre")
    assert meta["positions"] == names
    rows = meta["rows"]
    for j in (0, len(rows) - 1):  # the first and last question of the second shard
        q = questions.iloc[ACTIVATION_SHARD + j]
        assert rows[j]["question_id"] == q["question_id"]
        # the plain computation: this question alone, its own rollout, positions read off its length
        prompt = model.prompt_ids(q["question"])
        with torch.no_grad():
            r = model.rollout([prompt], record=[("resid_out", layer) for layer in range(L)])
            ids = model.generate(r.state, r.answer_logits)[0]
        T = len(prompt)
        where = [T + p for p in range(K)] + [r.state.length - 1, T - 1]
        for layer in range(L):
            plain = r.hooks.recorded("resid_out", layer)[0, where]
            assert torch.allclose(resid[j, layer], plain, atol=1e-4), (j, layer)
        assert torch.allclose(thought[j], r.thoughts[0], atol=1e-4)
        assert torch.allclose(pre[j], r.thought_source_hidden()[0], atol=1e-4)
        text = model.decode(ids)
        assert rows[j]["pred_answer"] == pytest.approx(float(text.rsplit(":", 1)[-1]))


def test_probes_read_the_recorded_sites(probe_run):
    from latentpatch.probing.activations import read_sites
    from latentpatch.probing.probes import probe_site

    run, cfg = probe_run
    probes = pd.read_parquet(run / "results" / "probes.parquet")
    questions = pd.read_parquet(run / "results" / "questions.parquet")
    assert {"answer", "intermediate_0", "intermediate_1"} <= set(probes["label"])
    # "correct" is probed only when right and wrong answers both reach --probe-min-count (two classes)
    assert ("correct" in set(probes["label"])) == (
        questions["correct"].value_counts().min() >= 4 and questions["correct"].nunique() == 2
    )
    # one site recomputed here from the shards: resid_out, layer 2, thought 1, label intermediate_0
    sites = read_sites(sorted((run / "results" / "activations").glob("*.safetensors")))
    X = sites["resid_out"][:, 2, 1].numpy()
    y = [None if v != v else v for v in questions["intermediate_0"]]
    mine = probe_site(X, y, questions["group"].astype(str).to_numpy(), seed=cfg.seed, min_count=4)
    row = probes[(probes["label"] == "intermediate_0") & (probes["component"] == "resid_out")]
    row = row[(row["layer"] == 2) & (row["position"] == "t1")].iloc[0]
    assert row["accuracy"] == mine.accuracy and row["selectivity"] == pytest.approx(mine.selectivity)
    assert row["majority_accuracy"] == mine.majority_accuracy


def test_resume_records_only_missing_shards_and_gives_the_same_bytes(probe_run, tmp_path):
    import shutil

    from latentpatch.pipeline.run import run_experiments

    run, cfg = probe_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    first = sorted((copy / "results" / "activations").glob("*.safetensors"))[0]
    kept = first.read_bytes()
    second = sorted((copy / "results" / "activations").glob("*.safetensors"))[1]
    first.write_bytes(kept[:100])  # damaged: recorded again
    second_mtime = second.stat().st_mtime_ns
    cfg.out = str(copy)
    run_experiments(cfg, resume=True, progress=False, command="test")
    assert first.read_bytes() == kept  # the same bytes as the uninterrupted run
    assert second.stat().st_mtime_ns == second_mtime  # a finished shard is not recorded again
    for name in ("questions.parquet", "probes.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(run / "results" / name), pd.read_parquet(copy / "results" / name))


def test_probe_report_section_quotes_stats_json(probe_run):
    run, _ = probe_run
    page = (run / "report.html").read_text()
    stats = json.loads((run / "stats.json").read_text())
    assert '<section id="probe">' in page and "probe_0_accuracy" in " ".join(
        p.name for p in (run / "figures").iterdir()
    )
    best = {b["label"]: stats["probe"]["rows"][b["row"]] for b in stats["probe"]["best"]}
    rows = pd.DataFrame(stats["probe"]["rows"])
    for label, r in best.items():  # the best site is the one with the highest held-out accuracy
        assert r["accuracy"] == rows.loc[rows["label"] == label, "accuracy"].max()
    from test_report_sentences import check_layout, check_sentences

    check_sentences(run)
    check_layout(run)


def test_probe_options_are_checked():
    from latentpatch.errors import LatentPatchError
    from latentpatch.pipeline.config import RunConfig

    with pytest.raises(LatentPatchError, match="--questions applies to the probe and das experiments only"):
        RunConfig(questions="q.jsonl").validate()
    RunConfig(experiments=("probe",), shard="0/2").validate()  # shards record, merge fits (test_shard_every_experiment)
    with pytest.raises(LatentPatchError, match="--probe-components: unknown 'nope'"):
        RunConfig(experiments=("probe",), probe_components="resid_out,nope").validate()


def test_the_shipped_model_holds_intermediate_s_at_thought_s_plus_1(tmp_path):
    """On generated questions: the probe of intermediate s on the fed thought is most accurate at thought
    s + 1 (docs/training.md: the shipped model stores intermediate s in thought s + 1)."""
    from latentpatch.data.questions import questions_from_pairs
    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.model.load import load_model
    from latentpatch.probing.activations import record_shard
    from latentpatch.probing.probes import probe_site

    model = load_model("default")
    torch.set_num_threads(1)
    qs = questions_from_pairs(generate_pairs(100, seed=11, intermediates=True))
    shard = record_shard(model, [model.prompt_ids(q.question) for q in qs.questions], ("resid_out",), 64)
    groups = np.array([q.group for q in qs.questions])
    found = {}
    for s in range(3):
        y = [q.intermediates[s] if q.intermediates and len(q.intermediates) > s else None for q in qs.questions]
        acc = [
            probe_site(shard.tensors["thought"][:, p].numpy(), y, groups, min_count=5, n_resamples=999).accuracy
            for p in range(model.num_latent)
        ]
        found[s] = acc
        assert int(np.argmax(acc)) == s + 1, (s, acc)
    assert found == EXPECTED_ACCURACY


def test_a_bad_question_file_stops_the_run_before_any_work(tmp_path, capsys):
    from latentpatch.cli import main

    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "a", "question": "Tom has 3 apples.", "answer": "x"}\n')
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as ex:
        main(["run", "--experiments", "probe", "--questions", str(bad), "--out", str(out), "--limit", "2"])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "record [0]" in err[0] and "fix:" in err[0]
    assert not out.exists()


def test_steering_along_a_label_difference_of_the_probe_activations(probe_run):
    run, cfg = probe_run
    steer = pd.read_parquet(run / "results" / "steer.parquet")
    assert set(steer["direction"]) == {cfg.steer_direction, "random0"}
    assert len(steer) == 4 * 6 * 2  # 4 pairs x 6 thoughts x (direction + 1 control), one layer and alpha
    stats = json.loads((run / "stats.json").read_text())
    assert stats["steer"]["direction"] == cfg.steer_direction


def test_label_and_probe_directions_equal_plain_computations():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from latentpatch.errors import LatentPatchError
    from latentpatch.probing.directions import label_difference, probe_weights

    rng = np.random.default_rng(0)
    acts = rng.standard_normal((30, 2, 3, 5)).astype(np.float32)  # [n, L, K, d]
    values = [6.0, 8.0, 9.0] * 10
    diff = label_difference(acts, values, "6", "8")
    plain = acts[0::3].mean(0) - acts[1::3].mean(0)
    assert np.allclose(diff, plain)
    w = probe_weights(acts, values, "9", seed=0)
    X = acts[:, 1, 2].astype(np.float64)
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(max_iter=1000, random_state=0).fit(scaler.transform(X), [str(v) for v in values])
    row = list(clf.classes_).index("9.0")
    assert np.allclose(w[1, 2], clf.coef_[row] / scaler.scale_, atol=1e-5)
    # adding the direction raises the probe's score of the class
    x = X[:1]
    before = clf.decision_function(scaler.transform(x))[0, row]
    after = clf.decision_function(scaler.transform(x + 0.5 * w[1, 2]))[0, row]
    assert after > before
    with pytest.raises(LatentPatchError, match="no question has label = 7"):
        label_difference(acts, values, "7", "8")


def test_regression_probes_equal_a_plain_ridge_loop(probe_run):
    """--probe-regression: the held-out R^2 of a magnitude, recomputed here with sklearn on the probe's folds."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from latentpatch.probing.activations import read_sites
    from latentpatch.probing.probes import probe_regression

    run, cfg = probe_run
    probes = pd.read_parquet(run / "results" / "probes.parquet")
    reg = probes[probes["kind"] == "regression"]
    assert set(reg["label"]) == {"answer", "intermediate_0", "intermediate_1", "intermediate_2"}  # the numeric labels
    questions = pd.read_parquet(run / "results" / "questions.parquet")
    sites = read_sites(sorted((run / "results" / "activations").glob("*.safetensors")))
    X = sites["thought"][:, 1].numpy().astype(np.float64)
    y = questions["intermediate_0"].to_numpy(float)
    groups = questions["group"].astype(str).to_numpy()
    result = probe_regression(X, y, groups, seed=cfg.seed)
    pred = np.empty_like(y)
    for test in result.folds:  # held-out rows of each fold; the rest trains
        train = np.setdiff1d(np.arange(len(y)), test)
        pred[test] = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(X[train], y[train]).predict(X[test])
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    row = reg[(reg["label"] == "intermediate_0") & (reg["component"] == "thought") & (reg["position"] == "t1")]
    assert row["r2"].iloc[0] == pytest.approx(r2, abs=1e-9) == pytest.approx(result.r2, abs=1e-9)
    stats = json.loads((run / "stats.json").read_text())
    assert {b["label"] for b in stats["probe"]["regression"]["best"]} == set(reg["label"])
