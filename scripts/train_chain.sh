#!/usr/bin/env bash
# The candidate recipe for a shipped model whose chain reads its thoughts (docs/training.md, "From
# scratch with token-fed swaps"): not the shipped model yet (stage 2 reaches 74.8% held out).
# Wall time on a 2-core AMD EPYC machine: stage 1 31 min and stage 2 31 min on two threads,
# stage 3 ~22 min on one.
set -euo pipefail
WORK=${1:-chain_model_build}
mkdir -p "$WORK"
CHAIN="--latent-aux-factor 1.0 --thought-aux-factor 1 --thought-swap-rate 0.5 --swap-same-value 0.25 \
  --swap-token-rate 0.5 --thought-match-factor 1.0 --answer-blind-rate 0.5"
latentpatch train --out "$WORK/stage1" --steps 3000 --seed 0 --lr 4e-3 --warmup 50 --teacher-only-steps 300 \
  --number-init fourier $CHAIN --threads 2
latentpatch train --out "$WORK/stage2" --init-from "$WORK/stage1" --steps 3000 --seed 1 --lr 2e-3 --warmup 50 \
  --teacher-only-steps 0 $CHAIN --threads 2
latentpatch train --out "$WORK/stage3" --init-from "$WORK/stage2" --steps 2000 --seed 2 --lr 1e-3 --warmup 20 \
  --teacher-only-steps 0 $CHAIN --threads 1
for stage in stage1 stage2 stage3; do
  latentpatch eval --model "dir:$WORK/$stage" --n 1000 --json > "$WORK/$stage/eval.json"
  python scripts/chain_follow.py "dir:$WORK/$stage" | tee "$WORK/$stage/chain_follow.txt"
  scripts/thought_dependence.sh "dir:$WORK/$stage" "$WORK/$stage/thought_dependence"
done
