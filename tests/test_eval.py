"""``latentpatch eval`` on any model spec: training questions are excluded only for latentpatch model dirs."""

from __future__ import annotations

import json

from latentpatch.data.pairs import save_pairs
from latentpatch.data.synthetic import generate_pairs
from latentpatch.model.load import DEFAULT_MODEL_DIR
from latentpatch.training.evaluate import model_dir_of, training_questions


def test_model_dir_of_specs(tmp_path):
    assert model_dir_of("default") == DEFAULT_MODEL_DIR
    assert model_dir_of(f"dir:{tmp_path}") == tmp_path
    assert model_dir_of(str(DEFAULT_MODEL_DIR)) == DEFAULT_MODEL_DIR  # a plain path to a model dir
    for spec in ("config:llama", f"codi:{DEFAULT_MODEL_DIR}", "coconut:x.pt", "gguf:x.gguf", str(tmp_path)):
        assert model_dir_of(spec) is None, spec
    assert training_questions(None) is None and training_questions(tmp_path) is None


def test_eval_of_a_non_directory_spec_skips_training_questions(tmp_path, capsys):
    from latentpatch.cli import main

    pairs = tmp_path / "pairs.json"
    save_pairs(generate_pairs(2, seed=1), pairs)
    args = ["eval", "--model", "config:llama", "--n", "3", "--batch-size", "4", "--pairs", str(pairs)]
    main(args)
    text = capsys.readouterr().out
    assert "model: config:llama" in text and "training questions: unknown" in text
    main(args + ["--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["training_questions_known"] is False and res["excluded_training_questions"] == 0
    assert res["n"] == 3 and res["n_pairs"] == 2
