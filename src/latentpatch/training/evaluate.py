"""``latentpatch eval``: quality of a CODI model on held-out synthetic problems and on pairs.

Numbers are measured with the tool's own rollout (:class:`latentpatch.model.latent.LatentModel`):

* ``accuracy``: greedy answer == ground truth on ``n`` held-out problems (seed distinct from the
  training data; questions that occur in the training pool are skipped and replaced).
* ``pairs_both_correct``: fraction of pairs whose clean *and* corrupted answers are both correct.
* ``ablation_accuracy_drop``: accuracy minus accuracy when all K thoughts (their input
  embeddings) are replaced by zeros; ``ablation_mean_accuracy_drop`` the same with each thought
  replaced by its mean over the evaluated problems (per latent position).

All fractions are in [0, 1] (``units: "fraction"``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentpatch.errors import LatentPatchError
from latentpatch.model.latent import LatentModel
from latentpatch.model.latent_dir import LATENT_JSON
from latentpatch.model.load import DEFAULT_MODEL_DIR, load_model
from latentpatch.patching.metrics import same_number


def model_dir_of(spec: str | Path) -> Path | None:
    """The latentpatch model directory a ``--model`` spec names (``default``, ``dir:PATH``, or a
    plain path that ``load_model`` reads as one), or None for any other spec (``codi:``,
    ``config:``, ...), whose training questions are unknown.

    >>> model_dir_of("default").name, model_dir_of("dir:models/a"), model_dir_of("codi:models/a")
    ('default_model', PosixPath('models/a'), None)
    """
    spec = str(spec).strip()
    if spec == "default":
        return DEFAULT_MODEL_DIR
    kind, sep, rest = spec.partition(":")
    if sep and kind == "dir":
        return Path(rest)
    if not sep or len(kind) == 1:  # a plain path (or a Windows drive letter), as load_model guesses it
        path = Path(spec)
        return path if (path / LATENT_JSON).is_file() else None
    return None


def training_questions(model_dir: Path | None) -> set[str] | None:
    """Questions of the training pool recorded in the model directory's ``latentpatch.json``;
    None when unknown (no model directory, or no training record in it)."""
    if model_dir is None or not (model_dir / LATENT_JSON).exists():
        return None
    tr = json.loads((model_dir / LATENT_JSON).read_text()).get("training") or {}
    if "data_seed" not in tr or "train_pool" not in tr:
        return None
    from latentpatch.training.config import TrainConfig
    from latentpatch.training.data import training_pool

    pool = training_pool(TrainConfig(train_pool=int(tr["train_pool"]), data_seed=int(tr["data_seed"])))
    return {p.question for p in pool}


def held_out_problems(n: int, seed: int, exclude: set) -> list:
    from latentpatch.data.synthetic import problem_stream

    out, seen = [], set()
    for p in problem_stream(seed):
        if p.question in exclude or p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
        if len(out) >= n:
            return out
    return out


def answers(
    lm: LatentModel, questions: Sequence[str], batch_size: int, thoughts: torch.Tensor | None = None
) -> list[float | None]:
    """Greedy answers in batches; ``thoughts`` [1, K, d]: fed instead of every row's thoughts
    (:meth:`LatentModel.thought_ablation`)."""
    preds: list[float | None] = []
    for i in range(0, len(questions), batch_size):
        qs = list(questions[i : i + batch_size])
        kw: dict[str, Any] = {} if thoughts is None else dict(lm.thought_ablation(thoughts, len(qs)))
        preds.extend(lm.answer(qs, **kw))
    return preds


def mean_thoughts(lm: LatentModel, questions: Sequence[str], batch_size: int) -> torch.Tensor:
    """[1, K, d] fp32: each latent position's thought averaged over ``questions``."""
    total: torch.Tensor | None = None
    count = 0
    for i in range(0, len(questions), batch_size):
        r = lm.rollout(list(questions[i : i + batch_size]))
        s = r.thoughts.float().sum(0)
        total = s if total is None else total + s
        count += r.thoughts.shape[0]
    if total is None:
        raise ValueError("mean_thoughts needs at least one question")
    return (total / count)[None]


def accuracy(preds: Sequence[float | None], gold: Sequence[float]) -> float:
    return sum(same_number(p, g) for p, g in zip(preds, gold)) / len(gold)


def pair_scores(lm: LatentModel, pairs_path: Path | None, batch_size: int, exclude: set[str]) -> dict:
    """Clean / corrupted / both-correct fractions on a pair file (default: the shipped pairs)."""
    from latentpatch.data.pairs import load_pairs
    from latentpatch.pipeline.selection import default_pairs_path

    ppath = Path(pairs_path) if pairs_path else default_pairs_path()
    if not ppath.exists():
        raise LatentPatchError(f"pairs file {ppath} not found")
    pairs = load_pairs(ppath)
    cq = [p.clean.question for p in pairs]
    kq = [p.corrupted.question for p in pairs]
    clean_ok = [same_number(a, p.clean.answer) for a, p in zip(answers(lm, cq, batch_size), pairs)]
    corr_ok = [same_number(a, p.corrupted.answer) for a, p in zip(answers(lm, kq, batch_size), pairs)]
    n = max(1, len(pairs))
    return {
        "pairs_file": str(ppath),
        "n_pairs": len(pairs),
        "pair_questions_in_training": sum(q in exclude for q in cq + kq),
        "pairs_clean_accuracy": sum(clean_ok) / n,
        "pairs_corrupted_accuracy": sum(corr_ok) / n,
        "pairs_both_correct": sum(a and b for a, b in zip(clean_ok, corr_ok)) / n,
    }


def evaluate(
    model: str | Path = "default",
    n: int = 1000,
    seed: int = 12345,
    pairs_path: Path | None = None,
    batch_size: int = 128,
    lm: LatentModel | None = None,
) -> dict:
    """Accuracy on ``n`` held-out problems, under thought ablation (zeros, dataset mean) and on
    the pairs. ``model``: a ``load_model`` spec (or pass ``lm`` already loaded). Held-out problems
    skip the training questions only when ``model`` is a latentpatch model directory (which records
    them); for other specs ``training_questions_known`` is False and nothing is skipped."""
    t0 = time.time()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    if lm is None:
        lm = load_model(str(model))
    known = training_questions(model_dir_of(model))  # None: not a latentpatch model dir, nothing to exclude
    exclude = known or set()
    probs = held_out_problems(n, seed, exclude)
    qs = [p.question for p in probs]
    gold = [p.answer for p in probs]
    preds = answers(lm, qs, batch_size)
    acc = accuracy(preds, gold)
    acc_zero = accuracy(answers(lm, qs, batch_size, torch.zeros(1, lm.num_latent, lm.d_model)), gold)
    acc_mean = accuracy(answers(lm, qs, batch_size, mean_thoughts(lm, qs, batch_size)), gold)
    by_template: dict = {}
    for p, pr in zip(probs, preds):
        c = by_template.setdefault(p.template, [0, 0])
        c[0] += same_number(pr, p.answer)
        c[1] += 1
    return {
        "model": str(model),
        "units": "fraction",
        "n": len(qs),
        "seed": seed,
        "excluded_training_questions": len(exclude),
        "training_questions_known": known is not None,
        "accuracy": acc,
        "accuracy_by_template": {k: v[0] / v[1] for k, v in sorted(by_template.items())},
        "zero_thoughts_accuracy": acc_zero,
        "mean_thoughts_accuracy": acc_mean,
        "ablation_accuracy_drop": acc - acc_zero,
        "ablation_mean_accuracy_drop": acc - acc_mean,
        **pair_scores(lm, pairs_path, batch_size, exclude),
        "wall_s": round(time.time() - t0, 1),
    }


def format_report(res: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"model: {res['model']}"]
    if not res.get("training_questions_known", True):
        lines.append(
            "training questions: unknown (not a latentpatch model directory), so held-out problems "
            "are not filtered against them"
        )
    lines += [
        f"held-out accuracy ({res['n']} problems, seed {res['seed']}): {pct(res['accuracy'])}",
        "  by template: " + ", ".join(f"{k} {pct(v)}" for k, v in res["accuracy_by_template"].items()),
        f"thoughts -> zeros: accuracy {pct(res['zero_thoughts_accuracy'])} (drop {pct(res['ablation_accuracy_drop'])})",
        f"thoughts -> dataset mean: accuracy {pct(res['mean_thoughts_accuracy'])} "
        f"(drop {pct(res['ablation_mean_accuracy_drop'])})",
        f"pairs ({res['n_pairs']}): clean {pct(res['pairs_clean_accuracy'])}, corrupted "
        f"{pct(res['pairs_corrupted_accuracy'])}, both correct {pct(res['pairs_both_correct'])}",
        f"wall time: {res['wall_s']} s",
    ]
    return "\n".join(lines)
