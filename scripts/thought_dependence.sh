#!/usr/bin/env bash
# Measure whether a model's answers follow its thoughts (docs/method.md §13, "Do the answers follow
# the thoughts?") on the 57 default pairs with their intermediates, and write the three numbers of
# thought_signature to OUT/signature.json (the model card reads it).
#   scripts/thought_dependence.sh MODEL OUT      (MODEL: default | dir:PATH)
set -euo pipefail
MODEL=${1:?model (default | dir:PATH)}
OUT=${2:?output directory}
mkdir -p "$OUT"
latentpatch pairs generate --n 57 --seed 0 --intermediates --out "$OUT/pairs.json"
latentpatch run --model "$MODEL" --pairs "$OUT/pairs.json" --experiments thought,intermediate \
  --out "$OUT/run" --threads 1 --no-use-cache
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from latentpatch.analysis.steps_section import read_steps, thought_signature
out = Path(sys.argv[1])
sig = thought_signature(read_steps(out / "run")[0])
(out / "signature.json").write_text(json.dumps(sig, indent=1) + "\n")
print(json.dumps(sig))
PY
