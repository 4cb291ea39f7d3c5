"""PCCoT (github whyNLP/PCCoT at 2e32e3e): the parallel-slots rollout against a plain loop written
here from the official inference procedure, and its checkpoint loader.

The official procedure: ``models/modeling_gpt2.py`` ``PCCoTGPT2LMHeadModel.forward`` lines 127-180
(round 0 on question + [BOT] + [LATENT] x N; slot 0 = prj(h at [BOT]), slot i = prj(h at latent
i-1); ``num_iterations`` rounds on the question+[BOT] cache, each keeping slot 0 and setting slot i =
prj(h of slot i-1); the answer pass reads the last round's KV) and ``models/generate.py``
``generate`` lines 120-175 (the first token is the argmax whatever it is, later ones stop at eos).
The plain loop re-runs the whole sequence without a cache, one question at a time (the official
rounds pass no attention mask, so its numbers are per question: a batch here must give each row
those). The checkpoint is written by peft itself (the official ``test_ccot.py`` lines 718-727:
``LoraConfig(..., trainable_token_indices={"wte": [bot, eot, latent, pad, eos]},
fan_in_fan_out=True)``, ``save_pretrained``) with ``config.json`` and ``pccot_args.json`` by their
documented keys.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_hub import base_tokenizer
from test_loading import ALPHA, R, V, base_lm, run_cli

from latentpatch.errors import LatentPatchError
from latentpatch.model.config import build_prj
from latentpatch.model.latent import LatentModel
from latentpatch.model.load import load_model
from latentpatch.model.loaders import random_model
from latentpatch.model.pccot import PCCoTModel, slot_writes
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
from latentpatch.patching.checks import check_engine_reference
from latentpatch.patching.metrics import answer_logprob
from latentpatch.patching.pccot_rounds import round_thought_sweep
from latentpatch.patching.specs import EngineConfig, layer_specs, position_specs
from latentpatch.pipeline.cache import model_key
from latentpatch.pipeline.limits import check_pccot_run

BOT, EOT, LATENT, PAD, EOS = V, V + 1, V + 2, V + 3, 2
N, T_FILE, N_NEW = 4, 2, 6
ANSWER_PROMPT = "the answer is"
PAIRS = [("tom has 12 eggs", "tom has 13 eggs", 12, 13), ("ann 4 cats", "ann 7 cats", 4, 7)]


def write_checkpoint(root, *, extra: dict | None = None, use_projection: bool = False):
    """(adapter dir, the unmerged peft model) in PCCoT's layout; ``extra`` keys added to the adapter file."""
    base = base_lm("gpt2")
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tok = base_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<pcot.bot>", "<pcot.eot>", "<pcot.latent>"]})
    tok.add_special_tokens({"pad_token": "[PAD]"})
    assert [tok.convert_tokens_to_ids(t) for t in ("<pcot.bot>", "<pcot.eot>", "<pcot.latent>", "[PAD]")] == [
        BOT,
        EOT,
        LATENT,
        PAD,
    ]
    lm = base_lm("gpt2")
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    cfg = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_fc", "c_proj"],
        trainable_token_indices={"wte": [BOT, EOT, LATENT, PAD, EOS]},
        fan_in_fan_out=True,
    )
    peft = get_peft_model(lm, cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n or "trainable_tokens_delta" in n:
                p.copy_(torch.randn_like(p) * (0.2 if "lora_" in n else 1.0))
    peft.eval()
    out = root / "adapter"
    peft.save_pretrained(out)
    acfg = json.loads((out / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(acfg))
    if extra:
        from safetensors.torch import load_file, save_file

        sd = load_file(str(out / "adapter_model.safetensors"))
        save_file({**sd, **extra}, str(out / "adapter_model.safetensors"))
    config = {**lm.config.to_dict(), "model_type": "pccot-gpt2", "num_iterations": T_FILE}
    config["use_projection"] = use_projection
    (out / "config.json").write_text(json.dumps(config))
    args = dict(bot_token_id=BOT, eot_token_id=EOT, latent_token_id=LATENT, num_latent_tokens=N)
    (out / "pccot_args.json").write_text(json.dumps({**args, "answer_prompt": ANSWER_PROMPT}))
    tok.save_pretrained(out)
    return out, peft, tok


@torch.no_grad()
def official_pccot(lm, question: list[int], f, T: int, answer_prompt: list[int], ids=(BOT, EOT, LATENT, EOS)):
    """PCCoTGPT2LMHeadModel.forward + generate for one question (no cache, no padding): the slots fed
    in each round [T, N, d], the logits of the first answer token [V], the greedy answer ids.
    ``ids``: the bot, eot, latent and eos ids."""
    bot, eot, latent, eos = ids
    q = question + [bot]
    ids = torch.tensor([q + [latent] * N + [eot] + answer_prompt])
    qb, lb = len(q), len(q) + N
    emb = lm.get_input_embeddings()
    h = lm.transformer(input_ids=ids[:, :lb])[0]
    slots = f(h[:, qb - 1 : lb - 1])
    fed = []
    for _ in range(T):
        fed.append(slots[0])
        hh = lm.transformer(inputs_embeds=torch.cat([emb(ids[:, :qb]), slots], 1))[0][:, qb:]
        last, slots = slots, torch.cat([slots[:, :1], f(hh)[:, :-1]], 1)
    seq = torch.cat([emb(ids[:, :qb]), last, emb(ids[:, lb:])], 1)
    logits = lm(inputs_embeds=seq).logits[0, -1]
    tokens = [int(logits.argmax())]
    for _ in range(N_NEW - 1):
        seq = torch.cat([seq, emb(torch.tensor([[tokens[-1]]]))], 1)
        nxt = int(lm(inputs_embeds=seq).logits[0, -1].argmax())
        if nxt == eos:
            break
        tokens.append(nxt)
    return torch.stack(fed), logits, tokens


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("pccot")
    adapter, peft, tok = write_checkpoint(root)
    return load_model(f"pccot:{adapter}"), peft, tok, root


def identity(h):
    return h


def test_parallel_rollout_equals_the_official_procedure(released):
    """A batch of two questions of different lengths: every row's slots per round, its answer logits
    and greedy answer equal the official procedure on that question alone (T = 1, 2, 3 < N = 4)."""
    m, peft, tok, _ = released
    assert isinstance(m, PCCoTModel) and (m.rounds, m.num_latent, m.latent_id) == (T_FILE, N, LATENT)
    assert m.answer_start_ids() == [EOT] + tok.encode(ANSWER_PROMPT, add_special_tokens=False)
    questions = [[5, 6, 7, 8, 9], [10, 11]]
    lm = peft.base_model.model  # the unmerged peft model: LoRA and the token rows applied on the fly
    for T in (1, 2, 3):
        r = m.parallel_rollout([q + [BOT] for q in questions], rounds=T)
        answers = m.generate(r.state, r.answer_logits, N_NEW)
        for b, q in enumerate(questions):
            fed, logits, tokens = official_pccot(lm, q, identity, T, m.answer_start_ids()[1:])
            assert (r.thoughts[b] - fed).abs().max() <= 1e-5
            assert (r.answer_logits[b] - logits).abs().max() <= 1e-5
            assert answers[b] == tokens


@pytest.fixture(scope="module")
def projected():
    """A tiny random GPT-2 with CODI's projection as the feedback, as a PCCoT model of N slots."""
    base = random_model("gpt2", num_latent=N, seed=3)
    with torch.no_grad():
        prj = build_prj(base.d_model, 2 * base.d_model, layer_norm=True)
        for p in prj.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return PCCoTModel(base.lm, prj.eval(), base.config, base.tokenizer, rounds=N, latent_id=65)


def test_rounds_at_least_slots_equal_the_sequential_loop(projected):
    m = projected
    prompts = [[72, 105, 33, m.config.bot_id], [80, m.config.bot_id]]
    seq = LatentModel(m.lm, m.prj, m.config, m.tokenizer).rollout(prompts)  # the sequential loop
    for T in (N, N + 2):
        r = m.parallel_rollout(prompts, rounds=T)
        assert (r.answer_logits - seq.answer_logits).abs().max() <= 1e-5
        assert (r.thoughts[:, -1] - seq.thoughts).abs().max() <= 1e-5  # the last round's slots = the thoughts
    short = m.parallel_rollout(prompts, rounds=N - 1)
    assert (short.answer_logits - seq.answer_logits).abs().max() > 1e-3  # one update short: not converged
    # the projection path against the official procedure (this vocabulary's ids)
    ids = (m.config.bot_id, m.config.eot_id, 65, m.config.eos_id)
    fed, logits, _ = official_pccot(m.lm, prompts[0][:-1], m.feedback, 2, [], ids)
    r = m.parallel_rollout([prompts[0]], rounds=2)
    assert (r.thoughts[0] - fed).abs().max() <= 1e-5 and (r.answer_logits[0] - logits).abs().max() <= 1e-5


def test_round_writes_and_hooks(projected):
    """A site is (round, slot, component, layer): a write given for round r changes rounds >= r only,
    and writing a site's own value changes nothing."""
    m = projected
    prompts = [[72, 105, 33, m.config.bot_id]]
    T = 3
    plain = m.parallel_rollout(prompts, rounds=T, record=[("resid_out", 1)])
    own = plain.hooks[2].recorded("resid_out", 1)[:, 1]  # round 2, slot 1: [B, d]
    same = m.parallel_rollout(prompts, rounds=T, writes={2: [slot_writes(plain.prompt_len, 1, "resid_out", 1, own)]})
    assert torch.equal(same.answer_logits, plain.answer_logits) and torch.equal(same.hidden, plain.hidden)
    zero = slot_writes(plain.prompt_len, 1, "resid_out", 1, torch.zeros_like(own))
    patched = m.parallel_rollout(prompts, rounds=T, writes={2: [zero]})
    assert torch.equal(patched.hidden[:, 0], plain.hidden[:, 0])  # round 1 untouched
    assert not torch.allclose(patched.hidden[:, 1, 1], plain.hidden[:, 1, 1])  # round 2, slot 1 written
    assert torch.equal(patched.hidden[:, 1, 0], plain.hidden[:, 1, 0])  # causal: slot 0 of round 2 untouched
    assert (patched.answer_logits - plain.answer_logits).abs().max() > 1e-4  # flows through round 3 to the answer

    def hook(r, slots):  # a thought-level patch of round T's last slot
        return torch.cat([slots[:, :-1], torch.zeros_like(slots[:, -1:])], 1) if r == T else slots

    hooked = m.parallel_rollout(prompts, rounds=T, round_hook=hook)
    assert torch.equal(hooked.thoughts[:, :-1], plain.thoughts[:, :-1]) and hooked.thoughts[0, -1, -1].abs().max() == 0
    with pytest.raises(LatentPatchError, match="rounds run 0..3"):
        m.parallel_rollout(prompts, rounds=T, writes={5: []})


def test_checkpoint_errors(tmp_path):
    adapter, _, _ = write_checkpoint(tmp_path / "a", extra={"base_model.model.transformer.foo.weight": torch.zeros(2)})
    with pytest.raises(LatentPatchError, match=r"unexpected key\(s\) \(base_model.model.transformer.foo.weight\)"):
        load_model(f"pccot:{adapter}")
    adapter, _, _ = write_checkpoint(tmp_path / "b", use_projection=True)
    with pytest.raises(LatentPatchError, match="use_projection"):
        load_model(f"pccot:{adapter}")
    (adapter / "pccot_args.json").unlink()
    with pytest.raises(LatentPatchError, match="pccot_args.json"):
        load_model(f"pccot:{adapter}")


def test_the_engines_loop_is_the_parallel_rollout_at_the_site_round(released):
    """``rollout`` (what the engine runs) = PCCoT's rounds with the sites of ``site_round``: its
    thoughts are that round's slots, its recordings that round's, its answer PCCoT's; T = 2 < N = 4."""
    m, _, _, root = released
    prompt = [5, 6, 7, BOT]
    for site in (1, 2):
        ms = load_model(f"pccot:{root / 'adapter'}", pccot_round=site)
        par = ms.parallel_rollout([prompt], record=[("resid_out", 1)])
        r = ms.rollout([prompt], record=[("resid_out", 1)])
        assert (r.thoughts[0] - par.thoughts[0, site - 1]).abs().max() <= 1e-6
        assert (r.answer_logits - par.answer_logits).abs().max() <= 1e-5
        acts = r.hooks.recorded("resid_out", 1)[0]  # prompt, the site round's slots, the answer start
        assert acts.shape[0] == len(prompt) + N + len(ms.answer_start_ids())
        assert (acts[len(prompt) : len(prompt) + N] - par.hooks[site].recorded("resid_out", 1)[0]).abs().max() <= 1e-5
    keys = {model_key(load_model(f"pccot:{root / 'adapter'}", pccot_round=s)) for s in (1, 2)}
    assert len(keys) == 2  # the activation cache keeps each site round's baselines apart
    with pytest.raises(LatentPatchError, match="--pccot-round 3: the model runs rounds 1..2"):
        load_model(f"pccot:{root / 'adapter'}", pccot_round=3)
    with pytest.raises(LatentPatchError, match="--pccot-round only applies to pccot:"):
        load_model("config:gpt2", pccot_round=1)


def test_engine_check_passes_and_run_refuses_undefined_experiments(released):
    m, _, _, _ = released
    with pytest.raises(LatentPatchError, match="--experiments edges,atp: not defined on PCCoT"):
        check_pccot_run(m, ["layer", "edges", "early", "atp"])
    check_pccot_run(m, ["layer", "position", "thought", "early", "influence", "intermediate", "attention"])
    bases = []
    for i, (qc, qr, ac, ar) in enumerate(PAIRS):
        clean, corr = (record_run(m, m.prompt_ids(q)) for q in (qc, qr))
        bases.append(prepare_pair(m, str(i), clean, corr, ac, ar))
    specs = layer_specs(m.n_layers, m.num_latent) + position_specs(m.n_layers, m.num_latent)
    values = [replacement_values(b, EngineConfig()) for b in bases]
    out = check_engine_reference(m, bases, specs, values.__getitem__, 16, 6)
    assert out["passed"] and out["cells"] == 6, out


def test_round_thought_sweep_cells_equal_single_runs(projected):
    """Each (round, slot) cell of the batched sweep equals one plain run of that patch alone, and a
    source equal to the target changes nothing."""
    m = projected
    bot = m.config.bot_id
    target, source = [49, 50, 43, bot], [51, 50, 43, bot]
    cells = round_thought_sweep(m, target, source, 3, 4, rounds=[1, 3])
    assert [(c["round"], c["slot"]) for c in cells] == [(r, s) for r in (1, 3) for s in range(N)]
    clean, corr = m.answer_ids(3), m.answer_ids(4)
    src = m.parallel_rollout([source])

    def ld_of(r):
        s = m.score(r.state, r.answer_logits, [[clean[0], corr[0]]])[0]
        return answer_logprob(s[0], *clean) - answer_logprob(s[1], *corr)

    for c in cells[::3]:
        rnd, slot = c["round"], c["slot"]

        def hook(at, slots, rnd=rnd, slot=slot):
            if at != rnd:
                return slots
            out = slots.clone()
            out[:, slot] = src.thoughts[:, rnd - 1, slot]
            return out

        assert abs(ld_of(m.parallel_rollout([target], round_hook=hook)) - c["answer_logprob_diff"]) <= 1e-5
    own = round_thought_sweep(m, target, target, 3, 4, rounds=[2])
    base = ld_of(m.parallel_rollout([target]))
    assert all(abs(c["answer_logprob_diff"] - base) <= 1e-5 for c in own)
    assert any(abs(c["answer_logprob_diff"] - base) > 1e-4 for c in cells)  # the patches do something
    with pytest.raises(LatentPatchError, match="rounds 1..4"):
        round_thought_sweep(m, target, source, 3, 4, rounds=[0])


def test_latentpatch_run_on_pccot(released, tmp_path):
    """``run`` on a PCCoT model (T = 2 < N = 4, sites of the last round): the sweep and the thought
    experiment through the engine, with every built-in check passing; undefined experiments refuse
    (the other experiments: tests/test_pccot_experiments.py)."""
    import pandas as pd

    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    _, _, _, root = released
    entries = []
    for i, (qc, qr, ac, ar) in enumerate(
        [("tom has 12 eggs", "tom has 13 eggs", 12, 13), ("ann 4 cats", "ann 7 cats", 4, 7)]
    ):
        entries += [
            {"pair_id": f"p{i}", "variant": "clean", "question": qc, "answer": ac},
            {"pair_id": f"p{i}", "variant": "corrupted", "question": qr, "answer": ar},
        ]
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(entries))
    model = f"pccot:{root / 'adapter'}"
    cfg = RunConfig(model=model, pairs=str(pairs), experiments=("layer", "thought"), out=str(tmp_path / "run"))
    out = run_experiments(dataclasses.replace(cfg, use_cache=False), progress=False, command="test")
    checks = json.loads((out / "manifest.json").read_text())["checks"]
    assert all(c["passed"] for c in checks.values()), checks
    steps = pd.read_parquet(out / "results" / "steps.parquet")
    assert set(steps["experiment"]) == {"thought"} and len(steps) > 0
    edges = dataclasses.replace(cfg, experiments=("edges",), out=str(tmp_path / "edges"))
    with pytest.raises(LatentPatchError, match="--experiments edges: not defined on PCCoT"):
        run_experiments(edges, progress=False, command="test")


def test_pccot_from_the_hub_cache(released, tmp_path, monkeypatch, capsys):
    """``pccot:ORG/NAME`` and the adapter's base (its weights) both from a hub cache built here,
    offline; ``latentpatch models`` lists the preset with its command."""
    import shutil

    from test_hub import cache_repo

    m, _, _, root = released
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_repo(home / "hub", "testorg/tiny-gpt2", lambda d: base_lm("gpt2").save_pretrained(d))

    def adapter_files(d):
        for f in (root / "adapter").iterdir():
            shutil.copy(f, d / f.name)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "testorg/tiny-gpt2"}))

    cache_repo(home / "hub", "testorg/tiny-pccot", adapter_files)
    hub = load_model("pccot:testorg/tiny-pccot")
    assert hub.name == "pccot:testorg/tiny-pccot" and hub.rounds == T_FILE
    assert torch.equal(hub.rollout([[5, 6, BOT]]).answer_logits, m.rollout([[5, 6, BOT]]).answer_logits)
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "pccot-gpt2: " in out and "--model pccot:whynlp/pccot-gpt2" in out
