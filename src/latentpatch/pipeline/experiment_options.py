"""The options of the experiments beyond the patching sweeps, each declared once (no torch).

:class:`ExperimentOptions` holds the options of the question-set analyses (``probe``, ``steer``;
docs/method.md §16), of the edges between thoughts (§17) and of distributed alignment search (§20).
:class:`~latentpatch.pipeline.config.RunConfig` inherits them, so the command line, ``--config`` files
and the manifest read them like every other run option; their checks live in
:mod:`latentpatch.pipeline.reader_options` and :mod:`latentpatch.pipeline.das_options`. Every one is
omitted from the manifest while unset, so a run that does not use them keeps its manifest and hash.
"""

from __future__ import annotations

from dataclasses import dataclass

from latentpatch.pipeline.model_options import ModelOptions
from latentpatch.pipeline.options import option
from latentpatch.pipeline.reader_options import component_list


@dataclass
class ExperimentOptions(ModelOptions):
    """The options of ``probe``, ``steer``, ``edges`` and ``das`` (each None until given).

    >>> ExperimentOptions(steer_alphas="1,2").steer_alpha_values
    (1.0, 2.0)
    """

    questions: str | None = option(
        None,
        "With --experiments probe: the question set (pair file with intermediates, question JSON/JSONL, or "
        "GSM8K-style worked solutions; docs/method.md §16); default: the run's pairs, both sides. "
        "With --experiments das: the problems (§20.1).",
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
    edge_heads: bool | None = option(
        None,
        "With --experiments edges: also knock out each attention edge in each head alone (docs/method.md §17).",
        flags="--edge-heads/--no-edge-heads",
        omit_if_unset=True,
        concern="experiments",
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
    latent_count: str = option(
        "target",
        "On a family whose latent phase ends by a rule (CoLaR's sampled ###, Soft Thinking's </think>): "
        "target (each pair runs its target run's own count by the rule, at most --num-latent) | fixed "
        "(--num-latent for every pair). Fixed-count families (CODI, Coconut): --num-latent either way.",
        omit_if_unset=True,
        concern="experiments",
    )
    patched_stop: str = option(
        "keep",
        "On a family with a stop rule: keep (patched runs keep their pair's latent count, so sites stay "
        "comparable; results record where the rule would stop them) | rule (patched runs stop by the rule, "
        "up to --num-latent, and are answered there).",
        omit_if_unset=True,
        concern="experiments",
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
