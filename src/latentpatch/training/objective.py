"""The CODI objective on a :class:`~latentpatch.model.latent.LatentModel`.

* teacher CE: the LM on ``question <bot> CoT <eot> The answer is: N <eos>`` (see
  :mod:`latentpatch.training.data`), CE on everything after ``<bot>``.
* student CE: :func:`student_forward` (the model's latent rollout, with gradients), CE on the
  answer tokens (``The answer is: N <eos>``, predicted from ``<eot>`` onward).
* distillation: at the last token of the answer prefix (the lone space token ``"Ġ"`` of
  ``"The answer is: "``, whose next token is the first digit of N), every layer's output hidden
  state (``hidden_states[1:]``) of student vs teacher (detached), SmoothL1, divided by the
  teacher's std per layer, averaged over layers.
* auxiliary (not in CODI, ``latent_aux_factor``): the LM head on the final hidden state at
  latent position j predicts the j-th intermediate result.

Total loss = student CE + ``distill_factor`` * distill + ``ref_factor`` * teacher CE
(+ ``latent_aux_factor`` * auxiliary).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import embedding_matrix
from latentpatch.model.state import RolloutState
from latentpatch.training.data import Batch, Codec, spent_columns
from latentpatch.training.interchange import ThoughtSwap, plan_swap, thought_targets

if TYPE_CHECKING:
    from latentpatch.training.config import TrainConfig


class StudentPass(NamedTuple):
    """What :func:`student_forward` returns. La = answer length, V = vocabulary, L = layers."""

    answer_logits: torch.Tensor  # [B, La, V]
    answer_hidden_states: tuple  # L + 1 tensors [B, La, d] (embeddings, then every layer's output)
    thoughts: torch.Tensor  # [B, K, d] input embeddings fed at the latent positions
    latent_hidden: torch.Tensor  # [B, K, d] final hidden states at the latent positions


def positions(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] position ids from an attention mask: padding never shifts a row's positions."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE: logits[:, i] predicts labels[:, i+1] (-100 ignored)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def student_forward(
    model: LatentModel,
    q_ids: torch.Tensor,
    q_mask: torch.Tensor,
    a_ids: torch.Tensor,
    a_mask: torch.Tensor,
    blind_rows: torch.Tensor | None = None,
    swap: ThoughtSwap | None = None,
    latent_hide: torch.Tensor | None = None,
) -> StudentPass:
    """The latent rollout of :meth:`LatentModel.rollout`, with gradients and every layer's hidden
    states, and the answer part teacher-forced.

    ``q_ids``/``q_mask`` [B, T_q]: question + ``<bot>``, left-padded. ``a_ids``/``a_mask`` [B, La]:
    ``<eot> The answer is: N <eos>``, right-padded. Thought k is the feedback (``model.feedback``,
    CODI's ``prj``) of the final hidden state of the previous position (``<bot>`` for thought 0),
    fed as an input embedding; the last produced thought is not fed (nor computed). K =
    ``model.num_latent``. The latent steps are the one loop, :meth:`LatentModel.run_thoughts`
    (``next_thought=False``, the swap as its step hook, ``latent_hide``); the prompt and answer
    passes run the LM with every layer's hidden states. Kept equal to ``LatentModel.rollout`` by
    tests/test_train.py.

    ``blind_rows`` [B] bool (training only): in these rows the answer tokens do not attend to the
    question tokens (``<bot>``, the thoughts and the answer stay visible), so the answer must be
    read from the thoughts. Positions are unchanged; the rollout itself (question, thoughts) is not
    affected, and the saved model is a plain causal LM. ``swap`` (training only): feed another
    row's thought at one position (:mod:`latentpatch.training.interchange`). ``latent_hide``
    [B, K, T_q + K] bool (training only, :func:`latent_hide_mask`): columns latent position j does
    not attend to (its own column is never hidden; the answer tokens see every position).
    """
    from transformers import DynamicCache

    lm = model.lm
    kv = model.cache_keyword  # "cache" (transformers 5) or "past_key_values": the rollout's own choice
    out = lm(
        input_ids=q_ids,
        attention_mask=q_mask,
        position_ids=positions(q_mask),
        use_cache=True,
        output_hidden_states=True,
        **{kv: DynamicCache()},
    )
    state = RolloutState(
        cache=getattr(out, kv), attention_mask=q_mask, next_position=q_mask.sum(1), length=q_ids.size(1)
    )
    hook = None if swap is None else partial(swap.apply, embed=lm.get_input_embeddings())
    first = model.feedback(out.hidden_states[-1][:, -1])
    thoughts, latent_hidden, _ = model.run_thoughts(
        state, first, 0, step_hook=hook, latent_hide=latent_hide, next_thought=False
    )
    mask = torch.cat([state.attention_mask, a_mask], 1)
    answer_mask = mask
    if blind_rows is not None:
        hide = torch.zeros_like(mask, dtype=torch.bool)
        hide[:, : q_ids.size(1) - 1] = blind_rows[:, None]  # question tokens; <bot> is the last
        answer_mask = mask.masked_fill(hide, 0)
    out = lm(
        input_ids=a_ids,
        attention_mask=answer_mask,
        position_ids=positions(mask)[:, -a_ids.size(1) :],
        use_cache=True,
        output_hidden_states=True,
        **{kv: state.cache},
    )
    return StudentPass(out.logits, out.hidden_states, thoughts, latent_hidden)


def latent_hide_mask(
    b: Batch, rows: torch.Tensor, num_latent: int, spent: bool = False, codec: Codec | None = None
) -> torch.Tensor:
    """[B, K, T_q + K] bool, the columns latent position j may not attend to in ``rows`` [B] bool:
    the earlier latent positions (so what the chain computed so far reaches position j only
    through its fed thought), and with ``spent`` (needs ``codec``) the question numbers that only
    earlier steps read (:func:`~latentpatch.training.data.spent_columns`), so that position j
    cannot recompute the earlier results from the question either."""
    T_q, K = b.q_ids.size(1), num_latent
    hide = torch.zeros(b.q_ids.size(0), K, T_q + K, dtype=torch.bool)
    hide[:, :, T_q:] = torch.ones(K, K, dtype=torch.bool).tril(-1)  # latent column k < j
    if spent and codec is not None:
        hide[:, :, :T_q] = spent_columns(b.q_ids, b.programs, codec, K)
    return hide & rows[:, None, None]


def distill_loss(
    teacher_hidden: tuple, student_hidden: tuple, b: Batch, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over layers of SmoothL1(student, detached teacher) / teacher std at the distillation
    position (``b.t_distill`` in the teacher sequence, ``b.a_distill`` in the answer part), over
    the rows ``keep`` ([B] bool; default all: a swapped row's teacher solves another problem)."""
    rows = torch.arange(b.t_ids.size(0))
    if keep is not None:
        rows = rows[keep]
    if not len(rows):  # every row swapped: nothing to distil
        return student_hidden[-1].new_zeros(())
    per_layer = []
    for th, sh in zip(teacher_hidden[1:], student_hidden[1:]):
        t = th[rows, b.t_distill[rows]].detach()
        s = sh[rows, b.a_distill[rows]]
        per_layer.append(F.smooth_l1_loss(s, t) / (t.std() + 1e-6))
    return torch.stack(per_layer).mean()


def codi_loss(
    model: LatentModel, b: Batch, cfg: TrainConfig, teacher_only: bool = False, codec: Codec | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss (scalar, with gradients) and its parts as floats (for the log).

    ``codec`` is needed for interchange training (``cfg.thought_swap_rate``: counterfactual answer
    tokens); without it no thought is swapped."""
    t_out = model.lm(input_ids=b.t_ids, attention_mask=b.t_mask, output_hidden_states=True, use_cache=False)
    t_ce = next_token_ce(t_out.logits, b.t_labels)
    if teacher_only:
        return t_ce, {"teacher_ce": t_ce.item()}
    blind = None
    if cfg.answer_blind_rate:  # the answer must be read from the thoughts in these rows
        blind = torch.rand(b.q_ids.size(0)) < cfg.answer_blind_rate
    hide = None
    if cfg.thought_isolate_rate:  # the chain must pass through the fed thoughts in these rows
        rows = torch.rand(b.q_ids.size(0)) < cfg.thought_isolate_rate
        hide = latent_hide_mask(b, rows, model.num_latent, cfg.hide_spent_numbers, codec)
    swap = None
    if codec is not None:
        positions = [int(p) for p in cfg.swap_positions.split(",")] if cfg.swap_positions else None
        swap = plan_swap(
            b, codec, cfg.thought_swap_rate, model.num_latent, cfg.swap_same_value, positions, cfg.swap_token_rate
        )
    if swap is not None:
        a_ids, a_labels, targets, t_targets = (
            swap.answer_ids,
            swap.answer_labels,
            swap.latent_targets,
            swap.thought_targets,
        )
    else:
        a_ids, a_labels, targets = b.a_ids, b.a_labels, b.latent_targets
        t_targets = thought_targets(b.latent_targets) if b.latent_targets is not None else None
    student = student_forward(model, b.q_ids, b.q_mask, a_ids, b.a_mask, blind, swap, hide)
    s_ce = next_token_ce(student.answer_logits, a_labels)
    keep = ~swap.rows if swap is not None else None
    distill = distill_loss(t_out.hidden_states, student.answer_hidden_states, b, keep)
    total = s_ce + cfg.distill_factor * distill + cfg.ref_factor * t_ce
    parts = {"student_ce": s_ce.item(), "distill": distill.item(), "teacher_ce": t_ce.item()}
    if cfg.latent_aux_factor and targets is not None:
        # auxiliary (not in CODI): the LM head on the final hidden state at latent position j
        # predicts the j-th intermediate result (the answer once the program has no more steps)
        lat_logits = model.logits(student.latent_hidden)  # [B, K, V] fp32
        aux = F.cross_entropy(lat_logits.reshape(-1, lat_logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        total = total + cfg.latent_aux_factor * aux
        parts["latent_aux"] = aux.item()
    if cfg.thought_aux_factor and t_targets is not None:
        # auxiliary (not in CODI): the fed thought, read as an input embedding (dot product with the
        # tied token embeddings), is its value's token, so later positions can read it as they read
        # the question's numbers
        emb = embedding_matrix(model.lm)  # [V, d]
        t_logits = (student.thoughts @ emb.T).float()  # [B, K, V]
        t_aux = F.cross_entropy(t_logits.reshape(-1, t_logits.size(-1)), t_targets.reshape(-1), ignore_index=-100)
        total = total + cfg.thought_aux_factor * t_aux
        parts["thought_aux"] = t_aux.item()
    if cfg.thought_match_factor and t_targets is not None:
        # (not in CODI) the fed thought points where its value's token embedding points, so a
        # position computes from it as from a number it reads
        fed = t_targets != -100
        emb = embedding_matrix(model.lm)
        match = 1 - F.cosine_similarity(student.thoughts[fed], emb[t_targets[fed]], dim=-1).mean()
        total = total + cfg.thought_match_factor * match
        parts["thought_match"] = match.item()
    return total, parts
