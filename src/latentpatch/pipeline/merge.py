"""Merge shard run directories (``latentpatch run --shard i/N``) into one run directory.

Shard i of N runs pairs k with k mod N == i of the filtered, limited pair list and names each
pair's result file by its global index (``results/pairs/{k:05d}.json``, and likewise under every
other stage folder: ``steps/``, ``lens/``, ``attention/``, ``atp/``). Merging checks that the
shards belong together, copies every stage folder's per-pair files, writes ``pairs.json`` in
global order and a merged manifest, then runs the model-free :func:`latentpatch.assembly.assemble`
(every stage's tables): ``results/`` ends up as an unsharded run would write it. See ``docs/scaling.md``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from latentpatch.assembly import ASSEMBLERS, assemble
from latentpatch.data.pairs import Pair, load_pairs, save_pairs
from latentpatch.errors import LatentPatchError
from latentpatch.names import ACTIVATIONS_DIR, GLOBAL_REPLACEMENTS
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.options import parse_shard, parse_values
from latentpatch.rundir import PAIRS_DIR, Manifest, RunPaths, read_manifest

#: Manifest config keys that may differ between shards of one run.
FREE_KEYS = {f.name for f in dataclasses.fields(RunConfig) if not f.metadata["results"]} | {"shard"}


def _complete_manifest(run_dir: Path) -> Manifest:
    """The typed manifest of a finished shard (an unfinished shard is refused)."""
    data = read_manifest(run_dir)
    if data.get("status") != "complete":
        raise LatentPatchError(
            f"{run_dir} is not complete (status {data.get('status')!r}); fix: finish it with "
            "`latentpatch run ... --resume` before merging"
        )
    return Manifest.from_dict(data, RunPaths(run_dir).manifest)


def _shard(m: Manifest) -> str:
    """The shard ``i/N`` a manifest was run as (an unsharded run is shard 0/1)."""
    return m.config.get("shard") or "0/1"


def _settings(m: Manifest) -> dict:
    return {**{k: v for k, v in m.config.items() if k not in FREE_KEYS}, "model_info": m.model}


def _check_compatible(dirs: Sequence[Path], manifests: Sequence[Manifest]) -> int:
    """Same settings, one shard count, every shard exactly once; returns N."""
    first = _settings(manifests[0])
    for d, m in zip(dirs[1:], manifests[1:]):
        s = _settings(m)
        diff = sorted(k for k in set(first) | set(s) if first.get(k) != s.get(k))
        if diff:
            raise LatentPatchError(
                f"{d} and {dirs[0]} were run with different settings (differ in: {', '.join(diff)}); "
                "fix: merge only the shards of one run configuration"
            )
    if first.get("replacement") in GLOBAL_REPLACEMENTS and any(
        m.config.get("shard") and m.replacement_pool != "all shards" for m in manifests
    ):
        # shards written before values were computed over all shards' pairs
        raise LatentPatchError(
            f"--replacement {first['replacement']} uses values computed over the run's pairs, and these "
            "shards computed them over their own pairs only; fix: rerun the shards with this version"
        )
    shards = [parse_shard(_shard(m)) for m in manifests]
    counts = sorted({n for _, n in shards})
    if len(counts) > 1:
        raise LatentPatchError(
            f"the shards disagree on the number of shards ({counts}); fix: merge the shards of one split"
        )
    n = counts[0]
    owner: dict[int, Path] = {}
    for d, (i, _) in zip(dirs, shards):
        if i in owner:
            raise LatentPatchError(f"{d} and {owner[i]} are both shard {i}/{n}; fix: pass each shard once")
        owner[i] = d
    missing = sorted(set(range(n)) - set(owner))
    if missing:
        raise LatentPatchError(
            f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing; fix: pass every shard's run directory"
        )
    return n


def _merge_checks(manifests: Sequence[Manifest]) -> dict:
    """Per check: passed only if every shard passed; the worst shard's value; per-shard results kept."""
    shards = [(_shard(m), m.checks or {}) for m in manifests]
    names = list(dict.fromkeys(name for _, checks in shards for name in checks))
    merged = {}
    for name in names:
        items = [(shard, checks[name]) for shard, checks in shards if name in checks]
        values = [c["value"] for _, c in items if isinstance(c.get("value"), (int, float))]
        worst = min if name == "live_thoughts" else max  # live_thoughts passes above its threshold
        merged[name] = {
            "passed": all(c["passed"] for _, c in items),
            "value": worst(values) if values else None,
            "threshold": items[0][1].get("threshold"),
            "detail": f"worst of {len(items)} shards; shard {items[0][0]}: {items[0][1].get('detail', '')}",
            "shards": {shard: c for shard, c in items},
        }
    return merged


def _sum_numbers(dicts: Sequence[dict | None]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in (d or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def _merged_cuts(manifests: Sequence[Manifest]) -> dict | None:
    """The shards' ``answers_cut`` counts added up (the model's ``max_positions`` is every shard's)."""
    cuts = [m.answers_cut for m in manifests if m.answers_cut]
    if not cuts:
        return None
    return {"max_positions": cuts[0].get("max_positions"), "baselines": 0, "patched": 0} | {
        k: v for k, v in _sum_numbers(cuts).items() if k != "max_positions"
    }


def merge_runs(run_dirs: Sequence[str | Path], out: str | Path, report: bool = True) -> Path:
    """Merge the shard run directories ``run_dirs`` into ``out`` (a new or empty directory).

    Raises :class:`LatentPatchError` when the shards were run with different settings, when a
    shard is missing, given twice or incomplete, or when ``out`` already holds files.
    Returns ``out``.
    """
    t0 = time.perf_counter()
    dirs = [Path(d) for d in run_dirs]
    out = Path(out)
    if not dirs:
        raise LatentPatchError("merge: no run directories given; fix: pass every shard's run directory")
    if out.exists() and any(out.iterdir()):
        raise LatentPatchError(f"--out {out} is not empty; fix: choose a new directory")
    manifests = [_complete_manifest(d) for d in dirs]
    n_shards = _check_compatible(dirs, manifests)
    order = sorted(range(len(dirs)), key=lambda j: parse_shard(_shard(manifests[j]))[0])
    dirs, manifests = [dirs[j] for j in order], [manifests[j] for j in order]
    files, pairs = _pair_files(dirs, n_shards, bool(manifests[0].config.get("only_correct")))
    for folder, found in _stage_files(dirs, n_shards, files).items():
        target = RunPaths(out).results / folder
        target.mkdir(parents=True, exist_ok=True)
        for k in sorted(found):
            shutil.copyfile(found[k], target / found[k].name)
    probe_s = _probe_tables(dirs, manifests, n_shards, out)
    _das_files(dirs, out)
    ordered = [files[k][1] for k in sorted(files)]
    save_pairs([pairs[data["pair_id"]] for data in ordered], RunPaths(out).pairs)
    t = time.perf_counter()
    assemble(out)
    timings = _sum_numbers([m.timings for m in manifests])
    timings.update(assemble_s=time.perf_counter() - t, merge_s=time.perf_counter() - t0)
    if probe_s is not None:
        timings["probes_s"] = probe_s
    _merged_manifest(dirs, manifests, ordered, out, timings).write(out)
    if report:
        from latentpatch.analysis.report import build_report

        build_report(out)
    return out


def _probe_tables(dirs: Sequence[Path], manifests: Sequence[Manifest], n_shards: int, out: Path) -> float | None:
    """A sharded probe run (docs/method.md §16): every shard's activation files (file k from shard
    k mod N) copied, then the probes fitted over all of them (``pipeline/probing.py`` ``fit_probes``:
    no model, but torch to read the files); their seconds, or None without probe shards."""
    fits = [m.probe_fit for m in manifests]
    if not any(fits):
        return None
    if fits.count("merge") != len(fits):
        raise LatentPatchError("the shards disagree on where the probes are fitted; fix: rerun them with one version")
    target = RunPaths(out).results / ACTIVATIONS_DIR
    target.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(dirs):
        for f in sorted((RunPaths(d).results / ACTIVATIONS_DIR).glob("[0-9]*.safetensors")):
            if int(f.stem) % n_shards != i:
                raise LatentPatchError(f"{f} does not belong to shard {i}/{n_shards}; fix: merge the unchanged shards")
            shutil.copyfile(f, target / f.name)
    from latentpatch.pipeline.probing import SHARD_QUESTIONS, fit_probes
    from latentpatch.pipeline.progress import RunProgress

    shutil.copyfile(RunPaths(dirs[0]).results / ACTIVATIONS_DIR / SHARD_QUESTIONS, target / SHARD_QUESTIONS)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    config = RunConfig(**parse_values(RunConfig, {k: v for k, v in manifests[0].config.items() if k in fields}))
    return fit_probes(RunPaths(out).results, config, int(manifests[0].model["num_latent"]), RunProgress())


def _das_files(dirs: Sequence[Path], out: Path) -> None:
    """A sharded das run (docs/method.md §20): shard i fitted the sites j with j mod N == i on every
    pair's examples; their files are copied (a name in two shards is refused) and ``das.parquet``
    assembled from all of them."""
    from latentpatch.names import DAS_CHAINS_FILE, DAS_DIR

    found: dict[str, Path] = {}
    for d in dirs:
        for f in sorted((RunPaths(d).results / DAS_DIR).glob("*")):
            if f.name in found:
                raise LatentPatchError(f"{f} is also in {found[f.name].parent}; fix: merge the unchanged shards")
            found[f.name] = f
    # a shard with sites counts every question's chain (one without a site writes none)
    chains = [f for f in (RunPaths(d).results / DAS_CHAINS_FILE for d in dirs) if f.is_file()]
    if chains:
        if any(f.read_bytes() != chains[0].read_bytes() for f in chains):
            raise LatentPatchError(f"the shards' {DAS_CHAINS_FILE} differ; fix: merge the shards of one question set")
        (RunPaths(out).results).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chains[0], RunPaths(out).results / DAS_CHAINS_FILE)
    if not found:
        return
    target = RunPaths(out).results / DAS_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(found):
        shutil.copyfile(found[name], target / name)
    from latentpatch.pipeline.das import assemble_das

    assemble_das(RunPaths(out).results)


def _pair_files(
    dirs: Sequence[Path], n_shards: int, only_correct: bool
) -> tuple[dict[int, tuple[Path, dict]], dict[str, Pair]]:
    """Every shard's pair result files by global index (checked against their shard), and the
    pairs by id."""
    files: dict[int, tuple[Path, dict]] = {}
    pairs: dict[str, Pair] = {}
    for i, d in enumerate(dirs):
        shard_pairs = load_pairs(RunPaths(d).pairs)
        pairs.update({p.pair_id: p for p in shard_pairs})
        found = sorted(RunPaths(d).pair_results.glob("[0-9]*.json"))
        if len(found) != len(shard_pairs):
            raise LatentPatchError(
                f"{d}: {len(found)} pair result files for {len(shard_pairs)} pairs; fix: rerun that shard with --resume"
            )
        for f in found:
            data = json.loads(f.read_text())
            k = int(data.get("index", f.stem))
            if k % n_shards != i or k in files:
                raise LatentPatchError(
                    f"{f}: pair index {k} does not belong to shard {i}/{n_shards} or is "
                    "duplicated; fix: merge the unchanged shard directories"
                )
            files[k] = (f, data)
    if not only_correct and sorted(files) != list(range(len(files))):
        gaps = sorted(set(range(max(files) + 1)) - set(files))
        raise LatentPatchError(f"pair indices {gaps[:8]} have no result file; fix: pass every shard's run directory")
    return files, pairs


def _stage_files(
    dirs: Sequence[Path], n_shards: int, pair_files: dict[int, tuple[Path, dict]]
) -> dict[str, dict[int, Path]]:
    """Every stage folder's per-pair files (``results/pairs/`` and each other folder of
    :data:`~latentpatch.assembly.ASSEMBLERS` the shards wrote) by global index: every shard has the
    same folders, and each folder one file per pair of the patching sweep."""
    folders = [sorted(f for f in ASSEMBLERS if (RunPaths(d).results / f).is_dir()) for d in dirs]
    if any(f != folders[0] for f in folders):
        raise LatentPatchError(
            f"the shards wrote different stage folders under results/ ({folders[0]} vs "
            f"{next(f for f in folders if f != folders[0])}); fix: merge the shards of one run configuration"
        )
    out: dict[str, dict[int, Path]] = {PAIRS_DIR: {k: path for k, (path, _) in pair_files.items()}}
    for folder in folders[0]:
        if folder == PAIRS_DIR:
            continue
        found: dict[int, Path] = {}
        for i, d in enumerate(dirs):
            for f in sorted((RunPaths(d).results / folder).glob("[0-9]*.json")):
                k = int(f.stem)
                if k % n_shards != i or k in found:
                    raise LatentPatchError(
                        f"{f}: pair index {k} does not belong to shard {i}/{n_shards} or is duplicated; "
                        "fix: merge the unchanged shard directories"
                    )
                found[k] = f
        if sorted(found) != sorted(pair_files):
            missing = sorted(set(pair_files) - set(found))
            raise LatentPatchError(
                f"results/{folder}/ lacks the files of pair indices {missing[:8]} that results/pairs/ has; "
                "fix: rerun that shard with --resume"
            )
        out[folder] = found
    return out


def _merged_stops(manifests: Sequence[Manifest], order: Sequence[str]) -> dict | None:
    """The shards' ``latent_stops`` (a family with a stop rule, docs/method.md §22) as one run's: the
    pairs' counts summed, the pairs whose source count differs joined in ``order`` (pair ids)."""
    stops = [m.latent_stops for m in manifests if m.latent_stops]
    if not stops:
        return None
    counts: dict[str, int] = {}
    for s in stops:
        for k, n in (s.get("target_counts") or {}).items():
            counts[k] = counts.get(k, 0) + int(n)
    merged = dict(stops[0])
    if "target_counts" in merged:
        merged["target_counts"] = {k: counts[k] for k in sorted(counts, key=int)}
        rank = {p: i for i, p in enumerate(order)}
        differs = [p for s in stops for p in s.get("source_differs") or []]
        merged["source_differs"] = sorted(differs, key=lambda p: rank.get(p, len(rank)))
    return merged


def _merged_manifest(
    dirs: Sequence[Path], manifests: Sequence[Manifest], ordered: Sequence[dict], out: Path, timings: dict
) -> Manifest:
    """The first shard's manifest with the config, baselines, checks and timings of all shards."""
    config = dict(manifests[0].config, shard=None, out=str(out))
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**parse_values(RunConfig, {k: v for k, v in config.items() if k in fields}))
    n_cells = sum(len(d["cells"]) for d in ordered)
    cache = _sum_numbers([m.activation_cache for m in manifests])
    return dataclasses.replace(
        manifests[0],
        status="complete",
        config=config,
        config_hash=cfg.result_hash(),
        command="latentpatch merge " + " ".join(str(d) for d in dirs) + f" --out {out}",
        previous_timings=None,
        n_pairs=len(ordered),
        baselines=_merged_baselines(manifests, ordered),
        checks=_merge_checks(manifests),
        timings=timings,
        finished=max((m.finished for m in manifests if m.finished), default=None),  # the last shard's
        cells_per_second=n_cells / timings["sweep_s"] if timings.get("sweep_s") else None,
        activation_cache=cache or None,
        answers_cut=_merged_cuts(manifests),
        probe_fit=None,  # the merged run is an unsharded one
        latent_stops=_merged_stops(manifests, [d["pair_id"] for d in ordered]),
        merged_from=[
            {
                "run_dir": str(d),
                "shard": m.config.get("shard"),
                "n_pairs": m.n_pairs,
                "git_commit": m.git_commit,
                "device": m.device,
                "batch_size": m.batch_size,
            }
            for d, m in zip(dirs, manifests)
        ],
    )


def _merged_baselines(manifests: Sequence[Manifest], ordered: Sequence[dict]) -> dict:
    """The manifest's ``baselines`` over every shard's pairs (``ordered``: their result files' contents)."""
    per_pair: dict[str, dict] = {}
    for m in manifests:
        per_pair.update((m.baselines or {}).get("per_pair") or {})
    flags = {
        d["pair_id"]: (bool(d["cells"][0]["clean_correct"]), bool(d["cells"][0]["corrupted_correct"]))
        for d in ordered
        if d["cells"]
    }
    for d in ordered:  # a run without cells (step-level, reading, atp only): from the unpatched predictions
        p = per_pair.get(d["pair_id"])
        if d["pair_id"] not in flags and p is not None:
            flags[d["pair_id"]] = (
                _same_number(p.get("clean_pred"), p.get("clean_answer")),
                _same_number(p.get("corrupted_pred"), p.get("corrupted_answer")),
            )
    n = len(ordered)
    return {
        "n_pairs": n,
        "clean_accuracy": sum(c for c, _ in flags.values()) / max(n, 1),
        "corrupted_accuracy": sum(r for _, r in flags.values()) / max(n, 1),
        "both_correct": sum(c and r for c, r in flags.values()) / max(n, 1),
        "flagged_pairs": [pid for pid, (c, r) in flags.items() if not (c and r)],
        "per_pair": {d["pair_id"]: per_pair[d["pair_id"]] for d in ordered if d["pair_id"] in per_pair},
    }


def _same_number(x: float | None, y: float | None) -> bool:
    """``patching.metrics.same_number`` (the baselines' rule of a correct answer), without torch."""
    return x is not None and y is not None and abs(float(x) - float(y)) < 1e-6
