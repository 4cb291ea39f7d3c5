"""Edges between positions of the latent chain (docs/method.md §17): attention-edge knockouts and
path patching from one thought to another.

An :class:`Edge` names a key (``question``, ``bot``, thought ``t<i>`` or a question role such as
``number 1``) and the query positions that read it (latent positions j = 0..K-1; j = K is the
answer start: the token(s) fed after the thoughts, ``[EOT]`` and ``[EOS]`` where the family feeds it):

- ``knockout``: the queries do not attend to the key's columns (every head, or ``head`` h only). The
  softmax is renormalised over the remaining keys (the columns are masked out before it, as padding
  is), in that forward call only; the cache keeps the full mask, so later positions still read the
  key. The loop then continues: later thoughts regenerate from the changed state.
- ``path``: sender thought i (``key = "t<i>"``), receivers ``queries``: each receiver's attention reads
  at column i the keys/values of thought i *patched*: the target run's own prefix, thought i's input
  replaced by the source run's thought i (what ``influence``/``source`` feeds; computed once per sender).
  Every other position reads the target's keys/values at i; position i itself and the recurrence into
  i+1 stay the target's. A receiver thought reads the patched values in its own forward call only;
  the answer receiver (K) reads them in the whole answer phase (the answer start and every answer
  token scored or decoded after it). From the first receiver on, the loop regenerates (``hold``:
  every input after the sender held at the target's thought instead).

Exactly true (tested): a knockout of nothing is the target run; ``path`` i -> every later position
with ``hold`` is the ``frozen`` thought patch of i (thought i replaced, later inputs held); ``path``
from the last thought to the answer is that frozen patch and the ``total`` one (nothing regenerates).
A knockout that cannot change anything (a key at or after the earliest query, or a role the question
lacks) is refused with :class:`EdgeRefused`, never run.

:func:`edge_sweep` runs a pair's edges as the engine runs its specs: sorted by their earliest query,
chunks of ``batch_size`` rows continue from the target's cached prefix before the chunk's earliest
query (shared), through the one latent loop (:meth:`LatentModel.run_thoughts`: ``latent_hide`` for
the every-head knockouts, a step hook for path swaps and per-head masks), then the engine's answers
(:func:`~latentpatch.patching.cells.score_and_generate`) and metrics (:func:`~latentpatch.patching.cells.cell_results`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from latentpatch.model.heads import head_shape
from latentpatch.model.kv_cache import layers_of
from latentpatch.model.latent import LatentModel
from latentpatch.model.sites import hooked_module, transformer_blocks
from latentpatch.model.state import Rollout, RolloutState, stack_states
from latentpatch.names import ALL_HEADS, EDGE_KNOCKOUT, EDGE_PATH
from latentpatch.patching.baselines import PairBaseline
from latentpatch.patching.cells import cell_results, score_and_generate
from latentpatch.patching.engine import EngineOptions
from latentpatch.patching.specs import PatchSpec


class EdgeRefused(ValueError):
    """An edge whose mask or patch cannot change anything (the query cannot see the key)."""


@dataclass(frozen=True)
class Edge:
    """One edge intervention (module docstring): ``kind`` (``knockout``|``path``), ``key`` (a key group:
    ``question``, ``bot``, ``t<i>``, a question role), ``queries`` (latent positions, K = the answer
    start), ``head`` (knockout: -1 = every head), ``hold`` (path: inputs after the sender held).

    >>> Edge("path", "t1", (3,)).sender, Edge("knockout", "question", (0, 2)).start
    (1, 0)
    """

    kind: str
    key: str
    queries: tuple[int, ...]
    head: int = ALL_HEADS
    hold: bool = False

    @property
    def start(self) -> int:
        """The earliest query: every position before it is the target's."""
        return min(self.queries)

    @property
    def sender(self) -> int | None:
        """Thought i of a ``t<i>`` key (None for the question groups)."""
        return int(self.key[1:]) if self.key[:1] == "t" and self.key[1:].isdigit() else None


def key_columns(key: str, prompt_len: int, roles: Sequence[str] | None = None) -> list[int]:
    """Absolute columns of a key group in a batch-of-one rollout (``prompt_len`` = T_q, no padding):
    ``question`` = every prompt token before [BOT], ``bot`` = T_q - 1, ``t<i>`` = T_q + i, a role
    (``number 1``, ``operator``, ... of :func:`~latentpatch.patching.reading.token_roles`) its tokens.

    >>> key_columns("question", 4), key_columns("bot", 4), key_columns("t2", 4)
    ([0, 1, 2], [3], [6])
    >>> key_columns("number 1", 4, ["other", "number 1", "number 1", "special"])
    [1, 2]
    """
    if key == "question":
        return list(range(prompt_len - 1))
    if key == "bot":
        return [prompt_len - 1]
    if key[:1] == "t" and key[1:].isdigit():
        return [prompt_len + int(key[1:])]
    return [c for c, r in enumerate(roles or []) if r == key and c < prompt_len - 1]


def edge_columns(
    edge: Edge, prompt_len: int, num_latent: int, n_heads: int, roles: Sequence[str] | None = None
) -> list[int]:
    """The key columns of ``edge``, or :class:`EdgeRefused` when it cannot change anything (no such
    key, a key at or after its earliest query) or is not defined (a path from a non-thought, a
    per-head path, a query outside 0..K, a head outside 0..H-1)."""
    cols = key_columns(edge.key, prompt_len, roles)
    label = f"{edge.kind} {edge.key} -> {list(edge.queries)}"
    if not edge.queries or not all(0 <= q <= num_latent for q in edge.queries):
        raise EdgeRefused(f"{label}: queries are latent positions 0..{num_latent} ({num_latent} = the answer start)")
    if not cols:
        raise EdgeRefused(f"{label}: this question has no {edge.key!r} key, so there is nothing to remove")
    if max(cols) >= prompt_len + edge.start:
        raise EdgeRefused(f"{label}: query {edge.start} cannot see key {edge.key!r} (a causal mask hides it already)")
    if not ALL_HEADS <= edge.head < n_heads:
        raise EdgeRefused(f"{label}: head {edge.head} is not one of 0..{n_heads - 1} (or -1 = every head)")
    if edge.kind == EDGE_PATH and (edge.sender is None or edge.head != ALL_HEADS):
        raise EdgeRefused(f"{label}: a path's sender is a thought t<i>, patched in every head")
    if edge.kind not in (EDGE_KNOCKOUT, EDGE_PATH):
        raise EdgeRefused(f"{label}: unknown edge kind {edge.kind!r}")
    return cols


# ---- per-head masks --------------------------------------------------------------------------------
class HeadMask:
    """Context manager: while ``drop`` [B, H, >= T] bool is set, the attention of every layer does not
    read the columns ``drop[b, h]`` in head h of row b (for every query of the call; ``length`` = T,
    the keys of the call). It rewrites the attention module's 4-D mask (the model's own one, or the
    causal one a mask-free SDPA call implies), so the kernel renormalises over the remaining keys."""

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.drop: torch.Tensor | None = None
        self.length = 0
        self._handles: list[RemovableHandle] = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if self.drop is None:
            return None
        if str(getattr(self.lm.config, "_attn_implementation", "")).startswith("flash"):
            # flash attention takes no 4-D mask: a per-head knockout would silently do nothing
            raise ValueError("per-head knockouts need sdpa or eager attention, not flash attention")
        hidden = args[0] if args else kwargs["hidden_states"]
        B, Q, T = hidden.shape[0], hidden.shape[1], self.length
        mask = kwargs.get("attention_mask")
        if mask is None:  # SDPA without a mask = plain causal attention over the cache
            q = torch.arange(Q, device=hidden.device)[:, None]
            keep = (torch.arange(T, device=hidden.device)[None] <= T - Q + q)[None, None].expand(B, 1, Q, T)
        elif mask.dtype == torch.bool:
            keep = mask[..., :T]
        else:
            keep = mask[..., :T] == 0
        keep = keep & ~self.drop[:, :, None, :T].to(keep.device)  # [B, H, Q, T]
        if mask is None or mask.dtype == torch.bool:
            kwargs["attention_mask"] = keep
        else:
            kwargs["attention_mask"] = torch.zeros(keep.shape, dtype=mask.dtype, device=mask.device).masked_fill(
                ~keep, torch.finfo(mask.dtype).min
            )
        return args, kwargs

    def __enter__(self) -> HeadMask:
        for layer in range(len(transformer_blocks(self.lm))):
            module, _ = hooked_module(self.lm, "attn_out", layer)
            self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.drop = None


# ---- path patching: the sender's keys and values ------------------------------------------------------
#: one sender's keys/values at its column, per layer: ([kv_heads, d_head], [kv_heads, d_head])
SenderKV = list[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def sender_kv(model: LatentModel, target: Rollout, thought: torch.Tensor, i: int) -> SenderKV:
    """Keys/values at latent i of the target's prefix with ``thought`` [d] fed as thought i (one step)."""
    col = target.prompt_len + i
    state = target.state.fork(length=col)  # no copy: the step concatenates into new tensors
    model.advance(state, inputs_embeds=thought.to(device=model.device, dtype=model.dtype)[None, None])
    return [(k[0, :, col].clone(), v[0, :, col].clone()) for k, v in layers_of(state.cache)]


class CacheSwaps:
    """In-place writes of senders' keys/values into a batch's cache (rows, column), undone later."""

    def __init__(self, state: RolloutState):
        self.state = state
        self.saved: list[tuple[int, int, SenderKV]] = []

    def apply(self, writes: Sequence[tuple[int, int, SenderKV]], keep: bool = False) -> None:
        """``(row, column, values)`` written now; restored by :meth:`restore` unless ``keep``."""
        layers = layers_of(self.state.cache)
        for row, col, kv in writes:
            if not keep:
                self.saved.append((row, col, [(k[row, :, col].clone(), v[row, :, col].clone()) for k, v in layers]))
            for (k, v), (sk, sv) in zip(layers, kv):
                k[row, :, col] = sk.to(k.dtype)
                v[row, :, col] = sv.to(v.dtype)

    def restore(self) -> None:
        """Put back the target's values (into the cache's current tensors: a step concatenated new ones)."""
        layers = layers_of(self.state.cache)
        for row, col, kv in self.saved:
            for (k, v), (sk, sv) in zip(layers, kv):
                k[row, :, col] = sk
                v[row, :, col] = sv
        self.saved.clear()


# ---- one chunk ------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What a chunk does per row: every-head hides [B, K+1, W] and per-head drops [B, K+1, H, W] (step K:
    the answer start; None when no row has one), path writes per step, the rows held from ``start``."""

    hide: torch.Tensor | None
    drop: torch.Tensor | None
    writes: dict[int, list[tuple[int, int, SenderKV]]]
    hold: list[int]


def _plan(
    model: LatentModel, edges: Sequence[Edge], cols: Sequence[list[int]], senders: Callable[[int], SenderKV], width: int
) -> _Plan:
    K, B = model.num_latent, len(edges)
    n_heads = head_shape(model.lm)[0]
    hide = torch.zeros(B, K + 1, width, dtype=torch.bool, device=model.device)
    drop = torch.zeros(B, K + 1, n_heads, width, dtype=torch.bool, device=model.device)
    writes: dict[int, list[tuple[int, int, SenderKV]]] = {}
    for row, (edge, c) in enumerate(zip(edges, cols)):
        for q in edge.queries:
            if edge.kind == EDGE_PATH:
                assert edge.sender is not None  # checked by edge_columns
                writes.setdefault(q, []).append((row, c[0], senders(edge.sender)))
            elif edge.head == ALL_HEADS:
                hide[row, q, c] = True
            else:
                drop[row, q, edge.head, c] = True
    hold = [row for row, e in enumerate(edges) if e.kind == EDGE_PATH and e.hold]
    return _Plan(hide if hide.any() else None, drop if drop.any() else None, writes, hold)


def _edge_chunk(
    model: LatentModel,
    base: PairBaseline,
    target: Rollout,
    edges: Sequence[Edge],
    cols: Sequence[list[int]],
    senders: Callable[[int], SenderKV],
    options: EngineOptions,
) -> list[dict]:
    """Metrics of ``edges`` on one pair as one batched continuation of the target's prefix before the
    chunk's earliest query (rows = edges)."""
    T_q, K, B = target.prompt_len, model.num_latent, len(edges)
    start = min(e.start for e in edges)
    n_answer = len(model.answer_start_ids())
    plan = _plan(model, edges, cols, senders, T_q + K + n_answer)
    state = stack_states([target.state], T_q + start, [B])  # a copy: path writes go into it
    targets = target.thoughts[0][None].expand(B, -1, -1)  # [B, K, d]
    override = mask = None
    if plan.hold:
        mask = torch.zeros(B, K, dtype=torch.bool, device=model.device)
        mask[plan.hold, start:] = True
        override = targets
    swaps = CacheSwaps(state)
    with HeadMask(model.lm) as heads:

        def step(p: int, thought: torch.Tensor) -> torch.Tensor:
            # before latent p's forward: undo p-1's path writes, make p's, set p's per-head mask
            swaps.restore()
            swaps.apply(plan.writes.get(p, ()))
            heads.drop = None if plan.drop is None or not plan.drop[:, p].any() else plan.drop[:, p]
            heads.length = state.length + 1
            return thought

        latent_hide = None if plan.hide is None else plan.hide[:, :K]
        if start < K:
            model.run_thoughts(
                state,
                targets[:, start],
                start,
                step_hook=step,
                thought_override=override,
                override_mask=mask,
                latent_hide=latent_hide,
            )
        swaps.restore()
        swaps.apply(plan.writes.get(K, ()), keep=True)  # the answer receiver: the whole answer phase
        heads.drop = None if plan.drop is None or not plan.drop[:, K].any() else plan.drop[:, K]
        heads.length = state.length + n_answer
        hide = None if plan.hide is None or not plan.hide[:, K].any() else plan.hide[:, K]
        end = model.advance(state, inputs_embeds=model.embed_ids(model.answer_start_ids(), B), hide=hide)
        heads.drop = None
    logits = model.logits(end[:, -1])  # [B, V]
    rows = [base] * B
    answers = score_and_generate(model, rows, state, logits, options.shared_prefix)
    specs = [PatchSpec("edges", e.kind, "edge", -1, e.queries, e.start) for e in edges]  # labels only
    return cell_results(model, rows, specs, answers, {})


@torch.no_grad()
def edge_sweep(
    model: LatentModel,
    base: PairBaseline,
    edges: Sequence[Edge],
    roles: Sequence[str] | None = None,
    options: EngineOptions | None = None,
) -> list[dict]:
    """One metric dict per edge (keys: :func:`~latentpatch.patching.metrics.answer_metrics`,
    ``answer_ids``), in order, on the pair's target run; ``roles``: the target prompt's token roles
    (for role keys). Every edge is checked first (:func:`edge_columns`: :class:`EdgeRefused`).

    >>> from latentpatch.data.synthetic import generate_pairs
    >>> from latentpatch.model.load import load_model
    >>> from latentpatch.patching.baselines import prepare_pair, record_run
    >>> model = load_model("default")
    >>> pair = generate_pairs(1, seed=0)[0]
    >>> clean, corrupted = (record_run(model, model.prompt_ids(v.question)) for v in (pair.clean, pair.corrupted))
    >>> base = prepare_pair(model, pair.pair_id, clean, corrupted, pair.clean.answer, pair.corrupted.answer)
    >>> cells = edge_sweep(model, base, [Edge("knockout", "t0", (1,)), Edge("path", "t5", (6,))])
    >>> [sorted(c)[:3] for c in cells][0]
    ['answer_ids', 'answer_logit_diff', 'answer_logprob_diff']
    >>> edge_sweep(model, base, [Edge("knockout", "t3", (2,))])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    latentpatch.patching.edges.EdgeRefused: knockout t3 -> [2]: query 2 cannot see key 't3' (a causal mask ...)
    """
    target = base.target_rollout
    if target is None:  # the pair's draw stream, as its baselines (docs/method.md §21)
        target = model.rollout([base.target.prompt], streams=[base.stream])
    T_q, K = target.prompt_len, model.num_latent
    n_heads = head_shape(model.lm)[0]
    cols = [edge_columns(e, T_q, K, n_heads, roles) for e in edges]
    memo: dict[int, SenderKV] = {}

    def senders(i: int) -> SenderKV:
        if i not in memo:
            memo[i] = sender_kv(model, target, base.source.thoughts[i], i)
        return memo[i]

    options = options or EngineOptions()
    order = sorted(range(len(edges)), key=lambda r: edges[r].start)
    out: dict[int, dict] = {}
    for lo in range(0, len(order), options.batch_size):
        rows = order[lo : lo + options.batch_size]
        cells = _edge_chunk(model, base, target, [edges[r] for r in rows], [cols[r] for r in rows], senders, options)
        out.update(zip(rows, cells))
    return [out[r] for r in range(len(edges))]


# ---- the experiment's grid -----------------------------------------------------------------------------
def knockout_edges(num_latent: int, n_heads: int = 0) -> list[Edge]:
    """Every visible knockout: query j = 0..K (K = the answer start) x key question, [BOT], thoughts
    before j; every head, then (``n_heads`` > 0) each head alone.

    >>> [(e.key, e.queries) for e in knockout_edges(1)]
    [('question', (0,)), ('bot', (0,)), ('question', (1,)), ('bot', (1,)), ('t0', (1,))]
    """
    edges = []
    for head in (ALL_HEADS, *range(n_heads)):
        for j in range(num_latent + 1):
            keys = ["question", "bot"] + [f"t{i}" for i in range(j)]
            edges += [Edge(EDGE_KNOCKOUT, k, (j,), head) for k in keys]
    return edges


def path_edges(num_latent: int) -> list[Edge]:
    """The K x K grid of paths: sender thought i = 0..K-1, receiver j = i+1..K (K = the answer).

    >>> [(e.key, e.queries) for e in path_edges(2)]
    [('t0', (1,)), ('t0', (2,)), ('t1', (2,))]
    """
    return [Edge(EDGE_PATH, f"t{i}", (j,)) for i in range(num_latent) for j in range(i + 1, num_latent + 1)]


def sender_specs(num_latent: int) -> list[PatchSpec]:
    """Per sender i, the whole-thought comparisons through the engine: ``total`` (thought i replaced by
    the source's, later thoughts regenerated: ``influence``'s source patch) and ``frozen`` (later
    inputs held at the target's: only the attention path carries it)."""
    return [
        PatchSpec("edges", mode, "thought", -1, (i,), i, frozen=mode == "frozen", replacement="source")
        for mode in ("total", "frozen")
        for i in range(num_latent)
    ]


def source_thoughts(base: PairBaseline) -> Callable[[PatchSpec], torch.Tensor]:
    """The :data:`~latentpatch.patching.baselines.ValueFn` of :func:`sender_specs`: the source run's thoughts."""
    return lambda spec: base.source.thoughts[list(spec.positions)]
