"""The options of a run and of model loading, each declared once with its help text (no torch).

:class:`ModelOptions` are the options of :func:`latentpatch.model.load.load_model`, shared by
``latentpatch run``, ``eval`` and ``inspect``; :class:`RunConfig` adds the options of a run. The
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
    LENS_CHOICES,
    REPLACEMENTS,
    SITE_COMPONENTS,
)
from latentpatch.pipeline.das_options import check_das_options
from latentpatch.pipeline.executor_options import check_executor_options
from latentpatch.pipeline.options import option, parse_batch_size, parse_experiments, parse_shard, parse_values
from latentpatch.pipeline.reader_options import check_probe_options, check_steer_options, component_list
from latentpatch.pipeline.selection import default_pairs_path as default_pairs_path  # tests and bench import it here

if TYPE_CHECKING:
    from latentpatch.model.latent import LatentModel

#: ``--dtype`` values (``load_model`` also takes the aliases fp32, bf16, fp16, half).
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DTYPE_ALIASES: tuple[str, ...] = ("fp32", "float", "bf16", "fp16", "half")

#: ``--figure-formats``: figure files matplotlib writes besides the PNG the report embeds.
FIGURE_FORMATS: tuple[str, ...] = ("svg", "pdf", "png")

#: ``--engine``: the batched engine, or one full rollout per cell (the check's reference).
ENGINES: tuple[str, ...] = ("fast", "reference")


MODEL_HELP = (
    "Model spec: default (the shipped model), codi:DIR or codi:ORG/NAME[@REV] (official CODI checkpoint, "
    "local or on the hub; with --base or --preset), coconut:FILE or coconut:ORG/NAME[:FILE][@REV], "
    "dir:PATH (latentpatch model dir), gguf:PATH, or config:llama|gpt2 (a small random model, for a demo). "
    "`latentpatch models` lists the released checkpoints."
)


@dataclass
class ModelOptions:
    """The options of :func:`latentpatch.model.load.load_model` (``run``, ``eval``, ``inspect``)."""

    model: str = option("default", MODEL_HELP, concern="model")
    base: str | None = option(
        None,
        "Base model of a codi:/coconut: checkpoint: a local dir or a hub name ORG/NAME[@REV] (config and tokenizer).",
        concern="model",
    )
    preset: str | None = option(
        None,
        "Settings of a released CODI checkpoint: codi-gpt2, codi-llama1b or codi-llama1b-instruct "
        "(see `latentpatch models`).",
        concern="model",
    )
    lora_r: int | None = option(
        None,
        "LoRA rank of a codi: checkpoint (0 = checkpoint without LoRA; default: read from the file).",
        omit_if_unset=True,
        concern="model",
    )
    lora_alpha: float | None = option(
        None, "LoRA alpha of a codi: checkpoint (scaling = alpha / r).", omit_if_unset=True, concern="model"
    )
    lora_targets: str | None = option(
        None, "Comma-separated LoRA target modules of a codi: checkpoint.", omit_if_unset=True, concern="model"
    )
    prj_dim: int | None = option(
        None,
        "Projection width of a codi: checkpoint (default: read from the file).",
        omit_if_unset=True,
        concern="model",
    )
    prj_ln: bool | None = option(
        None,
        "The projection of a codi: checkpoint ends with a LayerNorm (default: read from the file).",
        flags="--prj-ln/--no-prj-ln",
        omit_if_unset=True,
        concern="model",
    )
    num_latent: int | None = option(
        None, "Number of continuous thoughts (default: the model's).", omit_if_unset=True, concern="model"
    )
    remove_eos: bool | None = option(
        None,
        "No [EOS] around the thoughts of a codi: checkpoint (CODI's --remove_eos).",
        flags="--remove-eos/--keep-eos",
        omit_if_unset=True,
        concern="model",
    )
    eos_id: int | None = option(
        None, "End-of-sequence token id of a codi: checkpoint.", omit_if_unset=True, concern="model"
    )
    answer_prefix: str | None = option(
        None,
        "Text a codi: checkpoint emits before the number (default: 'The answer is: ').",
        omit_if_unset=True,
        concern="model",
    )
    device: str = option("cpu", "Device: cpu, cuda, cuda:1, ...", concern="model")
    dtype: str = option("float32", "Weights and activations: " + ", ".join(DTYPES) + ".", concern="model")
    pccot_round: int | None = option(
        None,
        "The Jacobi round whose slots are the sites of a pccot: model (default: the last).",
        omit_if_unset=True,
        concern="model",
    )

    def load(self) -> LatentModel:
        """The model these options name (``load_model`` checks dtype, device and the overrides)."""
        from latentpatch.model.load import load_model

        overrides = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(ModelOptions) if f.metadata["omit_if_unset"]
        }
        # an empty --base/--preset (e.g. from a config file) means "not given"
        return load_model(
            self.model,
            base=self.base or None,
            preset=self.preset or None,
            dtype=self.dtype,
            device=self.device,
            **overrides,
        )


@dataclass
class RunConfig(ModelOptions):
    """Every option of ``latentpatch run``: the model options plus those of the run itself.

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
    questions: str | None = option(
        None,
        "With --experiments probe: the question set (pair file with intermediates, question JSON/JSONL, or "
        "GSM8K-style worked solutions; docs/method.md §16); default: the run's pairs, both sides.",
        omit_if_unset=True,
        concern="experiments",
    )
    skip_unparsed: bool | None = option(
        None,
        "With --questions: leave out worked solutions that cannot be parsed (the manifest counts them).",
        flags="--skip-unparsed/--no-skip-unparsed",
        omit_if_unset=True,
        concern="experiments",
    )
    probe_components: str | None = option(
        None,
        "With --experiments probe: components recorded at every layer besides the thoughts (comma list; "
        "default resid_out).",
        omit_if_unset=True,
        concern="experiments",
    )
    probe_min_count: int | None = option(
        None,
        "With --experiments probe: a label value is a class only with at least N questions (default 10).",
        omit_if_unset=True,
        concern="experiments",
    )
    probe_regression: bool | None = option(
        None,
        "With --experiments probe: also a ridge regression per numeric label and site (held-out R^2 for magnitudes).",
        flags="--probe-regression/--no-probe-regression",
        omit_if_unset=True,
        concern="experiments",
    )
    activation_dtype: str | None = option(
        None,
        "With --experiments probe: dtype of the stored activations, float32 (default) or float16.",
        omit_if_unset=True,
        concern="experiments",
    )
    steer_alphas: str | None = option(
        None,
        "With --experiments steer: comma list of alphas, in units of the site's typical clean/corrupted "
        "difference (default -2,-1,1,2).",
        omit_if_unset=True,
        concern="experiments",
    )
    steer_layers: str | None = option(
        None,
        "With --experiments steer: comma list of layers steered (default: every layer).",
        omit_if_unset=True,
        concern="experiments",
    )
    steer_controls: int | None = option(
        None,
        "With --experiments steer: random directions of the same norm per site (default 2).",
        omit_if_unset=True,
        concern="experiments",
    )
    steer_vector: str | None = option(
        None,
        "With --experiments steer: the direction, a .npy/.pt file ([d] or [layers, thoughts, d]); default: "
        "the mean source - target difference at each site.",
        omit_if_unset=True,
        concern="experiments",
    )
    steer_direction: str | None = option(
        None,
        "With --experiments steer: meandiff (default: the pairs' mean source - target difference), "
        "label:NAME=A,B (mean activation of questions with label A minus B) or probe:NAME=V (a probe's weight "
        "vector of value V); label and probe read the probe experiment's activations (add probe).",
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
    edge_heads: bool | None = option(
        None,
        "With --experiments edges: also knock out each attention edge in each head alone (docs/method.md §17).",
        flags="--edge-heads/--no-edge-heads",
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
    das_sites: str | None = option(
        None,
        "With --experiments das: comma list of sites, thought.tP, thought_pre.tP or COMPONENT.LN.tP (P, N may "
        "be *; default thought.t*).",
        omit_if_unset=True,
        concern="experiments",
    )
    das_k: str | None = option(
        None,
        "With --experiments das: comma list of subspace sizes k (default 1,2,4,8,16; k = d, the full "
        "interchange, is always run).",
        omit_if_unset=True,
        concern="experiments",
    )
    das_variable: str | None = option(
        None,
        "With --experiments das: the high-level variable, intermediate:S (default intermediate:0: the base "
        "problem recomputed with step S forced to the source's value), answer (the source's answer) or "
        "column:NAME (each pair's clean side names the counterfactual answer of clean <- corrupted).",
        omit_if_unset=True,
        concern="experiments",
    )
    das_steps: int | None = option(
        None,
        "With --experiments das: training steps per site and k (default 100, batches of 16 pairs).",
        omit_if_unset=True,
        concern="experiments",
    )
    das_pairs: int | None = option(
        None,
        "With --experiments das: training interchange pairs (default 256; held-out pairs: half as many).",
        omit_if_unset=True,
        concern="experiments",
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
    def result_keys(cls) -> tuple[str, ...]:
        """The options that change numbers in ``results/`` (declared with ``results=True``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["results"])

    @classmethod
    def options_of(cls, concern: str) -> tuple[str, ...]:
        """The options about ``concern`` (one of ``latentpatch.pipeline.options.CONCERNS``).

        >>> RunConfig.options_of("output")
        ('out', 'report', 'figure_formats', 'wandb', 'wandb_project')
        """
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["concern"] == concern)

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

    @property
    def probe_component_list(self) -> tuple[str, ...]:
        """The components the probe stage records (``--probe-components``, default ``resid_out``)."""
        return component_list(self.probe_components)

    @property
    def steer_alpha_values(self) -> tuple[float, ...]:
        """``--steer-alphas`` as numbers (default -2, -1, 1, 2)."""
        return tuple(float(a) for a in (self.steer_alphas or "-2,-1,1,2").split(","))

    @property
    def steer_layer_values(self) -> tuple[int, ...] | None:
        """``--steer-layers`` as numbers (None: every layer)."""
        return None if self.steer_layers is None else tuple(int(x) for x in self.steer_layers.split(","))

    @property
    def steer_control_count(self) -> int:
        """``--steer-controls`` (default 2)."""
        return 2 if self.steer_controls is None else self.steer_controls

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
        for f in dataclasses.fields(self):
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
