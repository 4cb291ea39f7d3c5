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
from pathlib import Path
from typing import Optional, Sequence

import torch

from latentpatch.errors import LatentPatchError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"
DEFAULT_PAIRS = Path(__file__).resolve().parents[1] / "default_data" / "pairs.json"


def resolve_model_dir(spec: str | Path) -> Path:
    if str(spec) == "default":
        return DEFAULT_MODEL_DIR
    p = Path(spec)
    if not p.is_dir():
        raise LatentPatchError(f"--model {spec}: not a directory (use 'default' or a model directory)")
    return p


def load_latent_model(spec: str | Path):
    """A :class:`LatentModel` for ``spec``: via ``latentpatch.model.load.load_model`` when available,
    else built from a directory written by :func:`latentpatch.training.train.save_model`."""
    try:
        from latentpatch.model.load import load_model  # the project's strict loader
    except ImportError:
        load_model = None
    if load_model is not None:
        return load_model(str(spec))
    return load_own_dir(resolve_model_dir(spec))


def load_own_dir(path: Path):
    from transformers import AutoTokenizer

    from latentpatch.model.latent import LatentConfig, LatentModel
    from latentpatch.training.train import load_trained

    model, _, meta = load_trained(path)
    cfg = LatentConfig(
        num_latent=meta["num_latent"], pad_id=meta["pad_id"], bot_id=meta["bot_id"], eot_id=meta["eot_id"],
        eos_id=meta["eos_id"], remove_eos=meta["remove_eos"], answer_prefix=meta["answer_prefix"],
        question_template=meta["question_template"], add_special_tokens=meta["add_special_tokens"],
        max_answer_tokens=meta["max_answer_tokens"],
    )
    tok = AutoTokenizer.from_pretrained(str(path))
    return LatentModel(model.codi, model.prj, cfg, tokenizer=tok, name=path.name)


def _training_questions(model_dir: Optional[Path]) -> set:
    """Questions of the training pool recorded in ``latentpatch.json`` (empty if unknown)."""
    if model_dir is None or not (model_dir / "latentpatch.json").exists():
        return set()
    tr = json.loads((model_dir / "latentpatch.json").read_text()).get("training") or {}
    if "data_seed" not in tr or "train_pool" not in tr:
        return set()
    from latentpatch.training.train import TrainConfig, training_pool

    return {p.question for p in training_pool(TrainConfig(train_pool=int(tr["train_pool"]), data_seed=int(tr["data_seed"])))}


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


def _answers(lm, questions: Sequence[str], batch_size: int, override: Optional[torch.Tensor] = None):
    preds = []
    for i in range(0, len(questions), batch_size):
        qs = list(questions[i: i + batch_size])
        kw = {}
        if override is not None:
            B, K = len(qs), lm.num_latent
            kw = {"thought_override": override.to(lm.dtype).expand(B, K, -1).clone(),
                  "override_mask": torch.ones(B, K, dtype=torch.bool)}
        preds.extend(lm.answer(qs, **kw))
    return preds


def _mean_thoughts(lm, questions: Sequence[str], batch_size: int) -> torch.Tensor:
    total, count = None, 0
    for i in range(0, len(questions), batch_size):
        r = lm.rollout(list(questions[i: i + batch_size]))
        s = r.thoughts.float().sum(0)
        total = s if total is None else total + s
        count += r.thoughts.shape[0]
    return (total / count)[None]  # [1, K, d]


def _correct(pred, gold) -> bool:
    return pred is not None and abs(float(pred) - float(gold)) < 1e-6


def evaluate(model: str | Path = "default", n: int = 1000, seed: int = 12345,
             pairs_path: Optional[Path] = None, batch_size: int = 128, lm=None) -> dict:
    t0 = time.time()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    if lm is None:
        lm = load_latent_model(model)
    model_dir = resolve_model_dir(model) if isinstance(model, (str, Path)) else None
    exclude = _training_questions(model_dir)
    probs = held_out_problems(n, seed, exclude)
    qs = [p.question for p in probs]
    gold = [p.answer for p in probs]
    preds = _answers(lm, qs, batch_size)
    acc = sum(_correct(p, g) for p, g in zip(preds, gold)) / len(qs)

    K, d = lm.num_latent, lm.d_model
    zero = torch.zeros(1, K, d)
    preds_zero = _answers(lm, qs, batch_size, zero)
    acc_zero = sum(_correct(p, g) for p, g in zip(preds_zero, gold)) / len(qs)
    mean = _mean_thoughts(lm, qs, batch_size)
    preds_mean = _answers(lm, qs, batch_size, mean)
    acc_mean = sum(_correct(p, g) for p, g in zip(preds_mean, gold)) / len(qs)

    by_template: dict = {}
    for p, pr in zip(probs, preds):
        c = by_template.setdefault(p.template, [0, 0])
        c[0] += _correct(pr, p.answer)
        c[1] += 1

    from latentpatch.data.pairs import load_pairs

    ppath = Path(pairs_path) if pairs_path else DEFAULT_PAIRS
    if not ppath.exists():
        raise LatentPatchError(f"pairs file {ppath} not found")
    pairs = load_pairs(ppath)
    cq = [p.clean.question for p in pairs]
    kq = [p.corrupted.question for p in pairs]
    cp = _answers(lm, cq, batch_size)
    kp = _answers(lm, kq, batch_size)
    clean_ok = [_correct(a, p.clean.answer) for a, p in zip(cp, pairs)]
    corr_ok = [_correct(a, p.corrupted.answer) for a, p in zip(kp, pairs)]
    both = sum(a and b for a, b in zip(clean_ok, corr_ok)) / max(1, len(pairs))
    return {
        "model": str(model),
        "units": "fraction",
        "n": len(qs),
        "seed": seed,
        "excluded_training_questions": len(exclude),
        "accuracy": acc,
        "accuracy_by_template": {k: v[0] / v[1] for k, v in sorted(by_template.items())},
        "zero_thoughts_accuracy": acc_zero,
        "mean_thoughts_accuracy": acc_mean,
        "ablation_accuracy_drop": acc - acc_zero,
        "ablation_mean_accuracy_drop": acc - acc_mean,
        "pairs_file": str(ppath),
        "n_pairs": len(pairs),
        "pair_questions_in_training": sum(q in exclude for q in cq + kq),
        "pairs_clean_accuracy": sum(clean_ok) / max(1, len(pairs)),
        "pairs_corrupted_accuracy": sum(corr_ok) / max(1, len(pairs)),
        "pairs_both_correct": both,
        "wall_s": round(time.time() - t0, 1),
    }


def format_report(res: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        f"model: {res['model']}",
        f"held-out accuracy ({res['n']} problems, seed {res['seed']}): {pct(res['accuracy'])}",
        "  by template: " + ", ".join(f"{k} {pct(v)}" for k, v in res["accuracy_by_template"].items()),
        f"thoughts -> zeros: accuracy {pct(res['zero_thoughts_accuracy'])} (drop {pct(res['ablation_accuracy_drop'])})",
        f"thoughts -> dataset mean: accuracy {pct(res['mean_thoughts_accuracy'])} (drop {pct(res['ablation_mean_accuracy_drop'])})",
        f"pairs ({res['n_pairs']}): clean {pct(res['pairs_clean_accuracy'])}, corrupted "
        f"{pct(res['pairs_corrupted_accuracy'])}, both correct {pct(res['pairs_both_correct'])}",
        f"wall time: {res['wall_s']} s",
    ]
    return "\n".join(lines)
