#!/usr/bin/env bash
# Retrain the shipped default model (src/latentpatch/default_model) from scratch on CPU, in four
# stages (see the model card and docs/training.md), then collect them into one model directory.
# Wall time on a 2-core AMD EPYC machine: 31 + 31 min on two threads, then 25 + 34 min on one
# (the other core busy with a second run). Each stage is deterministic given its seed and threads.
#   stage 1: `latentpatch train`'s defaults: the CODI objective plus the options that make the chain
#            read its thoughts (interchange with token-fed swaps, thought losses, answer-blind rows);
#   stages 2-4: the same options, continued at lr 2e-3, 1e-3, 1e-3.
set -euo pipefail
WORK=${1:-default_model_build}
mkdir -p "$WORK"
latentpatch train --out "$WORK/stage1" --threads 2
latentpatch train --out "$WORK/stage2" --init-from "$WORK/stage1" --seed 1 --lr 2e-3 --teacher-only-steps 0 --threads 2
latentpatch train --out "$WORK/stage3" --init-from "$WORK/stage2" --steps 2000 --seed 2 --lr 1e-3 --warmup 20 \
  --teacher-only-steps 0 --threads 1
latentpatch train --out "$WORK/stage4" --init-from "$WORK/stage3" --seed 3 --lr 1e-3 --warmup 20 \
  --teacher-only-steps 0 --threads 1
python scripts/collect_stages.py "$WORK/model" "$WORK"/stage{1,2,3,4}
latentpatch eval --model "dir:$WORK/model" --n 1000 --json | tee "$WORK/model/eval.json"
scripts/thought_dependence.sh "dir:$WORK/model" "$WORK/thought_dependence"
cp "$WORK/thought_dependence/signature.json" "$WORK/model/signature.json"
python scripts/chain_follow.py "dir:$WORK/model"
