"""Vocabulary-space interventions on a continuous thought (docs/method.md §13).

A thought is fed as an input *embedding*, so it can be compared with, and replaced by, what the
model's input token embeddings E [V, d] span. For the target run's thought t [d] at latent p
(site ``thought`` only: these act in the input-embedding space, never on ``thought_pre``), with
v* = argmax_v cos(t, E_v) over the vocabulary:

- ``discretize``: E[v*], the nearest token's own embedding (its own norm);
- ``discretize_norm``: E[v*] rescaled to |t|;
- ``vocab_proj``: the least-squares projection of t on the span of its top :data:`VOCAB_TOP_K`
  token embeddings by cosine, rescaled to |t| (norm kept);
- ``remove_top1``: t − (t·u) u with u = E[v*] / |E[v*]|;
- ``number:s`` / ``number_plus1:s``: E[first token of the target's intermediate s (+ 1), written as
  the answer writes it] (:meth:`~latentpatch.model.latent.LatentModel.answer_ids`).

*What the search ranges over.* Real vocabulary only: the model's latent markers and padding
(``[BOT]``, ``[EOT]``, pad; :class:`~latentpatch.model.config.LatentConfig`), ``[EOS]``, the
tokenizer's special and added-special tokens (BOS/UNK, reserved ids) and the rows of E that no
token has (a matrix padded beyond the tokenizer) are excluded. Those rows are not words a written
chain could hold: a thought "nearest to [BOT]" says nothing of its content, untrained or reserved
rows are degenerate neighbours, and feeding [EOT]/[EOS] as a thought ends the phase rather than
replacing a step. Without a tokenizer only the configured ids are excluded (and ``number`` kinds
are unavailable).

Pure functions first (tensors in, tensors out: :func:`nearest_tokens`, :func:`discretize`,
:func:`project_on_tokens`, :func:`remove_top_token`), then :class:`Vocabulary` (E, its unit rows in
float32, the excluded ids and the number tokens; built once per run) and :func:`vocab_specs`.

>>> E = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
>>> unit = unit_rows(E)
>>> nearest_tokens(torch.tensor([[0.1, 3.0]]), unit, 2).tolist()
[[1, 2]]
>>> discretize(torch.tensor([[0.1, 3.0]]), E, unit, exclude=(1,)).tolist()
[[1.0, 1.0]]
>>> remove_top_token(torch.tensor([[3.0, 4.0]]), unit, exclude=(2,)).tolist()
[[3.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import embedding_matrix
from latentpatch.names import ALL_POSITIONS, NO_LAYER, NUMBER_REPLACEMENTS, VOCAB_REPLACEMENTS, VOCAB_TOP_K
from latentpatch.patching.interventions import Replacement
from latentpatch.patching.specs import PatchSpec

#: The site the vocabulary-space replacements write (the fed input embedding).
VOCAB_SITE = "thought"


# ---- pure functions ------------------------------------------------------------------------------
def unit_rows(embeddings: torch.Tensor) -> torch.Tensor:
    """[V, d] float32 rows of ``embeddings`` [V, d] scaled to norm 1 (a zero row stays zero)."""
    return F.normalize(embeddings.detach().float(), dim=-1)


def nearest_tokens(t: torch.Tensor, unit: torch.Tensor, k: int, exclude: Sequence[int] = ()) -> torch.Tensor:
    """Ids [n, k] of the ``k`` tokens nearest each row of ``t`` [n, d] by cosine, best first.

    ``unit``: [V, d] unit rows of E (:func:`unit_rows`, on the device the search runs on);
    ``exclude``: ids never chosen. Cosines in float32; ``k`` is capped at the ids left."""
    cos = F.normalize(t.detach().float().to(unit.device), dim=-1) @ unit.T  # [n, V]
    if len(exclude):
        cos[:, list(exclude)] = -torch.inf
    return cos.topk(min(k, unit.shape[0] - len(set(exclude))), dim=-1).indices


def discretize(
    t: torch.Tensor, embeddings: torch.Tensor, unit: torch.Tensor, exclude: Sequence[int] = (), keep_norm: bool = False
) -> torch.Tensor:
    """[n, d]: the embedding of each row's nearest token (E's dtype; ``keep_norm``: float32, rescaled
    to the row's norm). ``t`` [n, d], ``embeddings`` E [V, d], ``unit`` its unit rows."""
    rows = embeddings[nearest_tokens(t, unit, 1, exclude)[:, 0].to(embeddings.device)]  # [n, d]
    if not keep_norm:
        return rows
    r = rows.float()
    scale = t.float().to(r.device).norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return r * scale


def project_on_tokens(
    t: torch.Tensor, embeddings: torch.Tensor, unit: torch.Tensor, k: int = VOCAB_TOP_K, exclude: Sequence[int] = ()
) -> torch.Tensor:
    """[n, d] float32: each row of ``t`` [n, d] projected (least squares) on the span of its ``k``
    nearest token embeddings by cosine, rescaled to the row's norm (a zero projection stays zero).

    The solve is in float64 on the CPU with the SVD driver (``gelsd``): a rank-deficient set of
    tokens is handled, and the result does not depend on the device."""
    ids = nearest_tokens(t, unit, k, exclude).to(embeddings.device)  # [n, k]
    A = embeddings[ids].detach().double().cpu().transpose(1, 2)  # [n, d, k]
    b = t.detach().double().cpu()[..., None]  # [n, d, 1]
    coef = torch.linalg.lstsq(A, b, driver="gelsd").solution  # [n, k, 1]
    proj = (A @ coef)[..., 0]  # [n, d]
    scale = b[..., 0].norm(dim=-1, keepdim=True) / proj.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return (proj * scale).float().to(t.device)


def remove_top_token(t: torch.Tensor, unit: torch.Tensor, exclude: Sequence[int] = ()) -> torch.Tensor:
    """[n, d] float32: each row of ``t`` [n, d] minus its component along its nearest token's unit
    embedding u: t − (t·u) u."""
    u = unit[nearest_tokens(t, unit, 1, exclude)[:, 0]]  # [n, d]
    tf = t.detach().float().to(u.device)
    return (tf - (tf * u).sum(-1, keepdim=True) * u).to(t.device)


# ---- the run's vocabulary ------------------------------------------------------------------------
def excluded_ids(model: LatentModel) -> tuple[int, ...]:
    """Ids the cosine search skips (module docstring): the configured pad/[BOT]/[EOT]/[EOS], the
    tokenizer's special and added-special tokens, and the rows of E beyond the tokenizer."""
    V = embedding_matrix(model.lm).shape[0]
    cfg = model.config
    ids = {cfg.pad_id, cfg.bot_id, cfg.eot_id, cfg.eos_id}
    tok = model.tokenizer
    if tok is not None:
        ids |= set(getattr(tok, "all_special_ids", []))
        ids |= {i for i, a in getattr(tok, "added_tokens_decoder", {}).items() if getattr(a, "special", False)}
        ids |= set(range(len(tok), V))
    return tuple(sorted(i for i in ids if 0 <= i < V))


def first_number_token(model: LatentModel, value: float) -> int:
    """The id of the first number token of ``value`` as the answer writes it (after the answer
    prefix: ``answer_ids``), e.g. " 24" or "2" depending on the tokenizer."""
    ids, start = model.answer_ids(value)
    if start >= len(ids):
        raise ValueError(f"the answer {value!r} has no number token")
    return ids[start]


@dataclass
class Vocabulary:
    """The input embeddings a run's vocabulary-space replacements use, built once per run (:meth:`of`).

    ``embeddings``: E [V, d] (the model's own matrix, not a copy); ``unit``: its rows scaled to norm 1,
    float32 [V, d], on the model's device; ``excluded``: ids the cosine search skips;
    ``number_token``: value -> id of its first answer token (None: no tokenizer, no ``number`` kinds).

    >>> from latentpatch.data.synthetic import generate_pairs
    >>> from latentpatch.model.load import load_model
    >>> model = load_model("default")
    >>> vocab = Vocabulary.of(model)
    >>> vocab.excluded  # <eos>, <pad>, <bot>, <eot>
    (0, 853, 854, 855)
    >>> q = generate_pairs(1, seed=0, intermediates=True)[0].clean  # steps 34-7=27, +1=28, -5=23, +9=32
    >>> t = model.rollout([model.prompt_ids(q.question)]).thoughts[0]  # [K, d]
    >>> [model.tokenizer.decode([i]) for i in nearest_tokens(t, vocab.unit, 1, vocab.excluded)[:, 0].tolist()]
    ['=', '27', '28', '23', '32', '32']
    >>> bool(torch.allclose(vocab.replace("vocab_proj", t).norm(dim=-1), t.norm(dim=-1)))
    True
    """

    embeddings: torch.Tensor
    unit: torch.Tensor
    excluded: tuple[int, ...] = ()
    number_token: Callable[[float], int] | None = None
    top_k: int = VOCAB_TOP_K
    _numbers: dict[float, int] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, model: LatentModel, top_k: int = VOCAB_TOP_K) -> Vocabulary:
        """``model``'s vocabulary (E, its unit rows, the excluded ids, its number tokens)."""
        E = embedding_matrix(model.lm).detach()
        number = None if model.tokenizer is None else (lambda v: first_number_token(model, v))
        return cls(E, unit_rows(E), excluded_ids(model), number, top_k)

    def replace(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        """[n, d]: the ``kind`` (one of :data:`VOCAB_REPLACEMENTS`) of each thought in ``t`` [n, d], in
        ``t``'s dtype and device (``discretize``: the token's embedding as E stores it)."""
        E, unit, ex = self.embeddings, self.unit, self.excluded
        if kind == "discretize":
            out = discretize(t, E, unit, ex)
        elif kind == "discretize_norm":
            out = discretize(t, E, unit, ex, keep_norm=True)
        elif kind == "vocab_proj":
            out = project_on_tokens(t, E, unit, self.top_k, ex)
        elif kind == "remove_top1":
            out = remove_top_token(t, unit, ex)
        else:
            raise ValueError(f"unknown vocabulary replacement {kind!r}; expected one of {VOCAB_REPLACEMENTS}")
        return out.to(device=t.device, dtype=t.dtype)

    def has_numbers(self) -> bool:
        """Whether ``number`` kinds can be written (the model has a tokenizer)."""
        return self.number_token is not None

    def number(self, value: float) -> torch.Tensor:
        """[d]: the input embedding of ``value``'s first answer token."""
        if self.number_token is None:
            raise ValueError("number replacements need the model's tokenizer")
        if value not in self._numbers:
            self._numbers[value] = self.number_token(value)
        return self.embeddings[self._numbers[value]]


# ---- specs and values ----------------------------------------------------------------------------
def vocab_specs(num_latent: int, n_intermediates: int = 0) -> list[PatchSpec]:
    """The thought experiment's vocabulary-space specs (site ``thought``), after its other specs:
    per :data:`VOCAB_REPLACEMENTS` kind, thought p alone then every thought (-1); then per
    intermediate s and :data:`NUMBER_REPLACEMENTS` kind, thought p alone (``number:s``).

    >>> [s.replacement for s in vocab_specs(2, 1)][-4:]
    ['number:0', 'number:0', 'number_plus1:0', 'number_plus1:0']
    """
    every = tuple(range(num_latent))
    specs = []
    for rep in VOCAB_REPLACEMENTS:
        specs += [PatchSpec("thought", "single", VOCAB_SITE, NO_LAYER, (p,), p, replacement=rep) for p in every]
        specs.append(PatchSpec("thought", "all", VOCAB_SITE, NO_LAYER, every, ALL_POSITIONS, replacement=rep))
    for s in range(n_intermediates):
        for kind in NUMBER_REPLACEMENTS:
            specs += [
                PatchSpec("thought", "single", VOCAB_SITE, NO_LAYER, (p,), p, replacement=f"{kind}:{s}") for p in every
            ]
    return specs


def is_vocab(rep: Replacement) -> bool:
    """A vocabulary-space replacement (its values need a :class:`Vocabulary`)."""
    return rep.kind in VOCAB_REPLACEMENTS or rep.kind in NUMBER_REPLACEMENTS


def runs_for(spec: PatchSpec, intermediates: Sequence[float] | None, vocab: Vocabulary | None) -> bool:
    """Whether a pair whose target run has ``intermediates`` runs ``spec``: a ``number`` kind needs
    the target's intermediate s and a vocabulary with number tokens; every other spec runs."""
    rep = spec.replacement_value
    if rep.kind not in NUMBER_REPLACEMENTS:
        return True
    s = rep.intermediate
    has_value = intermediates is not None and s is not None and s < len(intermediates)
    return has_value and vocab is not None and vocab.has_numbers()


def vocab_value(
    vocab: Vocabulary | None,
    rep: Replacement,
    site: str,
    own: torch.Tensor,
    positions: list[int],
    intermediates: Sequence[float] | None,
    memo: dict[str, torch.Tensor],
) -> torch.Tensor:
    """[len(positions), d]: what a vocabulary-space replacement feeds at ``positions``. ``own``: the
    target run's thoughts [K, d]; each kind of :data:`VOCAB_REPLACEMENTS` is computed for every
    thought once (kept in ``memo``), so "all" feeds exactly the single-step values."""
    if site != VOCAB_SITE:
        raise ValueError(f"replacement {rep.label!r} acts on the input embedding: site 'thought', not {site!r}")
    if vocab is None:
        raise ValueError(f"replacement {rep.label!r} needs the model's vocabulary")
    if rep.kind in NUMBER_REPLACEMENTS:
        s = rep.intermediate
        if s is None or intermediates is None or s >= len(intermediates):
            raise ValueError(f"replacement {rep.label!r}: the target run has no intermediate {s}")
        value = float(intermediates[s]) + (1.0 if rep.kind == "number_plus1" else 0.0)
        return vocab.number(value)[None].expand(len(positions), -1).to(device=own.device, dtype=own.dtype)
    if rep.kind not in memo:
        memo[rep.kind] = vocab.replace(rep.kind, own)
    return memo[rep.kind][positions]
