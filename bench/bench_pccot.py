"""The engine's speed-up over the reference on PCCoT, beside the same model's sequential loop
(docs/method.md §18), measured side by side in one process.

A GPT-2-shaped random model (``--layers``, ``--d``; byte tokenizer, CODI's projection as the
feedback) run three ways on the same pairs and the same position sweep (``resid_out``, every layer x
latent position, denoise, source values):

- ``pccot``: a :class:`~latentpatch.model.pccot.PCCoTModel` with N = ``--slots`` and T = ``--rounds``
  (sites of the last round): ``sweep_fast`` (batch 64) vs ``sweep_reference`` (one rollout per cell);
- ``sequential``: the same weights as a plain ``LatentModel`` with K = N: the same two sweeps.

Printed: wall seconds of each and the ratio reference / engine per model. PCCoT's engine cannot
start a patched run from the target's prefix at the patched slot (every round recomputes all
slots), so its ratio is the batching alone.

Example::

    python bench/bench_pccot.py --pairs 4 --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from latentpatch.data.synthetic import generate_pairs  # noqa: E402
from latentpatch.model.config import build_prj  # noqa: E402
from latentpatch.model.latent import LatentModel  # noqa: E402
from latentpatch.model.loaders import byte_tokenizer  # noqa: E402
from latentpatch.model.pccot import PCCoTModel  # noqa: E402
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values  # noqa: E402
from latentpatch.patching.engine import EngineOptions, sweep_fast, sweep_reference  # noqa: E402
from latentpatch.patching.specs import EngineConfig, position_specs  # noqa: E402


def models(layers: int, d: int, slots: int, rounds: int) -> dict[str, LatentModel]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from latentpatch.model.config import LatentConfig

    torch.manual_seed(0)
    V = 257
    lm = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=V + 3,
            n_embd=d,
            n_layer=layers,
            n_head=4,
            n_positions=1024,
            bos_token_id=256,
            eos_token_id=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ).eval()
    prj = build_prj(d, 2 * d, layer_norm=True).eval()
    cfg = LatentConfig(
        num_latent=slots,
        pad_id=V,
        bot_id=V + 1,
        eot_id=V + 2,
        eos_id=256,
        add_special_tokens=False,
        max_answer_tokens=8,
    )
    tok = byte_tokenizer()
    return {
        "pccot": PCCoTModel(lm, prj, cfg, tok, name="pccot", rounds=rounds, latent_id=ord("_")),
        "sequential": LatentModel(lm, prj, cfg, tok, name="sequential"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--slots", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = [
        f"## PCCoT: engine vs reference beside the sequential loop ({datetime.date.today()})",
        "",
        f"`python bench/bench_pccot.py --pairs {args.pairs} --layers {args.layers} --d {args.d} --slots "
        f"{args.slots} --rounds {args.rounds}`; torch threads 1. Position sweep of resid_out (every layer x "
        "slot), denoise, source values.",
        "",
        "| model | cells | engine s | reference s | reference / engine |",
        "|---|---:|---:|---:|---:|",
    ]
    pairs = generate_pairs(args.pairs, seed=0)
    for name, model in models(args.layers, args.d, args.slots, args.rounds).items():
        with torch.no_grad():
            bases = []
            for pair in pairs:
                clean, corr = (record_run(model, model.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
                bases.append(prepare_pair(model, pair.pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer))
            specs = position_specs(model.n_layers, model.num_latent, "resid_out")
            values = [replacement_values(b, EngineConfig()) for b in bases]
            t0 = time.perf_counter()
            fast = [sweep_fast(model, b, specs, v, EngineOptions(64)) for b, v in zip(bases, values)]
            fast_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = [sweep_reference(model, b, specs, v) for b, v in zip(bases, values)]
            ref_s = time.perf_counter() - t0
        worst = max(
            abs(f["answer_logit_diff"] - r["answer_logit_diff"])
            for fc, rc in zip(fast, ref)
            for f, r in zip(fc, rc)
            if f["answer_logit_diff"] == f["answer_logit_diff"]
        )
        cells = len(specs) * len(bases)
        lines.append(f"| {name} | {cells} | {fast_s:.2f} | {ref_s:.2f} | **{ref_s / fast_s:.1f}x** |")
        print(
            f"{name}: {cells} cells, engine {fast_s:.2f} s, reference {ref_s:.2f} s, "
            f"ratio {ref_s / fast_s:.1f}x, max |answer_logit_diff difference| {worst:.2e}"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
