"""Does a model's chain carry a swapped thought's value forward? (docs/training.md, "The chain does
not compute from its thoughts").

For each thought p, every row of a batch of held-out training problems is fed another row's thought
at p (``plan_swap`` with rate 1, interchange training's own swap) and run with ``student_forward``
(the training copy of the rollout, full attention). Over the rows whose counterfactual value differs
from their own, it prints how often latent position j >= p decodes (LM head, argmax) the
counterfactual step result ("follows") or the row's own ("own"), and the same for the answer's
number (teacher-forced argmax).

    python scripts/chain_follow.py dir:src/latentpatch/default_model --problems 256
"""

from __future__ import annotations

import argparse

import torch

from latentpatch.model.latent import LatentModel
from latentpatch.model.latent_dir import load_latent_dir
from latentpatch.training.config import TrainConfig
from latentpatch.training.data import ANSWER_PREFIX, Codec, make_batch, training_pool
from latentpatch.training.interchange import plan_swap
from latentpatch.training.objective import student_forward
from latentpatch.training.train import latent_config


def rates(got: torch.Tensor, counterfactual: torch.Tensor, own: torch.Tensor, rows: torch.Tensor) -> str:
    """'follows/own' fractions over ``rows`` [B] bool (all [B] token ids)."""
    n = int(rows.sum())
    if not n:
        return "  -  "
    f = float((got[rows] == counterfactual[rows]).float().mean())
    o = float((got[rows] == own[rows]).float().mean())
    return f"{f:.2f}/{o:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="dir:PATH of a model `latentpatch train` wrote")
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = args.model.removeprefix("dir:")
    cfg = TrainConfig(train_pool=args.problems, data_seed=7)  # a pool the shipped recipe (data seed 1) never drew
    codec = Codec.from_dir(path)
    saved = load_latent_dir(path)
    model = LatentModel(saved.lm, saved.prj, latent_config(cfg, codec), name="chain-follow").eval()
    K = model.num_latent
    b = make_batch(training_pool(cfg)[: args.problems], codec, K)
    number_at = 1 + len(codec.encode(ANSWER_PREFIX))  # <eot> prefix N <eos>: N's index
    print(f"{path}: {args.problems} problems; swapped thought p -> follows/own at latent position j, then the answer")
    print("p  " + "  ".join(f"   j={j}   " for j in range(1, K)) + "   answer")
    with torch.no_grad():
        for p in range(1, K):
            torch.manual_seed(args.seed + p)
            swap = plan_swap(b, codec, 1.0, K, positions=[p])
            if swap is None:
                continue
            out = student_forward(model, b.q_ids, b.q_mask, swap.answer_ids, b.a_mask, swap=swap)
            latent = model.logits(out.latent_hidden).argmax(-1)  # [B, K]
            cells = []
            for j in range(1, K):
                cf, own = swap.latent_targets[:, j], b.latent_targets[:, j]
                rows = swap.rows & (cf != own) & (own != -100) if j >= p else torch.zeros_like(swap.rows)
                cells.append(rates(latent[:, j], cf, own, rows))
            cf, own = swap.answer_ids[:, number_at], b.a_ids[:, number_at]
            answer = out.answer_logits.argmax(-1)[:, number_at - 1]
            cells.append(rates(answer, cf, own, swap.rows & (cf != own)))
            print(f"{p}  " + "  ".join(f"{c:^11}" for c in cells))


if __name__ == "__main__":
    main()
