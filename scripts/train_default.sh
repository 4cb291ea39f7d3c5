#!/usr/bin/env bash
# Retrain the shipped default model (src/latentpatch/default_model) from scratch on CPU, in three
# stages (see the model card and docs/training.md). Single thread: deterministic given the seeds.
# Wall time on one core of a 2-core AMD EPYC machine: 44 + 44 + 14 min.
#   stage 1: the CODI recipe (`latentpatch train`'s defaults);
#   stage 2: interchange training, answer-blind rows and the thought auxiliary loss, lr 2e-3
#            (the answers start to follow the thoughts);
#   stage 3: the same at lr 5e-4 with more interchange (accuracy back up).
set -euo pipefail
WORK=${1:-default_model_build}
mkdir -p "$WORK"
export OMP_NUM_THREADS=1
latentpatch train --out "$WORK/stage1" --steps 4600 --seed 0 --lr 4e-3 --warmup 50 \
  --teacher-only-steps 300 --latent-aux-factor 1.0 --number-init fourier --threads 1
latentpatch train --out "$WORK/stage2" --init-from "$WORK/stage1" --steps 3000 --lr 2e-3 --warmup 50 \
  --teacher-only-steps 0 --thought-aux-factor 1 --thought-swap-rate 0.5 --answer-blind-rate 0.5 --threads 1
latentpatch train --out "$WORK/model" --init-from "$WORK/stage2" --steps 1000 --lr 5e-4 --warmup 20 \
  --teacher-only-steps 0 --thought-aux-factor 1 --thought-swap-rate 0.75 --answer-blind-rate 0.5 --threads 1
latentpatch eval --model "dir:$WORK/model" --n 1000 --json | tee "$WORK/model/eval.json"
scripts/thought_dependence.sh "dir:$WORK/model" "$WORK/thought_dependence"
