"""CODI training: a tiny run lowers the loss; the training student forward is the real rollout."""

from __future__ import annotations

import json

import pytest
import torch

from latentpatch.data.synthetic import generate_problems
from latentpatch.model.latent import LatentModel
from latentpatch.model.load import load_model
from latentpatch.training.config import TrainConfig
from latentpatch.training.data import Codec, make_batch
from latentpatch.training.objective import positions, student_forward
from latentpatch.training.train import train

TINY = dict(
    layers=1,
    d_model=32,
    heads=2,
    d_ff=64,
    prj_dim=32,
    num_latent=2,
    batch_size=8,
    train_pool=400,
    tokenizer_corpus=400,
    vocab_size=1000,
    lr=3e-3,
    warmup=5,
    log_every=1,
    threads=1,
    teacher_only_steps=0,
)  # default recipe otherwise: aux loss, Fourier number init


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    summary = train(TrainConfig(steps=40, **TINY), out, progress=False)
    return out, summary


def test_short_training_lowers_loss(tiny_run):
    out, summary = tiny_run
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in log[:3]) / 3
    last = sum(r["loss"] for r in log[-3:]) / 3
    assert last < first * 0.8, (first, last)
    meta = json.loads((out / "latentpatch.json").read_text())
    assert meta["format"] == "latentpatch-codi/1" and meta["family"] == "llama"
    assert meta["eot_id"] == meta["bot_id"] + 1 == meta["pad_id"] + 2  # CODI: V, V+1, V+2


def test_checkpoint_layout(tiny_run):
    from safetensors.torch import load_file

    out, _ = tiny_run
    keys = set(load_file(str(out / "model.safetensors")))
    assert {"prj.1.weight", "prj.1.bias", "prj.3.weight", "prj.3.bias", "prj.ln.weight", "prj.ln.bias"} <= keys
    assert "codi.model.embed_tokens.weight" in keys and "codi.model.norm.weight" in keys
    assert "codi.lm_head.weight" not in keys  # tied
    assert all(k.startswith(("codi.model.", "prj.")) for k in keys)


def test_hf_tokenizer_loads(tiny_run):
    from transformers import AutoTokenizer

    out, _ = tiny_run
    tok = AutoTokenizer.from_pretrained(str(out))
    codec = Codec.from_dir(out)
    text = "Tom has 16 apples. The answer is: 17"
    assert tok(text, add_special_tokens=False)["input_ids"] == codec.encode(text)
    assert tok.decode(codec.encode(text)) == text
    # numbers are single tokens: 16 -> 17 keeps the token length
    assert len(codec.encode("has 16 apples")) == len(codec.encode("has 17 apples"))


def student_forward_reference(model: LatentModel, q_ids, q_mask, a_ids, a_mask) -> torch.Tensor:
    """Plain no-cache loop (full recompute each step) of the student rollout: [B, La, V] answer logits."""
    lm, embed = model.lm, model.lm.get_input_embeddings()
    embs = embed(q_ids)
    mask = q_mask
    for _ in range(model.num_latent):
        out = lm(
            inputs_embeds=embs,
            attention_mask=mask,
            position_ids=positions(mask),
            output_hidden_states=True,
            use_cache=False,
        )
        emb = model.prj(out.hidden_states[-1][:, -1]).unsqueeze(1)
        embs = torch.cat([embs, emb], 1)
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], 1)
    embs = torch.cat([embs, embed(a_ids)], 1)
    mask = torch.cat([mask, a_mask], 1)
    out = lm(
        inputs_embeds=embs,
        attention_mask=mask,
        position_ids=positions(mask),
        output_hidden_states=True,
        use_cache=False,
    )
    return out.logits[:, -a_ids.size(1) :]


def test_student_forward_equals_plain_loop(tiny_run):
    out, _ = tiny_run
    model = load_model(f"dir:{out}")
    codec = Codec.from_dir(out)
    probs = generate_problems(5, seed=99)  # different question lengths -> left padding exercised
    b = make_batch(probs, codec)
    with torch.no_grad():
        fast, _, _, _ = student_forward(model, b.q_ids, b.q_mask, b.a_ids, b.a_mask)
        ref = student_forward_reference(model, b.q_ids, b.q_mask, b.a_ids, b.a_mask)
    m = b.a_mask.bool()
    assert torch.allclose(fast[m], ref[m], atol=1e-4)


def test_student_forward_equals_tool_rollout(tiny_run):
    """The training rollout equals LatentModel's inference rollout (answer logits after [EOT]), on
    the model that `latentpatch train` saved and load_model("dir:PATH") loads strictly."""
    out, _ = tiny_run
    lm = load_model(f"dir:{out}")
    codec = Codec.from_dir(out)
    probs = generate_problems(4, seed=7)
    b = make_batch(probs, codec)
    with torch.no_grad():
        fast, _, _, _ = student_forward(lm, b.q_ids, b.q_mask, b.a_ids, b.a_mask)
        r = lm.rollout([p.question for p in probs])
    assert torch.allclose(fast[:, 0].float(), r.answer_logits, atol=1e-4)


def test_numbers_are_single_tokens(tiny_run):
    out, _ = tiny_run
    codec = Codec.from_dir(out)
    for n in range(201):
        assert len(codec.encode(str(n))) == 1
    # the answer prefix ends with a lone space token, then the number
    ids = codec.encode("The answer is: 37")
    assert codec.tok.id_to_token(ids[-2]) == "Ġ" and codec.decode(ids[-1:]) == "37"


def test_fourier_number_init_matches_the_formula(tiny_run):
    """init_number_embeddings writes scale*[cos, sin](2 pi n / T) into the first dims of each number
    token and leaves every other row and dim untouched."""
    import math

    from latentpatch.training.train import NUMBER_PERIODS, build_model, init_number_embeddings

    out, _ = tiny_run
    codec = Codec.from_dir(out)
    cfg = TrainConfig(**{**TINY, "d_model": 64, "heads": 2})
    torch.manual_seed(0)
    model = build_model(cfg, codec)
    before = model.lm.get_input_embeddings().weight.detach().clone()
    init_number_embeddings(model, codec, scale=0.5)
    after = model.lm.get_input_embeddings().weight.detach()
    width = 2 * len(NUMBER_PERIODS)
    numbers = {codec.encode(str(n))[0]: n for n in range(201)}
    for tid, n in [(t, n) for t, n in numbers.items() if n in (0, 1, 7, 37, 200)]:
        want = [0.5 * math.cos(2 * math.pi * n / T) for T in NUMBER_PERIODS] + [
            0.5 * math.sin(2 * math.pi * n / T) for T in NUMBER_PERIODS
        ]
        assert torch.allclose(after[tid, :width], torch.tensor(want), atol=1e-6)
    assert torch.equal(after[:, width:], before[:, width:])
    other = [i for i in range(after.shape[0]) if i not in numbers]
    assert torch.equal(after[other], before[other])
    assert model.lm.lm_head.weight.data_ptr() == model.lm.get_input_embeddings().weight.data_ptr()  # tied


def test_training_pool_excludes_default_pair_questions():
    """The first clean question of generate_pairs(57, seed=0) is generate_problems(seed=0)'s first
    problem; the training pool must drop it (the default pairs stay held out)."""
    from latentpatch.data.pairs import load_pairs
    from latentpatch.pipeline.config import default_pairs_path
    from latentpatch.training.data import normalize_question, training_pool

    pair_qs = {normalize_question(v.question) for p in load_pairs(default_pairs_path()) for v in (p.clean, p.corrupted)}
    raw = [normalize_question(p.question) for p in generate_problems(50, 0)]
    assert any(q in pair_qs for q in raw)
    pool = [normalize_question(p.question) for p in training_pool(TrainConfig(train_pool=50, data_seed=0))]
    assert pool == [q for q in raw if q not in pair_qs] and len(pool) < len(raw)


def attention_bias(mask: torch.Tensor, t_q: int, n_a: int, blind=None, latent_hide=None) -> torch.Tensor:
    """[B, 1, T, T] additive mask: causal and padding; answer tokens (the last ``n_a``) of ``blind``
    rows see no question token (but ``<bot>``); latent position j of row i does not see the columns
    ``latent_hide[i, j]`` marks."""
    T = mask.size(1)
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    for i in range(len(mask)):
        if blind is not None and blind[i]:
            allowed[i, T - n_a :, : t_q - 1] = False
        if latent_hide is not None:
            for j in range(T - t_q - n_a):
                for col in range(T):
                    if col < latent_hide.size(2) and latent_hide[i, j, col]:
                        allowed[i, t_q + j, col] = False
    allowed |= torch.eye(T, dtype=torch.bool)[None]  # padding queries see themselves (no NaN)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def student_reference(model: LatentModel, b, answer_ids, blind=None, swap=None, latent_hide=None) -> torch.Tensor:
    """Plain no-cache loop with explicit 4-D masks: thought ``swap.position`` of row i is row
    ``swap.donor[i]``'s where ``swap.rows[i]``; see :func:`attention_bias` for ``blind`` and
    ``latent_hide``. [B, La, V] answer logits."""
    lm, embed = model.lm, model.lm.get_input_embeddings()
    embs, mask, t_q = embed(b.q_ids), b.q_mask, b.q_ids.size(1)
    for step in range(model.num_latent):
        bias = attention_bias(mask, t_q, 0, None, latent_hide)
        out = lm(inputs_embeds=embs, attention_mask=bias, position_ids=positions(mask), output_hidden_states=True)
        emb = model.prj(out.hidden_states[-1][:, -1]).unsqueeze(1)
        if swap is not None and step == swap.position:
            fed = []
            for i in range(len(emb)):
                if swap.token_rows is not None and swap.token_rows[i]:  # the donor value's token, at row i's norm
                    token = embed(swap.token_ids[i : i + 1])
                    fed.append(token * emb[i].norm() / token.norm())
                else:
                    fed.append(emb[int(swap.donor[i])] if swap.rows[i] else emb[i])
            emb = torch.stack(fed)
        embs = torch.cat([embs, emb], 1)
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], 1)
    embs = torch.cat([embs, embed(answer_ids)], 1)
    mask = torch.cat([mask, b.a_mask], 1)
    n_a = answer_ids.size(1)
    bias = attention_bias(mask, t_q, n_a, blind, latent_hide)
    out = lm(inputs_embeds=embs, attention_mask=bias, position_ids=positions(mask))
    return out.logits[:, -n_a:]


def test_blind_and_swapped_student_equals_plain_loop(tiny_run):
    """Training-only variants of the rollout (answer blind to the question, a swapped thought)
    against a plain recompute with an explicit 4-D attention mask."""
    from latentpatch.training.interchange import plan_swap

    out, _ = tiny_run
    model = load_model(f"dir:{out}")
    codec = Codec.from_dir(out)
    b = make_batch(generate_problems(6, seed=5), codec, num_latent=model.num_latent)
    torch.manual_seed(3)
    swap = plan_swap(b, codec, 1.0, model.num_latent)
    assert swap is not None and swap.rows.any()
    blind = torch.tensor([True, False, True, True, False, True])
    with torch.no_grad():
        fast = student_forward(model, b.q_ids, b.q_mask, swap.answer_ids, b.a_mask, blind, swap).answer_logits
        ref = student_reference(model, b, swap.answer_ids, blind, swap)
        plain = student_forward(model, b.q_ids, b.q_mask, swap.answer_ids, b.a_mask).answer_logits
    m = b.a_mask.bool()
    assert torch.allclose(fast[m], ref[m], atol=1e-4)
    assert not torch.allclose(fast[m], plain[m], atol=1e-3)  # the variants do change the logits


def test_token_fed_student_equals_plain_loop(tiny_run):
    """``swap_token_rate``: the token rows are fed the donor value's token embedding at their own
    thought's norm, the other swapped rows the donor's thought (plain recompute with 4-D masks)."""
    from latentpatch.training.interchange import plan_swap

    out, _ = tiny_run
    model = load_model(f"dir:{out}")
    codec = Codec.from_dir(out)
    b = make_batch(generate_problems(8, seed=5), codec, num_latent=model.num_latent)
    torch.manual_seed(4)
    swap = plan_swap(b, codec, 1.0, model.num_latent, token_rate=0.5)
    assert swap is not None and swap.token_rows is not None
    assert swap.token_rows.any() and (swap.rows & ~swap.token_rows).any()
    m = b.a_mask.bool()
    with torch.no_grad():
        fast = student_forward(model, b.q_ids, b.q_mask, swap.answer_ids, b.a_mask, None, swap)
        ref = student_reference(model, b, swap.answer_ids, None, swap)
        assert torch.allclose(fast.answer_logits[m], ref[m], atol=1e-4)
        fed = fast.thoughts[:, swap.position]  # [B, d]
        token = model.lm.get_input_embeddings()(swap.token_ids)
        cos = torch.nn.functional.cosine_similarity(fed, token, dim=-1)
        assert (cos[swap.token_rows] > 1 - 1e-5).all() and (cos[~swap.token_rows] < 0.999).all()


def test_token_rows_hold_the_donor_value_and_keep_the_swap(tiny_run):
    """With ``token_rate`` the rows, donors and targets are those of the plain draw (the token rows
    are drawn after it); a token row's token is the donor's value at p-1, checked by hand."""
    from latentpatch.training.interchange import plan_swap

    out, _ = tiny_run
    codec = Codec.from_dir(out)
    K = 4
    probs = generate_problems(48, seed=13)
    b = make_batch(probs, codec, num_latent=K)
    checked = 0
    for seed in range(5):
        torch.manual_seed(seed)
        plain = plan_swap(b, codec, 0.7, K)
        torch.manual_seed(seed)
        swap = plan_swap(b, codec, 0.7, K, token_rate=1.0)
        assert plain.token_rows is None and torch.equal(swap.token_rows, swap.rows)
        assert torch.equal(plain.donor, swap.donor) and torch.equal(plain.latent_targets, swap.latent_targets)
        assert torch.equal(plain.answer_ids, swap.answer_ids)
        p = swap.position
        for i in range(len(probs)):
            if swap.rows[i]:
                res = _plain_results(probs[int(swap.donor[i])].program)
                assert codec.decode([int(swap.token_ids[i])]) == str(res[min(p - 1, len(res) - 1)])
                checked += 1
    assert checked > 40


def test_thought_match_is_one_minus_the_mean_cosine(tiny_run):
    """``thought_match_factor``: 1 - mean cosine of each fed thought q >= 1 with the embedding of step
    result q-1, computed here element by element; the total grows by factor x that."""
    from latentpatch.training.interchange import thought_targets
    from latentpatch.training.objective import codi_loss

    out, _ = tiny_run
    model = load_model(f"dir:{out}")
    codec = Codec.from_dir(out)
    b = make_batch(generate_problems(6, seed=9), codec, num_latent=model.num_latent)
    with torch.no_grad():
        thoughts = student_forward(model, b.q_ids, b.q_mask, b.a_ids, b.a_mask).thoughts
        emb = model.lm.get_input_embeddings().weight
        targets = thought_targets(b.latent_targets)
        cosines = [
            float(thoughts[i, q] @ emb[targets[i, q]] / (thoughts[i, q].norm() * emb[targets[i, q]].norm()))
            for i in range(targets.size(0))
            for q in range(targets.size(1))
            if targets[i, q] != -100
        ]
        want = 1 - sum(cosines) / len(cosines)
        # no random rows (interchange, answer-blind), so both calls see the same batch
        fixed = dict(TINY, thought_swap_rate=0.0, answer_blind_rate=0.0)
        off, parts_off = codi_loss(model, b, TrainConfig(**fixed, thought_match_factor=0.0))
        on, parts = codi_loss(model, b, TrainConfig(**fixed, thought_match_factor=2.0))
    assert "thought_match" not in parts_off and parts["thought_match"] == pytest.approx(want, abs=1e-5)
    assert float(on - off) == pytest.approx(2.0 * want, abs=1e-4)


def test_isolated_student_equals_plain_loop(tiny_run):
    """Latent positions that see no earlier latent position and, with ``spent``, none of the question
    numbers only earlier steps read (``thought_isolate_rate``, ``hide_spent_numbers``), alone and with
    blind rows, against a plain recompute with explicit 4-D masks at every step; hidden rows change,
    the others do not (a random 2-layer model with 4 thoughts, so that the masks matter)."""
    from latentpatch.training.objective import latent_hide_mask
    from latentpatch.training.train import build_model

    out, _ = tiny_run
    codec = Codec.from_dir(out)
    torch.manual_seed(0)
    model = build_model(TrainConfig(**{**TINY, "layers": 2, "num_latent": 4}), codec).eval()
    b = make_batch(generate_problems(6, seed=7), codec, num_latent=model.num_latent)
    rows = torch.tensor([True, True, False, True, False, False])
    blind = torch.tensor([True, False, False, True, True, False])
    m = b.a_mask.bool()
    with torch.no_grad():
        plain = student_forward(model, b.q_ids, b.q_mask, b.a_ids, b.a_mask)
        for spent in (False, True):
            hide = latent_hide_mask(b, rows, model.num_latent, spent, codec)
            assert not hide[~rows].any() and hide[rows].any()
            for blind_rows in (None, blind):
                fast = student_forward(model, b.q_ids, b.q_mask, b.a_ids, b.a_mask, blind_rows, None, hide)
                ref = student_reference(model, b, b.a_ids, blind_rows, None, hide)
                assert torch.allclose(fast.answer_logits[m], ref[m], atol=1e-4)
            fast = student_forward(model, b.q_ids, b.q_mask, b.a_ids, b.a_mask, None, None, hide)
            # thought 0 comes from <bot>, thought 1 from latent position 0 (which sees no earlier latent
            # and no spent number); from thought 2 on, hidden rows compute something else
            assert torch.allclose(fast.thoughts[:, :2], plain.thoughts[:, :2], atol=1e-5)
            moved = (fast.thoughts[:, 2:] - plain.thoughts[:, 2:]).abs().amax(dim=(1, 2))
            assert (moved[rows] > 1e-3).all() and (moved[~rows] < 1e-5).all()


def test_spent_columns_mark_the_numbers_of_earlier_steps_only(tiny_run):
    """``spent_columns`` by hand on two programs: a chain hides step 0's operands from position 1 on
    (and every literal past the last step); a program reading an older result hides nothing."""
    from latentpatch.data.synthetic import Problem
    from latentpatch.training.data import spent_columns

    out, _ = tiny_run
    codec = Codec.from_dir(out)
    chain = Problem("A has 16 eggs, eats 3, doubles 2 times?", (("sub", 16, 3), ("mul", "#0", 2)), 26, "", "t")
    other = Problem("5 and 7, then 5 times 4.", (("add", 5, 7), ("mul", 5, 4), ("add", "#0", "#1")), 32, "", "t")
    b = make_batch([chain, other], codec, num_latent=3)
    cols = spent_columns(b.q_ids, b.programs, codec, 3)
    words = [codec.decode([int(t)]).strip() for t in b.q_ids[0]]
    at = {w: [i for i, x in enumerate(words) if x == w] for w in ("16", "3", "2")}
    assert not cols[0, 0].any()
    assert [i for i in range(len(words)) if cols[0, 1, i]] == sorted(at["16"] + at["3"])
    assert [i for i in range(len(words)) if cols[0, 2, i]] == sorted(at["16"] + at["3"] + at["2"])
    assert not cols[1].any()


def _plain_results(program, forced_step=None, forced_value=None):
    """Step results by hand, with one step's result forced."""
    res = []
    for i, (op, a, b) in enumerate(program):
        x = res[int(a[1:])] if isinstance(a, str) else a
        y = res[int(b[1:])] if isinstance(b, str) else b
        r = {"add": x + y, "sub": x - y, "mul": x * y, "div": x // y if y and x % y == 0 else -1}[op]
        res.append(forced_value if i == forced_step else r)
    return res


def test_swap_targets_are_the_counterfactual_program(tiny_run):
    """Every swapped row's answer and later latent targets = its program with step p-1 forced to
    the donor's value at p-1 (the donor's answer past its last step); other rows are unchanged."""
    from latentpatch.training.interchange import plan_swap

    out, _ = tiny_run
    codec = Codec.from_dir(out)
    K = 4
    probs = generate_problems(64, seed=11)
    b = make_batch(probs, codec, num_latent=K)
    number_at = 1 + len(codec.encode("The answer is: "))
    checked = 0
    for seed in range(6):
        torch.manual_seed(seed)
        swap = plan_swap(b, codec, 0.7, K)
        p = swap.position
        for i, prob in enumerate(probs):
            if not swap.rows[i]:
                assert torch.equal(swap.answer_ids[i], b.a_ids[i])
                continue
            donor = probs[int(swap.donor[i])]
            d_res = _plain_results(donor.program)
            v = d_res[min(p - 1, len(d_res) - 1)]
            res = _plain_results(prob.program, p - 1, v)
            values = (res + [res[-1]] * K)[:K]  # past the last step the thoughts hold the answer
            if p - 1 >= len(res):  # the swapped thought held the answer: the new value is the answer
                values[p - 1 :] = [v] * (K - p + 1)
            answer = values[-1]
            assert codec.decode([int(swap.answer_ids[i, number_at])]) == str(answer)
            assert int(swap.answer_labels[i, number_at]) == int(swap.answer_ids[i, number_at])
            got = [codec.decode([int(t)]) for t in swap.latent_targets[i, p:]]
            assert got == [str(x) for x in values[p:]]
            assert torch.equal(swap.latent_targets[i, :p], b.latent_targets[i, :p])
            checked += 1
    assert checked > 50


def test_same_value_donors_hold_the_rows_value_and_keep_its_targets(tiny_run):
    """``swap_same_value`` 1: a swapped row whose batch has another row with its value at the
    swapped thought gets such a donor (checked with a plain recomputation of both programs), and
    its targets stay its own; with 0 the donors are those of the plain draw (same RNG use)."""
    from latentpatch.training.interchange import plan_swap

    out, _ = tiny_run
    codec = Codec.from_dir(out)
    K = 4
    probs = generate_problems(64, seed=11)
    b = make_batch(probs, codec, num_latent=K)
    matched = 0
    for seed in range(6):
        torch.manual_seed(seed)
        plain = plan_swap(b, codec, 0.7, K)
        torch.manual_seed(seed)
        again = plan_swap(b, codec, 0.7, K, same_value=0.0)
        assert torch.equal(plain.donor, again.donor) and torch.equal(plain.rows, again.rows)
        torch.manual_seed(seed)
        swap = plan_swap(b, codec, 0.7, K, same_value=1.0)
        p = swap.position

        def value(prob, p=p):
            res = _plain_results(prob.program)
            return res[min(p - 1, len(res) - 1)]

        for i, prob in enumerate(probs):
            has_partner = any(value(q) == value(prob) for j, q in enumerate(probs) if j != i)
            if not swap.rows[i] or not has_partner:
                continue
            donor = int(swap.donor[i])
            assert donor != i and value(probs[donor]) == value(prob)
            assert torch.equal(swap.answer_ids[i], b.a_ids[i])
            assert torch.equal(swap.latent_targets[i], b.latent_targets[i])
            matched += 1
    assert matched > 20


def test_swap_positions_limit_the_swapped_thought(tiny_run):
    """``positions`` restricts the drawn thought; the default draw is the one of 1..K-1."""
    from latentpatch.training.interchange import plan_swap

    out, _ = tiny_run
    codec = Codec.from_dir(out)
    b = make_batch(generate_problems(32, seed=4), codec, num_latent=4)
    drawn = set()
    for seed in range(12):
        torch.manual_seed(seed)
        assert plan_swap(b, codec, 0.9, 4, positions=[2]).position == 2
        torch.manual_seed(seed)
        default = plan_swap(b, codec, 0.9, 4).position
        torch.manual_seed(seed)
        assert plan_swap(b, codec, 0.9, 4, positions=[1, 2, 3]).position == default
        drawn.add(default)
    assert drawn == {1, 2, 3}


def test_collected_stages_keep_each_stages_command_and_log(tiny_run, tmp_path):
    """``scripts/collect_stages.py`` (how the shipped model's directory is made from its stages): the
    last stage's weights, every stage's log lines tagged with their stage, and for each stage a
    command that rebuilds its settings from ``latentpatch train``'s defaults."""
    import dataclasses
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "collect_stages.py"
    spec = importlib.util.spec_from_file_location("collect_stages", script)
    assert spec is not None and spec.loader is not None
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)

    stage1, _ = tiny_run
    stage2 = tmp_path / "stage2"
    train(TrainConfig(**{**TINY, "steps": 3, "seed": 5, "lr": 1e-3, "init_from": str(stage1)}), stage2, progress=False)
    out = tmp_path / "model"
    collect.main(out, [stage1, stage2])

    assert (out / "model.safetensors").read_bytes() == (stage2 / "model.safetensors").read_bytes()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    own = [len((d / "train_log.jsonl").read_text().splitlines()) for d in (stage1, stage2)]
    assert [r["stage"] for r in log] == [1] * own[0] + [2] * own[1]
    stages = json.loads((out / "latentpatch.json").read_text())["training"]["stages"]
    assert [s["stage"] for s in stages] == [1, 2]
    types = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    for st in stages:
        words = st["command"].split()
        assert words[:4] == ["latentpatch", "train", "--out", f"stage{st['stage']}"]
        given = {}
        for flag, value in zip(words[4::2], words[5::2]):  # this recipe has no bool flags
            name = flag[2:].replace("-", "_")
            given[name] = value if name == "init_from" else types[name](value)
        rebuilt = dataclasses.asdict(TrainConfig(**given))
        settings = st["settings"]
        for name in rebuilt:
            if name in settings and name not in ("init_from", "ckpt_every"):
                assert rebuilt[name] == settings[name], (st["stage"], name)
        assert given.get("init_from", "") == ("stage1" if st["stage"] == 2 else "")
