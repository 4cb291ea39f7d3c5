"""Logit lens and attention reading (docs/method.md §14) against plain computations written here."""

from __future__ import annotations

import pytest
import torch

from latentpatch.model.load import load_model
from latentpatch.model.loaders import random_model
from latentpatch.patching.reading import attention_run, lens_run, query_indices, role_mass, token_roles

PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lens_last_layer_is_the_models_logits(family: str) -> None:
    model = random_model(family, num_latent=3)
    V = model.vocab_size
    lens = lens_run(model, PROMPT, list(range(V)), k=3)
    r = model.rollout([PROMPT])
    own = torch.cat([model.logits(r.latent_hidden[0]), r.answer_logits], dim=0)  # [K+1, V]
    torch.testing.assert_close(lens.probs[-1], torch.softmax(own, -1), atol=1e-5, rtol=1e-4)
    ranks = (own[:, None, :] > own[:, :, None]).sum(-1)  # plain rank of every token
    assert torch.equal(lens.ranks[-1], ranks)
    assert torch.equal(lens.top_ids[-1, :, 0], own.argmax(-1))
    # row 0 reads the fed vector itself: the thoughts (and the answer-start token's embedding)
    norm = model.lm.model.norm if family == "llama" else model.lm.transformer.ln_f
    plain = model.logits(norm(r.thoughts[0]))
    torch.testing.assert_close(lens.probs[0, :-1], torch.softmax(plain, -1), atol=1e-5, rtol=1e-4)
    assert lens.layers == [-1, *range(model.n_layers)]


def _eager_attentions(model, prompt: list[int]) -> tuple[list[torch.Tensor], list[int]]:
    """Attention weights of the eager implementation over the full rollout sequence in one forward."""
    r = model.rollout([prompt])
    emb = model.lm.get_input_embeddings()(torch.tensor([prompt]))
    seq = torch.cat([emb, r.thoughts, model.embed_ids(model.answer_start_ids(), 1)], dim=1)
    model.lm.config._attn_implementation = "eager"
    try:
        out = model.backbone(inputs_embeds=seq, output_attentions=True)
    finally:
        model.lm.config._attn_implementation = "sdpa"
    return list(out.attentions), query_indices(r.prompt_len, model.num_latent, seq.shape[1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attention_equals_eager(family: str) -> None:
    model = random_model(family, num_latent=3)
    model.lm.config._attn_implementation = "sdpa"
    weights, T_q = attention_run(model, PROMPT)  # [L, H, Q, T]
    assert T_q == len(PROMPT)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5, rtol=0)
    eager, idx = _eager_attentions(model, PROMPT)
    for layer, att in enumerate(eager):
        torch.testing.assert_close(weights[layer], att[0][:, idx].float(), atol=1e-5, rtol=1e-4)


def test_default_model_roles_and_mass() -> None:
    model = load_model("default")
    q = "Tom has 3 apples and buys 12 more. How many apples does Tom have?"
    prompt = model.prompt_ids(q)
    roles = token_roles(model, prompt, len(model.question_ids(q)))
    assert [r for r in roles if r.startswith("number")][:1] == ["number 1"] and "number 2" in roles
    assert roles[-1] == "special" and "operator" in roles  # [BOT], "more"
    weights, T_q = attention_run(model, prompt)
    mass = role_mass(weights.mean(1), roles)  # [L, Q] per role
    torch.testing.assert_close(sum(mass.values()), torch.ones(weights.shape[0], weights.shape[2]), atol=1e-5, rtol=0)


def test_run_with_reading_and_heads(tmp_path) -> None:
    """A run with lens, attention and head_out writes the tables and the report sections."""
    import pandas as pd

    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    pairs = generate_pairs(2, seed=0, intermediates=True)
    cfg = RunConfig(
        experiments=("layer", "lens", "attention"), component="head_out", out=str(tmp_path / "r"), use_cache=False
    )
    out = run_experiments(cfg, pairs=pairs, progress=False, command="test")
    res = out / "results"
    lens = pd.read_parquet(res / "lens.parquet")
    assert {"answer", "intermediate", "operand"} <= set(lens["kind"]) and set(lens["variant"]) == {"clean", "corrupted"}
    att = pd.read_parquet(res / "attention.parquet")
    sums = att.groupby(["pair_id", "variant", "layer", "position"])["weight"].sum()
    assert ((sums - 1).abs() < 1e-4).all()
    cells = pd.read_parquet(res / "cells.parquet")
    assert sorted(cells["component"].unique()) == [f"head_out.{h}" for h in range(4)]
    html = (out / "report.html").read_text()
    assert all(f'id="{sid}"' in html for sid in ("lens", "attention", "heads"))


def test_run_of_reading_experiments_only_gets_a_report(tmp_path) -> None:
    """No cells (lens only): the page holds the checks, the lens section with its figure, and no error."""
    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    cfg = RunConfig(experiments=("lens",), out=str(tmp_path / "r"), use_cache=False)
    out = run_experiments(cfg, pairs=generate_pairs(2, seed=1), progress=False, command="test")
    html = (out / "report.html").read_text()
    assert 'id="checks"' in html and 'id="lens"' in html and 'id="layer"' not in html
    lens_part = html[html.index('id="lens"') :]
    assert "data:image/png;base64," in lens_part[: lens_part.index("</section>")]
    # stats.json holds the lens statistics the section shows: checked against the parquet by hand
    import json

    import pandas as pd

    best = json.loads((out / "stats.json").read_text())["lens"]["best"]
    lens = pd.read_parquet(out / "results" / "lens.parquet")
    answer = next(r for r in best if r["kind"] == "answer")
    rows = lens[lens["kind"] == "answer"]
    medians = {key: float(g["rank"].median()) for key, g in rows.groupby(["layer", "position"])}
    assert answer["median_rank"] == min(medians.values())
    assert medians[(answer["layer"], answer["position"])] == answer["median_rank"]
    at = rows[(rows["layer"] == answer["layer"]) & (rows["position"] == answer["position"])]
    assert answer["top1_rate"] == float((at["rank"] == 0).mean()) and answer["n"] == len(at)
    assert f"{answer['n']}</td>" in lens_part[: lens_part.index("</section>")]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_thought_to_thought_maps_equal_eager_attention(family: str) -> None:
    """The K+1 x (K+3) maps per head: the eager implementation's weights at the latent queries, summed over
    the question's keys and the answer-start keys here, each thought and [BOT] kept; rows sum to 1."""
    from latentpatch.patching.reading import thought_attention, thought_keys

    model = random_model(family, num_latent=3)
    model.lm.config._attn_implementation = "sdpa"
    weights, T_q = attention_run(model, PROMPT)
    maps = thought_attention(weights, T_q, model.num_latent)  # [L, H, Q, K + 3]
    K = model.num_latent
    assert maps.shape[-1] == len(thought_keys(K)) == K + 3
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-5, rtol=0)
    eager, idx = _eager_attentions(model, PROMPT)
    for layer, att in enumerate(eager):
        a = att[0][:, idx].float()  # [H, Q, T]
        plain = torch.cat(
            [
                a[..., : T_q - 1].sum(-1, keepdim=True),  # the question (every prompt token before [BOT])
                a[..., T_q - 1 : T_q],  # [BOT]
                a[..., T_q : T_q + K],  # each thought
                a[..., T_q + K :].sum(-1, keepdim=True),  # the answer-start tokens
            ],
            dim=-1,
        )
        torch.testing.assert_close(maps[layer], plain, atol=1e-5, rtol=1e-4)
        # a thought cannot see a later thought: the causal mask leaves those keys at 0
        for q in range(K - 1):
            assert float(maps[layer, :, q, 2 + q + 1 : 2 + K].abs().max()) == 0.0


def test_a_run_writes_the_thought_maps_and_their_statistics(tmp_path) -> None:
    import json

    import numpy as np
    import pandas as pd

    from latentpatch.data.synthetic import generate_pairs
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    cfg = RunConfig(experiments=("attention",), out=str(tmp_path / "r"), use_cache=False)
    out = run_experiments(cfg, pairs=generate_pairs(3, seed=1), progress=False, command="test")
    maps = pd.read_parquet(out / "results" / "attention_thoughts.parquet")
    sums = maps.groupby(["pair_id", "variant", "layer", "head", "query"])["weight"].sum()
    assert np.allclose(sums, 1.0, atol=1e-4)
    stats = json.loads((out / "stats.json").read_text())["attention"]["thoughts"]
    # "previous": per pair, the mean over thoughts p >= 1, layers, heads and runs of the weight on thought p - 1
    K = 6
    rows = maps[(maps["query"] >= 1) & (maps["query"] < K)]
    prev = rows[rows["key"] == "t" + (rows["query"] - 1).astype(str)]
    plain = prev.groupby("pair_id")["weight"].mean().mean()
    got = next(r for r in stats["summary"] if r["key"] == "previous")
    assert got["mean"] == pytest.approx(plain, abs=1e-9) and got["n"] == 3
    page = (out / "report.html").read_text()
    assert "thought_attention_L0" in " ".join(p.name for p in (out / "figures").iterdir())
    assert "the thought before it" in page
    from test_report_sentences import check_sentences

    check_sentences(out)
