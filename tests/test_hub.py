"""Hub names offline: a huggingface_hub cache built by the test under a temp HF_HOME with
HF_HUB_OFFLINE=1 (models--ORG--NAME/{refs/main, snapshots/<hash>/..., blobs/...})."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
from test_loading import ALPHA, TARGETS, K, R, V, base_lm, make_codi, run_cli

from latentpatch.errors import LatentPatchError
from latentpatch.model.hub import split_hub_name
from latentpatch.model.load import load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def base_tokenizer():
    """A word-level tokenizer of exactly V = 40 ids (<unk> 0, <bos> 1, <eos> 2, digits, a-z, space)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789abcdefghijklmnopqrstuvwxyz ")
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) == V
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def cache_repo(hub, repo: str, write, commit: str = COMMIT) -> None:
    """One repository in huggingface_hub's cache layout: files written by ``write(dir)`` become
    blobs (named by their sha256) linked from ``snapshots/<commit>``; ``refs/main`` names the commit."""
    root = hub / ("models--" + repo.replace("/", "--"))
    staging = root / "staging"
    staging.mkdir(parents=True)
    write(staging)
    snap, blobs = root / "snapshots" / commit, root / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    for f in sorted(staging.iterdir()):
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(blob)
        f.unlink()
    staging.rmdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A temp HF_HOME holding testorg/tiny-base (config + tokenizer), testorg/tiny-codi (a CODI
    GPT-2 checkpoint) and testorg/tiny-coconut (a Coconut file), offline."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module, _ = make_codi("gpt2")
    cache_repo(
        home / "hub",
        "testorg/tiny-base",
        lambda d: (base_lm("gpt2").config.save_pretrained(d), base_tokenizer().save_pretrained(d)),
    )
    cache_repo(home / "hub", "testorg/tiny-codi", lambda d: torch.save(module.state_dict(), d / "pytorch_model.bin"))
    lm = base_lm("gpt2")
    lm.resize_token_embeddings(V + 3, mean_resizing=False)
    sd = {"base_causallm." + k: v for k, v in lm.state_dict().items()}
    sd["embedding.weight"] = lm.get_input_embeddings().weight
    cache_repo(home / "hub", "testorg/tiny-coconut", lambda d: torch.save(sd, d / "checkpoint_6"))
    return module


def codi(spec: str = "codi:testorg/tiny-codi", **kw):
    args = dict(lora_r=R, lora_alpha=ALPHA, lora_targets=",".join(TARGETS["gpt2"]), num_latent=K)
    return load_model(spec, base=kw.pop("base", "testorg/tiny-base"), **{**args, **kw})


def test_split_hub_name():
    assert split_hub_name("zen-E/CODI-llama3.2-1b-Instruct@v1.0") == ("zen-E/CODI-llama3.2-1b-Instruct", "v1.0")
    assert split_hub_name("/abs/path") is None and split_hub_name("just-a-name") is None


def test_codi_and_base_from_the_cache_offline(hub):
    m = codi()
    assert m.name.startswith("codi:testorg/tiny-codi") and m.tokenizer is not None and m.config.eos_id == 2
    assert m.prompt_ids("ab 1") == [13, 14, 39, 4, V + 1]  # the base's tokenizer from the cache
    at_commit = codi(f"codi:testorg/tiny-codi@{COMMIT}", base=f"testorg/tiny-base@{COMMIT}")
    r1, r2 = m.rollout([[5, 6, V + 1]]), at_commit.rollout([[5, 6, V + 1]])
    assert torch.equal(r1.answer_logits, r2.answer_logits)


def test_coconut_file_from_the_cache(hub):
    m = load_model("coconut:testorg/tiny-coconut:checkpoint_6", base="testorg/tiny-base", num_latent=K)
    assert m.config.decoding == "coconut" and m.name == "coconut:testorg/tiny-coconut:checkpoint_6"


@pytest.mark.parametrize(
    "spec,base,repo",
    [
        ("codi:testorg/not-here", "testorg/tiny-base", "testorg/not-here"),
        ("codi:testorg/tiny-codi", "gpt2", "gpt2"),
        ("codi:testorg/tiny-codi@v9", "testorg/tiny-base", "testorg/tiny-codi"),
        ("coconut:testorg/other:checkpoint_6", "testorg/tiny-base", "testorg/other"),
    ],
)
def test_not_cached_offline_is_one_fast_line(hub, spec, base, repo):
    start = time.monotonic()
    with pytest.raises(LatentPatchError) as err:
        codi(spec, base=base) if spec.startswith("codi") else load_model(spec, base=base)
    assert time.monotonic() - start < 3.0
    msg = str(err.value)
    assert "\n" not in msg and repo in msg and f"hf download {repo}" in msg and "HF_HOME" in msg


def test_inspect_with_hub_names(hub, capsys):
    args = ["--lora-r", str(R), "--lora-alpha", str(ALPHA), "--num-latent", str(K), "--max-new-tokens", "3"]
    code, out, err = run_cli(
        capsys, "inspect", "--model", "codi:testorg/tiny-codi", "--base", "testorg/tiny-base", "--question", "ab", *args
    )
    assert code == 0, err
    assert "model: codi:testorg/tiny-codi" in out and "thought 2:" in out and "probe latent 3" in out
