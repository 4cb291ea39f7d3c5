"""The options of model loading, each declared once with its help text (no torch).

:class:`ModelOptions` are the options of :func:`latentpatch.model.load.load_model`, shared by
``latentpatch run``, ``eval`` and ``inspect`` (:class:`~latentpatch.pipeline.config.RunConfig`
inherits them); ``--model``'s spec kinds are listed in :data:`MODEL_HELP`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from latentpatch.pipeline.options import option

if TYPE_CHECKING:
    from latentpatch.model.latent import LatentModel

#: ``--dtype`` values (``load_model`` also takes the aliases fp32, bf16, fp16, half).
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DTYPE_ALIASES: tuple[str, ...] = ("fp32", "float", "bf16", "fp16", "half")


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
