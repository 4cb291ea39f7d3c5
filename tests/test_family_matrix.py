"""Every family x every experiment (issue #31, "Tests": a parametrised smoke test over families x
experiments with a few pairs).

One ``run_experiments`` per family with every experiment of :data:`~latentpatch.names.ALL_EXPERIMENTS`
it runs today (module-scoped: the whole file is a handful of runs), then one assertion per family x
experiment: the run finished, every built-in check passed, and the experiment's result table exists
and holds finite numbers in its metric columns. Where a family refuses an experiment today (PCCoT:
:func:`~latentpatch.pipeline.limits.check_pccot_run`; a family with a stop rule under the default
``--latent-count target``: :func:`~latentpatch.pipeline.latent_counts.check_latent_stops`, so CoLaR's
run uses ``--latent-count fixed``), the matrix asserts the one-line refusal, so the table documents it.

The families are built on the shipped model's trained 4-layer LM (d = 128, ``load_model("default")``),
with K = 3 thoughts (the shipped 6 halved: the step-level experiments' cells scale with K):

- ``codi``: the shipped model itself (CODI's projection);
- ``coconut``: the same LM feeding its last hidden state back (Coconut's identity feedback);
- ``soft``, ``multiplex``: Soft Thinking (paper settings) and Multiplex Thinking (width 3, seeded draws)
  over the LM's head and embeddings;
- ``colar``: CoLaR's Gaussian latent head (:func:`colar_feedback`: its mean fitted to CODI's projection,
  std exp(-3), seeded normals);
- ``pccot``: PCCoT's parallel slots (N = 3 slots, T = 2 Jacobi rounds < N: really parallel), the
  sites of the last round.

SIM-CoT's presets run CODI's and Coconut's loops (model/simcot.py: only the loaders differ), so their
rows are ``codi`` and ``coconut``.

Why own-answer pairs: ``das`` and ``probe`` need questions the model answers right, and a random tiny
model answers nothing. Built on a trained LM, every family answers the shipped pairs' questions with
*a* number (not the right one for the mixtures). Each family's pairs are the shipped pairs rewritten
with that family's own greedy answers (kept where both sides give a number and the two differ), so
every example is one the model "gets right" by construction, the flags are all False, and das
(``--das-variable answer``: the counterfactual is the source's answer) has its interchanges.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from latentpatch import names
from latentpatch.data.pairs import Pair, Variant, load_pairs
from latentpatch.data.synthetic import program_results
from latentpatch.errors import LatentPatchError
from latentpatch.model.colar import CoLaRFeedback, LatentPolicy
from latentpatch.model.feedback import IdentityFeedback
from latentpatch.model.latent import LatentModel
from latentpatch.model.load import load_model
from latentpatch.model.mixture import MULTIPLEX_DEFAULT, SOFT_THINKING_PAPER, MultiplexFeedback, SoftThinkingFeedback
from latentpatch.model.pccot import PCCOT_EXPERIMENTS, PCCoTModel
from latentpatch.model.stops import stop_rule_of
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.run import run_experiments
from latentpatch.pipeline.selection import default_pairs_path

FAMILIES = ("codi", "coconut", "soft", "multiplex", "colar", "pccot")
N_PAIRS = 4  # das holds out ceil(30 %) of the pairs and draws its test interchanges across two of them
#: thoughts per run (the shipped model's 6 halved: every step-level experiment's cells scale with K)
K = 3
#: the ridge of the CoLaR head's fit (large enough that its weights stay small: fp32 noise is not amplified)
RIDGE = 10.0
#: experiment -> (result file under results/, (column, value) selecting its rows or None, metric columns
#: that must be finite in every selected row)
OUTPUTS: dict[str, tuple[str, tuple[str, str] | None, tuple[str, ...]]] = {
    "layer": ("cells.parquet", ("experiment", "layer"), ("kl", "answer_logit_diff")),
    "position": ("cells.parquet", ("experiment", "position"), ("kl", "answer_logit_diff")),
    "iterative": ("cells.parquet", ("experiment", "iterative"), ("kl", "answer_logit_diff")),
    "thought": (names.STEPS_FILE, ("experiment", "thought"), ("kl", "answer_logit_diff")),
    "early": (names.STEPS_FILE, ("experiment", "early"), ("kl", "answer_logit_diff")),
    "intermediate": (names.STEPS_FILE, ("experiment", "intermediate"), ("kl", "answer_logit_diff")),
    "influence": (names.INFLUENCE_FILE, None, ("kl", "thought_cos")),
    "lens": (names.LENS_FILE, None, ("prob",)),
    "attention": (names.ATTENTION_FILE, None, ("weight",)),
    "atp": (names.ATP_FILE, None, ("atp", "atp_attention")),
    "probe": (names.PROBES_FILE, None, ("accuracy",)),
    "steer": (names.STEER_FILE, None, ("kl", "answer_logit_diff")),
    "edges": (names.EDGES_FILE, None, ("kl", "answer_logit_diff")),
    "das": (names.DAS_FILE, ("method", "das"), ("train_loss", "counterfactual")),  # the trained subspace's rows
}

#: the smallest settings of the experiments that have their own options (one site, one k, a few steps)
SMALL: dict[str, dict[str, Any]] = {
    "probe": {"probe_min_count": 2},
    "steer": {"steer_layers": "1", "steer_alphas": "1", "steer_controls": 1},
    "das": {"das_sites": "thought.t1", "das_k": "1", "das_steps": 3, "das_variable": "answer", "das_pairs": 8},
    "atp": {"atp_exact_pairs": 1},
}


def test_every_experiment_has_an_output_entry():
    assert set(OUTPUTS) == set(names.ALL_EXPERIMENTS)


def build_family(family: str, base: LatentModel) -> LatentModel:
    """The family's model on the shipped LM (module docstring)."""
    cfg, tok, lm = base.config, base.tokenizer, base.lm
    vocab = min(cfg.pad_id, cfg.bot_id, cfg.eot_id)  # the real tokens: the specials come after them
    if family == "codi":
        return base
    if family == "coconut":
        return LatentModel(lm, IdentityFeedback(), cfg, tok, name="coconut:default")
    if family == "soft":
        return LatentModel(lm, SoftThinkingFeedback(SOFT_THINKING_PAPER, vocab).bind(lm), cfg, tok, name="soft:default")
    if family == "multiplex":
        fb = MultiplexFeedback(MULTIPLEX_DEFAULT, vocab).bind(lm)
        return LatentModel(lm, fb, cfg, tok, name="multiplex:default")
    if family == "colar":
        return LatentModel(lm, colar_feedback(base), cfg, tok, name="colar:default")
    if family == "pccot":
        return PCCoTModel(lm, base.feedback, cfg, tok, name="pccot:default", rounds=2, latent_id=cfg.bot_id)
    raise AssertionError(family)


def colar_feedback(base: LatentModel) -> CoLaRFeedback:
    """CoLaR's Gaussian head on the shipped LM, its mean fitted (ridge, closed form) to the shipped
    model's projection at the LM's latent states, a small std (exp(-3)) and the scale 1.

    Why fitted: a random head feeds vectors the LM ignores (zeroing them changed none of the answers,
    so the ``live_thoughts`` check rightly failed); fitted, the thoughts are CODI's plus seeded noise,
    and every draw still comes from the stream.
    """
    torch.manual_seed(0)
    policy = LatentPolicy(base.d_model, 2 * base.d_model).eval()
    questions = [q for p in load_pairs(default_pairs_path()) for q in (p.clean.question, p.corrupted.question)]
    with torch.no_grad():
        h = base.rollout(questions).latent_hidden.flatten(0, 1)  # [n, d] what the head reads
        z = torch.cat([policy.fc(h), torch.ones(len(h), 1)], 1).double()  # [n, i + 1]
        target = base.feedback(h).double()  # [n, d] CODI's thoughts from those states
        w = torch.linalg.solve(z.T @ z + RIDGE * torch.eye(z.shape[1], dtype=z.dtype), z.T @ target)  # [i + 1, d]
        policy.mean.weight.copy_(w[:-1].T)
        policy.mean.bias.copy_(w[-1])
        policy.log_std.weight.zero_()
        policy.log_std.bias.fill_(-3.0)
    # vocab: the head's every row (CoLaR's stop token is drawn over the resized vocabulary, [PAD] included)
    return CoLaRFeedback(policy, 1.0, int(base.lm.get_output_embeddings().weight.shape[0]))


def own_answer_pairs(model: LatentModel, n: int) -> list[Pair]:
    """The first ``n`` shipped pairs whose two questions the model answers with two different numbers,
    rewritten with those answers (the module docstring says why)."""
    out: list[Pair] = []
    pairs = load_pairs(default_pairs_path())
    for start in range(0, len(pairs), 16):
        chunk = pairs[start : start + 16]
        preds = model.answer([p.clean.question for p in chunk] + [p.corrupted.question for p in chunk])
        for i, pair in enumerate(chunk):
            a, b = preds[i], preds[i + len(chunk)]
            if a is None or b is None or a == b or not (abs(a) < 1e6 and abs(b) < 1e6):
                continue
            own = [int(x) if float(x).is_integer() else float(x) for x in (a, b)]
            clean, corrupted = (
                Variant(v.question, answer, {**v.extra, "intermediates": _steps(v)})
                for v, answer in zip((pair.clean, pair.corrupted), own)
            )
            out.append(Pair(pair.pair_id, clean, corrupted, pair.raw_id))
            if len(out) == n:
                return out
    return out


def _steps(v: Variant) -> list[int | float]:
    """The question's step results but the last (the true answer, which the own answer replaces): the
    ``intermediate`` experiment's donors and the probes' labels (the shipped pairs carry only ``program``)."""
    return list(program_results(v.extra["program"]) or [])[:-1]


def family_experiments(model: LatentModel) -> tuple[str, ...]:
    if isinstance(model, PCCoTModel):
        return tuple(e for e in names.ALL_EXPERIMENTS if e in PCCOT_EXPERIMENTS)
    return names.ALL_EXPERIMENTS


@pytest.fixture(scope="module")
def base() -> LatentModel:
    return load_model("default", num_latent=K)


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory) -> Callable[[str], dict[str, Any]]:
    """family -> {model, pairs, out (run directory), refused (the refusal's message or None)}, each
    family's run made once on first use."""
    made: dict[str, dict[str, Any] | BaseException] = {}

    def get(family: str) -> dict[str, Any]:
        if family not in made:  # a failed run is kept too: its experiments fail without running it again
            try:
                made[family] = _run_family(family, base, tmp_path_factory.mktemp(family))
            except Exception as err:
                made[family] = err
        run = made[family]
        if isinstance(run, BaseException):
            raise run
        return run

    return get


def _run_family(family: str, base: LatentModel, tmp: Path) -> dict[str, Any]:
    model = build_family(family, base)
    pairs = own_answer_pairs(model, N_PAIRS)
    assert len(pairs) == N_PAIRS, f"{family}: only {len(pairs)} shipped pairs answered with two numbers"
    experiments = family_experiments(model)
    options = {k: v for e in experiments for k, v in SMALL.get(e, {}).items()}
    config = RunConfig(
        experiments=experiments,
        out=str(tmp / "run"),
        report=False,
        use_cache=False,
        threads=1,
        workers=1,
        check_cells=4,
        thoughts_pairs=1,
        **options,
    )
    counts_refused = None
    if stop_rule_of(model) is not None:  # CoLaR: per-pair latent counts run the sweeps only (method §22)
        with pytest.raises(LatentPatchError) as err:
            run_experiments(config, model=model, pairs=pairs, progress=False, command="test")
        counts_refused = str(err.value)
        config = dataclasses.replace(config, latent_count="fixed")
    out = run_experiments(config, model=model, pairs=pairs, progress=False, command="test")
    refused = None
    left = tuple(e for e in names.ALL_EXPERIMENTS if e not in experiments)
    if left:
        with pytest.raises(LatentPatchError) as err:
            run_experiments(
                RunConfig(experiments=left, out=str(tmp / "refused"), use_cache=False),
                model=model,
                pairs=pairs,
                progress=False,
                command="test",
            )
        refused = str(err.value)
    return {"model": model, "pairs": pairs, "out": out, "refused": refused, "counts_refused": counts_refused}


@pytest.mark.parametrize("family", FAMILIES)
def test_run_finishes_with_every_check_passing(runs, family):
    run = runs(family)
    manifest = json.loads((run["out"] / "manifest.json").read_text())
    assert manifest["status"] == "complete", manifest.get("status")
    checks = manifest["checks"]
    assert checks and all(c["passed"] for c in checks.values()), checks
    cells = pd.read_parquet(run["out"] / "results" / "cells.parquet")
    assert not cells["flagged"].any()  # own-answer pairs: the model "gets" every side
    if run["counts_refused"] is not None:  # a family with a stop rule: every experiment but the sweeps refused
        message = run["counts_refused"]
        assert "\n" not in message and "fix: add --latent-count fixed" in message
        named = message.split(":")[0].removeprefix("--experiments ").split(",")
        assert set(named) == set(names.ALL_EXPERIMENTS) - {"layer", "position", "iterative"}


@pytest.mark.parametrize("experiment", names.ALL_EXPERIMENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_experiment_output(runs, family, experiment):
    run = runs(family)
    if experiment not in family_experiments(run["model"]):
        message = run["refused"]
        assert message is not None and "\n" not in message and "fix:" in message
        assert f"--experiments {','.join(e for e in names.ALL_EXPERIMENTS if e not in PCCOT_EXPERIMENTS)}:" in message
        assert experiment in message.split(":")[0].split(" ")[1].split(",")
        return
    file, tag, columns = OUTPUTS[experiment]
    path = run["out"] / "results" / file
    assert path.is_file(), path
    table = pd.read_parquet(path)
    if tag is not None:
        table = table[table[tag[0]] == tag[1]]
    assert len(table) > 0, f"{family}/{experiment}: no rows in {file}"
    for column in columns:
        values = table[column].astype(float)
        assert values.map(math.isfinite).all(), f"{family}/{experiment}: {column} not finite: {values.tolist()}"
