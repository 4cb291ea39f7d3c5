"""The options of a run, each declared once with its help text (no torch).

:class:`RunConfig` is every option of ``latentpatch run``: the model options
(:class:`~latentpatch.pipeline.model_options.ModelOptions`, shared with ``eval`` and ``inspect``),
the options of the experiments beyond the sweeps
(:class:`~latentpatch.pipeline.experiment_options.ExperimentOptions`: probe, steer, edges, das) and
the run's own. The
command line builds its ``--options`` from these fields (name, type, default, help; see
:func:`latentpatch.pipeline.options.option`), and a ``--config`` file (JSON or TOML) takes the same
names as keys. Declaring an option and parsing its text live in :mod:`latentpatch.pipeline.options`;
the pairs a run patches (``--pairs``, ``--limit``, ``--shard``) in :mod:`latentpatch.pipeline.selection`.

Imports no torch, so ``merge`` and ``latentpatch run --help`` stay light.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from latentpatch.errors import LatentPatchError
from latentpatch.names import (
    ALL_EXPERIMENTS,
    ATP_EXPERIMENT,
    DEFAULT_COMPONENT,
    DEFAULT_LENS,
    DIRECTIONS,
    EXPERIMENTS,
    GLOBAL_REPLACEMENTS,
    HEAD_COMPONENT,
    LATENT_COUNTS,
    LENS_CHOICES,
    PATCHED_STOPS,
    REPLACEMENTS,
    SITE_COMPONENTS,
)
from latentpatch.pipeline.das_options import check_das_options
from latentpatch.pipeline.executor_options import check_executor_options
from latentpatch.pipeline.experiment_options import ExperimentOptions
from latentpatch.pipeline.model_options import DTYPE_ALIASES as DTYPE_ALIASES
from latentpatch.pipeline.model_options import DTYPES as DTYPES
from latentpatch.pipeline.model_options import MODEL_HELP as MODEL_HELP
from latentpatch.pipeline.model_options import ModelOptions as ModelOptions
from latentpatch.pipeline.options import option, parse_batch_size, parse_experiments, parse_shard, parse_values
from latentpatch.pipeline.reader_options import check_probe_options, check_steer_options
from latentpatch.pipeline.selection import default_pairs_path as default_pairs_path  # tests and bench import it here

if TYPE_CHECKING:
    pass

#: ``--figure-formats``: figure files matplotlib writes besides the PNG the report embeds.
FIGURE_FORMATS: tuple[str, ...] = ("svg", "pdf", "png")

#: ``--engine``: the batched engine, or one full rollout per cell (the check's reference).
ENGINES: tuple[str, ...] = ("fast", "reference")


@dataclass
class RunConfig(ExperimentOptions):
    """Every option of ``latentpatch run``: the model options, the options of the experiments beyond
    the sweeps (:class:`~latentpatch.pipeline.experiment_options.ExperimentOptions`), and those of the
    run itself.

    >>> RunConfig(limit=5).result_hash() == RunConfig(limit=5, out="elsewhere").result_hash()
    True
    """

    pairs: str = option("default", "Pair file (JSON), or 'default' (the shipped pairs).", concern="experiments")
    experiments: tuple[str, ...] = option(
        EXPERIMENTS,
        "Comma list of "
        + ",".join(ALL_EXPERIMENTS)
        + " (thought..intermediate: step-level analyses, docs/method.md §13; lens, attention: §14; "
        "atp: attribution patching, §15).",
        parse=parse_experiments,
        concern="experiments",
    )
    component: str = option(
        DEFAULT_COMPONENT, "Patched component: " + " | ".join(SITE_COMPONENTS) + ".", concern="experiments"
    )
    direction: str = option(
        "denoise", "denoise (clean -> corrupted run) | noise (corrupted -> clean run).", concern="experiments"
    )
    replacement: str = option("source", "Patched-in values: " + " | ".join(REPLACEMENTS) + ".", concern="experiments")
    out: str = option("runs/latest", "Run directory.", concern="output", results=False)
    limit: int | None = option(None, "First N pairs only (quick test: --limit 5).", concern="experiments")
    shard: str | None = option(
        None, "i/N: this process runs pairs k with k mod N == i (see `latentpatch merge`).", concern="execution"
    )
    batch_size: int | str = option(
        64, "Patches per forward pass, or auto (from free memory).", parse=parse_batch_size, concern="execution"
    )
    threads: int | None = option(
        None, "CPU threads (default: 1 for small models, else the free cores).", concern="execution"
    )
    workers: int | None = option(
        None,
        "Processes that patch pairs side by side (default: one per free core for a small model on the CPU, "
        "at most one per 8 pairs; else 1). Results are the same bytes with any number.",
        omit_if_unset=True,
        concern="execution",
        results=False,
    )
    seed: int = option(0, "Random seed (resample partners, check cells).", concern="experiments")
    only_correct: bool = option(
        False,
        "Exclude pairs the model gets wrong (clean or corrupted).",
        flags="--only-correct/--all-pairs",
        concern="experiments",
    )
    keep_same_answer: bool = option(
        False, "Keep pairs whose clean and corrupted answers are equal.", concern="experiments"
    )
    engine: str = option("fast", "fast (batched) | reference (one full rollout per cell).", concern="execution")
    strict: bool = option(False, "A failing built-in check is fatal.", concern="execution", results=False)
    check_cells: int = option(
        8, "Cells the engine_reference check recomputes with the reference engine.", concern="execution"
    )
    cache_dir: str | None = option(
        None,
        "Activation cache directory (default ~/.cache/latentpatch/activations).",
        concern="execution",
        results=False,
    )
    use_cache: bool = option(True, "Read and write the activation cache.", concern="execution", results=False)
    report: bool = option(True, "Build stats, figures and report.html at the end.", concern="output", results=False)
    figure_formats: str | None = option(
        None,
        "Figure files besides PNG, comma-separated (e.g. svg, or svg,pdf); PNG only by default (faster).",
        omit_if_unset=True,
        concern="output",
        results=False,
    )
    wandb: bool = option(False, "Log the run to Weights & Biases.", concern="output", results=False)
    wandb_project: str | None = option(None, "W&B project (default: latentpatch).", concern="output", results=False)
    thoughts_pairs: int = option(5, "Pairs whose decoded thoughts go to results/thoughts.json.", concern="experiments")
    atp_exact_pairs: int | None = option(
        None,
        "With --experiments atp: the first N pairs whose every site is also patched exactly, to check the "
        "estimate (default: all pairs; docs/method.md §15).",
        omit_if_unset=True,
        concern="experiments",
    )
    refine: int | None = option(
        None,
        "With --experiments atp: per pair, patch exactly the K sites with the largest estimate and a seeded "
        "random control sample of K of the rest (docs/method.md §15).",
        omit_if_unset=True,
        concern="experiments",
    )
    graddrop: bool | None = option(
        None,
        "With --experiments atp: also compute AtP*'s GradDrop score (one backward pass per layer; "
        "--refine then ranks by it).",
        flags="--graddrop/--no-graddrop",
        omit_if_unset=True,
        concern="experiments",
    )
    lens: str = option(
        DEFAULT_LENS,
        "With --experiments lens: logit (each layer through the final norm and LM head), tuned (through a "
        "per-layer affine translator first, trained on the run's questions; docs/method.md §14.1) or both.",
        omit_if_unset=True,
        concern="experiments",
    )
    executor: str | None = option(
        None,
        "Where the per-pair work runs: fork (this machine: this process and forked workers, the default) or "
        "ray (one actor per model replica on a Ray cluster; pip install 'latentpatch[ray]'; docs/scaling.md).",
        omit_if_unset=True,
        concern="execution",
        results=False,
    )
    ray_address: str | None = option(
        None,
        "With --executor ray: the address of an existing Ray cluster (host:port or auto); default: start a local one.",
        omit_if_unset=True,
        concern="execution",
        results=False,
    )
    gpus_per_worker: float | None = option(
        None,
        "With --executor ray: GPUs per model replica (default 0: CPU replicas, one per --threads CPUs).",
        omit_if_unset=True,
        concern="execution",
        results=False,
    )
    seeds: int = option(
        1,
        "Repeat the run over N seeds (--seed, --seed + 1, ...; a random feedback's draws, docs/method.md §21): "
        "OUT/seed-S/ each, then OUT/seeds.json and OUT/seeds.html with each cell's spread over the seeds.",
        omit_if_unset=True,
        concern="execution",
    )

    #: Key order of the manifest's ``config`` (the order from before the model options moved into
    #: :class:`ModelOptions`, so a default run's manifest is unchanged); model options added since
    #: then (``lora_r`` ...) go after ``preset`` when set.
    CONFIG_KEY_ORDER: ClassVar[tuple[str, ...]] = (
        "model",
        "base",
        "preset",
        "pairs",
        "experiments",
        "component",
        "direction",
        "replacement",
        "out",
        "limit",
        "shard",
        "device",
        "dtype",
        "batch_size",
        "threads",
        "seed",
        "only_correct",
        "keep_same_answer",
        "engine",
        "strict",
        "check_cells",
        "cache_dir",
        "use_cache",
        "report",
        "wandb",
        "wandb_project",
        "thoughts_pairs",
    )

    #: Version of :meth:`result_hash`'s recipe: 2 = the options declared ``results=True``, hashed
    #: with this number (1, before 2026-12-07: the same options listed in a table, without it). A run
    #: directory made under another version is refused on --resume (it says which).
    CONFIG_HASH_VERSION: ClassVar[int] = 2

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        """The options in the order ``--help`` and the manifest show them: the model's, the run's own,
        then the experiments' (:class:`ExperimentOptions`, declared in their own module)."""
        experiment = {f.name for f in dataclasses.fields(ExperimentOptions)} - {
            f.name for f in dataclasses.fields(ModelOptions)
        }
        fields = dataclasses.fields(cls)
        return [f for f in fields if f.name not in experiment] + [f for f in fields if f.name in experiment]

    @classmethod
    def result_keys(cls) -> tuple[str, ...]:
        """The options that change numbers in ``results/`` (declared with ``results=True``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["results"])

    @classmethod
    def options_of(cls, concern: str) -> tuple[str, ...]:
        """The options about ``concern`` (one of ``latentpatch.pipeline.options.CONCERNS``).

        >>> RunConfig.options_of("output")
        ('out', 'report', 'figure_formats', 'wandb', 'wandb_project')
        """
        return tuple(f.name for f in cls.option_fields() if f.metadata["concern"] == concern)

    def validate(self) -> None:
        """Raise a :class:`LatentPatchError` naming the option for the first bad value (dtype and
        device are checked by ``load_model``)."""
        bad = [e for e in self.experiments if e not in ALL_EXPERIMENTS]
        if bad or not self.experiments:
            raise LatentPatchError(
                f"--experiments: unknown {','.join(bad) or '(empty)'}; use a comma list of {','.join(ALL_EXPERIMENTS)}"
            )
        for name, value, choices in (
            ("lens", self.lens, LENS_CHOICES),
            ("component", self.component, SITE_COMPONENTS),
            ("direction", self.direction, DIRECTIONS),
            ("replacement", self.replacement, REPLACEMENTS),
            ("engine", self.engine, ENGINES),
            ("latent-count", self.latent_count, LATENT_COUNTS),
            ("patched-stop", self.patched_stop, PATCHED_STOPS),
        ):
            if value not in choices:
                raise LatentPatchError(f"--{name} {value!r}: use one of {', '.join(choices)}")
        if str(self.dtype).lower() not in DTYPES + DTYPE_ALIASES:
            raise LatentPatchError(f"--dtype {self.dtype!r} is not supported; fix: use {', '.join(DTYPES)}")
        if not str(self.out).strip():
            raise LatentPatchError("--out is empty; fix: name a run directory, e.g. --out runs/first")
        if self.threads is not None and self.threads < 1:
            raise LatentPatchError("--threads must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise LatentPatchError("--workers must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise LatentPatchError("--limit must be >= 1")
        if self.seeds < 1:
            raise LatentPatchError(f"--seeds {self.seeds}: must be at least 1; fix: pass --seeds 1 or more")
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1)):
            raise LatentPatchError(f"--batch-size {self.batch_size!r}: use a positive integer or auto")
        bad_formats = [
            f for f in (self.figure_formats or "").split(",") if f.strip() and f.strip().lower() not in FIGURE_FORMATS
        ]
        if bad_formats:
            raise LatentPatchError(
                f"--figure-formats {self.figure_formats!r}: use a comma list of {', '.join(FIGURE_FORMATS)}"
            )
        if self.shard is not None:
            parse_shard(self.shard)
            self._check_shardable()
        self._check_atp()
        check_probe_options(self)
        check_steer_options(self)
        check_executor_options(self)
        check_das_options(self)
        if self.lens != DEFAULT_LENS and "lens" not in self.experiments:
            raise LatentPatchError(
                f"--lens {self.lens} applies to the lens experiment only; "
                "fix: add lens to --experiments, or drop --lens"
            )
        if self.edge_heads is not None and "edges" not in self.experiments:
            raise LatentPatchError("--edge-heads applies to the edges experiment only; fix: add edges to --experiments")

    def _check_atp(self) -> None:
        """The attribution patching options: positive counts, and only with ``--experiments atp``."""
        for name, value in (("atp-exact-pairs", self.atp_exact_pairs), ("refine", self.refine)):
            if value is not None and value < 1:
                raise LatentPatchError(f"--{name} must be >= 1 (got {value})")
        given = [n for n, v in (("atp-exact-pairs", self.atp_exact_pairs), ("refine", self.refine)) if v is not None]
        if self.graddrop is not None:
            given.append("graddrop")
        if given and ATP_EXPERIMENT not in self.experiments:
            raise LatentPatchError(
                f"--{given[0]} applies to attribution patching only; fix: add atp to --experiments, or drop the option"
            )

    def _check_shardable(self) -> None:
        """``merge`` joins every stage's per-pair files and every pooled value is computed over all
        shards' pairs (the run's one value pool: ``pipeline.values.run_value_pool``), except per-head
        baselines, which are not in the shared activation cache."""
        if self.component == HEAD_COMPONENT and self.replacement in GLOBAL_REPLACEMENTS:
            raise LatentPatchError(
                f"--shard with --component {HEAD_COMPONENT} --replacement {self.replacement}: per-head values are "
                "pooled over this shard's pairs only; fix: run it unsharded, or use --replacement source or zero"
            )

    def result_hash(self) -> str:
        """Hash of the options that change numbers (the run directory's ``config_hash``):
        ``"<version>-<16 hex digits>"``, the version being :attr:`CONFIG_HASH_VERSION`.

        >>> RunConfig().result_hash()[:2]
        '2-'
        """
        keys = set(self.result_keys())
        options = {k: v for k, v in self.to_dict().items() if k in keys}
        payload = json.dumps({"version": self.CONFIG_HASH_VERSION, "options": options}, sort_keys=True)
        return f"{self.CONFIG_HASH_VERSION}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``config``: every option, except those marked ``omit_if_unset`` while None or
        at their default, in :attr:`CONFIG_KEY_ORDER`.

        >>> list(RunConfig(lora_r=8).to_dict())[:6]
        ['model', 'base', 'preset', 'lora_r', 'pairs', 'experiments']
        """
        d: dict[str, Any] = {}
        for f in self.option_fields():
            value = getattr(self, f.name)
            if f.metadata.get("omit_if_unset") and (value is None or value == f.default):
                continue
            d[f.name] = list(value) if isinstance(value, tuple) else value
        head = self.CONFIG_KEY_ORDER[:3]  # model, base, preset
        newer = [k for k in d if k not in self.CONFIG_KEY_ORDER]
        order = [*head, *newer, *self.CONFIG_KEY_ORDER[3:]]
        return {k: d[k] for k in order if k in d}

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """Read a JSON or TOML config file; ``overrides`` (explicit CLI flags, None = not given) win."""
        path = Path(path)
        if not path.exists():
            raise LatentPatchError(f"config file {path} does not exist; fix: pass an existing JSON or TOML file")
        try:
            text = path.read_text()
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except Exception as err:
            raise LatentPatchError(
                f"config file {path} cannot be parsed ({err}); fix: write valid JSON or TOML"
            ) from None
        if not isinstance(data, dict):
            raise LatentPatchError(f"config file {path}: expected a mapping of option names to values")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise LatentPatchError(
                f"config file {path}: unknown key(s) {', '.join(unknown)}; "
                "fix: use the names of `latentpatch run --help`"
            )
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**parse_values(cls, data))
