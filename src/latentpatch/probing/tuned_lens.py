"""The tuned lens (docs/method.md §14.1; Belrose et al. 2023, "Eliciting Latent Predictions from
Transformers with the Tuned Lens"): one affine translator per layer, trained so that a layer's residual
stream, translated and then read through the model's own final norm and LM head, gives the model's
final-layer distribution at the same position.

Parametrisation (the published code's residual form): layer l's translator maps ``h`` [..., d] to
``h + h A_lᵀ + b_l`` with ``A_l`` [d, d] and ``b_l`` [d] both zero at initialisation, so an untrained
lens is exactly the logit lens. Layers: ``-1`` (the fed vector: the token embedding, the thought, the
answer-start embedding; ``THOUGHT_LAYER``) and the blocks ``0..L-1``. The last block has no translator
at all: there the tuned lens *is* the logit lens, which is the model's own output.

Training (:func:`train_tuned_lens`): each question's unpatched rollout (batch of one) is recorded once,
under ``torch.no_grad``: at the prompt positions, the latent positions and the answer-start positions
(``[EOT]`` (+``[EOS]``): the first answer positions, whose logits predict the answer), the fed vector and
every block's ``resid_out`` ([L+1, n, d]) and the final-layer log-probabilities ([n, V] fp32). The
questions are split by question (``groups``: questions that must stay together, e.g. a pair's two) into
training and held-out sets. The translators are then trained on those tensors alone: each step draws
``batch_size`` training positions (a seeded generator) and minimises, summed over layers,
``mean over positions of KL(p_final || p_lens) = Σ_v p_final (log p_final − log p_lens)``. Adam with a
constant learning rate (the layers' parameters are disjoint, so the sum trains each translator on its
own loss); no randomness besides the position draws, so the same seed gives the same bytes on the CPU.
The report gives per layer the mean held-out KL of the tuned lens and of the logit lens (identity).

Caching (:func:`tuned_lens`): ``<cache>/<model key>/tuned_lens/<digest>/`` (``lens.safetensors`` and
``lens.json``), ``<model key>`` being the activation cache's fingerprint of the weights
(:func:`latentpatch.pipeline.cache.model_key`) and ``<digest>`` a hash of the settings and of the
questions (and groups) it was trained on, so a lens is reused only for the same model, data and
settings (a run's numbers never depend on which earlier run trained it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentpatch.errors import LatentPatchError
from latentpatch.files import atomic_path, write_json
from latentpatch.model.heads import lens_logits
from latentpatch.model.latent import LatentModel
from latentpatch.names import TUNED_LENS_DIR

#: Position groups of a rollout a lens trains on: the prompt, the latent thoughts, the answer start.
POSITION_GROUPS: tuple[str, ...] = ("prompt", "thoughts", "answer")
#: Version of the stored lens (its digest); a lens stored under another version is retrained.
LENS_FORMAT = "latentpatch-tuned-lens/1"
#: Positions per chunk when evaluating (bounds memory at chunk x V).
EVAL_CHUNK = 1024


@dataclass(frozen=True)
class LensSettings:
    """How a tuned lens is trained (defaults: a run's ``--lens tuned|both`` and ``inspect --lens tuned``)."""

    steps: int = 500
    lr: float = 1e-3
    seed: int = 0
    held_out_fraction: float = 0.2
    positions: tuple[str, ...] = POSITION_GROUPS
    batch_size: int = 512  # training positions per step

    def check(self) -> None:
        """A :class:`LatentPatchError` naming the first bad setting."""
        bad = [p for p in self.positions if p not in POSITION_GROUPS]
        if bad or not self.positions:
            raise LatentPatchError(f"tuned lens positions {list(self.positions)}: use some of {POSITION_GROUPS}")
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise LatentPatchError(
                f"tuned lens steps {self.steps}, lr {self.lr}, batch_size {self.batch_size}: need steps >= 0, lr > 0, "
                "batch_size >= 1"
            )
        if not 0 < self.held_out_fraction < 1:
            raise LatentPatchError(f"tuned lens held_out_fraction {self.held_out_fraction}: must lie in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "positions": list(self.positions)}


class TunedLens(nn.Module):
    """Affine translators ``h -> h + h A_lᵀ + b_l`` for layers ``-1..L-2``; the last layer ``L-1`` is the
    identity (no parameters). ``weight`` [L, d, d] and ``bias`` [L, d] (fp32; row ``layer + 1``)."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.n_layers = n_layers
        self.weight = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """[..., d] -> [..., d] in ``h``'s dtype (computed in fp32); at the last layer ``h`` itself."""
        if not -1 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} outside -1..{self.n_layers - 1}")
        if layer == self.n_layers - 1:
            return h
        x = h.float()
        return (x + x @ self.weight[layer + 1].T + self.bias[layer + 1]).to(h.dtype)

    def logits(self, lm: nn.Module, h: torch.Tensor, layer: int) -> torch.Tensor:
        """[..., V] fp32: layer ``layer``'s residual stream [..., d] translated, then the final norm and LM head."""
        return lens_logits(lm, self.transform(h, layer))


def kl_to_final(target_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """[n] ``KL(p || q) = Σ_v p (log p − log q)``: ``target_logp`` [n, V] = log p (final layer), ``logits``
    [n, V] of q (the lens)."""
    return (target_logp.exp() * (target_logp - torch.log_softmax(logits.float(), dim=-1))).sum(-1)


@dataclass
class LensData:
    """One question's recorded rollout: ``streams`` [L+1, n, d] (row 0: the fed vectors, row l+1: block l's
    ``resid_out``; model dtype) and ``target`` [n, V] fp32 final-layer log-probabilities."""

    streams: torch.Tensor
    target: torch.Tensor


@torch.no_grad()
def record_question(model: LatentModel, prompt: Sequence[int], positions: Sequence[str]) -> LensData:
    """The unpatched rollout of ``prompt`` (batch of one) at the position groups ``positions``."""
    L = model.n_layers
    r = model.rollout([list(prompt)], record=[("resid_out", layer) for layer in range(L)])
    assert r.hooks is not None
    start = model.answer_start_ids()
    fed = torch.cat([model.embed_ids(prompt, 1)[0], r.thoughts[0], model.embed_ids(start, 1)[0]])  # [length, d]
    T_q, K = r.prompt_len, model.num_latent
    spans = {"prompt": range(T_q), "thoughts": range(T_q, T_q + K), "answer": range(T_q + K, r.state.length)}
    idx = [i for name in POSITION_GROUPS if name in positions for i in spans[name]]
    rows = [fed[idx]] + [r.hooks.recorded("resid_out", layer)[0, idx] for layer in range(L)]
    streams = torch.stack(rows)  # [L+1, n, d]
    return LensData(streams, torch.log_softmax(lens_logits(model.lm, streams[-1]), dim=-1))


def split_questions(
    prompts: Sequence[Sequence[int]], groups: Sequence[Hashable] | None, fraction: float, seed: int
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """``(training, held-out)`` distinct prompts: a prompt goes with its first occurrence's group (default:
    each prompt its own), the groups are shuffled by ``seed`` and the first ``round(fraction * n)`` (at
    least one, at most n - 1) are held out. A prompt is never in both.

    >>> split_questions([[1], [2], [1], [3]], ["a", "b", "a", "c"], 0.34, 0)[1]
    [(3,)]
    """
    first: dict[tuple[int, ...], Hashable] = {}
    for i, p in enumerate(prompts):
        first.setdefault(tuple(p), tuple(p) if groups is None else groups[i])
    order = list(dict.fromkeys(first.values()))
    if len(order) < 2:
        raise LatentPatchError(
            f"the tuned lens needs questions of at least 2 groups (pairs) to hold some out; got {len(order)}; "
            "fix: run more pairs, or use --lens logit"
        )
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(max(1, round(fraction * len(order))), len(order) - 1)
    held = {order[j] for j in perm[:n_held]}
    return [p for p, g in first.items() if g not in held], [p for p, g in first.items() if g in held]


def _stack(data: Sequence[LensData]) -> LensData:
    return LensData(torch.cat([d.streams for d in data], dim=1), torch.cat([d.target for d in data], dim=0))


@torch.no_grad()
def held_out_kl(model: LatentModel, lens: TunedLens, data: LensData) -> list[dict[str, Any]]:
    """Per layer ``-1..L-1``: ``{layer, logit, tuned}``, the mean over positions of KL(p_final || p_lens)
    with the identity translator (the logit lens) and with ``lens``."""
    n = data.target.shape[0]
    out = []
    for j in range(model.n_layers + 1):
        sums = {"logit": 0.0, "tuned": 0.0}
        for a in range(0, n, EVAL_CHUNK):
            h, t = data.streams[j, a : a + EVAL_CHUNK], data.target[a : a + EVAL_CHUNK]
            sums["logit"] += float(kl_to_final(t, lens_logits(model.lm, h)).double().sum())
            sums["tuned"] += float(kl_to_final(t, lens.logits(model.lm, h, j - 1)).double().sum())
        out.append({"layer": j - 1, "logit": sums["logit"] / n, "tuned": sums["tuned"] / n})
    return out


@dataclass
class TrainedLens:
    """A tuned lens with its ``report`` (settings, split sizes, ``held_out_kl`` per layer), the
    ``train`` / ``held_out`` prompts (distinct, token ids), and whether it was ``loaded`` from the cache
    (``path``: its cache folder, None without one)."""

    lens: TunedLens
    report: dict[str, Any]
    train: list[tuple[int, ...]]
    held_out: list[tuple[int, ...]]
    loaded: bool = False
    path: Path | None = field(default=None)


def _prompt_ids(model: LatentModel, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    return [model.prompt_ids(p) if isinstance(p, str) else list(p) for p in prompts]


def train_tuned_lens(
    model: LatentModel,
    prompts: Sequence[str | Sequence[int]],
    *,
    steps: int = LensSettings.steps,
    lr: float = LensSettings.lr,
    seed: int = LensSettings.seed,
    held_out_fraction: float = LensSettings.held_out_fraction,
    positions: Sequence[str] = POSITION_GROUPS,
    batch_size: int = LensSettings.batch_size,
    groups: Sequence[Hashable] | None = None,
) -> TrainedLens:
    """Train a tuned lens on the rollouts of ``prompts`` (questions, or prompt ids with separators)."""
    settings = LensSettings(steps, lr, seed, held_out_fraction, tuple(positions), batch_size)
    settings.check()
    ids = _prompt_ids(model, prompts)
    train, held = split_questions(ids, groups, held_out_fraction, seed)
    train_data = _stack([record_question(model, p, settings.positions) for p in train])
    held_data = _stack([record_question(model, p, settings.positions) for p in held])
    lens = TunedLens(model.n_layers, model.d_model).to(model.device)
    fit(model, lens, train_data, settings)
    report = {
        "format": LENS_FORMAT,
        "settings": settings.to_dict(),
        "optimizer": "adam",
        "n_questions": {"train": len(train), "held_out": len(held)},
        "n_positions": {"train": int(train_data.target.shape[0]), "held_out": int(held_data.target.shape[0])},
        "held_out_kl": held_out_kl(model, lens, held_data),
    }
    return TrainedLens(lens, report, train, held)


def fit(model: LatentModel, lens: TunedLens, data: LensData, settings: LensSettings) -> None:
    """``settings.steps`` Adam steps on ``Σ_layers mean_positions KL(p_final || p_lens)`` over random
    batches of ``data``'s positions (the model's own weights stay frozen)."""
    n, L = data.target.shape[0], model.n_layers
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(lens.parameters(), lr=settings.lr)
    with model.grad_mode(True):
        for _ in range(settings.steps):
            idx = torch.randperm(n, generator=gen)[: settings.batch_size].to(data.target.device)
            target = data.target[idx]
            loss = sum(
                (kl_to_final(target, lens.logits(model.lm, data.streams[j, idx], j - 1)).mean() for j in range(L)),
                torch.zeros((), device=target.device),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def lens_digest(prompts: Sequence[Sequence[int]], groups: Sequence[Hashable] | None, settings: LensSettings) -> str:
    """The cache name of a lens: a hash of the format, the settings and the questions with their groups."""
    payload = {
        "format": LENS_FORMAT,
        "settings": settings.to_dict(),
        "prompts": [list(p) for p in prompts],
        "groups": None if groups is None else [str(g) for g in groups],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _load(path: Path, model: LatentModel) -> tuple[TunedLens, dict[str, Any]] | None:
    """The lens stored at ``path`` (None when absent, torn or of another shape)."""
    from safetensors.torch import load_file

    try:
        report = json.loads((path / "lens.json").read_text())
        tensors = load_file(str(path / "lens.safetensors"))
        lens = TunedLens(model.n_layers, model.d_model)
        lens.load_state_dict(tensors)
    except Exception:  # missing, torn or foreign: train again
        return None
    return lens.to(model.device), report


def tuned_lens(
    model: LatentModel,
    prompts: Sequence[str | Sequence[int]],
    cache_dir: Path | str | None,
    *,
    settings: LensSettings = LensSettings(),
    groups: Sequence[Hashable] | None = None,
) -> TrainedLens:
    """The tuned lens of ``model`` on ``prompts``: loaded from ``cache_dir`` when it holds one for this
    model, these questions and ``settings`` (``loaded`` True), else trained (:func:`train_tuned_lens`)
    and stored there. ``cache_dir`` None: always trained, never stored."""
    from safetensors.torch import save_file

    from latentpatch.pipeline.cache import model_key

    settings.check()
    ids = _prompt_ids(model, prompts)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / model_key(model) / TUNED_LENS_DIR / lens_digest(ids, groups, settings)
        stored = _load(path, model)
        if stored is not None:
            train, held = split_questions(ids, groups, settings.held_out_fraction, settings.seed)
            return TrainedLens(stored[0], stored[1], train, held, loaded=True, path=path)
    trained = train_tuned_lens(
        model,
        ids,
        steps=settings.steps,
        lr=settings.lr,
        seed=settings.seed,
        held_out_fraction=settings.held_out_fraction,
        positions=settings.positions,
        batch_size=settings.batch_size,
        groups=groups,
    )
    if path is not None:
        with atomic_path(path / "lens.safetensors") as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in trained.lens.state_dict().items()}, str(tmp))
        write_json(path / "lens.json", trained.report)  # written last: its presence marks a whole lens
        trained.path = path
    return trained
