"""Make one model directory from a model trained in stages with `latentpatch train --init-from`.

    python scripts/collect_stages.py OUT STAGE_DIR [STAGE_DIR ...]

OUT gets the last stage's weights, config and tokenizer; its latentpatch.json keeps the last stage's
`training` settings plus `training.stages` (each stage's command, rebuilt from the options that differ
from `latentpatch train`'s defaults, its wall time and all its settings), and its train_log.jsonl is every stage's log,
each line tagged with its `stage`. The model card (scripts/make_model_card.py) reads both.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path

from latentpatch.training.config import TrainConfig

COPIED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
NOT_OPTIONS = {"wall_s", "out", "stages", "ckpt_every"}  # ckpt_every: snapshots only, same model


def stage_command(training: dict, number: int) -> str:
    """The `latentpatch train` command of one stage: the options that differ from the defaults."""
    parts = ["latentpatch train", f"--out stage{number}"]
    for f in fields(TrainConfig):
        if f.name in NOT_OPTIONS or f.name not in training or training[f.name] == f.default:
            continue
        flag, value = "--" + f.name.replace("_", "-"), training[f.name]
        if f.name == "init_from":
            value = f"stage{number - 1}"
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


def main(out: Path, stage_dirs: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    last = stage_dirs[-1]
    for name in COPIED:
        shutil.copyfile(last / name, out / name)
    stages, log_lines = [], []
    for number, d in enumerate(stage_dirs, start=1):
        training = json.loads((d / "latentpatch.json").read_text())["training"]
        command = stage_command(training, number)
        stages.append({"stage": number, "command": command, "wall_s": training["wall_s"], "settings": training})
        for line in (d / "train_log.jsonl").read_text().splitlines():
            if line.strip():
                log_lines.append(json.dumps({"stage": number, **json.loads(line)}))
    meta = json.loads((last / "latentpatch.json").read_text())
    meta["training"]["init_from"] = f"stage{len(stage_dirs) - 1}" if len(stage_dirs) > 1 else ""
    meta["training"]["stages"] = stages
    (out / "latentpatch.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / "train_log.jsonl").write_text("\n".join(log_lines) + "\n")
    for st in stages:
        print(f"stage {st['stage']} ({st['wall_s'] / 60:.1f} min): {st['command']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]])
