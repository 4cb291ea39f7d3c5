"""Reading an unpatched rollout (docs/method.md §14): the logit lens and the attention to the question.

Both read one prompt's rollout (batch of one, no padding). Query positions: latent positions
0..K-1 (absolute ``T_q + p``) and the first answer position K (the last token fed before the answer,
whose logits predict the first answer token).

- :func:`lens_run`: every layer's residual stream (``resid_out``) and the fed vector itself (row 0,
  ``layer = -1``: the thought, or the answer-start token's embedding) through the final norm and the
  LM head (the logit lens), or first through a tuned lens's translator of that layer
  (:class:`latentpatch.probing.tuned_lens.TunedLens`, §14.1): top-k tokens and the rank and
  probability of given tokens. :func:`lens_streams` and :func:`lens_read` are its two halves (one
  rollout read with several lenses).
- :func:`attention_run`: attention weights of every layer and head at the query positions
  (:func:`latentpatch.model.heads.attention_weights`); :func:`token_roles` and :func:`role_mass`
  aggregate them over the question's tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from latentpatch.model.heads import QueryRecorder, attention_weights, lens_logits
from latentpatch.model.latent import LatentModel
from latentpatch.probing.tuned_lens import TunedLens

#: Words (lower case, stripped) that name an arithmetic step in GSM8K-style questions.
OPERATOR_WORDS = frozenset(
    "+ - * / x × = times each per every more less fewer half twice double triple total left remaining "
    "gives give gave buys buy bought sells sold spends spent loses lost eats ate adds add plus minus "
    "divided split shares share altogether combined another".split()
)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass
class LensResult:
    """Lens of one rollout. Rows: ``layers`` (-1 = the fed vector, then 0..L-1); columns: query positions.

    ``top_ids``/``top_probs``: [L+1, Q, k]; ``ranks``/``probs``: [L+1, Q, n_tokens] for the tokens asked
    for (rank 0 = the top token; ties count in the token's favour)."""

    layers: list[int]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    ranks: torch.Tensor
    probs: torch.Tensor


def query_indices(prompt_len: int, num_latent: int, length: int) -> list[int]:
    """Absolute indices of latent positions 0..K-1 and of the first answer position (``length - 1``)."""
    return [prompt_len + p for p in range(num_latent)] + [length - 1]


def value_token(model: LatentModel, value: float) -> int:
    """The first number token of ``value`` as the model writes it after its answer prefix."""
    ids, start = model.answer_ids(value)
    return ids[min(start, len(ids) - 1)]


def known_values(question: str, answer: float, intermediates: Sequence[float] | None) -> list[tuple[str, int, float]]:
    """``(kind, index, value)``: the answer, each intermediate result, each number of the question.

    >>> known_values("Tom has 3 apples and buys 4.", 7.0, [7.0])
    [('answer', 0, 7.0), ('intermediate', 0, 7.0), ('operand', 0, 3.0), ('operand', 1, 4.0)]
    """
    out = [("answer", 0, float(answer))]
    out += [("intermediate", i, float(v)) for i, v in enumerate(intermediates or [])]
    out += [("operand", i, float(v)) for i, v in enumerate(_NUMBER.findall(question.replace(",", "")))]
    return out


@torch.no_grad()
def lens_streams(model: LatentModel, prompt: Sequence[int], stream: int | None = None) -> torch.Tensor:
    """[L+1, Q, d] of ``prompt``'s unpatched rollout at the query positions: row 0 the fed vectors (the
    thoughts, then the answer-start token's embedding), row l+1 block l's ``resid_out``. ``stream``:
    the pair's draw-stream key (a random feedback's draws, docs/method.md §21)."""
    L = model.n_layers
    r = model.rollout([list(prompt)], record=[("resid_out", layer) for layer in range(L)], streams=[stream])
    assert r.hooks is not None
    idx = query_indices(r.prompt_len, model.num_latent, r.state.length)
    last = model.answer_start_ids()[-1]
    fed = torch.cat([r.thoughts[0], model.embed_ids([last], 1)[0]], dim=0)  # [Q, d]
    return torch.stack([fed] + [r.hooks.recorded("resid_out", layer)[0, idx] for layer in range(L)])


@torch.no_grad()
def lens_read(
    model: LatentModel, streams: torch.Tensor, tokens: Sequence[int], k: int = 5, lens: TunedLens | None = None
) -> LensResult:
    """The lens of ``streams`` (:func:`lens_streams`): the logit lens, or ``lens``'s translator of each
    layer first (the tuned lens; at the last layer the two are the same)."""
    tok = torch.tensor(list(tokens), dtype=torch.long, device=model.device)
    layers = [-1, *range(model.n_layers)]
    tops, top_p, ranks, probs = [], [], [], []
    for layer, row in zip(layers, streams):  # [Q, d] each
        # one layer at a time keeps memory at Q x V
        logits = lens_logits(model.lm, row) if lens is None else lens.logits(model.lm, row, layer)
        p = torch.softmax(logits, dim=-1)
        top = p.topk(k, dim=-1)
        tops.append(top.indices)
        top_p.append(top.values)
        own = logits[:, tok]  # [Q, n]
        ranks.append((logits[:, None, :] > own[:, :, None]).sum(-1))
        probs.append(p[:, tok])
    return LensResult(layers, torch.stack(tops), torch.stack(top_p), torch.stack(ranks), torch.stack(probs))


def lens_run(
    model: LatentModel, prompt: Sequence[int], tokens: Sequence[int], k: int = 5, lens: TunedLens | None = None
) -> LensResult:
    """The logit lens (or, with ``lens``, the tuned lens) of the unpatched rollout of ``prompt`` at every
    layer and query position."""
    return lens_read(model, lens_streams(model, prompt), tokens, k, lens)


@torch.no_grad()
def attention_run(model: LatentModel, prompt: Sequence[int], stream: int | None = None) -> tuple[torch.Tensor, int]:
    """``([L, H, Q, T] fp32 attention weights at the query positions, T_q)`` of ``prompt``'s rollout.

    The rollout runs with the model's own attention kernel; weights are recomputed from queries
    and cached keys per layer (:func:`latentpatch.model.heads.attention_weights`). ``stream``: the
    pair's draw-stream key. PCCoT: the queries of its site round's pass, and the answer's over round T
    (:meth:`~latentpatch.model.pccot.PCCoTModel.round_attention`)."""
    from latentpatch.model.pccot import PCCoTModel

    if isinstance(model, PCCoTModel):
        return model.round_attention(prompt)
    with QueryRecorder(model.lm) as rec:
        r = model.rollout([list(prompt)], streams=[stream])
    idx = query_indices(r.prompt_len, model.num_latent, r.state.length)
    w = [attention_weights(model.lm, rec, r.state, layer, idx)[0] for layer in range(model.n_layers)]
    return torch.stack(w), r.prompt_len


def token_roles(model: LatentModel, prompt: Sequence[int], n_question: int) -> list[str]:
    """Role of each prompt token: ``number i`` (i-th number of the question, 1-based; a number split
    over several digit tokens is one number), ``operator`` (:data:`OPERATOR_WORDS`), ``other``, or
    ``special`` (BOS and the separators after the question)."""
    tok = model.tokenizer
    specials: set[int | None] = {model.config.pad_id, model.config.bot_id, model.config.eos_id, model.config.eot_id}
    specials.add(getattr(tok, "bos_token_id", None) if tok is not None else None)
    roles, n, prev_digit = [], 0, False
    for i, t in enumerate(prompt):
        text = tok.decode([t]) if tok is not None else ""
        if i >= n_question or t in specials:
            roles.append("special")
            prev_digit = False
            continue
        digit = any(ch.isdigit() for ch in text)
        if digit and (not prev_digit or text[:1].isspace()):
            n += 1
        prev_digit = digit
        if digit:
            roles.append(f"number {n}")
        else:
            roles.append("operator" if text.strip().lower() in OPERATOR_WORDS else "other")
    return roles


def thought_keys(num_latent: int) -> list[str]:
    """The key groups of a thought-to-thought map: the question, [BOT] (the prompt's last token), each
    thought, and the answer-start tokens fed after the thoughts.

    >>> thought_keys(2)
    ['question', 'bot', 't0', 't1', 'answer_start']
    """
    return ["question", "bot"] + [f"t{p}" for p in range(num_latent)] + ["answer_start"]


def thought_attention(weights: torch.Tensor, prompt_len: int, num_latent: int) -> torch.Tensor:
    """[L, H, Q, K + 3]: ``weights`` [L, H, Q, T] (queries: the thoughts and the first answer position)
    summed over the key groups of :func:`thought_keys` (each row still sums to 1)."""
    T_q, K = prompt_len, num_latent
    parts = [
        weights[..., : T_q - 1].sum(-1, keepdim=True),
        weights[..., T_q - 1 : T_q],
        weights[..., T_q : T_q + K],
        weights[..., T_q + K :].sum(-1, keepdim=True),
    ]
    return torch.cat(parts, dim=-1)


def role_mass(weights: torch.Tensor, roles: Sequence[str]) -> dict[str, torch.Tensor]:
    """Attention mass per role: ``weights`` [..., T] (keys), ``roles`` for the first T_q keys; every
    later key (the thoughts, the query itself) counts as ``thoughts``. Returns role -> [...]."""
    T_q = len(roles)
    out = {"thoughts": weights[..., T_q:].sum(-1)}
    for role in dict.fromkeys(roles):
        cols = [i for i, r in enumerate(roles) if r == role]
        out[role] = weights[..., cols].sum(-1)
    return out


def lens_lines(
    model: LatentModel,
    prompt: Sequence[int],
    values: Sequence[tuple[str, int, float]],
    k: int,
    lens: TunedLens | None = None,
) -> list[str]:
    """``latentpatch inspect --lens``: per layer and query position the top-k tokens, then per known
    value (``(kind, index, value)``, see :func:`known_values`) its rank at every layer x position;
    with ``lens``, read through the tuned lens."""
    tokens = [value_token(model, v) for _, _, v in values] if model.tokenizer is not None else []
    res = lens_run(model, prompt, tokens, k, lens)
    K = model.num_latent
    name = [f"thought {p}" for p in range(K)] + ["answer"]
    title = "logit lens" if lens is None else "tuned lens (docs/method.md §14.1)"
    out = [f"{title} (layer 'fed' = the thought / answer-start embedding itself; ranks: 0 = top token)"]
    for li, layer in enumerate(res.layers):
        lab = "fed" if layer < 0 else f"L{layer}"
        for q in range(res.top_ids.shape[1]):
            ids = res.top_ids[li, q].tolist()
            toks = [model.decode([i]) if model.tokenizer is not None else str(i) for i in ids]
            tops = " | ".join(f"{t!r} {pr:.3f}" for t, pr in zip(toks, res.top_probs[li, q].tolist()))
            out.append(f"{lab:>4} {name[q]:>9}: {tops}")
    for j, (kind, index, value) in enumerate(values if tokens else []):
        out.append(f"rank of {kind} {index} = {value:g} (rows: layers fed, L0..; columns: {', '.join(name)})")
        for li, layer in enumerate(res.layers):
            lab = "fed" if layer < 0 else f"L{layer}"
            out.append(f"{lab:>4}: " + " ".join(f"{int(x):>6}" for x in res.ranks[li, :, j].tolist()))
    return out
