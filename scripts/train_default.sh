#!/usr/bin/env bash
# Retrain the shipped default model (src/latentpatch/default_model) from scratch on CPU, in one run
# (see the model card). Single thread: deterministic given the seeds. Wall time ~44 min on one core (the defaults of `latentpatch train` are this recipe).
set -euo pipefail
WORK=${1:-default_model_build}
mkdir -p "$WORK"
export OMP_NUM_THREADS=1
latentpatch train --out "$WORK/model" --steps 4600 --seed 0 --lr 4e-3 --warmup 50 \
  --teacher-only-steps 300 --latent-aux-factor 1.0 --number-init fourier --threads 1
latentpatch eval --model "$WORK/model" --n 1000 --json | tee "$WORK/model/eval.json"
