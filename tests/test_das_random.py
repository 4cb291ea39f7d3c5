"""DAS on a random family (issue #31; docs/method.md §20, §21): Multiplex Thinking draws at every latent
step, so an interchange's base, source and intervened runs must meet the same draws (common random
numbers), else an IIA measures sampling noise.

On Multiplex over the shipped model's LM (width 3, temperature 4: which ids are drawn depends on the
draws; 4 thoughts, sites at thought 1, so two later steps draw), each against a plain computation
written here:

- the DasSet's base and source runs equal plain ``model.rollout`` runs of the same prompts (bitwise);
- k = 0 equals the base run, and an interchange that writes the base's own value changes nothing
  (the intervened run restarts at the site and meets the later steps' draws of the base run);
- k = d at a block site equals the run with that site overwritten (``model.rollout`` with a ``Write``),
  and its greedy answers equal the engine's whole-site patch (``sweep_fast``, a position spec with the
  source's values) of each (source -> base) pair;
- at thought sites, k = d equals the run with the thought overridden by the source's;
- the test can fail: another seed's draws give other answer logits, and the site matters.

Each problem's runs draw from its group's stream (``pair_stream(group)``; a source without its own
``source_group`` draws from the base's group's stream, as a pair's clean and corrupted runs share one):
the plain runs here pass those keys.
"""

from __future__ import annotations

import pytest
import torch

from latentpatch.model.latent import LatentModel
from latentpatch.model.load import load_model
from latentpatch.model.mixture import MULTIPLEX_DEFAULT, MixtureSettings, MultiplexFeedback
from latentpatch.model.sites import Write
from latentpatch.model.streams import pair_stream
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
from latentpatch.patching.engine import sweep_fast
from latentpatch.patching.specs import EngineConfig, PatchSpec
from latentpatch.probing.das import (
    DasSet,
    DasSite,
    Example,
    Subspace,
    full_interchange,
    interchange_answers,
    intervened,
)

QUESTIONS = [
    "A shop has 5 boxes with 4 pens in each box. It sells 6 pens. How many pens are left?",
    "Tom has 7 apples and buys 5 more. He gives 3 to Ann. How many apples does Tom have?",
    "A bus leaves with 34 passengers. At the first stop 7 people get off and 1 get on. How many are on it?",
]
SITES = [DasSite("resid_out", 1, 1), DasSite("thought", -1, 1), DasSite("thought_pre", -1, 1)]
#: Multiplex at temperature 4 (width 3, no filter): flat enough that which ids are drawn depends on the draws
#: (at J1mL1's T 1 this LM is peaked enough that another stream often draws the same ids)
FLAT = MixtureSettings(**{**MULTIPLEX_DEFAULT.__dict__, "temperature": 4.0})


def multiplex(seed: int) -> LatentModel:
    """Multiplex (:data:`FLAT`) over the shipped LM with 4 thoughts, CODI's prompt framing, the draws
    seeded by ``seed``."""
    base = load_model("default", num_latent=4)
    cfg, lm = base.config, base.lm
    vocab = min(cfg.pad_id, cfg.bot_id, cfg.eot_id)  # the real tokens (the specials follow them)
    return LatentModel(lm, MultiplexFeedback(FLAT, vocab, seed).bind(lm), cfg, base.tokenizer)


@pytest.fixture(scope="module")
def model() -> LatentModel:
    return multiplex(seed=3)


@pytest.fixture(scope="module")
def data(model):
    ids = [tuple(model.prompt_ids(q)) for q in QUESTIONS]
    examples = [Example(ids[i], ids[(i + 1) % len(ids)], 10.0 + i, str(i)) for i in range(len(ids))]
    return DasSet(model, examples, SITES)


def _bases(data) -> list[list[int]]:
    return [list(e.base) for e in data.examples]


def _keys(data) -> list[int]:
    """Each example's draw stream (its group's; the source shares it: no ``source_group``)."""
    return [pair_stream(e.group) for e in data.examples]


def test_the_set_runs_are_plain_runs(model, data):
    plain = model.rollout(_bases(data), streams=_keys(data))
    assert torch.equal(data.base.thoughts, plain.thoughts)
    assert torch.equal(data.base.answer_logits, plain.answer_logits)
    src = model.rollout([list(e.source) for e in data.examples], streams=_keys(data))
    assert torch.equal(data.source_values[SITES[1]], src.thoughts[:, 1])
    # the draws matter: another seed's stream gives other thoughts after the first
    other = multiplex(seed=4).rollout(_bases(data), streams=_keys(data))
    for step in (2, 3):  # the steps after the sites: every row's thought differs under other draws
        assert ((other.thoughts[:, step] - plain.thoughts[:, step]).abs().amax(-1) > 1e-3).all()


@pytest.mark.parametrize("site", SITES, ids=str)
def test_empty_and_own_value_interchanges_are_the_base_run(model, data, site):
    rows = torch.arange(len(data))
    plain = model.rollout(_bases(data), streams=_keys(data))
    with torch.no_grad():
        _, none = intervened(data, site, rows, Subspace(model.d_model, 0))
        _, own = intervened(data, site, rows, full_interchange, source=data.base_value(site))
    torch.testing.assert_close(none, plain.answer_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(own, plain.answer_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", SITES, ids=str)
def test_full_interchange_is_the_whole_site_patch(model, data, site):
    rows, p, bases = torch.arange(len(data)), site.position, _bases(data)
    with torch.no_grad():
        _, full = intervened(data, site, rows, full_interchange)
    keys = _keys(data)
    src = model.rollout([list(e.source) for e in data.examples], record=[("resid_out", 1)], streams=keys)
    plain = model.rollout(bases, streams=keys)
    if site.is_thought:  # the thought fed at p: the source's (thought_pre: its state, through the feedback at p)
        fed = (
            src.thoughts[:, p]
            if site.component == "thought"
            else model.feedback.feed(src.thought_source_hidden()[:, p], p, keys)
        )
        over = torch.zeros(len(bases), model.num_latent, model.d_model)
        mask = torch.zeros(len(bases), model.num_latent, dtype=torch.bool)
        over[:, p], mask[:, p] = fed, True
        patched = model.rollout(bases, thought_override=over, override_mask=mask, streams=keys)
    else:
        value = src.hooks.recorded("resid_out", 1)[:, src.latent_index(p)]
        index, every = torch.full((len(bases),), plain.latent_index(p)), torch.ones(len(bases), dtype=torch.bool)
        patched = model.rollout(bases, writes=[Write("resid_out", 1, index, every, value)], streams=keys)
    torch.testing.assert_close(full, patched.answer_logits, atol=1e-4, rtol=1e-4)
    assert (patched.answer_logits - plain.answer_logits).abs().max() > 1e-2  # the site matters: the test can fail


def test_full_interchange_answers_equal_the_engines_patch(model, data):
    site = SITES[0]
    answers = interchange_answers(data, site, full_interchange)
    spec = PatchSpec("position", "single", site.component, site.layer, (site.position,), site.position)
    for i, e in enumerate(data.examples):
        # the engine's pair: the base question is the target (corrupted), the source's values patched in (clean)
        stream = pair_stream(e.group)  # the example's stream, shared by its base and source runs
        clean, corrupted = (record_run(model, list(ids), stream=stream) for ids in (e.source, e.base))
        pair = prepare_pair(model, str(i), clean, corrupted, 1.0, 2.0)
        (cell,) = sweep_fast(model, pair, [spec], replacement_values(pair, EngineConfig()))
        assert cell["pred_answer"] == answers[i] or (answers[i] is None and cell["pred_answer"] != cell["pred_answer"])
