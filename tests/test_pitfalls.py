"""Known checkpoint pitfalls (docs/checkpoints.md): each is a correct load or one line naming the key and the fix."""

from __future__ import annotations

import pytest
import torch
from test_loading import EMB, HEAD, V, assert_matches_unmerged, load, make_codi, old_spelling, save_base, save_ckpt

from latentpatch.errors import LatentPatchError


def fails(family, sd, tmp_path, name, **kw) -> str:
    ckpt = save_ckpt(sd, tmp_path / name)
    with pytest.raises(LatentPatchError) as err:
        load(family, ckpt, save_base(tmp_path, family), **kw)
    msg = str(err.value)
    assert "\n" not in msg and str(ckpt) in msg and "fix:" in msg
    return msg


@pytest.mark.parametrize("which", ["lora_A", "base_layer", "prj.ln.bias"])
def test_one_missing_key_is_said_to_be_missing_from_the_file(tmp_path, which):
    module, _ = make_codi("llama")
    sd = dict(module.state_dict())
    key = next(k for k in sd if which in k and (which.startswith("prj") or "layers.0.mlp.up_proj" in k))
    msg = fails("llama", {k: v for k, v in sd.items() if k != key}, tmp_path, "one_missing")
    assert key in msg
    if which == "prj.ln.bias":  # the projection's LayerNorm: its own hint
        assert "prj.ln" in msg
    else:
        assert "missing from the file" in msg and "--lora-targets" not in msg


def test_llama_special_rows_come_from_the_file(tmp_path):
    """CODI's LLaMA checkpoint holds base vocabulary + 3 rows ([PAD]/[BOT]/[EOT]); the model is
    resized before loading, so those rows are the file's own, not dropped or re-initialised."""
    module, _ = make_codi("llama")
    sd = dict(module.state_dict())
    m = load("llama", save_ckpt(sd, tmp_path / "ok"), save_base(tmp_path, "llama"))
    assert m.lm.get_input_embeddings().weight.shape[0] == V + 3
    assert torch.equal(m.lm.get_input_embeddings().weight[V:], sd[EMB["llama"]][V:])
    assert torch.equal(m.lm.get_output_embeddings().weight[V:], sd[HEAD][V:])
    assert_matches_unmerged(m, module)


@pytest.mark.parametrize("rows,needle", [(V, "before CODI's +3 resize"), (V + 5, f"a base of {V + 2} tokens fits")])
def test_embedding_rows_that_do_not_fit_are_named(tmp_path, rows, needle):
    module, _ = make_codi("llama")
    sd = dict(module.state_dict())
    for key in (EMB["llama"], HEAD):
        w = sd[key]
        sd[key] = w[:rows] if rows <= w.shape[0] else torch.cat([w, w[: rows - w.shape[0]]])
    msg = fails("llama", sd, tmp_path, f"rows{rows}")
    assert EMB["llama"] in msg and needle in msg and "--base" in msg


def test_gpt2_tied_head_stored_untied_loads(tmp_path):
    """GPT-2 ties lm_head to wte; the official state dict stores both (safetensors: two copies)."""
    module, _ = make_codi("gpt2", tie=True)
    sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
    assert HEAD in sd and torch.equal(sd[HEAD], sd[EMB["gpt2"]])
    m = load("gpt2", save_ckpt(sd, tmp_path / "g", "safetensors"), save_base(tmp_path, "gpt2", tie=True))
    assert m.lm.get_output_embeddings().weight is m.lm.get_input_embeddings().weight
    assert_matches_unmerged(m, module)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_old_and_new_peft_spellings_load_mixed_is_named(tmp_path, family):
    module, _ = make_codi(family)
    sd = dict(module.state_dict())
    base = save_base(tmp_path, family)
    for spelling, state in (("new", sd), ("old", old_spelling(sd))):
        assert_matches_unmerged(load(family, save_ckpt(state, tmp_path / spelling), base), module)
    key = next(k for k in sd if ".base_layer." in k)
    mixed = {(k.replace(".base_layer", "") if k == key else k): v for k, v in sd.items()}
    msg = fails(family, mixed, tmp_path, "mixed")
    assert key in msg and "peft" in msg
