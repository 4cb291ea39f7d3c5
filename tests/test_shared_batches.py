"""Several pairs in one engine batch (``sweep_pairs``): the same bits as each pair alone, the same
numbers as the plain reference, and a run that shares batches writes the same files."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from test_engine import assert_close_cells

from latentpatch.data.pairs import save_pairs
from latentpatch.data.synthetic import generate_pairs
from latentpatch.model.load import load_model
from latentpatch.model.state import stack_states
from latentpatch.names import THOUGHT_SITES
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
from latentpatch.patching.engine import (
    EngineOptions,
    group_pairs,
    pairs_per_batch,
    shared_batch_key,
    sweep_fast,
    sweep_pairs,
    sweep_reference,
)
from latentpatch.patching.experiments import SpecShape, experiment_specs
from latentpatch.patching.specs import EngineConfig
from latentpatch.patching.steps import early_specs, step_pool, step_record, step_values, thought_specs
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.run import run_experiments


@pytest.fixture(scope="module")
def model():
    return load_model("default")


@pytest.fixture(scope="module")
def pairs_and_values(model):
    """Baselines of 8 synthetic pairs and each one's values: activations from the other run,
    thoughts from the step-level values (so activation, frozen, tracked, thought and early specs
    all run)."""
    bases = []
    for p in generate_pairs(8, seed=0):
        clean, corr = (record_run(model, model.prompt_ids(v.question)) for v in (p.clean, p.corrupted))
        bases.append(prepare_pair(model, p.pair_id, clean, corr, p.clean.answer, p.corrupted.answer))
    recs = [(step_record(model, b.target.prompt), step_record(model, b.source.prompt)) for b in bases]
    pool = step_pool([s for _, s in recs])
    values = []
    for i, (base, (t, s)) in enumerate(zip(bases, recs)):
        acts = replacement_values(base, EngineConfig())
        steps = step_values(t, s, pool, partner=recs[(i + 1) % len(recs)][1], seed=0, pair_index=i)
        values.append(lambda spec, a=acts, st=steps: st(spec) if spec.component in THOUGHT_SITES else a(spec))
    return bases, values


def all_specs(model):
    n, k = model.n_layers, model.num_latent
    specs = [s for e in ("layer", "position", "iterative") for s in experiment_specs(e, SpecShape(n, k))]
    return specs + thought_specs(k)[::2] + early_specs(k)


def as_text(cells) -> str:
    """Every value at full precision (NaN included), for a comparison of bits."""
    return json.dumps(cells, sort_keys=True, default=str)


def test_pairs_in_one_batch_get_the_bits_they_get_alone(model, pairs_and_values, monkeypatch):
    bases, values = pairs_and_values
    keys = Counter(shared_batch_key(b, model.config.eos_id) for b in bases)
    assert max(keys.values()) >= 3  # not vacuous: several pairs do share a batch
    specs = all_specs(model)
    alone = [sweep_fast(model, b, specs, v, EngineOptions(batch_size=32)) for b, v in zip(bases, values)]

    calls = Counter()
    advance = model.advance

    def counted(state, **kwargs):
        calls[state.batch_size > 32] += 1
        return advance(state, **kwargs)

    monkeypatch.setattr(model, "advance", counted)
    together = sweep_pairs(model, bases, specs, values, EngineOptions(batch_size=32, shared_rows=1024))
    assert calls[True] > 0  # some forwards held more than one pair's chunk
    assert as_text(together) == as_text(alone)
    separate = Counter(calls)
    calls.clear()
    sweep_pairs(model, bases, specs, values, EngineOptions(batch_size=32, shared_rows=None))
    assert calls[True] == 0 and sum(calls.values()) > sum(separate.values())


def test_shared_batches_equal_the_plain_reference(model, pairs_and_values):
    """The independent computation: one full rollout per spec and plain greedy decoding."""
    bases, values = pairs_and_values
    key = Counter(shared_batch_key(b, model.config.eos_id) for b in bases).most_common(1)[0][0]
    group = [i for i, b in enumerate(bases) if shared_batch_key(b, model.config.eos_id) == key][:3]
    specs = all_specs(model)[::4]
    together = sweep_pairs(model, [bases[i] for i in group], specs, [values[i] for i in group], EngineOptions(16, 256))
    for i, cells in zip(group, together):
        ref = sweep_reference(model, bases[i], specs, values[i])
        assert_close_cells(cells, ref)
        assert [c["answer_ids"] for c in cells] == [c["answer_ids"] for c in ref]


def test_pairs_are_grouped_by_their_key_in_order(model, pairs_and_values):
    bases, _ = pairs_and_values
    order = [7, 0, 5, 2, 3, 1, 6, 4]
    groups = group_pairs(bases, order, 2, model.config.eos_id)
    assert sorted(i for g in groups for i in g) == list(range(8))
    for g in groups:
        assert 1 <= len(g) <= 2 and len({shared_batch_key(bases[i], model.config.eos_id) for i in g}) == 1
        assert g == sorted(g, key=order.index)  # each group keeps the given order
    prompt_lengths = {len(b.target.prompt) for b in bases}
    assert len(group_pairs(bases, order, 100, model.config.eos_id)) >= len(prompt_lengths)
    singles = group_pairs(bases, order, 1, model.config.eos_id)
    assert all(len(g) == 1 for g in singles) and sorted(g[0] for g in singles) == list(range(8))


def test_pairs_per_batch_counts_a_pairs_largest_chunk(model):
    specs = experiment_specs("position", SpecShape(model.n_layers, model.num_latent))  # 24 patches
    assert pairs_per_batch(specs, 64, 256) == 10
    assert pairs_per_batch(specs, 8, 256) == 32  # chunks of 8
    assert pairs_per_batch(specs, 64, None) == 1
    assert pairs_per_batch(specs[:1], 64, 256) == 1  # a batch of one row never shares
    assert pairs_per_batch(early_specs(model.num_latent), 64, 256) == 1  # early answers: per pair


def test_stack_states_keeps_each_rows_cache(model):
    a, _ = model.prefill([model.prompt_ids("Tom has 3 eggs and buys 4.")])
    b, _ = model.prefill([model.prompt_ids("Tom has 5 eggs and buys 2.")])
    assert a.length == b.length
    both = stack_states([a.fork(repeats=2), b])
    assert both.batch_size == 3 and both.length == a.length
    for layer, la, lb in zip(both.cache.layers, a.cache.layers, b.cache.layers):
        assert torch.equal(layer.keys[:2], la.keys.expand(2, -1, -1, -1)) and torch.equal(layer.values[2:], lb.values)
    assert torch.equal(both.next_position, torch.cat([a.next_position, a.next_position, b.next_position]))
    c, _ = model.prefill([model.prompt_ids("Tom has 3 eggs.")])
    with pytest.raises(ValueError, match="lengths"):
        stack_states([a, c])


def test_stack_states_cuts_and_repeats_in_one_copy(model):
    a, _ = model.prefill([model.prompt_ids("Tom has 3 eggs and buys 4.")])
    b, _ = model.prefill([model.prompt_ids("Tom has 5 eggs and buys 2.")])
    model.advance(a, inputs_embeds=model.embed_ids([7, 8], 1))  # a is now 2 tokens longer than b
    n = b.length - 1
    both = stack_states([a, b], n, [3, 2])
    assert both.batch_size == 5 and both.length == n and both.attention_mask.shape == (5, n)
    for layer, la, lb in zip(both.cache.layers, a.cache.layers, b.cache.layers):
        assert layer.keys.is_contiguous() and layer.keys.shape[2] == n
        assert torch.equal(layer.keys[:3], la.keys[:, :, :n].expand(3, -1, -1, -1))
        assert torch.equal(layer.values[3:], lb.values[:, :, :n].expand(2, -1, -1, -1))
    assert torch.equal(both.next_position, both.attention_mask.sum(1))
    with pytest.raises(ValueError, match="cannot take"):
        stack_states([a, b], a.length)


def test_a_plain_fork_shares_the_cache_and_leaves_the_original_usable(model):
    """A plain fork holds the original's tensors (no copy); advancing either leaves the other's
    cache as it was, and the original continues exactly as a deep copy of it does."""
    a, _ = model.prefill([model.prompt_ids("Tom has 3 eggs and buys 4.")] * 2)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in a.cache.layers]
    shorter, full = a.fork(length=a.length - 3), a.fork()
    assert full.cache.layers[0].keys.data_ptr() == a.cache.layers[0].keys.data_ptr()  # shared, not copied
    for f in (shorter, full):
        model.advance(f, inputs_embeds=model.embed_ids([7, 8, 9], 2))
    for layer, (k, v) in zip(a.cache.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    copy = a.fork(repeats=1, rows=torch.arange(2))  # a real copy
    h_a = model.advance(a, inputs_embeds=model.embed_ids([5], 2))
    h_copy = model.advance(copy, inputs_embeds=model.embed_ids([5], 2))
    assert torch.equal(h_a, h_copy)
    assert shorter.length == a.length - 1 and full.length == a.length + 2


def test_each_row_feeds_its_own_common_prefix_once(model):
    """Rows whose answer strings share a longer prefix within the row than across rows (two pairs,
    different digits) split where each row alone would: the same bits as each pair's rows alone,
    and no more positions fed."""
    a, _ = model.prefill([model.prompt_ids("Tom has 3 eggs and buys 4.")] * 2)
    b, _ = model.prefill([model.prompt_ids("Tom has 5 eggs and buys 2.")] * 2)
    first = torch.zeros(2, model.vocab_size)
    row_a = [[5, 6, 7, 1], [5, 6, 7, 2], [5, 6, 7, 3]]  # each row: common prefix 5 6 7
    row_b = [[5, 8, 7, 1], [5, 8, 7, 2], [5, 8, 7, 3]]
    fed = []
    real = model.advance

    def counting(state, **kw):
        x = kw.get("input_ids", kw.get("inputs_embeds"))
        fed.append(x.shape[0] * x.shape[1])
        return real(state, **kw)

    model.advance = counting
    try:
        alone = model.score(a, first, [row_a] * 2, shared_prefix=True) + model.score(b, first, [row_b] * 2, True)
        n_alone, fed[:] = sum(fed), []
        together = model.score(stack_states([a, b]), torch.cat([first, first]), [row_a] * 2 + [row_b] * 2, True)
    finally:
        del model.advance
    assert sum(fed) == n_alone == 4 * 3  # 3 prefix tokens a row, no branch left to feed
    for x, y in zip(alone, together):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_strings_that_feed_the_same_tokens_share_one_forward(model):
    """Without a common prefix (a model's own answer is text, the answers "32" and "31" are bare
    numbers), A_clean and A_corr still feed the same token "3": one forward serves both, with the
    bits of scoring each alone."""
    state, _ = model.prefill([model.prompt_ids("Tom has 3 eggs and buys 4.")] * 2)
    first = torch.zeros(2, model.vocab_size)
    strings = [[9, 3, 2], [3, 2], [3, 1]]
    fed = []
    real = model.advance

    def counting(state, **kw):
        x = kw.get("input_ids", kw.get("inputs_embeds"))
        fed.append(x.shape[0] * x.shape[1])
        return real(state, **kw)

    model.advance = counting
    try:
        out = model.score(state, first, [strings] * 2, shared_prefix=True)
    finally:
        del model.advance
    assert fed == [2 * 2, 2 * 1]  # A_base's two tokens, then "3" once for A_clean and A_corr
    for c in (1, 2):
        alone = model.score(state, first, [[strings[c]]] * 2, shared_prefix=True)
        assert all(torch.equal(out[b][c], alone[b][0]) for b in range(2))


def test_a_run_that_shares_batches_writes_the_files_of_one_pair_at_a_time(tmp_path, monkeypatch, model):
    import latentpatch.pipeline.run as run_module
    import latentpatch.pipeline.sweep as sweep_module

    pairs = tmp_path / "pairs.json"
    save_pairs(generate_pairs(8, seed=0), pairs)
    sizes: dict[str, list[int]] = {"shared": [], "alone": []}
    real = sweep_module.sweep_pairs

    runs = {}
    for name, rows in (("shared", 256), ("alone", None)):
        monkeypatch.setattr(run_module, "shared_rows", lambda *args, rows=rows, **kwargs: rows)
        monkeypatch.setattr(
            sweep_module,
            "sweep_pairs",
            lambda m, bases, *a, name=name, **k: sizes[name].append(len(bases)) or real(m, bases, *a, **k),
        )
        config = RunConfig(
            pairs=str(pairs),
            experiments=("layer", "position"),
            out=str(tmp_path / name),
            workers=1,
            report=False,
            use_cache=False,
        )
        runs[name] = run_experiments(config, model=model, progress=False, command="test")
    assert max(sizes["shared"]) > 1 and set(sizes["alone"]) == {1}
    assert sum(sizes["shared"]) == sum(sizes["alone"]) == 8
    files = sorted(p.relative_to(runs["alone"]) for p in (runs["alone"] / "results").rglob("*") if p.is_file())
    assert len(files) > 8
    for f in files:
        assert (runs["shared"] / f).read_bytes() == (runs["alone"] / f).read_bytes(), f


def test_scoring_the_common_prefix_once_gives_the_bits_of_whole_strings(model, pairs_and_values, monkeypatch):
    """The engine's default feeds "The answer is: " once per row and branches (docs/method.md §7.2):
    fewer positions, and on the CPU the same bits as feeding each answer string whole."""
    bases, values = pairs_and_values
    specs = all_specs(model)[::2]
    fed: Counter = Counter()
    advance = model.advance

    def counted(state, **kwargs):
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        fed[kwargs["mode"]] += x.shape[0] * x.shape[1]
        return advance(state, **{k: v for k, v in kwargs.items() if k != "mode"})

    for base, v in zip(bases[:3], values[:3]):
        cells = {}
        for mode, shared in (("once", True), ("whole", False)):
            monkeypatch.setattr(model, "advance", lambda state, mode=mode, **kw: counted(state, mode=mode, **kw))
            cells[mode] = sweep_fast(model, base, specs, v, EngineOptions(shared_prefix=shared))
        assert as_text(cells["once"]) == as_text(cells["whole"])
    assert fed["once"] < 0.8 * fed["whole"]
