"""The ``probe`` experiment of a run (docs/method.md §16): activations once, then a probe per label x site.

1. The question set: ``--questions FILE`` (:func:`latentpatch.data.questions.load_questions`), or the
   run's pairs, both sides (a pair is one group: its two questions never straddle a split).
2. Activations: one batched rollout per shard of questions records every site
   (:mod:`latentpatch.probing.activations`), committed as ``results/activations/NNNNN.safetensors``;
   ``--resume`` skips the shards already written.
3. ``results/questions.parquet``: per question its id, group, answer, intermediates, the user's label
   columns and the model's greedy answer (``pred_answer``, ``correct``).
4. ``results/probes.parquet``: per label (the answer, each intermediate, ``correct``, each user label
   column) and site (component x layer x position, the thought before/after the feedback), the
   grouped cross-validated probe of :func:`latentpatch.probing.probes.probe_site`: held-out accuracy
   with a CI, the majority and random-vector baselines, the control task and the selectivity.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from latentpatch.data.pairs import Pair
from latentpatch.data.questions import load_questions, save_questions
from latentpatch.errors import LatentPatchError
from latentpatch.files import atomic_write_bytes
from latentpatch.model.streams import pair_stream
from latentpatch.names import (
    ACTIVATION_SHARD,
    ACTIVATIONS_DIR,
    DAS_EXPERIMENT,
    PROBE_EXPERIMENT,
    PROBES_FILE,
    QUESTIONS_FILE,
    probe_position_names,
)
from latentpatch.patching.metrics import same_number
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.manifest import RunContext
from latentpatch.pipeline.options import parse_shard
from latentpatch.pipeline.progress import RunProgress
from latentpatch.probing.activations import read_shard_rows, read_sites, record_shard, write_shard

if TYPE_CHECKING:
    from latentpatch.data.questions import QuestionSet

#: The default ``--probe-min-count``: a label value is a class with at least this many questions.
MIN_COUNT = 10
#: A shard's copy of the run's question set (under ``results/activations/``), from which ``merge`` fits the probes.
SHARD_QUESTIONS = "questions.jsonl"
#: Labels a probe reads besides the user's columns: the answer, whether the model is right, each intermediate.
BUILTIN_LABELS = ("answer", "correct")


def question_set(ctx: RunContext, all_pairs: Sequence[Pair]) -> QuestionSet:
    """``--questions`` (loaded strictly), else the run's pairs as questions."""
    from latentpatch.data.questions import load_questions, questions_from_pairs

    if ctx.config.questions:
        qs = load_questions(ctx.config.questions, skip_unparsed=bool(ctx.config.skip_unparsed))
        if qs.skipped:
            ctx.progress.warn(qs.describe())
        return qs
    return questions_from_pairs(list(all_pairs))


def check_question_file(config) -> None:
    """Load ``--questions`` once before the run starts, so a bad record is one line before any work."""
    if PROBE_EXPERIMENT in config.experiments and config.questions:
        from latentpatch.data.questions import load_questions

        load_questions(config.questions, skip_unparsed=bool(config.skip_unparsed))
    if DAS_EXPERIMENT in config.experiments and config.questions:  # the das variable on this set
        from latentpatch.pipeline.das_questions import check_das_questions

        check_das_questions(config)


def shard_path(ctx: RunContext, k: int):
    return ctx.paths.results / ACTIVATIONS_DIR / f"{k:05d}.safetensors"


def chunks_of(shard: str | None, n_chunks: int) -> list[int]:
    """The activation files a run records: every one, or with ``--shard i/N`` those k with k mod N == i
    (the questions are the same in every shard: the file's, not the shard's pairs).

    >>> chunks_of(None, 3), chunks_of("1/2", 5)
    ([0, 1, 2], [1, 3])
    """
    if shard is None:
        return list(range(n_chunks))
    i, n = parse_shard(shard)
    return [k for k in range(n_chunks) if k % n == i]


def record_activations(ctx: RunContext, qs: QuestionSet) -> list[dict[str, Any]]:
    """Record every activation file of this run (:func:`chunks_of`) not yet written; return their
    questions' rows (id, pred_answer, correct) in question order."""
    model, questions = ctx.model, qs.questions
    components = ctx.config.probe_component_list
    n_shards = math.ceil(len(questions) / ACTIVATION_SHARD)
    (ctx.paths.results / ACTIVATIONS_DIR).mkdir(parents=True, exist_ok=True)
    rows: dict[int, list[dict[str, Any]]] = {}
    for k in chunks_of(ctx.config.shard, n_shards):
        got = read_shard_rows(shard_path(ctx, k))
        want = [q.question_id for q in questions[k * ACTIVATION_SHARD : (k + 1) * ACTIVATION_SHARD]]
        if got is not None and [r["question_id"] for r in got] == want:
            rows[k] = got
    todo = [k for k in chunks_of(ctx.config.shard, n_shards) if k not in rows]
    ctx.progress.stage(
        "activations", sum(len(questions[k * ACTIVATION_SHARD : (k + 1) * ACTIVATION_SHARD]) for k in todo)
    )
    t = time.perf_counter()
    batch = min(int(ctx.batch_size), ACTIVATION_SHARD)
    for k in todo:
        part = questions[k * ACTIVATION_SHARD : (k + 1) * ACTIVATION_SHARD]
        prompts, keys = [model.prompt_ids(q.question) for q in part], [pair_stream(q.group) for q in part]
        shard = record_shard(model, prompts, components, batch, keys)  # each question's group's draws (§21)
        rows[k] = [
            {"question_id": q.question_id, "pred_answer": pred, "correct": bool(same_number(pred, q.answer))}
            for q, pred in zip(part, shard.pred_answers)
        ]
        write_shard(
            shard_path(ctx, k), shard, rows[k], model.num_latent, components, ctx.config.activation_dtype or "float32"
        )
        ctx.progress.advance(len(part))
    ctx.timings["activations_s"] = ctx.timings.get("activations_s", 0.0) + time.perf_counter() - t
    return [r for k in sorted(rows) for r in rows[k]]


def questions_table(qs: QuestionSet, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """``results/questions.parquet``: one row per question, its labels and the model's answer."""
    n_inter = max((len(q.intermediates or ()) for q in qs.questions), default=0)
    user = [name for name in qs.label_names() if name not in BUILTIN_LABELS and not name.startswith("intermediate_")]
    records = []
    for q, r in zip(qs.questions, rows):
        rec: dict[str, Any] = {
            "question_id": q.question_id,
            "group": q.group,
            "question": q.question,
            "answer": float(q.answer),
            "pred_answer": r["pred_answer"],
            "correct": r["correct"],
        }
        for s in range(n_inter):
            vals = q.intermediates or ()
            rec[f"intermediate_{s}"] = float(vals[s]) if s < len(vals) else None
        for name in user:
            value = q.labels.get(name)
            rec[f"label_{name}"] = None if value is None else str(value)
        records.append(rec)
    return pd.DataFrame(records)


def probe_labels(table: pd.DataFrame) -> dict[str, list]:
    """The labels probed: the answer, ``correct``, each intermediate, each user label column (values as
    class keys: numbers as their exact value, strings as given; None where a question lacks it)."""
    out: dict[str, list] = {}
    for col in table.columns:
        if col in ("answer", "correct") or col.startswith("intermediate_"):
            out[col] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in table[col]]
        elif col.startswith("label_"):
            out[col[len("label_") :]] = [None if v is None else v for v in table[col]]
    return out


def probe_sites(sites: dict[str, Any], num_latent: int, components: Sequence[str]) -> dict[tuple[str, int, str], Any]:
    """``(component, layer, position) -> X [n, d]`` (numpy float32) of every site in the shards;
    the thoughts have layer -1."""
    names = probe_position_names(num_latent)
    out = {}
    for c in components:
        t = sites[c]  # [n, L, K+2, d]
        for layer in range(t.shape[1]):
            for j, pos in enumerate(names):
                out[(c, layer, pos)] = t[:, layer, j].numpy()
    for site in ("thought", "thought_pre"):
        if site in sites:
            for p in range(sites[site].shape[1]):
                out[(site, -1, f"t{p}")] = sites[site][:, p].numpy()
    return out


def site_name(component: str, layer: int, position: str) -> str:
    """A site's key in :func:`~latentpatch.probing.probes.probe_all` (``component|layer|position``)."""
    return f"{component}|{layer}|{position}"


#: What the forked probe workers read (set in the parent before the pool starts: inherited, not pickled).
_SHARED: dict[str, Any] = {}


def _probe_label(label: str) -> tuple[str, list[dict[str, Any]] | str]:
    """One label's records over every site (or why it cannot be probed), from :data:`_SHARED`."""
    from latentpatch.probing.probes import probe_all

    values = _SHARED["labels"][label]
    sites, groups, seed = _SHARED["sites"], _SHARED["groups"], _SHARED["seed"]
    try:
        records = probe_all(sites, values, groups, seed=seed, min_count=_SHARED["min_count"])
    except ValueError as ex:  # fewer than 2 classes or 2 groups with enough questions: not probed
        return label, str(ex)
    if _SHARED["regression"] and numeric(values):
        records += probe_all(sites, values, groups, kind="regression", seed=seed)
    return label, records


def numeric(values: list) -> bool:
    """Whether a label is a magnitude (every known value a number, not a bool): regression applies.

    >>> numeric([1.0, None, 3]), numeric([True, False]), numeric(["mul", 2.0])
    (True, False, False)
    """
    known = [v for v in values if v is not None]
    return bool(known) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in known)


def run_probes(
    results: Path, config: RunConfig, num_latent: int, table: pd.DataFrame, progress: RunProgress
) -> tuple[pd.DataFrame, float]:
    """Every label x site probe on the recorded activation files under ``results`` (and its seconds);
    per label, the same grouped splits (and control map) for every site, so the sites' scores are
    comparable. Labels run side by side in forked processes where cores allow (each label's numbers
    do not depend on where it runs). No model: ``merge`` runs it for a sharded probe run."""
    paths = sorted((results / ACTIVATIONS_DIR).glob("*.safetensors"))
    sites = probe_sites(read_sites(paths), num_latent, config.probe_component_list)
    labels = probe_labels(table)
    _SHARED.update(
        sites={site_name(*key): X for key, X in sites.items()},
        labels=labels,
        groups=np.asarray(table["group"].astype(str)),
        seed=config.seed,
        min_count=config.probe_min_count or MIN_COUNT,
        regression=bool(config.probe_regression),
    )
    progress.stage("probes", len(labels))
    t = time.perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    found: dict[str, list[dict[str, Any]] | str] = {}
    try:
        if cores >= 2 and len(labels) > 1 and "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=min(cores, len(labels)), mp_context=context) as pool:
                for label, result in pool.map(_probe_label, labels):
                    found[label] = result
                    progress.advance(1)
        else:
            for label in labels:
                found[label] = _probe_label(label)[1]
                progress.advance(1)
    finally:
        _SHARED.clear()
    seconds = time.perf_counter() - t
    records = []
    for label, result in found.items():
        if isinstance(result, str):
            progress.warn(f"probe: label {label!r} not probed: {result}")
            continue
        for rec in result:
            component, layer, position = rec.pop("site").split("|")
            records.append({"label": label, "component": component, "layer": int(layer), "position": position, **rec})
    return pd.DataFrame(records), seconds


def sweep_probes(ctx: RunContext, all_pairs: Sequence[Pair]) -> None:
    """The probe experiment, when ``--experiments`` names it (a default run never calls it)."""
    if PROBE_EXPERIMENT not in ctx.config.experiments:
        return
    qs = question_set(ctx, all_pairs)
    rows = record_activations(ctx, qs)
    if ctx.config.shard is not None:  # the probes read every question: ``merge`` fits them (fit_probes)
        save_questions(qs, ctx.paths.results / ACTIVATIONS_DIR / SHARD_QUESTIONS)
        ctx.probe_fit = "merge"
        return
    table = questions_table(qs, rows)
    write_parquet(ctx.paths.results / QUESTIONS_FILE, table)
    probes_path = ctx.paths.results / PROBES_FILE
    if not probes_path.is_file():  # deterministic: a resumed run keeps a finished table
        frame, ctx.timings["probes_s"] = run_probes(
            ctx.paths.results, ctx.config, ctx.model.num_latent, table, ctx.progress
        )
        write_parquet(probes_path, frame)


def fit_probes(results: Path, config: RunConfig, num_latent: int, progress: RunProgress) -> float:
    """The probe tables of a merged sharded run (``results``: its folder, holding every shard's
    activation files and one shard's question set): ``questions.parquet`` and ``probes.parquet``,
    the bytes an unsharded run writes; returns the probes' seconds."""
    qs = load_questions(results / ACTIVATIONS_DIR / SHARD_QUESTIONS)
    rows = []
    for k in range(math.ceil(len(qs.questions) / ACTIVATION_SHARD)):
        got = read_shard_rows(results / ACTIVATIONS_DIR / f"{k:05d}.safetensors")
        want = [q.question_id for q in qs.questions[k * ACTIVATION_SHARD : (k + 1) * ACTIVATION_SHARD]]
        if got is None or [r["question_id"] for r in got] != want:
            raise LatentPatchError(
                f"results/{ACTIVATIONS_DIR}/{k:05d}.safetensors is missing or holds other questions; "
                "fix: rerun its shard with --resume, then merge again"
            )
        rows += got
    (results / ACTIVATIONS_DIR / SHARD_QUESTIONS).unlink()  # a shard's file: the merged run is an unsharded one
    table = questions_table(qs, rows)
    write_parquet(results / QUESTIONS_FILE, table)
    frame, seconds = run_probes(results, config, num_latent, table, progress)
    write_parquet(results / PROBES_FILE, frame)
    return seconds


def write_parquet(path, frame: pd.DataFrame) -> None:
    """``frame`` as parquet, atomically."""
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())
