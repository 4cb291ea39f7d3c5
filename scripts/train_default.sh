#!/usr/bin/env bash
# Retrain the shipped default model (src/latentpatch/default_model) from scratch on CPU, in the two
# stages that produced it (see the model card). Single thread: deterministic given the seeds.
# Wall time ~50 min on one (shared) CPU core.
set -euo pipefail
WORK=${1:-default_model_build}
mkdir -p "$WORK"
export OMP_NUM_THREADS=1
# stage 1: plain CODI objective, schedule planned for 3500 steps, stopped after step 1250
latentpatch train --out "$WORK/stage1" --steps 3500 --stop-after 1250 --seed 0 --threads 1
# stage 2: continue with the auxiliary intermediate-result loss on the latent positions
latentpatch train --out "$WORK/stage2" --init-from "$WORK/stage1" --steps 3000 --seed 1 --lr 1e-3 \
  --warmup 50 --threads 1 --latent-aux-factor 1.0
latentpatch eval --model "$WORK/stage2" --n 1000 --json | tee "$WORK/stage2/eval.json"
# stage 3: a short continuation of stage 2 (lower lr); this is the shipped model
latentpatch train --out "$WORK/stage3" --init-from "$WORK/stage2" --steps 1100 --seed 2 --lr 7e-4 \
  --warmup 30 --threads 1 --latent-aux-factor 1.0
latentpatch eval --model "$WORK/stage3" --n 1000 --json | tee "$WORK/stage3/eval.json"
