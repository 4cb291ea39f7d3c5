"""The run directory: its paths, typed manifest and readers (the tables are assembled by :mod:`latentpatch.assembly`).

Imports no torch (pandas only inside the functions that need it), so ``report``, ``compare``
and ``merge`` stay light. Layout (docs/ARCHITECTURE.md "Run directory")::

    RUN_DIR/manifest.json  pairs.json  results/pairs/NNNNN.json (one committed file per pair)
    results/{experiment}.json  results/cells.parquet  results/trajectories.parquet  results/thoughts.json
    stats.json  stats/{cells,comparisons,additivity}.csv  figures/*.png (+ .svg on request)  report.html

Every path is a property of :class:`RunPaths`; every file is written atomically through
:mod:`latentpatch.files` (a reader or a crash never sees half a file); every reader raises one :class:`LatentPatchError`
line naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentpatch.errors import LatentPatchError
from latentpatch.files import write_json
from latentpatch.names import (
    EXPERIMENTS,
    REQUIRED_CELL_COLUMNS,
    RUN_FORMAT,
)

if TYPE_CHECKING:
    import pandas as pd

#: The patching sweep's folder of per-pair files under ``results/``.
PAIRS_DIR = "pairs"

#: ``format`` tag of ``manifest.json`` (kept under this name for the pipeline's import).
FORMAT = RUN_FORMAT


# ---- paths -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunPaths:
    """Every file of one run directory.

    >>> RunPaths("runs/a").cells.as_posix()
    'runs/a/results/cells.parquet'
    >>> RunPaths("runs/a").pair_result(7).name
    '00007.json'
    """

    root: Path

    def __init__(self, root: Path | str) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.json"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def pair_results(self) -> Path:
        """Folder of the per-pair result files, committed one at a time (resume skips them)."""
        return self.results / PAIRS_DIR

    def pair_result(self, index: int) -> Path:
        """The result file of the pair with global index ``index`` (its name orders shards' pairs)."""
        return self.pair_results / f"{index:05d}.json"

    def experiment_result(self, experiment: str) -> Path:
        return self.results / f"{experiment}.json"

    @property
    def cells(self) -> Path:
        return self.results / "cells.parquet"

    @property
    def trajectories(self) -> Path:
        return self.results / "trajectories.parquet"

    @property
    def thoughts(self) -> Path:
        return self.results / "thoughts.json"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    def stats_table(self, name: str) -> Path:
        return self.root / "stats" / f"{name}.csv"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


# ---- the manifest --------------------------------------------------------------------------------
#: Manifest keys written only once their step ran (absent, not null, before).
_STEP_KEYS = (
    "threads",
    "workers",
    "previous_timings",
    "n_pairs",
    "baselines",
    "replacement_pool",
    "checks",
    "tuned_lens",
    "timings",
    "merged_from",
    "probe_fit",
    "latent_stops",
)
#: Keys the finish step writes together with ``timings`` (each may be null).
_FINISH_KEYS = ("finished", "cells_per_second", "activation_cache", "answers_cut")


@dataclass(kw_only=True)
class Manifest:
    """``manifest.json``: what ran, on what, with which result; fields in the file's key order.

    Written at each step of a run (``status`` "running", then "complete"): :meth:`to_dict` leaves
    out the keys of steps that have not run yet, so the file at each step is exactly what that
    step wrote. ``merged_from`` exists only in a ``latentpatch merge`` output.
    """

    format: str = RUN_FORMAT
    status: str = "running"
    config: dict[str, Any]  # RunConfig.to_dict()
    config_hash: str  # RunConfig.result_hash(): a resumed run must match it
    command: str
    versions: dict[str, str]
    git_commit: str | None
    seed: int
    device: str
    dtype: str
    batch_size: int
    threads: dict[str, Any] | None = None  # {count, reason}: the CPU threads a run chose (absent when merged)
    workers: dict[str, Any] | None = None  # {count, reason}: its processes for the pairs (pipeline/workers.py)
    model: dict[str, Any]  # name, family, n_layers, num_latent, d_model, config
    pairs_removed: list[dict[str, str]]  # [{pair_id, reason}]
    previous_timings: dict[str, float] | None = None  # the interrupted run's, on --resume
    n_pairs: int | None = None
    baselines: dict[str, Any] | None = None
    replacement_pool: str | None = None  # "all shards" when a shard computed mean/resample over all
    checks: dict[str, dict[str, Any]] | None = None
    tuned_lens: dict[str, Any] | None = None  # --lens tuned|both: {loaded, cache, settings, held_out_kl, ...}
    timings: dict[str, float] | None = None
    finished: str | None = None  # local time the run completed, "YYYY-MM-DD HH:MM" (the report's date)
    cells_per_second: float | None = None
    activation_cache: dict[str, int] | None = None  # {hits, misses}; null without the cache
    answers_cut: dict[str, Any] | None = None  # {max_positions, baselines, patched}: answers cut at the last position
    merged_from: list[dict[str, Any]] | None = None
    probe_fit: str | None = None  # "merge": a shard that recorded its probe activations; merge fits the probes
    latent_stops: dict[str, Any] | None = None  # a family with a stop rule: the rule, modes, counts (§22)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in field order, the keys of steps not yet run left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (f.name in _STEP_KEYS and value is None) or (f.name in _FINISH_KEYS and self.timings is None):
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | str = "manifest.json") -> Manifest:
        """Inverse of :meth:`to_dict`; a missing or unknown key is a :class:`LatentPatchError`."""
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in data]
        unknown = sorted(set(data) - {f.name for f in fields})
        if missing or unknown:
            problems = [f"lacks keys {missing}"] * bool(missing) + [f"has unknown keys {unknown}"] * bool(unknown)
            raise LatentPatchError(
                f"{path} {' and '.join(problems)}; fix: use a manifest written by this version's `latentpatch run`"
            )
        return cls(**data)

    def write(self, run_dir: Path | str) -> None:
        write_json(RunPaths(run_dir).manifest, self.to_dict())


# ---- readers -------------------------------------------------------------------------------------
def _rerun_hint(run_dir: Path) -> str:
    return f"rerun the command in {run_dir / 'manifest.json'} ('command') to regenerate it"


def _read_json_file(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LatentPatchError(f"{path} is not valid JSON ({err}); {fix}") from None


def read_manifest(run_dir: Path | str) -> dict[str, Any]:
    """``manifest.json`` as a dict (as written: a partial or older run's manifest has fewer keys).

    A missing directory or file, invalid JSON or a non-object is a :class:`LatentPatchError`.
    :meth:`Manifest.from_dict` types a complete one.
    """
    run_dir = Path(run_dir)
    path = RunPaths(run_dir).manifest
    if not run_dir.is_dir():
        raise LatentPatchError(f"{run_dir} is not a directory: pass a run directory written by `latentpatch run`")
    if not path.is_file():
        raise LatentPatchError(
            f"{path} is missing: {run_dir} is not a complete run directory; run `latentpatch run` to create one"
        )
    manifest = _read_json_file(path, "restore it or rerun `latentpatch run`")
    if not isinstance(manifest, dict):
        raise LatentPatchError(f"{path} must hold a JSON object; restore it or rerun `latentpatch run`")
    return manifest


def _read_parquet(path: Path, run_dir: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise LatentPatchError(
            f"{path} is not a readable parquet file ({type(err).__name__}); {_rerun_hint(run_dir)}"
        ) from None


def read_cells(run_dir: Path | str) -> pd.DataFrame:
    """``results/cells.parquet`` (one row per pair x spec), columns checked and typed.

    ``pair_id`` as str, ``layer``/``position`` as int, ``flagged`` as bool (False if absent).
    """
    run_dir = Path(run_dir)
    path = RunPaths(run_dir).cells
    if not path.is_file():
        raise LatentPatchError(f"{path} is missing: the run wrote no results; {_rerun_hint(run_dir)}")
    cells = _read_parquet(path, run_dir)
    missing = [c for c in REQUIRED_CELL_COLUMNS if c not in cells.columns]
    if missing:
        raise LatentPatchError(f"{path} lacks columns {missing}; {_rerun_hint(run_dir)}")
    if cells.empty:
        raise LatentPatchError(f"{path} has no rows; {_rerun_hint(run_dir)}")
    cells = cells.copy()
    cells["pair_id"] = cells["pair_id"].astype(str)
    cells["layer"] = cells["layer"].astype(int)
    cells["position"] = cells["position"].astype(int)
    if "flagged" not in cells.columns:
        cells["flagged"] = False
    cells["flagged"] = cells["flagged"].fillna(False).astype(bool)
    return cells


def read_trajectories(run_dir: Path | str) -> pd.DataFrame | None:
    """``results/trajectories.parquet`` (chained/frozen, per later position); None if absent."""
    run_dir = Path(run_dir)
    path = RunPaths(run_dir).trajectories
    return _read_parquet(path, run_dir) if path.is_file() else None


def read_result_json(run_dir: Path | str, name: str, required: bool = False) -> Any | None:
    """``results/<name>`` as JSON; None if absent and not ``required``."""
    run_dir = Path(run_dir)
    path = RunPaths(run_dir).results / name
    if not path.is_file():
        if required:
            raise LatentPatchError(f"{path} is missing; {_rerun_hint(run_dir)}")
        return None
    return _read_json_file(path, _rerun_hint(run_dir))


def read_thoughts(run_dir: Path | str) -> dict[str, dict[str, list[list[str]]]] | None:
    """``results/thoughts.json``: {pair_id: {"clean"|"corrupted": [[top tokens] per thought]}}; None if absent."""
    return read_result_json(run_dir, RunPaths(run_dir).thoughts.name)


def check_result_files(run_dir: Path | str) -> list[str]:
    """Parse every ``results/{layer,position,iterative}.json`` present; return the experiments found.

    A corrupt file raises :class:`LatentPatchError` naming it, so a damaged run is reported
    rather than silently summarised from the parquet alone.
    """
    paths = RunPaths(run_dir)
    found = [exp for exp in EXPERIMENTS if read_result_json(run_dir, paths.experiment_result(exp).name) is not None]
    read_thoughts(run_dir)
    return found


def read_stats(run_dir: Path | str) -> dict[str, Any] | None:
    """``stats.json`` (written by ``latentpatch report``); None if absent."""
    path = RunPaths(run_dir).stats
    if not path.is_file():
        return None
    return _read_json_file(path, "rebuild it with `latentpatch report RUN_DIR`")


def read_pairs_json(run_dir: Path | str) -> dict[str, dict[str, Any]]:
    """``pairs.json`` (the flat pair-file format) as {pair_id: {variant: entry}}; {} if absent."""
    path = RunPaths(run_dir).pairs
    if not path.is_file():
        return {}
    data = _read_json_file(path, "restore it from the pair file named in manifest.json config")
    out: dict[str, dict[str, Any]] = {}
    if isinstance(data, list):
        for e in data:
            if isinstance(e, dict) and "pair_id" in e:
                out.setdefault(str(e["pair_id"]), {})[str(e.get("variant", "?"))] = e
    return out


def read_stage_entry(path: Path | str, key: str) -> dict[str, Any] | None:
    """A per-pair file of a stage ``{pair_id, index, <key>: [...], ...}``; None if it is damaged or incomplete."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "pair_id" not in data or not isinstance(data.get(key), list):
        return None
    return data


def read_pair_result(path: Path | str) -> dict[str, Any] | None:
    """A per-pair result file ``{pair_id, index, cells, ...}``; None if it is damaged or incomplete."""
    return read_stage_entry(path, "cells")
