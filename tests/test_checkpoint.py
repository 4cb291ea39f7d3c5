"""The strict checkpoint core on its own: a tiny nn.Module, hand-made state dicts, no transformers model.

Every missing, unexpected or wrongly shaped key must be named in the error; LoRA must merge as
``W + (alpha / r) B A``; a tied head may be absent from the file.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from latentpatch.errors import LatentPatchError
from latentpatch.model.checkpoint import LoraSpec, load_weights_strict, read_state_dict
from latentpatch.model.config import build_prj

V, D, PRJ = 10, 4, 6


class TinyLM(nn.Module):
    """The smallest module the strict core accepts: input embeddings, one linear layer, a head."""

    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def file_state(seed: int = 0, prefix: str = "m.") -> dict[str, torch.Tensor]:
    """A complete file for TinyLM (untied) + build_prj(D, PRJ): random values, distinct from a fresh module's."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (V, D), "proj.weight": (D, D), "proj.bias": (D,), "head.weight": (V, D)}
    sd = {prefix + k: torch.randn(s, generator=g) for k, s in shapes.items()}
    prj = build_prj(D, PRJ)
    sd.update({"prj." + k: torch.randn(v.shape, generator=g) for k, v in prj.state_dict().items()})
    return sd


def load(sd: dict[str, torch.Tensor], tie: bool = False, **kwargs) -> tuple[TinyLM, nn.Module]:
    lm, prj = TinyLM(tie), build_prj(D, PRJ)
    load_weights_strict(lm, prj, sd, file="tiny.safetensors", prefix="m.", **kwargs)
    return lm, prj


def test_every_key_lands_where_it_belongs():
    sd = file_state()
    lm, prj = load(sd)
    for key, value in lm.state_dict().items():
        assert torch.equal(value, sd["m." + key]), key
    for key, value in prj.state_dict().items():
        assert torch.equal(value, sd["prj." + key]), key


def test_missing_key_is_named():
    sd = file_state()
    del sd["m.proj.bias"]
    with pytest.raises(LatentPatchError, match=r"tiny\.safetensors: 1 missing key\(s\) \(m\.proj\.bias\)"):
        load(sd)


def test_missing_projection_key_is_named():
    sd = file_state()
    del sd["prj.3.weight"]
    with pytest.raises(LatentPatchError, match=r"missing key\(s\) \(prj\.3\.weight\)"):
        load(sd)


def test_unexpected_key_is_named():
    sd = file_state()
    sd["m.extra.weight"] = torch.zeros(2)
    with pytest.raises(LatentPatchError, match=r"1 unexpected key\(s\) \(m\.extra\.weight\)"):
        load(sd)


def test_wrong_shape_is_named():
    sd = file_state()
    sd["m.proj.weight"] = torch.zeros(D, D + 1)
    with pytest.raises(LatentPatchError, match=r"m\.proj\.weight is \[4, 5\], expected \[4, 4\]"):
        load(sd)


def test_wrong_prefix_names_the_keys():
    sd = file_state(prefix="other.")
    with pytest.raises(LatentPatchError, match=r"missing key\(s\) \(m\.embed\.weight"):
        load(sd)


def test_tied_head_may_be_absent():
    sd = file_state()
    del sd["m.head.weight"]
    lm, _ = load(sd, tie=True)
    assert torch.equal(lm.head.weight, sd["m.embed.weight"])
    assert lm.head.weight is lm.embed.weight
    with pytest.raises(LatentPatchError, match=r"m\.head\.weight"):  # untied: the head is required
        load(sd, tie=False)


def test_lora_merges_as_w_plus_scaled_b_a():
    r, alpha = 2, 3.0
    sd = file_state()
    W, bias = sd.pop("m.proj.weight"), sd.pop("m.proj.bias")
    sd["m.proj.base_layer.weight"], sd["m.proj.base_layer.bias"] = W, bias  # current peft spelling
    A, B = torch.randn(r, D), torch.randn(D, r)  # A [r, in], B [out, r]
    sd["m.proj.lora_A.default.weight"], sd["m.proj.lora_B.default.weight"] = A, B
    lm, _ = load(sd, lora=LoraSpec(r=r, alpha=alpha, targets=("proj",)))
    torch.testing.assert_close(lm.proj.weight, W + (alpha / r) * (B @ A), rtol=0, atol=1e-6)
    assert torch.equal(lm.proj.bias, bias)
    assert torch.equal(lm.embed.weight, sd["m.embed.weight"])  # untargeted modules untouched


def test_lora_rank_mismatch_is_named():
    sd = file_state()
    sd["m.proj.base_layer.weight"], sd["m.proj.base_layer.bias"] = sd.pop("m.proj.weight"), sd.pop("m.proj.bias")
    sd["m.proj.lora_A.default.weight"], sd["m.proj.lora_B.default.weight"] = torch.zeros(3, D), torch.zeros(D, 3)
    with pytest.raises(LatentPatchError, match=r"m\.proj\.lora_A\.default\.weight is \[3, 4\], expected \[2, 4\]"):
        load(sd, lora=LoraSpec(r=2, alpha=4.0, targets=("proj",)))


def test_lora_without_a_matching_module_is_refused():
    with pytest.raises(LatentPatchError, match="none of the LoRA targets"):
        load(file_state(), lora=LoraSpec(r=2, alpha=4.0, targets=("q_proj",)))


def test_read_state_dict_file_and_directory(tmp_path):
    sd = {k: v.contiguous() for k, v in file_state().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    for where in (tmp_path, tmp_path / "model.safetensors"):
        got, file = read_state_dict(where)
        assert file == tmp_path / "model.safetensors"
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentPatchError, match="no model.safetensors or pytorch_model.bin"):
        read_state_dict(tmp_path / "empty")
