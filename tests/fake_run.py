"""A synthetic but realistic run directory, in the docs/ARCHITECTURE.md format, for tests.

``write_fake_run(tmp_path / "run", n_pairs=6, n_layers=4, K=3)`` writes ``manifest.json``,
``pairs.json``, ``results/{layer,position,iterative}.json``, ``results/cells.parquet``,
``results/trajectories.parquet`` and ``results/thoughts.json``. Effects have structure (middle
layers and early positions matter most, chained propagates, frozen is weaker) plus noise, so
statistics, figures and the report have something real to show. Nothing here needs a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from latentpatch.names import EXPERIMENTS as ALL_EXPERIMENTS
from latentpatch.names import LOGIT_METRICS as METRICS


def write_fake_run(
    run_dir: Path | str,
    n_pairs: int = 6,
    n_layers: int = 4,
    K: int = 3,
    seed: int = 0,
    experiments: Iterable[str] = ALL_EXPERIMENTS,
    flagged: Iterable[int] | None = (1,),
    failing_check: str | None = None,
    command: str = "latentpatch run --model default --pairs pairs.json --out RUN",
) -> Path:
    """Write a fake run directory and return its path.

    ``flagged``: indices of pairs the model gets wrong (flagged). ``failing_check``: name of a
    built-in check to mark as failed (e.g. ``"identity"``), to exercise the report's highlighting.
    """
    run_dir = Path(run_dir)
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    experiments = tuple(experiments)
    flagged_idx = set(flagged or ())
    pair_ids = [f"p{i:03d}" for i in range(n_pairs)]

    # ---- pairs.json (flat pair-file format, docs/method.md §9.1)
    pairs = []
    for pid in pair_ids:
        a = int(rng.integers(2, 50))
        pairs.append({"pair_id": pid, "variant": "clean", "question": f"Tom has {a} apples. How many?", "answer": a})
        pairs.append(
            {"pair_id": pid, "variant": "corrupted", "question": f"Tom has {a + 1} apples. How many?", "answer": a + 1}
        )
    (run_dir / "pairs.json").write_text(json.dumps(pairs, indent=1))

    # ---- per-pair baselines: logit difference of clean and corrupted runs
    ld_clean = rng.normal(3.0, 0.5, n_pairs)
    ld_corr = rng.normal(-3.0, 0.5, n_pairs)
    answers = {pid: (pairs[2 * i]["answer"], pairs[2 * i + 1]["answer"]) for i, pid in enumerate(pair_ids)}

    # layer profile: effect strongest in the middle layers; position profile: early thoughts matter
    layers = np.arange(n_layers)
    layer_prof = np.exp(-0.5 * ((layers - 0.4 * (n_layers - 1)) / max(1.0, n_layers / 4)) ** 2)
    pos_prof = np.exp(-np.arange(K) / 1.5)

    rows: list[dict] = []
    traj_rows: list[dict] = []

    def cell(i: int, experiment: str, mode: str, layer: int, position: int, strength: float, act_bias=np.nan):
        pid = pair_ids[i]
        rec = float(np.clip(strength + rng.normal(0, 0.08), -0.3, 1.2))
        ld = ld_corr[i] + rec * (ld_clean[i] - ld_corr[i])
        kl = float(abs(rec) * 2.0 + abs(rng.normal(0, 0.05)))
        pred_clean = rec > 0.6
        clean_ans, corr_ans = answers[pid]
        is_flagged = i in flagged_idx
        rows.append(
            dict(
                pair_id=pid,
                experiment=experiment,
                mode=mode,
                component="resid_out",
                layer=int(layer),
                position=int(position),
                kl=kl,
                logit_l2=float(np.sqrt(kl) * 1.5 + abs(rng.normal(0, 0.05))),
                pred_change_rate=float(np.clip(rec + rng.normal(0, 0.1), 0, 1)),
                answer_logit_diff=float(ld),
                answer_logprob_diff=float(ld * 1.2),
                recovery=rec,
                pred_answer=float(clean_ans if pred_clean else corr_ans),
                pred_is_clean=bool(pred_clean),
                pred_is_corrupted=bool(not pred_clean),
                act_cos_clean=float(np.nan if np.isnan(act_bias) else 0.5 + act_bias / 2),
                act_cos_corr=float(np.nan if np.isnan(act_bias) else 0.5 - act_bias / 2),
                act_bias=float(act_bias),
                clean_correct=not is_flagged,
                corrupted_correct=True,
                flagged=is_flagged,
            )
        )

    for i in range(n_pairs):
        for layer in layers:
            lp = layer_prof[layer]
            if "layer" in experiments:
                cell(i, "layer", "all", layer, -1, 0.95 * lp)
            if "position" in experiments:
                for p in range(K):
                    cell(i, "position", "single", layer, p, 0.8 * lp * pos_prof[p])
            if "iterative" in experiments:
                cell(i, "iterative", "parallel", layer, -1, 0.95 * lp)
                for n in range(K):
                    cell(i, "iterative", "cumulative", layer, n, 0.95 * lp * (1 - np.exp(-(n + 1))))
                for mode, gain in (("chained", 0.85), ("frozen", 0.45)):
                    biases = []
                    for p in range(1, K):
                        b = float(np.clip(gain * lp * np.exp(-(p - 1) / 3) + rng.normal(0, 0.05), -1, 1))
                        biases.append(b)
                        traj_rows.append(
                            dict(
                                pair_id=pair_ids[i],
                                layer=int(layer),
                                mode=mode,
                                position=p,
                                act_cos_clean=0.5 + b / 2,
                                act_cos_corr=0.5 - b / 2,
                                act_bias=b,
                            )
                        )
                    cell(i, "iterative", mode, layer, 0, gain * lp, act_bias=float(np.mean(biases)) if biases else 0.0)

    cells = pd.DataFrame(rows)
    cells.to_parquet(run_dir / "results" / "cells.parquet", index=False)
    if "iterative" in experiments:
        pd.DataFrame(traj_rows).to_parquet(run_dir / "results" / "trajectories.parquet", index=False)

    # ---- nested results/<experiment>.json: results[pair_id][layer][key] -> {metric: value}
    def key_of(r) -> str:
        if r["experiment"] == "layer":
            return "all"
        if r["experiment"] == "position":
            return str(r["position"])
        if r["mode"] == "cumulative":
            return f"cumulative_{r['position']}"
        return r["mode"]

    for exp in experiments:
        nested: dict = {}
        for r in rows:
            if r["experiment"] != exp:
                continue
            vals = {m: (None if np.isnan(r[m]) else r[m]) for m in METRICS}
            nested.setdefault(r["pair_id"], {}).setdefault(str(r["layer"]), {})[key_of(r)] = vals
        (run_dir / "results" / f"{exp}.json").write_text(json.dumps(nested))

    # ---- thoughts.json: top-3 decoded tokens per thought, a few pairs
    vocab = ["the", "16", "17", "apples", "+", "=", "Tom", "has", "4", "*", "2", "so"]
    thoughts = {
        pid: {
            variant: [[str(t) for t in rng.choice(vocab, 3, replace=False)] for _ in range(K)]
            for variant in ("clean", "corrupted")
        }
        for pid in pair_ids[:3]
    }
    (run_dir / "results" / "thoughts.json").write_text(json.dumps(thoughts))

    # ---- manifest.json
    checks = {
        "identity": {"passed": True, "value": 2.1e-8, "threshold": 1e-6, "detail": "max KL over 6 pairs"},
        "full_restoration": {
            "passed": True,
            "value": 3.0e-6,
            "threshold": 1e-4,
            "detail": "5/6 pairs same token length",
        },
        "live_thoughts": {
            "passed": True,
            "value": 0.42,
            "threshold": 0.0,
            "detail": "accuracy drop when thoughts are ablated",
        },
        "engine_reference": {"passed": True, "value": 4.0e-6, "threshold": 1e-4, "detail": "8 random specs"},
    }
    if failing_check:
        checks[failing_check].update(passed=False, value=0.5)
    flagged_ids = [pair_ids[i] for i in sorted(flagged_idx) if i < n_pairs]
    manifest = {
        "config": {
            "model": "default",
            "pairs": "pairs.json",
            "experiments": list(experiments),
            "component": "resid_out",
            "direction": "denoise",
            "replacement": "source",
            "batch_size": 32,
        },
        "command": command,
        "versions": {"latentpatch": "0.1.0", "torch": "2.13.0", "transformers": "4.50.0", "python": "3.11"},
        "git_commit": "0123456789abcdef",
        "seed": seed,
        "device": "cpu",
        "dtype": "float32",
        "model": {"name": "fake-codi", "family": "llama", "n_layers": n_layers, "num_latent": K, "d_model": 64},
        "timings": {"total_s": 12.5, "layer_s": 3.0, "position_s": 6.0, "iterative_s": 3.5},
        "checks": checks,
        "baselines": {
            "clean_accuracy": 1 - len(flagged_ids) / n_pairs,
            "corrupted_accuracy": 1.0,
            "n_pairs": n_pairs,
            "flagged_pairs": flagged_ids,
        },
        "status": "complete",
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return run_dir
