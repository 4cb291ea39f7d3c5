"""The model's position limit: greedy decoding, scoring and the rollout never index past it.

A CODI GPT-2 checkpoint whose base has ``n_positions = 256`` (LoRA r 8, alpha 32, prj 128, 6
latents, CODI's 256 new tokens) and a LLaMA with a small ``max_position_embeddings`` decode until
their last position: ``inspect``, ``run`` and ``eval`` finish, and a plain loop written here (no KV
cache, the whole sequence run again at every step, greedy by the family's rule) gives the same
tokens up to the limit. A prompt that alone does not fit is one line, exit code 2.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import tiny_lm, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from test_loading import TARGETS, CODILike, V, base_lm, save_ckpt

from latentpatch.cli import main
from latentpatch.data.pairs import Pair, Variant, save_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.model.config import LatentConfig, build_prj
from latentpatch.model.latent import LatentModel
from latentpatch.model.latent_dir import save_latent_dir

POSITIONS, R, ALPHA, PRJ_DIM, K = 256, 8, 32, 128, 6
EOS = V + 2  # the last id, which CODI's decoding never picks: every answer runs into the limit


@torch.no_grad()
def plain_greedy(lm, prj, prompt: list[int], cfg: LatentConfig, limit: int, max_new: int) -> list[int]:
    """Rollout and greedy decoding as a plain loop: every step runs the whole sequence of input
    embeddings again (no cache). An answer token is kept only while it has a position of its own
    (its index in the sequence < ``limit``), so the loop never feeds past the position table."""
    emb = lm.get_input_embeddings()
    seq = emb(torch.tensor([prompt]))
    for _ in range(cfg.num_latent):
        h = lm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][:, -1]
        seq = torch.cat([seq, prj(h)[:, None]], 1)
    start = [cfg.eot_id] + ([] if cfg.remove_eos else [cfg.eos_id])
    seq = torch.cat([seq, emb(torch.tensor([start]))], 1)
    out: list[int] = []
    for step in range(max_new):
        logits = lm(inputs_embeds=seq).logits[0, -1].float()
        logits[cfg.banned_ids(logits.shape[-1])] = float("-inf")
        t = int(logits.argmax())
        if t == cfg.eos_id and cfg.eos_stops(step):
            break
        if seq.shape[1] >= limit:  # the token would sit at position `limit`: the answer is cut
            break
        out.append(t)
        seq = torch.cat([seq, emb(torch.tensor([[t]]))], 1)
    return out


def codi_gpt2(tmp_path):
    """A CODI GPT-2 checkpoint in the official layout on a base of 256 positions (no tokenizer)."""
    lm = base_lm("gpt2", positions=POSITIONS, seed=3)
    base = tmp_path / "base"
    lm.config.save_pretrained(base)
    lm.resize_token_embeddings(V + 3, mean_resizing=False)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS["gpt2"], lora_dropout=0.0, fan_in_fan_out=True)
    peft = get_peft_model(lm, lora)
    torch.manual_seed(4)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    module = CODILike(peft, build_prj(32, PRJ_DIM, layer_norm=True)).eval()
    ckpt = save_ckpt(module.state_dict(), tmp_path / "ckpt", "safetensors")
    return module, ckpt, base


CODI_ARGS = ["--lora-r", str(R), "--lora-alpha", str(ALPHA), "--lora-targets", ",".join(TARGETS["gpt2"])]
CODI_ARGS += ["--prj-dim", str(PRJ_DIM), "--num-latent", str(K), "--eos-id", str(EOS)]


def run_cli(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_decodes_up_to_the_position_limit_as_a_plain_loop(tmp_path, capsys):
    module, ckpt, base = codi_gpt2(tmp_path)
    model_args = ["--model", f"codi:{ckpt}", "--base", str(base), *CODI_ARGS]
    code, out, err = run_cli(["inspect", *model_args, "--input-ids", "5,6,7"], capsys)
    assert code == 0, err
    ids = json.loads(re.search(r"answer ids: (\[.*\])", out).group(1))

    from latentpatch.model.codi import load_codi_checkpoint

    model = load_codi_checkpoint(
        ckpt, str(base), lora_r=R, lora_alpha=ALPHA, lora_targets=TARGETS["gpt2"], num_latent=K, eos_id=EOS
    )
    assert model.max_positions == POSITIONS and model.config.max_answer_tokens == 256  # CODI's 256 new tokens
    prompt = model.prompt_ids([5, 6, 7])
    expected = plain_greedy(module.codi, module.prj, prompt, model.config, POSITIONS, 256)
    room = POSITIONS - model.positions_before_answer(len(prompt))
    assert len(expected) == room  # this seed's answer runs into the limit (no [EOS] before it)
    assert ids == expected
    assert f"cut at the model's last position ({POSITIONS} positions)" in out


def test_a_prompt_that_does_not_fit_is_one_line(tmp_path, capsys):
    _, ckpt, base = codi_gpt2(tmp_path)
    long_ids = ",".join(["5"] * 250)
    code, out, err = run_cli(["inspect", "--model", f"codi:{ckpt}", "--base", str(base), *CODI_ARGS,
                              "--input-ids", long_ids], capsys)  # fmt: skip
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert "its prompt is" in err and "but the model takes 256" in err and len(err.strip().splitlines()) == 1


def test_run_without_a_tokenizer_is_refused_before_any_work(tmp_path, capsys, pair_file_factory):
    _, ckpt, base = codi_gpt2(tmp_path)
    out_dir = tmp_path / "run"
    code, out, err = run_cli(
        ["run", "--model", f"codi:{ckpt}", "--base", str(base), *CODI_ARGS, "--pairs", str(pair_file_factory()),
         "--out", str(out_dir), "--quiet", "--no-report"],
        capsys,
    )  # fmt: skip
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert f"--base {base}: no tokenizer files" in err and "fix:" in err
    assert not (out_dir / "results" / "pairs").exists() or not any((out_dir / "results" / "pairs").iterdir())


@pytest.fixture
def pair_file_factory(tmp_path):
    def make(questions=(("What is 2 + 3?", 5, "What is 2 + 4?", 6), ("Add 7 and 1.", 8, "Add 7 and 2.", 9))):
        pairs = [Pair(str(i), Variant(q1, a1), Variant(q2, a2)) for i, (q1, a1, q2, a2) in enumerate(questions)]
        path = tmp_path / "pairs.json"
        save_pairs(pairs, path)
        return path

    return make


def llama_text_model(positions: int, max_answer: int) -> LatentModel:
    """A tiny LLaMA with a character tokenizer and ``max_position_embeddings = positions``."""
    tok = tiny_tokenizer()
    lm = tiny_lm("llama", 2, 32, seed=5, vocab=len(tok), scale=10.0)
    lm.config.max_position_embeddings = positions
    torch.manual_seed(6)
    cfg = LatentConfig(
        num_latent=4,
        pad_id=tok.convert_tokens_to_ids("<pad>"),
        bot_id=tok.convert_tokens_to_ids("<bot>"),
        eot_id=tok.convert_tokens_to_ids("<eot>"),
        eos_id=0,
        answer_prefix="= ",
        add_special_tokens=False,
        max_answer_tokens=max_answer,
    )
    return LatentModel(lm, build_prj(32, 64, layer_norm=True).eval(), cfg, tokenizer=tok, name="tiny-llama")


def test_run_and_eval_finish_at_the_limit_and_count_the_cut_answers(tmp_path, capsys, pair_file_factory):
    model = llama_text_model(positions=40, max_answer=64)
    model_dir = save_latent_dir(model, tmp_path / "model")
    pairs = pair_file_factory()
    out_dir = tmp_path / "run"
    code, out, err = run_cli(
        ["run", "--model", f"dir:{model_dir}", "--pairs", str(pairs), "--experiments", "layer,position",
         "--out", str(out_dir), "--quiet", "--no-report", "--no-use-cache", "--strict"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    cut = manifest["answers_cut"]
    # The same count from the plain loop: an unpatched answer is cut when it fills its room.
    expected = 0
    for entry in json.loads(pairs.read_text()):
        prompt = model.prompt_ids(entry["question"])
        ids = plain_greedy(model.lm, model.prj, prompt, model.config, 40, 64)
        expected += len(ids) == 40 - model.positions_before_answer(len(prompt))
        r = model.rollout([prompt])
        assert model.generate(r.state, r.answer_logits)[0] == ids
    assert expected > 0 and cut == {"max_positions": 40, "baselines": expected, "patched": cut["patched"]}
    assert cut["patched"] > 0
    cells = [json.loads(f.read_text()) for f in sorted((out_dir / "results" / "pairs").glob("*.json"))]
    assert all(len(row["answer_ids"]) <= 40 for c in cells for row in c["cells"])

    # eval reads the synthetic held-out questions (~150-250 characters): a limit just past them
    eval_dir = save_latent_dir(llama_text_model(positions=300, max_answer=400), tmp_path / "eval_model")
    code, out, err = run_cli(["eval", "--model", f"dir:{eval_dir}", "--n", "3", "--pairs", str(pairs)], capsys)
    assert code == 0, err
    assert "accuracy" in out


def test_scoring_past_the_limit_is_refused():
    model = llama_text_model(positions=30, max_answer=64)
    r = model.rollout([[5, 6, 7, 8]])
    room = 30 - model.positions_before_answer(4)
    assert model.answer_room(r.state) == [room]
    model.score(r.state, r.answer_logits, [[[9] * (room + 1)]])  # room tokens fed: fits
    with pytest.raises(LatentPatchError, match="does not fit"):
        model.score(r.state, r.answer_logits, [[[9] * (room + 2)]])
