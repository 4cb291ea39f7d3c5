"""Write the default model's card (README.md) from its latentpatch.json, config.json and eval.json.

    python scripts/make_model_card.py MODEL_DIR EVAL_JSON SIGNATURE_JSON [NOTES_MD]

SIGNATURE_JSON: the thought-dependence numbers `scripts/thought_dependence.sh` writes.
NOTES_MD (optional) is a Markdown file whose text goes under "What was tried".
"""

import json
import sys
from pathlib import Path

d, ev = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
sig = json.loads(Path(sys.argv[3]).read_text())
notes = Path(sys.argv[4]).read_text().strip() if len(sys.argv) > 4 else ""
meta = json.loads((d / "latentpatch.json").read_text())
tr, cfg = meta["training"], json.loads((d / "config.json").read_text())
pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
size = sum(f.stat().st_size for f in d.iterdir() if f.is_file() and f.name != "README.md")
targets = [
    ("accuracy >= 95%", ev["accuracy"] >= 0.95),
    ("pairs both correct >= 90%", ev["pairs_both_correct"] >= 0.90),
    ("zero-ablation drop >= 50 points", ev["ablation_accuracy_drop"] >= 0.50),
    ("all thoughts from the clean run give the clean answer >= 70%", sig["source_answer"] >= 0.70),
    ("different-value donor flips > 50%", sig["diff_flip"] > 0.50),
    ("same-value donor flips < 10%", sig["same_flip"] < 0.10),
]
met = ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in targets)
n_layers, d_model, n_heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
quality_rows = [
    (
        f"accuracy, {ev['n']} held-out problems (seed {ev['seed']}, questions not in the training pool)",
        f"**{pct(ev['accuracy'])}**",
    ),
    (
        f"accuracy with all {meta['num_latent']} thoughts replaced by zeros",
        f"{pct(ev['zero_thoughts_accuracy'])} (drop **{pct(ev['ablation_accuracy_drop'])}**)",
    ),
    (
        "accuracy with each thought replaced by its dataset mean",
        f"{pct(ev['mean_thoughts_accuracy'])} (drop {pct(ev['ablation_mean_accuracy_drop'])})",
    ),
    (
        f"default pairs ({ev['n_pairs']}): clean / corrupted correct",
        f"{pct(ev['pairs_clean_accuracy'])} / {pct(ev['pairs_corrupted_accuracy'])}",
    ),
    ("default pairs: both clean and corrupted correct", f"**{pct(ev['pairs_both_correct'])}**"),
    (
        f"default pairs right on both sides ({sig['n_pairs']}): all thoughts from the clean run -> clean answer",
        f"**{pct(sig['source_answer'])}**",
    ),
    (
        "the thought that stores each intermediate: different- / same-value donor flips the answer",
        f"**{pct(sig['diff_flip'])}** / **{pct(sig['same_flip'])}**",
    ),
]
quality = "\n".join(f"| {measure} | {value} |" for measure, value in quality_rows)
train_cmd = (
    f"OMP_NUM_THREADS=1 latentpatch train --out model --steps {tr['steps']} --seed {tr['seed']} --lr {tr['lr']} \\\n"
    f"    --warmup {tr['warmup']} --teacher-only-steps {tr['teacher_only_steps']} "
    f"--latent-aux-factor {tr['latent_aux_factor']} \\\n"
    f"    --thought-aux-factor {tr['thought_aux_factor']} --thought-swap-rate {tr['thought_swap_rate']} "
    f"--answer-blind-rate {tr['answer_blind_rate']} \\\n"
    f"    --number-init {tr['number_init']} --threads {tr['threads']}"
)
stages = tr.get("stages") or []
stage1 = stages[0]["settings"] if stages else tr  # the curriculum runs in stage 1
stages_cmd = (
    "\n".join(f"# stage {st['stage']} ({st['wall_s'] / 60:.1f} min)\n{st['command']}" for st in stages)
    if stages
    else train_cmd
)
wall_s = sum(st["wall_s"] for st in stages) if stages else tr["wall_s"]
in_stages = f" in {len(stages)} stages" if stages else ""
last_stage = "The settings here are the last stage's; the commands below give each stage's. " if stages else ""
card = f"""# latentpatch default model: a small CODI model trained on synthetic arithmetic word problems

A {n_layers}-layer LLaMA-architecture model (d_model {d_model}, {n_heads} heads,
MLP {cfg["intermediate_size"]}, vocabulary {cfg["vocab_size"]}, tied embeddings, fp32, {size / 2**20:.1f} MB)
trained from scratch on CPU by `latentpatch train`{in_stages}, with K = {meta["num_latent"]} continuous thoughts and
the CODI projection `prj` (Linear {cfg["hidden_size"]}->{meta["prj_dim"]}, GELU, Linear, LayerNorm).
Layout: official CODI without LoRA (`codi.model.*`, `prj.1.*`, `prj.3.*`, `prj.ln.*`; `lm_head` tied
and omitted), `latentpatch.json` with the special ids and rollout settings.

## Measured quality (`latentpatch eval --model default --n 1000 --json`, the tool's own rollout)

| measure | value |
|---|---|
{quality}

By template: {", ".join(f"{k} {pct(v)}" for k, v in ev["accuracy_by_template"].items())}.
The {2 * ev["n_pairs"]} questions of the default pairs are not in the training pool
(`pair_questions_in_training`: {ev["pair_questions_in_training"]}).

Project targets: {met}.

## What was tried
{notes}

## Data
`latentpatch.data.synthetic`: 8 English story templates (shopping, class groups, bus stops, baking, savings,
farm rows, reading, sharing), 3-4 steps of + - * / with exact non-negative integer results <= 40
(`MAX_VALUE`); chain of thought in GSM8k-Aug style `<<16-3=13>> <<13*2=26>>`. Training pool:
`generate_problems({tr["train_pool"]}, seed={tr["data_seed"]})` minus the default pairs' questions;
tokenizer trained on its first {tr["tokenizer_corpus"]:,} problems. Held-out evaluation: seed {ev["seed"]},
skipping every question of the training pool. Default pairs: `generate_pairs(57, seed=0)` (one number
changed by a small digit-count-preserving amount; all pairs keep the token length).

## Tokenizer
Byte-level BPE (`tokenizers`), digit runs pre-tokenized apart from text and every integer 0..200 a
single token. Special tokens: `<eos>` = {meta["eos_id"]}, `<pad>` = {meta["pad_id"]}, `<bot>` = {meta["bot_id"]},
`<eot>` = {meta["eot_id"]} (CODI's V, V+1, V+2). No BOS (`add_special_tokens` false).

## Sequences and objective (`latentpatch.training.data`, `latentpatch.training.objective`)
- teacher: `question <bot> CoT <eot> The answer is: N <eos>` (CE on everything after `<bot>`)
- student: `question <bot>` + {meta["num_latent"]} continuous thoughts + `<eot> The answer is: N <eos>` (CE on the
  answer part); thought k = prj(final hidden state of the previous position), fed as an input embedding,
  the last produced thought not fed -- exactly the rollout of `LatentModel` (tested).
- distillation: every layer's hidden state at the lone space token ending "The answer is: ", SmoothL1
  student vs detached teacher divided by the teacher's std, mean over layers, factor {tr["distill_factor"]};
  teacher CE factor {tr["ref_factor"]}.
- an auxiliary loss that is **not part of CODI**, factor {tr["latent_aux_factor"]}: the LM head on the final
  hidden state at latent position j predicts the j-th intermediate result of the program (the answer
  once the program has no more steps). It makes the thoughts carry the intermediate results, which
  the patching tool's thought decoding shows.
- options that make the chain read its thoughts and the answer follow them (also not in CODI;
  `docs/training.md`): answer-blind rows (rate {tr["answer_blind_rate"]}: the answer tokens cannot attend
  to the question); interchange training (rate {tr["thought_swap_rate"]}: thought p is another row's, and
  the row learns the counterfactual targets; of those rows {tr["swap_same_value"]} get a donor with the
  same value and {tr["swap_token_rate"]} are fed the donor value's number-token embedding instead of its
  thought); a thought auxiliary loss (factor {tr["thought_aux_factor"]}: fed thought q, read as a token
  embedding, is step result q - 1) and a match loss (factor {tr["thought_match_factor"]}: 1 - cosine of
  fed thought q with that token's embedding).
- curriculum: the first {stage1["teacher_only_steps"]} steps of training
  train the teacher task only.
- number tokens start from value features (`--number-init {tr["number_init"]}`: the first 32
  embedding dims of token n are 0.1 * [cos, sin](2 pi n / T) for 16 periods T from 2 to 100, the rest
  random); embeddings are tied, so the LM head reads values through the same features.

{last_stage}AdamW (lr {tr["lr"]}, betas 0.9/0.98, weight decay {tr["weight_decay"]} on matrices),
batch {tr["batch_size"]},
{tr["steps"]} steps, linear warmup {tr["warmup"]} + cosine decay to 5%, grad clip {tr["grad_clip"]}, fp32,
`torch.set_num_threads({tr["threads"]})`, seeded init (seed {tr["seed"]}) and data order.

## Training commands (CPU; `scripts/train_default.sh`)
```
{stages_cmd}
```
Wall time: {wall_s:.0f} s ({wall_s / 60:.1f} min) on a 2-core AMD EPYC machine (the other core
busy with a second training run or benchmarks most of the time). Loss log: `train_log.jsonl`
(each line names its `stage`).
`eval.json`: the numbers above (eval wall time {ev["wall_s"]} s).
"""
(d / "README.md").write_text(card)
print(card)
