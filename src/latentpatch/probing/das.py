"""Distributed alignment search through the latent loop (docs/method.md §20).

DAS (Geiger et al. 2023/2024) asks whether a k-dimensional subspace of one site *is used* as a
high-level value: learn an orthonormal basis ``R`` [k, d] (rows orthonormal: ``R R^T = I_k``), write

    a' = a + R^T R (s - a)            a: the base run's activation, s: the source run's, at the site

(the first k rotated coordinates of the base interchanged with the source's, the rest kept) and train
``R`` so that the intervened model gives the answer a high-level causal model predicts for that
interchange (the *counterfactual answer*). Here the write happens inside the real latent loop:
the rollout continues from the site through :meth:`LatentModel.run_thoughts`, later thoughts
regenerate from the edited one, and the gradient of the loss flows through ``prj`` and the KV cache.

Contract:

- :class:`DasSite`: a thought site (``thought``, ``thought_pre`` at thought p) or a block component
  at (layer, thought p); :func:`parse_das_sites` reads ``--das-sites``.
- :class:`Subspace`: ``R`` as an ``orthogonal`` parametrization of a ``[k, d]`` weight; its
  ``forward(base, source)`` is the interchange above; ``k = 0`` is the identity, ``k = d`` the full
  interchange (``R^T R = I`` for every orthogonal ``R``).
- :class:`DasSet`: the unpatched base and source runs of a list of (base, source, counterfactual)
  examples, run once; every forward reuses the base run's KV prefix up to the site (``fork``), since
  nothing before the site changes.
- :func:`intervened`: the answer logits of a batch of rows with an intervention at a site;
  :func:`das_loss` (cross-entropy of the counterfactual answer's number tokens, teacher-forced),
  :func:`train_subspace`, :func:`interchange_accuracy` (IIA: the greedy number equals the
  counterfactual answer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrizations

from latentpatch.errors import LatentPatchError
from latentpatch.model.config import extract_number
from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import ActivationHooks, Edit
from latentpatch.model.state import Rollout, RolloutState
from latentpatch.model.streams import pair_stream
from latentpatch.names import COMPONENTS, THOUGHT_SITES
from latentpatch.patching.metrics import same_number

#: ``fn(base [n, d], source [n, d]) -> [n, d]``: what an interchange writes at the site.
Interchange = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, order=True)
class DasSite:
    """Where DAS intervenes: ``component`` (a block component, or ``thought``/``thought_pre``: the
    fed vector / the state ``prj`` maps to it, ``layer`` -1) at thought ``position``.

    >>> str(DasSite("thought", -1, 2)), str(DasSite("resid_out", 3, 1))
    ('thought.t2', 'resid_out.L3.t1')
    """

    component: str
    layer: int
    position: int

    def __str__(self) -> str:
        if self.component in THOUGHT_SITES:
            return f"{self.component}.t{self.position}"
        return f"{self.component}.L{self.layer}.t{self.position}"

    @property
    def is_thought(self) -> bool:
        return self.component in THOUGHT_SITES


def parse_das_sites(text: str, n_layers: int, num_latent: int) -> list[DasSite]:
    """``--das-sites``: a comma list of ``thought.tP``, ``thought_pre.tP``, ``COMPONENT.LN.tP``; ``tP``
    may be ``t*`` (every thought) and ``LN`` ``L*`` (every layer). ValueError with the fix on a bad item.

    >>> [str(s) for s in parse_das_sites("thought.t*,resid_out.L1.t0", 2, 2)]
    ['thought.t0', 'thought.t1', 'resid_out.L1.t0']
    """
    sites: list[DasSite] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        parts = item.split(".")
        ok = (len(parts) == 2 and parts[0] in THOUGHT_SITES) or (len(parts) == 3 and parts[0] in COMPONENTS)
        if not ok or not parts[-1].startswith("t") or (len(parts) == 3 and not parts[1].startswith("L")):
            raise ValueError(
                f"site {item!r}: use thought.tP, thought_pre.tP or COMPONENT.LN.tP (COMPONENT one of "
                f"{', '.join(COMPONENTS)}; P or N may be *)"
            )
        positions = _indices(parts[-1][1:], num_latent, item, "thought")
        layers = [-1] if len(parts) == 2 else _indices(parts[1][1:], n_layers, item, "layer")
        sites += [DasSite(parts[0], layer, p) for layer in layers for p in positions]
    if not sites:
        raise ValueError("no site given: use e.g. thought.t1 or resid_out.L2.t*")
    return list(dict.fromkeys(sites))


def _indices(text: str, n: int, item: str, what: str) -> list[int]:
    if text == "*":
        return list(range(n))
    if not text.isdigit() or int(text) >= n:
        raise ValueError(f"site {item!r}: {what} {text!r} is not in 0..{n - 1}")
    return [int(text)]


def orthonormal_rows(d: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[k, d] a seeded random matrix with orthonormal rows (QR of a Gaussian, float64 then cast).

    >>> r = orthonormal_rows(5, 2, 0, torch.float64)
    >>> torch.allclose(r @ r.T, torch.eye(2, dtype=torch.float64))
    True
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, max(k, 1), generator=g, dtype=torch.float64))
    return q[:, :k].T.contiguous().to(dtype)


class Subspace(nn.Module):
    """A k-dimensional subspace of a d-dimensional site, its basis ``R`` [k, d] kept orthonormal by
    ``torch.nn.utils.parametrizations.orthogonal`` (the trained parameters are unconstrained), seeded.

    >>> s = Subspace(4, 2, seed=0, dtype=torch.float64)
    >>> base, source = torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64)
    >>> moved = s(base, source)  # base + R^T R (source - base): the projection of source on the subspace
    >>> torch.allclose(moved, source @ s.basis.T @ s.basis)
    True
    """

    def __init__(self, d: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not 0 <= k <= d:
            raise ValueError(f"k must be in 0..{d}, got {k}")
        self.d, self.k = d, k
        # torch's parametrization completes the basis to a d x d start with its global RNG: seeded here,
        # and torch's own RNG state left as it was, so the fit depends on ``seed`` only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.rotation = nn.Linear(d, max(k, 1), bias=False, dtype=dtype)
            if k:
                with torch.no_grad():
                    self.rotation.weight.copy_(orthonormal_rows(d, k, seed, dtype))
                parametrizations.orthogonal(self.rotation)

    @property
    def basis(self) -> torch.Tensor:
        """[k, d] the orthonormal rows ``R`` (``k = 0``: an empty [0, d])."""
        if not self.k:
            return self.rotation.weight.new_zeros(0, self.d)
        return self.rotation.weight

    def forward(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``base + R^T R (source - base)`` for ``base``/``source`` [n, d] (in ``R``'s dtype)."""
        if not self.k:
            return base
        r = self.basis.to(base.dtype)
        return base + ((source - base) @ r.T) @ r


def full_interchange(base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """k = d: the whole site takes the source's value (what patching the site writes)."""
    return source.to(base.dtype)


@dataclass(frozen=True)
class Example:
    """One interchange: the base and source prompts (ids with separators), the counterfactual answer
    the high-level model predicts, and the base problem's group (splits keep a group on one side).
    A random feedback's runs draw from their group's stream (base: ``group``, source:
    ``source_group``, "" for the base's; :func:`~latentpatch.model.streams.pair_stream`, §21)."""

    base: tuple[int, ...]
    source: tuple[int, ...]
    counterfactual: float
    group: str
    source_group: str = ""


class DasSet:
    """The unpatched base and source runs of ``examples`` (one batched rollout each, no gradients),
    the values at ``sites`` of the source runs, and each counterfactual's answer ids.

    ``forward`` rows fork the base run's cache up to the site: the prefix is computed once.
    """

    def __init__(self, model: LatentModel, examples: Sequence[Example], sites: Sequence[DasSite]) -> None:
        self.model, self.examples = model, list(examples)
        record = sorted({(s.component, s.layer) for s in sites if not s.is_thought})
        base_keys = [pair_stream(e.group) for e in examples]  # each problem's own draw stream (§21)
        src_keys = [pair_stream(e.source_group or e.group) for e in examples]
        self.base: Rollout = model.rollout([list(e.base) for e in examples], record=record, streams=base_keys)
        src = model.rollout([list(e.source) for e in examples], record=record, streams=src_keys)
        self.source_values: dict[DasSite, torch.Tensor] = {}  # site -> [n, d]
        for s in sites:
            self.source_values[s] = _site_values(src, s)
        self.targets = [model.answer_ids(e.counterfactual) for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def base_value(self, site: DasSite) -> torch.Tensor:
        """[n, d] the base runs' values at ``site``."""
        return _site_values(self.base, site)


def _site_values(r: Rollout, site: DasSite) -> torch.Tensor:
    if site.component == "thought":
        return r.thoughts[:, site.position]
    if site.component == "thought_pre":
        return r.thought_source_hidden()[:, site.position]
    assert r.hooks is not None
    return r.hooks.recorded(site.component, site.layer)[:, r.latent_index(site.position)]


def intervened(
    data: DasSet, site: DasSite, rows: torch.Tensor, fn: Interchange, source: torch.Tensor | None = None
) -> tuple[RolloutState, torch.Tensor]:
    """(state after the answer start, answer logits [n, V]) of base rows ``rows`` [n] with ``fn(base
    value, source value)`` written at ``site``; ``source`` [n, d] overrides the source values. The
    prefix (prompt + thoughts 0..p-1) is the base run's cache; thought p on runs through the one
    latent loop, so later thoughts regenerate and gradients reach ``fn``'s parameters through ``prj``
    and the KV cache (call inside ``model.grad_mode(True)`` to train)."""
    model, base, p = data.model, data.base, site.position
    n = int(rows.numel())
    src = data.source_values[site][rows] if source is None else source
    state = base.state.fork(length=base.latent_index(p), rows=rows)
    hooks = None
    if site.component == "thought_pre":
        first = model.feedback.feed(fn(base.thought_source_hidden()[rows, p], src), p, state.streams)  # (§21)
    elif site.component == "thought":
        first = fn(base.thoughts[rows, p], src)
    else:
        first = base.thoughts[rows, p]
        index = torch.full((n,), base.latent_index(p), dtype=torch.long)
        edit = Edit(site.component, site.layer, index, torch.ones(n, dtype=torch.bool), lambda a, b: fn(a, src[b]))
        hooks = ActivationHooks(model.lm, writes=[edit])
    with hooks if hooks is not None else nullcontext():
        model.run_thoughts(state, first, p, hooks=hooks)
        end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), n), hooks=hooks)
    return state, model.logits(end[:, -1])


def das_loss(
    data: DasSet, site: DasSite, rows: torch.Tensor, fn: Interchange, targets: Sequence[int] | None = None
) -> torch.Tensor:
    """Mean over rows of the cross-entropy of the counterfactual answer's number tokens (teacher-forced
    after the intervention); ``targets`` [n] picks another example's counterfactual for each row
    (the label-shuffled control)."""
    model = data.model
    which = rows.tolist() if targets is None else list(targets)
    answers = [data.targets[i] for i in which]
    state, logits = intervened(data, site, rows, fn)
    scored = model.score(state, logits, [[ids] for ids, _ in answers], grad=torch.is_grad_enabled())
    losses = []
    for (ids, start), out in zip(answers, scored):
        tok = torch.tensor(ids[start:], device=out[0].device)
        losses.append(nn.functional.cross_entropy(out[0][start:].double(), tok))
    return torch.stack(losses).mean()


@dataclass
class Training:
    """The settings of one DAS fit (saved with the subspace)."""

    steps: int = 100
    batch: int = 16
    lr: float = 0.01
    seed: int = 0


#: ``loss(fn, rows [n], targets or None) -> 0-dim tensor``: the objective :func:`fit_subspace` minimises.
Objective = Callable[[Interchange, torch.Tensor, "list[int] | None"], torch.Tensor]


def fit_subspace(
    d: int, k: int, n: int, loss: Objective, settings: Training, shuffle_labels: bool = False
) -> tuple[Subspace, list[float]]:
    """Fit ``R`` [k, d] with Adam on seeded minibatches of ``n`` examples of ``loss``; ``shuffle_labels``:
    each row is asked for a seeded permutation's target instead (the control). Returns the subspace and
    the loss per step; ``k`` 0 or ``d`` is returned untrained (the identity; every rotation gives
    ``R^T R = I``)."""
    sub = Subspace(d, k, seed=settings.seed, dtype=torch.float32)
    losses: list[float] = []
    if k in (0, d):
        return sub, losses
    g = torch.Generator().manual_seed(settings.seed)
    perm = torch.randperm(n, generator=g).tolist() if shuffle_labels else None
    opt = torch.optim.Adam(sub.parameters(), lr=settings.lr)
    for _ in range(settings.steps):
        rows = torch.randperm(n, generator=g)[: settings.batch]
        targets = None if perm is None else [perm[i] for i in rows.tolist()]
        with torch.enable_grad():
            value = loss(sub, rows, targets)
            opt.zero_grad()
            value.backward()
        opt.step()
        losses.append(float(value.detach()))
    return sub, losses


def train_subspace(
    data: DasSet, site: DasSite, k: int, settings: Training, shuffle_labels: bool = False
) -> tuple[Subspace, list[float]]:
    """:func:`fit_subspace` of :func:`das_loss` at ``site`` of the model's latent loop (the model's own
    parameters frozen meanwhile: ``grad_mode``)."""
    model = data.model

    def loss(fn: Interchange, rows: torch.Tensor, targets: list[int] | None) -> torch.Tensor:
        with model.grad_mode(True):
            return das_loss(data, site, rows, fn, targets)

    return fit_subspace(model.d_model, k, len(data), loss, settings, shuffle_labels)


@torch.no_grad()
def interchange_answers(data: DasSet, site: DasSite, fn: Interchange, batch: int = 32) -> list[float | None]:
    """The greedy numeric answer of every example of ``data`` with ``fn`` at ``site`` (None: no number)."""
    model = data.model
    out: list[float | None] = []
    for start in range(0, len(data), batch):
        rows = torch.arange(start, min(start + batch, len(data)))
        state, logits = intervened(data, site, rows, fn)
        out += [extract_number(model.decode(ids)) for ids in model.generate(state, logits)]
    return out


def interchange_accuracy(data: DasSet, site: DasSite, fn: Interchange, batch: int = 32) -> list[bool]:
    """Per example: does the intervened model answer the counterfactual (IIA's terms)?"""
    preds = interchange_answers(data, site, fn, batch)
    return [same_number(p, e.counterfactual) for p, e in zip(preds, data.examples)]


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[min(ka, kb)] principal angles (radians, ascending) between the row spaces of ``a`` [ka, d] and
    ``b`` [kb, d].

    >>> e = torch.eye(3, dtype=torch.float64)
    >>> [round(float(x), 4) for x in principal_angles(e[:2], e[[1, 2]])]
    [0.0, 1.5708]
    """
    qa, _ = torch.linalg.qr(a.double().T)
    qb, _ = torch.linalg.qr(b.double().T)
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.sort(torch.arccos(cos)).values


def mean_or_nan(xs: Sequence[float | bool]) -> float:
    """The mean of ``xs`` as a float (NaN when empty)."""
    return float(sum(float(x) for x in xs) / len(xs)) if xs else math.nan


def read_subspace(path: str | Path) -> tuple[torch.Tensor, dict]:
    """(the basis ``R`` [k, d], its settings) of a saved DAS subspace (``results/das/<site>.k<k>.safetensors``);
    a file that is not one is a LatentPatchError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {})["latentpatch"])
            return f.get_tensor("basis"), info
    except Exception as ex:
        raise LatentPatchError(
            f"{path}: not a DAS subspace ({type(ex).__name__}); fix: give a results/das/<site>.k<k>.safetensors file"
        ) from None


def subspace_direction(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """[L, K, d] a one-dimensional DAS subspace's basis vector at every site, as a steering direction (its
    sign is arbitrary: steering's negative alphas cover the other one)."""
    basis, info = read_subspace(path)
    L, K, d = shape
    if basis.shape[0] != 1 or basis.shape[1] != d:
        raise LatentPatchError(
            f"--steer-vector {path}: a {basis.shape[0]}-dimensional subspace of d = {basis.shape[1]} is not one "
            f"direction of d = {d}; fix: use a k = 1 subspace of this model (--das-k 1)"
        )
    return basis[0].float().expand(L, K, d).clone()


def subspace_lines(model: LatentModel, prompt: Sequence[int], path: str | Path) -> list[str]:
    """``inspect --das FILE``: one line per thought p with the question's coordinates ``R a`` [k] in the
    saved subspace, ``a`` the activation of the subspace's component and layer at thought p (the
    subspace was learned at one of them: the file's site).

    >>> import tempfile, torch
    >>> from latentpatch.model.load import load_model
    >>> m = load_model("default")
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     f = Path(tmp) / "thought.t1.k2.safetensors"
    ...     save_subspace(f, Subspace(m.d_model, 2), {"site": "thought.t1", "k": 2, "variable": "answer"})
    ...     lines = subspace_lines(m, m.prompt_ids([5, 6, 7]), f)
    >>> len(lines) == 1 + m.num_latent, lines[1].startswith("  thought 0: [")
    (True, True)
    """
    basis, info = read_subspace(path)
    if basis.shape[1] != model.d_model:
        raise LatentPatchError(f"--das {path}: a subspace of d = {basis.shape[1]}, not this model's {model.d_model}")
    name = str(info.get("site", ""))
    parts = name.split(".")
    component = parts[0]
    layer = int(parts[1][1:]) if len(parts) == 3 else -1
    site = DasSite(component, layer, 0)
    record = [] if site.is_thought else [(component, layer)]
    r = model.rollout([list(prompt)], record=record)
    lines = [f"DAS subspace {name} (k {basis.shape[0]}, variable {info.get('variable')}): coordinates R a per thought"]
    for p in range(model.num_latent):
        a = _site_values(r, DasSite(component, layer, p))[0].float()
        coords = (basis.float() @ a).tolist()
        lines.append(f"  thought {p}: [" + ", ".join(f"{c:.3g}" for c in coords) + "]")
    return lines


def save_subspace(path: str | Path, sub: Subspace, info: dict) -> None:
    """The basis ``R`` [k, d] as tensor ``basis``, ``info`` (site, k, variable, training settings) as JSON
    under the metadata key ``latentpatch``; atomic. :func:`read_subspace` reads it back."""
    from safetensors.torch import save

    from latentpatch.files import atomic_write_bytes

    tensors = {"basis": sub.basis.detach().float().contiguous()}
    atomic_write_bytes(path, save(tensors, metadata={"latentpatch": json.dumps(info, sort_keys=True)}))
