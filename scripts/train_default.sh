#!/usr/bin/env bash
# Retrain the shipped default model (src/latentpatch/default_model) from scratch on CPU.
# Deterministic given the seed (single thread); wall time ~1 h on one shared CPU core.
set -euo pipefail
OUT=${1:-default_model_new}
OMP_NUM_THREADS=1 latentpatch train --out "$OUT" --steps 2000 --seed 0 --threads 1 --ckpt-every 250
latentpatch eval --model "$OUT" --n 1000 --json | tee "$OUT/eval.json"
