"""SIM-CoT checkpoints (github InternLM/SIM-CoT at f3ae967; docs/method.md "SIM-CoT and PCCoT").

SIM-CoT trains CODI or Coconut with an auxiliary decoder that reads each latent step; inference is
CODI's or Coconut's own loop, unchanged, and the decoder is discarded. So a SIM-CoT checkpoint is a
CODI or Coconut checkpoint plus the decoder's keys, which the loaders name as *known and unused*
(:func:`~latentpatch.model.checkpoint.split_known_unused`), never by a blanket ``strict=False``:

- CODI side (``CODI/src/model.py``, ``CODI/test.py``): ``codi.base_model.model.*`` (LoRA),
  ``prj.*``, and ``decoder.*`` (plus ``pj_in.*``/``pj_out.*`` when the decoder had another width).
  Its presets are CODI's (:data:`latentpatch.model.codi.PRESETS`, ``simcot-codi-*``), loaded by
  ``--model codi:... --preset simcot-codi-...``.
- Coconut side (``Coconut/coconut.py`` ``CoconutGPT_Same_Word_Embedding``, ``run.py``):
  ``base_causallm.*``, ``embedding.weight`` and ``expainable_llm.*`` (the misspelling is the
  code's). Its preset is :data:`COCONUT_PRESETS`, loaded by ``--model coconut:... --preset
  simcot-coconut-gpt2``.

The number of latents of a Coconut run is ``c_thought x min(max_latent_stage, stage)`` with
``stage = epoch // epochs_per_stage`` (``dataset.py`` ``get_question_latent_dataset`` with
``pad_latent_to_max``); :func:`coconut_latents` computes it.
"""

from __future__ import annotations

from typing import Any

from latentpatch.errors import LatentPatchError

#: the Coconut side's training-only decoder (``CoconutGPT_Same_Word_Embedding.expainable_llm``)
SIMCOT_COCONUT_UNUSED = ("expainable_llm.",)


def coconut_latents(c_thought: int, max_latent_stage: int, epoch: int, epochs_per_stage: int) -> int:
    """The latent count Coconut's ``run.py`` evaluates with at ``epoch`` (``pad_latent_to_max``).

    SIM-CoT's shipped eval config (``args/gsm_simcot_eval.yaml``: c_thought 2, max_latent_stage 5,
    resume 3, epochs_per_stage 3) evaluates at epoch 3, i.e. stage 1, so 2 latents, while the
    checkpoint was trained through stage 5 (10 latents):

    >>> coconut_latents(2, 5, 3, 3), coconut_latents(2, 5, 30, 3)
    (2, 10)
    """
    return c_thought * min(max_latent_stage, epoch // epochs_per_stage)


#: SIM-CoT's released Coconut checkpoint. ``num_latent`` 10 = the trained count (c_thought 2 x
#: max_latent_stage 5; ``args/gsm_simcot.yaml`` trains to epoch 35): the shipped eval config would
#: run 2 (:func:`coconut_latents`), a count the model saw only in its first stage; pass
#: ``--num-latent 2`` to reproduce that config. ``file``: the checkpoint file in the repository
#: (``run.py`` saves ``checkpoint_<epoch>``; the released file name is unverified: give
#: ``coconut:ORG/NAME:FILE`` when it differs).
COCONUT_PRESETS: dict[str, dict[str, Any]] = {
    "simcot-coconut-gpt2": dict(
        repo="internlm/SIM_COT-GPT2-Coconut",
        base="gpt2",
        num_latent=coconut_latents(2, 5, 30, 3),
        eval_config_latents=coconut_latents(2, 5, 3, 3),
        known_unused=SIMCOT_COCONUT_UNUSED,
        about="SIM-CoT (Coconut variant) GPT-2 on GSM8k-Aug; 10 latents as trained (the shipped "
        "args/gsm_simcot_eval.yaml evaluates with 2: pass --num-latent 2 for that)",
    ),
}


def get_coconut_preset(name: str) -> dict[str, Any]:
    """A copy of :data:`COCONUT_PRESETS` ``[name]``; an unknown name is one line with the choices.

    >>> get_coconut_preset("simcot-coconut-gpt2")["num_latent"]
    10
    """
    try:
        return dict(COCONUT_PRESETS[name])
    except KeyError:
        raise LatentPatchError(
            f"--preset {name!r} is not a Coconut preset; fix: use one of {', '.join(COCONUT_PRESETS)}"
        ) from None
