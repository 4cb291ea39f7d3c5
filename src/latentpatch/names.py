"""The names a run directory uses, and the rules that read them, in one place.

Components, experiments, modes, directions, replacements, metrics (with label and unit), the
columns of ``results/cells.parquet`` and ``results/trajectories.parquet`` and the format tags
are defined here once; every other module imports them. The two rules that analyses share
(:func:`all_positions_cell`, :func:`primary_component`) are one function each, with examples.

Imports nothing heavy (no torch, numpy or pandas), so any module may use it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

# ---- format tags ---------------------------------------------------------------------------------
#: ``format`` of a run directory's ``manifest.json``.
RUN_FORMAT = "latentpatch-run/1"
#: ``format`` of a latentpatch model directory's ``latentpatch.json``.
MODEL_FORMAT = "latentpatch-codi/1"

# ---- sites ----------------------------------------------------------------------------------------
#: Where an activation is read or overwritten (docs/method.md §3); the order of error messages.
COMPONENTS: tuple[str, ...] = ("resid_pre", "resid_out", "attn_out", "mlp_out")
#: The component a run patches unless configured otherwise.
DEFAULT_COMPONENT = "resid_out"
#: Per-head component (docs/method.md §14): head h's slice of the input of the attention output
#: projection (``o_proj`` for LLaMA, ``attn.c_proj`` for GPT-2). ``--component head_out`` expands every
#: spec into one per head, whose ``component`` is ``head_out.<h>`` (:func:`head_component`); that string
#: is the ``component`` column of ``cells.parquet`` (no extra column, so default runs are unchanged).
HEAD_COMPONENT = "head_out"
#: Every ``--component`` value: the block components plus :data:`HEAD_COMPONENT`.
SITE_COMPONENTS: tuple[str, ...] = COMPONENTS + (HEAD_COMPONENT,)


def head_component(head: int) -> str:
    """The component name of attention head ``head``'s output.

    >>> head_component(3)
    'head_out.3'
    """
    return f"{HEAD_COMPONENT}.{head}"


def parse_head(component: str) -> int | None:
    """The head index of a per-head component name, None for any other component.

    >>> parse_head("head_out.3"), parse_head("head_out"), parse_head("resid_out")
    (3, None, None)
    """
    base, _, head = component.partition(".")
    return int(head) if base == HEAD_COMPONENT and head.isdigit() else None


# ---- experiments and their modes ----------------------------------------------------------------
EXPERIMENTS: tuple[str, ...] = ("layer", "position", "iterative")
#: The one mode of the layer sweep: every latent position at one layer.
LAYER_MODE = "all"
#: The one mode of the position sweep: one latent position at one layer.
POSITION_MODE = "single"
#: Modes of the iterative experiment (docs/method.md §5).
ITERATIVE_MODES: tuple[str, ...] = ("parallel", "cumulative", "chained", "frozen")
#: Every mode per experiment.
MODES: dict[str, tuple[str, ...]] = {"layer": (LAYER_MODE,), "position": (POSITION_MODE,), "iterative": ITERATIVE_MODES}
#: Iterative modes whose later thoughts' activations are tracked (rows of ``trajectories.parquet``).
TRACKED_MODES: tuple[str, ...] = ("chained", "frozen")
#: Paired comparisons of iterative modes made per layer (a, b): the difference is a − b.
MODE_COMPARISONS: tuple[tuple[str, str], ...] = (("chained", "parallel"), ("chained", "frozen"), ("parallel", "frozen"))
#: ``position`` of a cell that patches every latent position at once.
ALL_POSITIONS = -1
#: The two (experiment, mode) cells that patch every latent position at one layer: the same patch.
ALL_POSITIONS_CELLS: tuple[tuple[str, str], ...] = (("layer", LAYER_MODE), ("iterative", "parallel"))

# ---- what is patched in, and from where -----------------------------------------------------------
#: ``denoise``: clean values into the corrupted run; ``noise``: corrupted values into the clean run.
DIRECTIONS: tuple[str, ...] = ("denoise", "noise")
#: What replaces the activation: the source run's value, zero, the dataset mean, another pair's value.
REPLACEMENTS: tuple[str, ...] = ("source", "zero", "mean", "resample")
#: Replacements whose values depend on every pair of the run (a shard computes them over all shards).
GLOBAL_REPLACEMENTS: tuple[str, ...] = ("mean", "resample")


# ---- step-level experiments (docs/method.md §13) ---------------------------------------------------
#: Experiments on the latent chain itself; run only when named in ``--experiments``. Their rows go to
#: ``results/steps.parquet`` and ``results/influence.parquet``, never to ``cells.parquet``.
STEP_EXPERIMENTS: tuple[str, ...] = ("thought", "early", "influence", "intermediate")
#: Reading experiments (docs/method.md §14): logit lens and attention to the question, from each
#: pair's unpatched runs; their rows go to ``results/lens*.parquet`` and ``results/attention.parquet``.
READING_EXPERIMENTS: tuple[str, ...] = ("lens", "attention")
#: Attribution patching (docs/method.md §15): the first-order estimate of every position-sweep site's
#: effect from one backward pass, checked against exact patching; rows go to ``results/atp.parquet``.
ATP_EXPERIMENT = "atp"
#: Trained readers (docs/method.md §16): linear probes per site on activations recorded once per
#: question (``results/activations/``, ``results/questions.parquet``, ``results/probes.parquet``).
PROBE_EXPERIMENT = "probe"
#: Steering (docs/method.md §16): alpha x a direction added at one site, beside random directions of
#: the same norm; rows go to ``results/steer.parquet``.
STEER_EXPERIMENT = "steer"
#: Every name ``--experiments`` accepts.
ALL_EXPERIMENTS: tuple[str, ...] = (
    EXPERIMENTS + STEP_EXPERIMENTS + READING_EXPERIMENTS + (ATP_EXPERIMENT, PROBE_EXPERIMENT, STEER_EXPERIMENT)
)
#: ``component`` of a spec that replaces a continuous thought: ``thought`` = the input embedding of
#: latent position p (after ``prj``); ``thought_pre`` = the final hidden state that ``prj`` maps to it.
THOUGHT_SITES: tuple[str, ...] = ("thought", "thought_pre")
#: ``component`` of an early-answer spec: [EOT] fed after k thoughts.
EARLY_SITE = "early"
#: ``layer`` of a step-level spec (it does not patch a block).
NO_LAYER = -1
#: What replaces a thought: the source run's, zero, the dataset mean (over pairs and steps), the
#: per-step mean (over pairs), the target's own thought plus Gaussian noise scaled to its norm,
#: another pair's source thought.
STEP_REPLACEMENTS: tuple[str, ...] = ("source", "zero", "mean", "step_mean", "noise", "resample")
#: Vocabulary-space replacements of site ``thought`` (docs/method.md §13, :mod:`latentpatch.patching.vocab`):
#: the nearest token embedding by cosine (as is; rescaled to the thought's norm), the projection on the
#: span of the top :data:`VOCAB_TOP_K` token embeddings (norm kept), the thought minus its top-1 token
#: component. Specs after :data:`STEP_REPLACEMENTS`' (their rows unchanged).
VOCAB_REPLACEMENTS: tuple[str, ...] = ("discretize", "discretize_norm", "vocab_proj", "remove_top1")
#: Write the input embedding of the first token of the target's intermediate s (``number:s``) or of
#: that value + 1 (``number_plus1:s``) as thought p; only for pairs whose target has intermediates.
NUMBER_REPLACEMENTS: tuple[str, ...] = ("number", "number_plus1")
#: Token embeddings spanning the subspace of ``vocab_proj``.
VOCAB_TOP_K = 8
#: The donor kinds of the ``intermediate`` experiment (``same:s``, ``diff:s``).
DONOR_REPLACEMENTS: tuple[str, ...] = ("same", "diff")
#: Interventions of the influence matrix.
INFLUENCE_REPLACEMENTS: tuple[str, ...] = ("zero", "noise", "source")
#: Files under ``results/`` of a run with step-level experiments: per-pair files (a folder), the tables.
STEPS_DIR, STEPS_FILE, INFLUENCE_FILE = "steps", "steps.parquet", "influence.parquet"
#: Step-table columns that JSON may hold as null (NaN, or no number): NaN in the tables, as in cells.parquet.
STEP_FLOAT_COLUMNS: tuple[str, ...] = (
    "kl",
    "answer_logit_diff",
    "recovery",
    "logprob_final",
    "p_final",
    "pred_answer",
    "thought_cos",
)
#: Noise scale: the noise vector's expected norm relative to the thought it is added to.
NOISE_SCALE = 1.0
#: ``results/steps.parquet``: one row per pair x step-level spec (thought, early, intermediate).
STEP_COLUMNS: list[str] = [
    "pair_id",
    "experiment",
    "site",
    "replacement",
    "position",
    "intermediate",
    "kl",
    "answer_logit_diff",
    "recovery",
    "logprob_final",
    "p_final",
    "pred_answer",
    "flipped",
    "correct",
    "to_source",
    "clean_correct",
    "corrupted_correct",
    "flagged",
]
#: ``results/influence.parquet``: one row per pair x intervention x intervened step i x thought j.
INFLUENCE_COLUMNS: list[str] = [
    "pair_id",
    "replacement",
    "step",
    "later",
    "thought_cos",
    "thought_rel_l2",
    "kl",
    "flipped",
    "flagged",
]


# ---- reading experiments (docs/method.md §14) ---------------------------------------------------------
#: Folders of per-pair files and the tables under ``results/`` of a run with reading experiments.
LENS_DIR, ATTENTION_DIR = "lens", "attention"
LENS_FILE, LENS_TOP_FILE, ATTENTION_FILE = "lens.parquet", "lens_top.parquet", "attention.parquet"
#: ``results/attention_thoughts.parquet``: per pair x variant x layer x head x query (thought p, or K = the
#: first answer position) x key group (``question``, ``bot``, ``t0..t{K-1}``, ``answer_start``), the
#: attention weight (the key groups of a row sum to 1).
ATTENTION_THOUGHTS_FILE = "attention_thoughts.parquet"
ATTENTION_THOUGHT_COLUMNS: list[str] = ["pair_id", "variant", "layer", "head", "query", "key", "weight"]
#: ``layer`` of a lens row that reads the thought vector itself (the input embedding at the position).
THOUGHT_LAYER = -1
#: ``results/lens.parquet``: one row per pair x variant x layer x position x known value. ``position``
#: 0..K-1 = latent position, K = the first answer position (the last fed token before the answer);
#: ``kind`` = ``answer`` | ``intermediate`` | ``operand``, ``index`` its order within the kind.
LENS_COLUMNS: list[str] = [
    "pair_id",
    "variant",
    "layer",
    "position",
    "kind",
    "index",
    "value",
    "token_id",
    "rank",
    "prob",
]
#: ``results/lens_top.parquet``: one row per pair x variant x layer x position x top-k rank.
LENS_TOP_COLUMNS: list[str] = ["pair_id", "variant", "layer", "position", "k", "token_id", "token", "prob"]
#: ``--lens`` (docs/method.md §14.1): the logit lens (the default: lens files as before), the tuned lens
#: (one trained affine translator per layer before the final norm and LM head), or both side by side.
LENS_CHOICES: tuple[str, ...] = ("logit", "tuned", "both")
DEFAULT_LENS = "logit"
#: The lenses a ``--lens`` value reads with, in the order their rows are written.
LENS_KINDS: dict[str, tuple[str, ...]] = {"logit": ("logit",), "tuned": ("tuned",), "both": ("logit", "tuned")}
#: Column of ``lens.parquet`` / ``lens_top.parquet`` naming the lens of a row ("logit" / "tuned"), after
#: ``pair_id``; present only when ``--lens`` is not the default, so default files are unchanged.
LENS_COLUMN = "lens"
#: Folder of trained tuned lenses inside a model's activation-cache folder (``<cache>/<model key>/``).
TUNED_LENS_DIR = "tuned_lens"
#: ``results/attention.parquet``: attention mass (mean over heads) per pair x variant x layer x query
#: position (0..K-1 latent, K first answer) x token role (``number 1``.., ``operator``, ``other``,
#: ``special``, ``thoughts``: earlier latent positions and the query itself).
ATTENTION_COLUMNS: list[str] = ["pair_id", "variant", "layer", "position", "role", "weight"]


# ---- attribution patching (docs/method.md §15) -------------------------------------------------------
#: Gradient paths: ``full`` = through the KV cache and the recurrence; ``attention`` = the gradient stopped
#: at each fed thought (recurrence cut, the counterpart of the ``frozen`` control).
ATP_PATHS: tuple[str, ...] = ("full", "attention")
#: Metrics attribution patching estimates (KL has zero gradient at the target run, so it has no
#: first-order estimate).
ATP_METRICS: tuple[str, ...] = ("answer_logit_diff", "answer_logprob_diff")
#: Per-pair files and the table under ``results/``.
ATP_DIR, ATP_FILE = "atp", "atp.parquet"
#: ``selected`` of a row under ``--refine K``: one of the K sites with the largest estimate, one of the
#: random control sample of the rest, or neither ("").
ATP_SELECTIONS: tuple[str, ...] = ("top", "control", "")
#: Float columns of ``atp.parquet`` that JSON holds as null when NaN.
ATP_FLOAT_COLUMNS: tuple[str, ...] = ("atp", "atp_attention", "atp_graddrop", "exact")
#: ``results/atp.parquet``: one row per pair x site (component x layer x latent position). ``atp`` /
#: ``atp_attention``: the estimated change of ``metric`` through both routes / with the recurrence cut;
#: ``atp_graddrop``: the GradDrop score (NaN unless ``--graddrop``); ``exact``: the exact change (NaN where
#: not patched); ``checked``: the pair is one of the exact check's (every site patched); ``selected``: see
#: :data:`ATP_SELECTIONS`.
ATP_COLUMNS: list[str] = [
    "pair_id",
    "metric",
    "component",
    "layer",
    "position",
    "atp",
    "atp_attention",
    "atp_graddrop",
    "exact",
    "checked",
    "selected",
    "flagged",
]


# ---- metrics ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One per-cell metric: its column name, what it measures and its unit ("" if none)."""

    name: str
    title: str
    unit: str = ""

    @property
    def label(self) -> str:
        """Title with unit, for axes and table headings.

        >>> METRICS["kl"].label
        'KL(patched ‖ corrupted) [nats]'
        >>> METRICS["act_bias"].label
        'cos(clean) − cos(corrupted)'
        """
        return f"{self.title} [{self.unit}]" if self.unit else self.title


#: Every metric column of ``cells.parquet``, in column order.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("kl", "KL(patched ‖ corrupted)", "nats"),
        Metric("logit_l2", "logit RMS change", "logits"),
        Metric("pred_change_rate", "argmax change rate", "fraction"),
        Metric("answer_logit_diff", "answer logit diff, clean − corr", "logits"),
        Metric("answer_logprob_diff", "answer log-prob diff, clean − corr", "nats"),
        Metric("recovery", "recovery", "fraction; 1 = clean restored"),
        Metric("act_cos_clean", "cos(activation, clean)"),
        Metric("act_cos_corr", "cos(activation, corrupted)"),
        Metric("act_bias", "cos(clean) − cos(corrupted)"),
    )
}
#: Human-readable metric names with units, for tables and figure labels.
METRIC_LABELS: dict[str, str] = {name: m.label for name, m in METRICS.items()}
#: Metrics computed from the output logits of every cell, in column order.
LOGIT_METRICS: tuple[str, ...] = (
    "kl",
    "logit_l2",
    "pred_change_rate",
    "answer_logit_diff",
    "answer_logprob_diff",
    "recovery",
)
#: Metrics of the tracked activation (chained/frozen rows only; NaN elsewhere).
ACTIVATION_METRICS: tuple[str, ...] = ("act_cos_clean", "act_cos_corr", "act_bias")
#: Metrics summarised per cell in ``stats.json`` (this order is the order of its comparison rows).
SUMMARY_METRICS: tuple[str, ...] = ("kl", "recovery", "answer_logit_diff", "logit_l2", "pred_change_rate", "act_bias")
#: Metrics whose single-position effects are summed in the additivity table (this order).
ADDITIVE_METRICS: tuple[str, ...] = ("kl", "recovery", "answer_logit_diff", "logit_l2", "pred_change_rate")
#: The three metrics every figure and report table shows.
KEY_METRICS: tuple[str, ...] = ("kl", "recovery", "answer_logit_diff")

# ---- table columns ------------------------------------------------------------------------------
#: Columns that identify a cell: one patch spec, whose sample is its values over pairs.
CELL_KEYS: list[str] = ["experiment", "mode", "component", "layer", "position"]
#: Columns every ``cells.parquet`` must have.
REQUIRED_CELL_COLUMNS: list[str] = ["pair_id", *CELL_KEYS]
#: ``results/cells.parquet``: one row per pair x patch spec, these columns in this order.
CELL_COLUMNS: list[str] = [
    "pair_id",
    *CELL_KEYS,
    *LOGIT_METRICS,
    "pred_answer",
    "pred_is_clean",
    "pred_is_corrupted",
    *ACTIVATION_METRICS,
    "clean_correct",
    "corrupted_correct",
    "flagged",
]
#: ``results/trajectories.parquet``: one row per pair x tracked spec x later latent position.
TRAJECTORY_COLUMNS: list[str] = ["pair_id", "layer", "mode", "position", *ACTIVATION_METRICS]


# ---- rules ------------------------------------------------------------------------------------------
def all_positions_cell(present: Iterable[tuple[str, str]], prefer: str = "layer") -> tuple[str, str] | None:
    """The (experiment, mode) whose cells are "every latent position patched at one layer".

    The layer sweep's ``all`` cell and the iterative ``parallel`` cell are the same patch. Analyses
    of the layer effect use the layer cell, else iterative ``parallel`` (``prefer="layer"``); the
    comparison of iterative modes uses its own ``parallel`` cell, else the layer cell
    (``prefer="iterative"``). ``present``: the (experiment, mode) pairs a table has. None if neither.

    >>> all_positions_cell([("layer", "all"), ("iterative", "parallel"), ("position", "single")])
    ('layer', 'all')
    >>> all_positions_cell([("iterative", "parallel"), ("iterative", "chained")])
    ('iterative', 'parallel')
    >>> all_positions_cell([("layer", "all"), ("iterative", "parallel")], prefer="iterative")
    ('iterative', 'parallel')
    >>> all_positions_cell([("position", "single")]) is None
    True
    """
    if prefer not in ("layer", "iterative"):
        raise ValueError(f"prefer must be 'layer' or 'iterative', got {prefer!r}")
    present = set(present)
    order = ALL_POSITIONS_CELLS if prefer == "layer" else ALL_POSITIONS_CELLS[::-1]
    return next((cell for cell in order if cell in present), None)


def primary_component(components: Iterable[str]) -> str | None:
    """The component a figure or summary shows when a table holds several.

    The default component (``resid_out``) if present, else the most frequent one; ties go to
    the first in :data:`COMPONENTS` order (unknown names after, alphabetically). ``components``:
    the ``component`` column of a table (one entry per row). None if empty.

    >>> primary_component(["resid_out", "mlp_out", "mlp_out"])
    'resid_out'
    >>> primary_component(["mlp_out", "attn_out", "attn_out"])
    'attn_out'
    >>> primary_component(["mlp_out", "attn_out"])
    'attn_out'
    >>> primary_component([]) is None
    True
    """
    counts = Counter(components)
    if not counts:
        return None
    if DEFAULT_COMPONENT in counts:
        return DEFAULT_COMPONENT

    def rank(name: str) -> tuple[int, int, str]:
        known = COMPONENTS.index(name) if name in COMPONENTS else len(COMPONENTS)
        return (-counts[name], known, name)

    return min(counts, key=rank)


# ---- trained readers (docs/method.md §16) --------------------------------------------------------------
#: ``results/activations/NNNNN.safetensors``: one shard per :data:`ACTIVATION_SHARD` questions;
#: ``results/questions.parquet``: the questions, their labels and the model's answers;
#: ``results/probes.parquet``: one row per label x site (:data:`PROBE_COLUMNS`).
ACTIVATIONS_DIR, QUESTIONS_FILE, PROBES_FILE = "activations", "questions.parquet", "probes.parquet"
#: Questions per activation shard (fixed, so a resumed run cuts the same shards).
ACTIVATION_SHARD = 64
#: The thought sites a probe reads besides the components: the fed vector and the state it came from.
PROBE_THOUGHT_SITES: tuple[str, ...] = THOUGHT_SITES
#: Query positions of a component site after the K thoughts: the first answer position (the last
#: token fed before the answer) and the question's last token (the "question" baseline).
PROBE_EXTRA_POSITIONS: tuple[str, ...] = ("ans", "question")


def probe_position_names(num_latent: int) -> list[str]:
    """The position axis of a component in an activation shard: ``t0..t{K-1}``, ``ans``, ``question``.

    >>> probe_position_names(2)
    ['t0', 't1', 'ans', 'question']
    """
    return [f"t{p}" for p in range(num_latent)] + list(PROBE_EXTRA_POSITIONS)


#: ``results/steer/NNNNN.json`` per pair, assembled into ``results/steer.parquet``: one row per pair x
#: direction (the steering direction or ``random<k>``) x site x alpha.
STEER_DIR, STEER_FILE = "steer", "steer.parquet"
STEER_COLUMNS: list[str] = [
    "pair_id",
    "direction",
    "control",
    "component",
    "layer",
    "position",
    "alpha",
    "kl",
    "answer_logit_diff",
    "recovery",
    "pred_answer",
    "flipped",
    "correct",
    "to_source",
    "flagged",
]
STEER_FLOAT_COLUMNS: tuple[str, ...] = ("kl", "answer_logit_diff", "recovery", "pred_answer")


# ---- edges between thoughts (docs/method.md §17) ----------------------------------------------------
#: Attention-edge knockouts and path patching from thought i to thought j; rows go to ``results/edges.parquet``.
EDGES_EXPERIMENT = "edges"
ALL_EXPERIMENTS = ALL_EXPERIMENTS + (EDGES_EXPERIMENT,)  # appended here, after the others (merge-friendly)
#: Edge kinds: ``knockout`` (query j does not attend to key i), ``path`` (j reads thought i patched),
#: and per sender i the whole-thought comparisons ``total`` (thought i patched, later thoughts
#: regenerated) and ``frozen`` (later inputs held at the target's).
EDGE_KNOCKOUT, EDGE_PATH = "knockout", "path"
EDGE_KINDS: tuple[str, ...] = (EDGE_KNOCKOUT, EDGE_PATH, "total", "frozen")
#: ``head`` of an edge that applies to every attention head.
ALL_HEADS = -1
#: ``results/edges/NNNNN.json`` per pair, assembled into ``results/edges.parquet``: one row per pair x edge.
#: ``query``: latent position j (K = the answer start; for total/frozen: -1); ``key``: ``question``,
#: ``bot``, ``t<i>``; ``sender``: i of a ``t<i>`` key or of total/frozen (-1 otherwise); ``ld_change``:
#: the answer logit difference minus the target's.
EDGES_DIR, EDGES_FILE = "edges", "edges.parquet"
EDGE_COLUMNS: list[str] = [
    "pair_id",
    "kind",
    "query",
    "key",
    "sender",
    "head",
    "kl",
    "answer_logit_diff",
    "ld_change",
    "recovery",
    "pred_answer",
    "flipped",
    "to_source",
    "flagged",
]
EDGE_FLOAT_COLUMNS: tuple[str, ...] = ("kl", "answer_logit_diff", "ld_change", "recovery", "pred_answer")


# ---- distributed alignment search (docs/method.md §20) ------------------------------------------
#: A learned k-dim subspace of a site interchanged between a base and a source run, scored against a
#: high-level model's counterfactual answer; rows go to ``results/das.parquet``.
DAS_EXPERIMENT = "das"
ALL_EXPERIMENTS = ALL_EXPERIMENTS + (DAS_EXPERIMENT,)  # appended here, after the others (merge-friendly)
#: ``results/das/<site>.k<k>.json`` (rows) and ``.safetensors`` (the learned basis) per site x k, and
#: ``<site>.full.json`` (full interchange and base run), assembled into ``results/das.parquet``: one row
#: per site x k x method x held-out example (:data:`DAS_COLUMNS`).
DAS_DIR, DAS_FILE = "das", "das.parquet"
#: The methods of a DAS row: the trained subspace, a random (untrained) one of the same k, one trained on
#: shuffled counterfactuals, the whole site interchanged (k = d), no intervention (k = 0).
DAS_METHODS: tuple[str, ...] = ("das", "random", "shuffled", "full", "base")
DAS_COLUMNS: list[str] = [
    "site",
    "component",
    "layer",
    "position",
    "k",
    "method",
    "variable",
    "example",
    "group",
    "counterfactual",
    "pred_answer",
    "hit",
    "train_loss",
]
#: With ``--questions`` of GSM8K worked solutions: how many chains were usable and why the others were
#: skipped (``data/chain.py`` ISSUES), in ``results/`` (docs/method.md §20.1).
DAS_CHAINS_FILE = "das_chains.json"

# ---- latent counts by a family's stop rule (docs/method.md §22) -----------------------------------
#: Cell columns a run on a family with a stop rule adds (``results/cells.parquet`` and the experiment
#: JSON): the pair's latent count (its target run's own, or ``--num-latent`` with ``--latent-count
#: fixed``), the count the rule gives the patched run (-1: it did not fire within the run's latents),
#: and whether that differs from the pair's count (the patched run would stop elsewhere).
LATENT_COUNT, RULE_LATENTS, STOPS_ELSEWHERE = "latent_count", "rule_latents", "stops_elsewhere"
STOP_COLUMNS: list[str] = [LATENT_COUNT, RULE_LATENTS, STOPS_ELSEWHERE]
#: what ``--latent-count`` takes: each pair's target run's own count by the family's rule, or
#: ``--num-latent`` for every pair
LATENT_COUNTS: tuple[str, ...] = ("target", "fixed")
#: what ``--patched-stop`` takes: patched runs keep their pair's count, or stop by the rule
PATCHED_STOPS: tuple[str, ...] = ("keep", "rule")
