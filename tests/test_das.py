"""Distributed alignment search (docs/method.md §20, issue #30), each part against a plain computation.

- a planted model built here (a value carried in a known 2-D subspace of one vector, noise elsewhere):
  k = 2 reaches IIA ~1 and its subspace's principal angles to the planted one are ~0; k = 1 at a vector
  that does not carry the value stays at the random rotation's level;
- the interchange inside the latent loop: k = d (the whole site) equals the run with that site
  overwritten (``model.rollout`` with a ``Write`` / a thought override), k = 0 equals the base run;
- the DAS loss's gradient matches central finite differences on the shipped model in float64;
- the shipped model, thought 1 holding intermediate 0: a short seeded run's IIA far above the random
  rotation and the shuffled-label control (its exact hit counts stored);
- the run stage: ``--experiments das`` writes das.parquet, stats.json ``das`` and the report section;
  a bad option is one line.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from latentpatch.analysis.html import fmt
from latentpatch.analysis.skeleton import lookup
from latentpatch.model.load import load_model
from latentpatch.model.sites import Write
from latentpatch.probing.das import (
    DasSet,
    DasSite,
    Example,
    Subspace,
    Training,
    das_loss,
    fit_subspace,
    full_interchange,
    intervened,
    principal_angles,
    train_subspace,
)


# ---- a planted model ------------------------------------------------------------------------------
class Planted:
    """x [n, d] = U^T (value on a circle, 2-D) + noise in U's complement; the output reads the value
    back from U's coordinates only: logits_c = scale * <U x, e_c>, e_c the circle point of value c."""

    def __init__(self, d: int = 8, classes: int = 6, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.u = q[:, :2].T.contiguous()  # [2, d] the planted subspace
        self.rest = q[:, 2:].T.contiguous()  # [d-2, d] its complement
        angles = 2 * math.pi * torch.arange(classes, dtype=torch.float64) / classes
        self.codes = torch.stack([angles.cos(), angles.sin()], 1)  # [C, 2]
        self.g, self.d, self.classes = g, d, classes

    def inputs(self, values: torch.Tensor) -> torch.Tensor:
        noise = 0.5 * torch.randn(len(values), self.d - 2, generator=self.g, dtype=torch.float64)
        return self.codes[values] @ self.u + noise @ self.rest

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return 8 * (x @ self.u.T) @ self.codes.T


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    m = Planted()
    n = 256
    base_v = torch.randint(0, m.classes, (n,), generator=m.g)
    source_v = (base_v + torch.randint(1, m.classes, (n,), generator=m.g)) % m.classes  # always another value
    site = {"base": m.inputs(base_v), "source": m.inputs(source_v)}
    # a second vector that carries nothing the output reads (pure noise)
    other = {"base": torch.randn(n, m.d, generator=m.g, dtype=torch.float64), "source": None}
    other["source"] = torch.randn(n, m.d, generator=m.g, dtype=torch.float64)
    return m, site, other, base_v, source_v


def _planted_iia(m: Planted, vecs: dict, at_site: bool, fn, rows: slice, base_v, source_v) -> float:
    """IIA of ``fn`` at the value-carrying vector (``at_site``) or at the noise vector (the output
    still reads the value-carrying one, unchanged)."""
    if at_site:
        x = fn(vecs["base"][rows], vecs["source"][rows])
    else:
        fn(vecs["base"][rows], vecs["source"][rows])  # written where the output does not read
        x = vecs["site"]["base"][rows]
    return float((m.logits(x).argmax(-1) == source_v[rows]).double().mean())


def test_planted_subspace_found(planted):
    m, site, other, base_v, source_v = planted
    test = slice(192, 256)

    def loss_at(vecs):
        def loss(fn, rows, targets):
            want = source_v[rows] if targets is None else source_v[torch.tensor(targets)]
            x = fn(vecs["base"][rows].float(), vecs["source"][rows].float()).double()
            return torch.nn.functional.cross_entropy(m.logits(x), want)

        return loss

    settings = Training(steps=200, batch=32, lr=0.05, seed=0)
    sub, losses = fit_subspace(m.d, 2, 192, loss_at(site), settings)
    iia = _planted_iia(m, site, True, lambda a, s: sub(a.float(), s.float()).double(), test, base_v, source_v)
    assert iia > 0.97, iia
    angles = principal_angles(sub.basis.detach(), m.u)
    assert float(angles.max()) < 0.1, angles
    random = Subspace(m.d, 2, seed=7)
    random_iia = _planted_iia(m, site, True, lambda a, s: random(a.float(), s.float()).double(), test, base_v, source_v)
    assert random_iia < 0.6

    # k = 1 at the vector without the value: whatever it learns, the output keeps the base value
    noise = dict(other, site=site)
    sub1, _ = fit_subspace(m.d, 1, 192, loss_at(other), Training(steps=40, batch=32, lr=0.05, seed=0))
    iia1 = _planted_iia(m, noise, False, lambda a, s: sub1(a.float(), s.float()).double(), test, base_v, source_v)
    control = _planted_iia(
        m, noise, False, lambda a, s: Subspace(m.d, 1, seed=3)(a.float(), s.float()).double(), test, base_v, source_v
    )
    assert iia1 == control == 0.0


# ---- the shipped model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return load_model("default")


def _examples(model, n: int = 4) -> list[Example]:
    qs = [
        "A farmer plants 2 rows with 3 trees in each row. 1 of the trees die, and the farmer plants 3 new trees. "
        "How many trees does the farmer have now?",
        "A shop has 5 boxes with 4 pens in each box. It sells 6 pens. How many pens are left?",
        "Tom has 7 apples and buys 5 more. He gives 3 to Ann. How many apples does Tom have?",
        "A bus leaves with 34 passengers. At the first stop 7 people get off and 1 get on. How many are on it?",
    ]
    ids = [tuple(model.prompt_ids(q)) for q in qs]
    return [Example(ids[i], ids[(i + 1) % len(ids)], 10.0 + i, str(i)) for i in range(n)]


@pytest.mark.parametrize("site", [DasSite("resid_out", 1, 2), DasSite("thought", -1, 1), DasSite("thought_pre", -1, 3)])
def test_full_and_empty_interchange(shipped, site):
    model = shipped
    examples = _examples(model)
    data = DasSet(model, examples, [site])
    rows = torch.arange(len(examples))
    src_run = model.rollout([list(e.source) for e in examples], record=[("resid_out", 1)])
    bases = [list(e.base) for e in examples]
    with torch.no_grad():
        _, logits_full = intervened(data, site, rows, full_interchange)
        _, logits_none = intervened(data, site, rows, Subspace(model.d_model, 0))
        _, logits_eye = intervened(data, site, rows, _identity_basis(model.d_model))
    # the plain computations: the whole site overwritten with the source run's value, and no intervention
    p, plain = site.position, model.rollout(bases)
    if site.component == "resid_out":
        value = src_run.hooks.recorded("resid_out", 1)[:, src_run.latent_index(p)]
        index, every = torch.full((len(bases),), plain.latent_index(p)), torch.ones(len(bases), dtype=torch.bool)
        patched = model.rollout(bases, writes=[Write("resid_out", 1, index, every, value)])
    else:
        if site.component == "thought":
            fed = src_run.thoughts[:, p]
        else:  # thought_pre: the source's pre-feedback state, through prj
            fed = model.feedback(src_run.thought_source_hidden()[:, p])
        over = torch.zeros(len(bases), model.num_latent, model.d_model)
        mask = torch.zeros(len(bases), model.num_latent, dtype=torch.bool)
        over[:, p], mask[:, p] = fed, True
        patched = model.rollout(bases, thought_override=over, override_mask=mask)
    torch.testing.assert_close(logits_full, patched.answer_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits_eye, patched.answer_logits, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(logits_none, plain.answer_logits, atol=1e-4, rtol=1e-4)
    assert (patched.answer_logits - plain.answer_logits).abs().max() > 1e-2  # the site matters: the test can fail


def _identity_basis(d: int) -> Subspace:
    """k = d with R = I (the orthogonal parametrization set to the identity)."""
    sub = Subspace(d, d, seed=0)
    with torch.no_grad():
        sub.rotation.weight = torch.eye(d)
    return sub


def test_gradient_matches_finite_differences():
    model = load_model("default", dtype=torch.float64)
    # the LM head's logits in float64 too (the model casts them to float32), so the check is float64 throughout
    model.logits = lambda h: model.lm.get_output_embeddings()(h)  # type: ignore[method-assign]
    site = DasSite("thought", -1, 1)
    data = DasSet(model, _examples(model, 2), [site])
    rows = torch.arange(2)
    # R [2, d] itself as the leaf: the gradient through the loop (prj, the KV cache, the answer) is what
    # is checked here; the orthogonal parametrization's own gradient is torch's
    param = torch.linalg.qr(
        torch.randn(model.d_model, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    )[0].T.contiguous()
    param.requires_grad_(True)

    def interchange(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return a + ((s - a) @ param.T) @ param

    def loss() -> torch.Tensor:
        with model.grad_mode(True):
            return das_loss(data, site, rows, interchange)

    value = loss()
    (grad,) = torch.autograd.grad(value, [param])
    norm = float(grad.norm())
    assert norm > 0
    u = torch.randn(param.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # along the gradient (the numeric slope must be |g|) and along a random direction (g . u, small)
    for direction, tol in ((grad / norm, 1e-3 * norm), (u, 2e-3 * norm)):
        eps = 1e-3
        with torch.no_grad():
            param.add_(eps * direction)
            up = float(loss())
            param.sub_(2 * eps * direction)
            down = float(loss())
            param.add_(eps * direction)
        numeric, analytic = (up - down) / (2 * eps), float((grad * direction).sum())
        assert abs(numeric - analytic) <= tol, (numeric, analytic)


def test_shipped_model_regression(shipped):
    """Thought 1 holds intermediate 0: trained k = 16 IIA >> random rotation and shuffled labels.
    A short seeded run; its exact held-out hit counts are stored (a change of method changes them)."""
    from latentpatch.data.pairs import load_pairs
    from latentpatch.patching.metrics import same_number
    from latentpatch.pipeline.das import draw_examples, problems_of, split_groups
    from latentpatch.pipeline.selection import default_pairs_path
    from latentpatch.probing.das import interchange_accuracy

    model = shipped
    problems = problems_of(model, load_pairs(default_pairs_path()))
    preds = model.answer([list(p.prompt) for p in problems])
    right = [p for p, a in zip(problems, preds) if same_number(a, p.answer)]
    held = split_groups([p.group for p in problems], 0)
    train = draw_examples([p for p in right if p.group not in held], ("intermediate", "0"), 48, 0)
    test = draw_examples([p for p in right if p.group in held], ("intermediate", "0"), 32, 1)
    site = DasSite("thought", -1, 1)
    tr, te = DasSet(model, train, [site]), DasSet(model, test, [site])
    settings = Training(steps=30, batch=16, lr=0.01, seed=0)
    fit, _ = train_subspace(tr, site, 16, settings)
    shuffled, _ = train_subspace(tr, site, 16, Training(30, 16, 0.01, 1), shuffle_labels=True)
    hits = {
        "das": sum(interchange_accuracy(te, site, fit)),
        "random": sum(interchange_accuracy(te, site, Subspace(model.d_model, 16, seed=1))),
        "shuffled": sum(interchange_accuracy(te, site, shuffled)),
    }
    assert hits["das"] >= hits["random"] + 8 and hits["das"] >= hits["shuffled"] + 8, hits
    assert hits == STORED, hits


#: The exact held-out hit counts (of 32) of :func:`test_shipped_model_regression`'s seeded run.
STORED = {"das": 19, "random": 0, "shuffled": 2}


# ---- the run stage ----------------------------------------------------------------------------------
def test_run_stage(tmp_path):
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.run import run_experiments

    options = dict(
        limit=10, experiments=("das",), das_sites="thought.t1", das_k="2", das_steps=3, das_pairs=8, use_cache=False
    )
    out = run_experiments(RunConfig(out=str(tmp_path / "r"), threads=1, **options), progress=False, command="test")
    import pandas as pd

    table = pd.read_parquet(out / "results" / "das.parquet")
    assert set(table["method"]) == {"das", "random", "shuffled", "full", "base"}
    assert set(table["k"]) == {0, 2, shipped_d()}
    stats = json.loads((out / "stats.json").read_text())
    das = table[(table["method"] == "das")]
    row = next(r for r in stats["das"]["summary"] if r["method"] == "das")
    assert row["mean"] == pytest.approx(das["hit"].mean()) and row["n"] == len(das)
    html = (out / "report.html").read_text()
    section = html[html.index('<section id="das"') :]
    section = section[: section.index("</section>")]
    quoted = re.findall(r'data-stat="([^"]+)"[^>]*>([^<]*)<', section)
    assert quoted  # the finding quotes its numbers, each from stats.json
    for path, text in quoted:
        assert text == fmt(lookup(stats, path)), (path, text)
    from safetensors import safe_open

    with safe_open(str(out / "results" / "das" / "thought.t1.k2.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["latentpatch"])
        assert tuple(f.get_tensor("basis").shape) == (2, shipped_d())
    assert info["site"] == "thought.t1" and info["k"] == 2 and info["variable"] == "intermediate:0"
    # --resume: the committed (site, k) files are kept, das.parquet is assembled to the same bytes
    before = (out / "results" / "das.parquet").read_bytes()
    (out / "results" / "das.parquet").unlink()
    again = RunConfig(out=str(out), threads=1, **options)
    run_experiments(again, resume=True, progress=False, command="test")
    assert (out / "results" / "das.parquet").read_bytes() == before


def test_shards_split_the_sites_and_merge_to_the_unsharded_bytes(tmp_path):
    """--shard i/2 fits the sites j with j mod 2 == i on every pair's examples; merge joins the files
    into the unsharded run's das.parquet and stats (byte for byte)."""
    from latentpatch.pipeline.config import RunConfig
    from latentpatch.pipeline.merge import merge_runs
    from latentpatch.pipeline.run import run_experiments

    options = dict(limit=10, experiments=("das",), das_sites="thought.t1,thought.t2", das_k="1", das_steps=2)
    options |= dict(das_pairs=8, use_cache=False, threads=1)
    full = run_experiments(RunConfig(out=str(tmp_path / "full"), **options), progress=False, command="test")
    shards = [
        run_experiments(RunConfig(out=str(tmp_path / f"s{i}"), shard=f"{i}/2", **options), progress=False, command="t")
        for i in range(2)
    ]
    assert [sorted(p.name for p in (s / "results" / "das").glob("*.json")) for s in shards] == [
        ["thought.t1.full.json", "thought.t1.k1.json"],
        ["thought.t2.full.json", "thought.t2.k1.json"],
    ]
    merged = merge_runs(shards, tmp_path / "merged")  # with its stats and report
    for name in ("results/das.parquet", "stats.json", "results/das/thought.t2.k1.safetensors"):
        assert (merged / name).read_bytes() == (full / name).read_bytes(), name


def shipped_d() -> int:
    return 128


def test_bad_options_are_one_line():
    from latentpatch.errors import LatentPatchError
    from latentpatch.pipeline.config import RunConfig

    with pytest.raises(LatentPatchError, match="--das-k"):
        RunConfig(experiments=("das",), das_k="0,2").validate()
    with pytest.raises(LatentPatchError, match="--das-variable"):
        RunConfig(experiments=("das",), das_variable="step:2").validate()
    with pytest.raises(LatentPatchError, match="--das-sites: site 'foo.t1'"):
        RunConfig(experiments=("das",), das_sites="thought.t1,foo.t1").validate()
    with pytest.raises(LatentPatchError, match="add das to --experiments"):
        RunConfig(das_steps=3).validate()


def test_saved_subspace_as_steering_direction(tmp_path):
    from latentpatch.errors import LatentPatchError
    from latentpatch.patching.steering import load_direction
    from latentpatch.probing.das import save_subspace

    one, two = Subspace(16, 1, seed=3), Subspace(16, 2, seed=3)
    save_subspace(tmp_path / "a.k1.safetensors", one, {"site": "resid_out.L1.t2", "k": 1})
    save_subspace(tmp_path / "a.k2.safetensors", two, {"site": "resid_out.L1.t2", "k": 2})
    v = load_direction(tmp_path / "a.k1.safetensors", (3, 4, 16))
    assert tuple(v.shape) == (3, 4, 16)
    assert torch.equal(v[2, 3], one.basis.detach()[0]) and torch.equal(v[0, 0], v[2, 1])
    with pytest.raises(LatentPatchError, match="--das-k 1"):
        load_direction(tmp_path / "a.k2.safetensors", (3, 4, 16))


def test_examples_by_variable():
    """Examples are drawn across problems, with the high-level model's counterfactual (recomputed here)."""
    from latentpatch.data.synthetic import program_results
    from latentpatch.pipeline.das import Problem, column_examples, draw_examples

    programs = [[("add", a, 2), ("mul", "#0", 3)] for a in range(1, 9)]
    problems = [
        Problem((i,), float(program_results(p)[-1]), p, tuple(program_results(p)), f"g{i // 2}", {"cf": 100 + i})
        for i, p in enumerate(programs)
    ]
    examples = draw_examples(problems, ("intermediate", "0"), 10, 0)
    assert len(examples) == 10
    for e in examples:
        b, src = problems[e.base[0]], problems[e.source[0]]
        assert b.group != src.group and e.group == b.group
        assert e.counterfactual == (src.results[0]) * 3 != b.answer  # step 0 forced, step 1 recomputed
    answers = draw_examples(problems, ("answer", ""), 5, 0)
    assert all(e.counterfactual == problems[e.source[0]].answer for e in answers)
    column = column_examples(problems, "cf")  # clean = even index, corrupted = the next one
    assert [(e.base[0], e.source[0], e.counterfactual) for e in column] == [(i, i + 1, 100 + i) for i in range(0, 8, 2)]
