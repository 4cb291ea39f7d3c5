"""The tuned lens (docs/method.md §14.1) against plain computations written here: the last layer is the
logit lens, training lowers the held-out KL, the KL reported is KL(final || lens) recomputed from one
plain forward pass, the split never shares a question, the cache is keyed by the weights and reused,
and ``--lens`` in a run (``both`` writes both lenses and a report; ``logit`` changes no byte)."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from latentpatch.data.pairs import load_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.model.heads import lens_logits
from latentpatch.model.load import load_model
from latentpatch.patching.reading import lens_run
from latentpatch.pipeline.cache import model_key
from latentpatch.pipeline.config import RunConfig, default_pairs_path
from latentpatch.probing import tuned_lens as tl
from latentpatch.probing.tuned_lens import LensSettings, TunedLens, split_questions, train_tuned_lens, tuned_lens

#: Pairs of the shipped file the lens trains on here (both questions of each), and training steps.
N_PAIRS, STEPS = 12, 150


@pytest.fixture(scope="module")
def model():
    return load_model("default")


@pytest.fixture(scope="module")
def data():
    pairs = load_pairs(default_pairs_path())[:N_PAIRS]
    return [v.question for p in pairs for v in (p.clean, p.corrupted)], [p.pair_id for p in pairs for _ in (0, 1)]


@pytest.fixture(scope="module")
def trained(model, data):
    questions, groups = data
    return train_tuned_lens(model, questions, steps=STEPS, lr=1e-3, seed=0, held_out_fraction=0.25, groups=groups)


def test_last_layer_is_the_logit_lens_exactly(model, trained) -> None:
    lens, L = trained.lens, model.n_layers
    assert tuple(lens.weight.shape) == (L, model.d_model, model.d_model)  # layers -1..L-2 only
    assert float(lens.weight.detach().abs().sum()) > 0  # it did train
    h = torch.randn(7, model.d_model)
    assert lens.transform(h, L - 1) is h
    assert torch.equal(lens.logits(model.lm, h, L - 1), lens_logits(model.lm, h))
    prompt = model.prompt_ids("Tom has 3 apples and buys 12 more. How many apples does Tom have?")
    tokens = list(range(model.vocab_size))
    logit, tuned = lens_run(model, prompt, tokens, 5), lens_run(model, prompt, tokens, 5, lens)
    for a, b in ((logit.probs, tuned.probs), (logit.ranks, tuned.ranks), (logit.top_ids, tuned.top_ids)):
        assert torch.equal(a[-1], b[-1])
        assert not torch.equal(a[1], b[1])  # an earlier layer reads differently
    # and the lens's own last-layer KL is zero
    assert trained.report["held_out_kl"][-1] == {"layer": L - 1, "logit": 0.0, "tuned": 0.0}


def test_training_lowers_held_out_kl(trained) -> None:
    rows = trained.report["held_out_kl"]
    assert [r["layer"] for r in rows] == [-1, 0, 1, 2, 3]
    for r in rows[:-1]:
        assert r["tuned"] < 0.8 * r["logit"], r


def _plain_kl(model, prompts, lens: TunedLens) -> list[tuple[float, float]]:
    """Per layer -1..L-1, (logit, tuned) mean KL(p_final || p_lens) over every position of ``prompts``,
    from one uncached forward of the whole sequence (prompt, thoughts, answer start) per prompt, the
    translator written out as h + h Aᵀ + b, and KL as Σ p (log p − log q)."""
    L = model.n_layers
    norm, head = model.lm.model.norm, model.lm.lm_head
    sums, n = torch.zeros(L + 1, 2, dtype=torch.float64), 0
    with torch.no_grad():
        for prompt in prompts:
            r = model.rollout([list(prompt)])
            emb = model.lm.get_input_embeddings()
            seq = torch.cat(
                [emb(torch.tensor([list(prompt)])), r.thoughts, emb(torch.tensor([model.answer_start_ids()]))], 1
            )
            out = model.lm(inputs_embeds=seq, output_hidden_states=True)
            logp = torch.log_softmax(out.logits[0].double(), -1)  # [T, V] the model's own final layer
            p = logp.exp()
            # hidden_states[0] = the fed vectors, [l + 1] = block l's output (the last one after the norm)
            streams = [seq[0]] + [out.hidden_states[i + 1][0] for i in range(L - 1)]
            for j, h in enumerate(streams):
                A, b = lens.weight[j].double(), lens.bias[j].double()
                for c, x in enumerate((h.double(), h.double() + h.double() @ A.T + b)):
                    q = torch.log_softmax(head(norm(x.float())).double(), -1)
                    sums[j, c] += (p * (logp - q)).sum()
            n += seq.shape[1]
    return [(float(sums[j, 0] / n), float(sums[j, 1] / n)) for j in range(L)] + [(0.0, 0.0)]


def test_reported_kl_is_kl_final_to_lens_by_hand(model, trained) -> None:
    plain = _plain_kl(model, trained.held_out, trained.lens)
    assert trained.report["n_positions"]["held_out"] == sum(
        len(p) + model.num_latent + len(model.answer_start_ids()) for p in trained.held_out
    )
    for row, (logit, tuned) in zip(trained.report["held_out_kl"], plain):
        assert row["logit"] == pytest.approx(logit, rel=1e-4, abs=1e-5), row
        assert row["tuned"] == pytest.approx(tuned, rel=1e-4, abs=1e-5), row
    # the same with torch's own KL on one layer
    lens, prompt = trained.lens, trained.held_out[0]
    rec = tl.record_question(model, prompt, tl.POSITION_GROUPS)
    q = torch.log_softmax(lens.logits(model.lm, rec.streams[1], 0), -1)
    torch_kl = torch.nn.functional.kl_div(q, rec.target, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(tl.kl_to_final(rec.target, lens.logits(model.lm, rec.streams[1], 0)), torch_kl)


def test_held_out_split_never_shares_a_question(model, data, trained) -> None:
    questions, groups = data
    prompts = [tuple(model.prompt_ids(q)) for q in questions]
    train, held = set(trained.train), set(trained.held_out)
    assert train and held and not train & held and train | held == set(prompts)
    group_of = dict(zip(prompts, groups))
    assert not {group_of[p] for p in train} & {group_of[p] for p in held}  # a pair's two questions stay together
    assert trained.report["n_questions"] == {"train": len(train), "held_out": len(held)}
    # a question given twice, in two groups, still lands on one side only
    ids = [[1, 2], [3], [1, 2], [4], [5]]
    for seed in range(5):
        tr, ho = split_questions(ids, ["a", "b", "c", "d", "e"], 0.5, seed)
        assert not set(tr) & set(ho) and len(tr) + len(ho) == 4
    with pytest.raises(LatentPatchError, match="at least 2"):
        split_questions([[1], [1]], None, 0.5, 0)


def test_same_seed_same_bytes(model, data) -> None:
    questions, groups = data[0][:6], data[1][:6]
    a, b = (train_tuned_lens(model, questions, steps=5, seed=3, groups=groups) for _ in range(2))
    assert torch.equal(a.lens.weight, b.lens.weight) and a.report == b.report


def test_cache_is_keyed_by_the_weights_and_reused(model, data, tmp_path, monkeypatch) -> None:
    questions, groups = data[0][:6], data[1][:6]
    settings = LensSettings(steps=5)
    calls = []
    real = tl.train_tuned_lens
    monkeypatch.setattr(tl, "train_tuned_lens", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = tuned_lens(model, questions, tmp_path, settings=settings, groups=groups)
    second = tuned_lens(model, questions, tmp_path, settings=settings, groups=groups)
    assert (first.loaded, second.loaded, len(calls)) == (False, True, 1)  # the second call did not train
    assert first.path == second.path and first.path is not None and first.path.parts[-3] == model_key(model)
    assert torch.equal(first.lens.weight, second.lens.weight) and first.report == second.report
    assert (second.train, second.held_out) == (first.train, first.held_out)
    # other settings or questions: another lens
    other = tuned_lens(model, questions, tmp_path, settings=dataclasses.replace(settings, seed=1), groups=groups)
    assert not other.loaded and other.path != first.path and len(calls) == 2
    # other weights: another key, never the stored lens
    changed = load_model("default")
    with torch.no_grad():
        changed.lm.lm_head.weight[0, 0] += 0.5
    assert model_key(changed) != model_key(model)
    again = tuned_lens(changed, questions, tmp_path, settings=settings, groups=groups)
    assert not again.loaded and again.path is not None and again.path.parts[-3] == model_key(changed)
    assert len(calls) == 3


def test_lens_option_is_in_the_hash_only_when_not_the_default() -> None:
    base = RunConfig(experiments=("lens",))
    assert RunConfig(experiments=("lens",), lens="logit").result_hash() == base.result_hash()
    assert "lens" not in RunConfig(experiments=("lens",), lens="logit").to_dict()
    assert RunConfig(experiments=("lens",), lens="both").result_hash() != base.result_hash()
    assert RunConfig(experiments=("lens",), lens="both").to_dict()["lens"] == "both"
    with pytest.raises(LatentPatchError, match="--lens tuned applies to the lens experiment"):
        RunConfig(lens="tuned").validate()
    with pytest.raises(LatentPatchError, match="--lens 'x'"):
        RunConfig(experiments=("lens",), lens="x").validate()


def _lens_run(tmp_path, name: str, limit: int = 4, **options):
    from latentpatch.pipeline.run import run_experiments

    cache = str(tmp_path / "cache")
    config = RunConfig(
        experiments=("lens",), limit=limit, out=str(tmp_path / name), cache_dir=cache, threads=1, **options
    )
    return run_experiments(config, progress=False, command="test")


def test_run_with_lens_both_and_logit(tmp_path, monkeypatch) -> None:
    from test_report_sentences import check_sentences

    from latentpatch.pipeline import reading

    monkeypatch.setattr(reading, "RUN_LENS_SETTINGS", LensSettings(steps=60))
    plain = _lens_run(tmp_path, "plain", report=False)
    logit = _lens_run(tmp_path, "logit", lens="logit", report=False)
    for f in ("lens.parquet", "lens_top.parquet", *(f"lens/{p.name}" for p in (plain / "results/lens").iterdir())):
        assert (plain / "results" / f).read_bytes() == (logit / "results" / f).read_bytes(), f
    assert (
        json.loads((logit / "manifest.json").read_text())["config_hash"]
        == json.loads((plain / "manifest.json").read_text())["config_hash"]
    )

    both = _lens_run(tmp_path, "both", lens="both")
    manifest = json.loads((both / "manifest.json").read_text())
    entry = manifest["tuned_lens"]
    assert entry["loaded"] is False and entry["settings"]["steps"] == 60
    assert entry["n_questions"]["train"] + entry["n_questions"]["held_out"] == 8  # 4 pairs, both variants
    assert [r["layer"] for r in entry["held_out_kl"]] == [-1, 0, 1, 2, 3]
    for name in ("lens.parquet", "lens_top.parquet"):
        table, before = pd.read_parquet(both / "results" / name), pd.read_parquet(plain / "results" / name)
        assert list(table.columns) == [before.columns[0], "lens", *before.columns[1:]]
        assert table["lens"].value_counts().to_dict() == {"logit": len(before), "tuned": len(before)}
        # the logit rows are the default run's rows
        pd.testing.assert_frame_equal(
            table[table["lens"] == "logit"].drop(columns="lens").reset_index(drop=True), before
        )
        last = table[table["layer"] == 3]
        value = "rank" if name == "lens.parquet" else "token_id"
        assert (
            last[last["lens"] == "logit"][value].to_numpy() == last[last["lens"] == "tuned"][value].to_numpy()
        ).all()
    stats = json.loads((both / "stats.json").read_text())["lens"]
    assert stats["lenses"] == ["logit", "tuned"] and set(stats["by_lens"]) == {"logit", "tuned"}
    assert stats["best"] == stats["by_lens"]["logit"]
    page = (both / "report.html").read_text()
    section = page[page.index('<section id="lens">') :]
    section = section[: section.index("</section>")]
    assert "With the logit lens" in section and "; with the tuned lens" in section and "Held-out KL" in section
    check_sentences(both)  # every number of every finding is in stats.json

    again = _lens_run(tmp_path, "again", lens="both", report=False)  # the same cache: loaded, the same bytes
    assert json.loads((again / "manifest.json").read_text())["tuned_lens"]["loaded"] is True
    for f in ("lens.parquet", "lens_top.parquet"):
        assert (again / "results" / f).read_bytes() == (both / "results" / f).read_bytes()


def test_a_tuned_lens_needs_two_pairs(tmp_path) -> None:
    with pytest.raises(LatentPatchError, match="--lens tuned: .* needs 2 pairs"):
        _lens_run(tmp_path, "one", lens="tuned", limit=1, report=False)


def test_inspect_lens_flag(trained, monkeypatch, capsys) -> None:
    from helpers import tiny_latent_model
    from test_loading import run_cli

    from latentpatch.pipeline import reading

    question = ["inspect", "--question", "Tom has 3 apples and buys 12 more. How many apples does Tom have?"]
    code, out, _ = run_cli(capsys, *question, "--lens", "logit")
    assert code == 0 and "logit lens (layer 'fed'" in out and "tuned lens" not in out
    monkeypatch.setattr(reading, "shipped_pairs_lens", lambda model: trained)  # no 57-pair training here
    code, out, _ = run_cli(capsys, *question, "--lens", "tuned")
    assert code == 0 and "tuned lens (docs/method.md §14.1)" in out and "held-out KL per layer" in out
    code, _, err = run_cli(capsys, *question, "--lens", "both")
    assert code == 2 and err.strip() == "error: --lens 'both': use logit or tuned"
    monkeypatch.undo()
    with pytest.raises(LatentPatchError, match="no tokenizer; fix: use --lens logit"):
        reading.shipped_pairs_lens(tiny_latent_model())
