"""Beam search over item identifiers: the fused trie-constrained decoder and the HF-style baseline.

Both drive the same loop. step_fn(step, last_tokens, state) -> (logits, state):
  step: 0..L-1; last_tokens: int64 [B*K] tokens chosen at the previous step (None at step 0);
  logits: float [B*K, V] next-token logits, row b*K + k = beam k of batch row b (at step 0 it
  may also return [B, V], one row per user, since every beam is still the empty prefix).
reorder_state(state, flat_parent) -> state is called between steps (not after the last one) with
flat_parent int64 [B*K]: new beam row r continues old row flat_parent[r] (index_select your KV
cache with it). Beams left without a valid continuation score -inf; they get the token of code 0
of the next level as `last_tokens`, and their logits are ignored.
"""
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import letter_ext
from letter_ext.constrained_beam_step import check_beam_scores
from letter_ext.hf_decoding import hf_style_step, prefix_allowed_tokens_fn
from letter_ext.trie import csr_from_rows

from .prefix_index import PrefixIndex

StepFn = Callable[[int, torch.Tensor | None, Any], tuple[torch.Tensor, Any]]


@dataclass
class BeamSearchResult:
    """Top-K identifiers per batch row, best first.

    items: int64 [B, K] item id (the first item of the identifier), -1 where fewer than K valid
    identifiers exist; codes: int64 [B, K, L] per-level codes (-1 in empty slots); scores: [B, K]
    float sum of log-probs (-inf in empty slots); leaves: int64 [B, K] identifier (leaf) ids, -1
    in empty slots; index: the PrefixIndex searched; item_groups (computed on first access): None when every identifier names one
    item, else [B][K] lists of all item ids of each slot's identifier ([] in empty slots).
    """

    items: torch.Tensor
    codes: torch.Tensor
    scores: torch.Tensor
    leaves: torch.Tensor
    index: PrefixIndex = field(repr=False)

    @functools.cached_property
    def item_groups(self) -> list[list[list[int]]] | None:
        if not self.index.duplicate_leaves.numel():
            return None
        return [[self.index.items_of_leaf(f) if f >= 0 else [] for f in row] for row in self.leaves.tolist()]


def _check_search_args(step_fn, batch_size, index, num_beams) -> None:
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
    if not isinstance(index, PrefixIndex):
        raise TypeError(f"index must be a letter.decoding.PrefixIndex, got {type(index).__name__}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")


def _beam_loop(step_fn: StepFn, batch_size: int, index: PrefixIndex, num_beams: int, choose, reorder_state, state):
    """The loop shared by both decoders.

    choose(level, logits, beam_scores [B, K_in], history [B*K_in, level]) -> (scores, parent,
    token), each [B, K]. Returns (scores [B, K], history [B*K, L] tokens).
    """
    batch, levels = batch_size, index.num_levels
    last_tokens, beam_scores, history = None, None, None
    for level in range(levels):
        logits, state = step_fn(level, last_tokens, state)
        if level == 0:
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] not in (batch, batch * num_beams):
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"step_fn must return logits [B*K, V] (or [B, V] at step 0), got {shape}")
            k_in = 1 if logits.shape[0] == batch else num_beams
            # One live beam per row: the empty prefix.
            beam_scores = torch.full((batch, k_in), float("-inf"), device=logits.device)
            beam_scores[:, 0] = 0.0
            history = torch.empty((batch * k_in, 0), dtype=torch.long, device=logits.device)
        k_in = beam_scores.shape[1]
        scores, parent, token = choose(level, logits, beam_scores, history)
        flat_parent = (parent + k_in * torch.arange(batch, device=parent.device)[:, None]).reshape(-1)
        token = torch.where(scores > float("-inf"), token, index.vocab_offsets[level])
        history = torch.cat([history[flat_parent], token.reshape(-1, 1)], 1)
        last_tokens, beam_scores = token.reshape(-1), scores
        if reorder_state is not None and level + 1 < levels:
            state = reorder_state(state, flat_parent)
    return beam_scores, history


def _level_bans(banned_leaves, batch_size: int, index: PrefixIndex):
    """constrained_beam_search's banned_leaves -> per level (banned_ptr, banned_node), or None."""
    if banned_leaves is None:
        return None
    is_csr = isinstance(banned_leaves, tuple) and len(banned_leaves) == 2
    if is_csr and all(isinstance(t, torch.Tensor) for t in banned_leaves):
        ptr, leaf = banned_leaves
    else:
        ptr, leaf = csr_from_rows(banned_leaves, index.device)
    if ptr.numel() != batch_size + 1:
        raise ValueError(f"banned_leaves must have one row per batch row ({batch_size}), got {ptr.numel() - 1}")
    return index.trie.banned_nodes(ptr, leaf)


def _result(index: PrefixIndex, scores, history, leaves) -> BeamSearchResult:
    batch, num_beams = scores.shape
    alive = scores > float("-inf")
    leaves = torch.where(alive, leaves.to(scores.device), -1)
    first_item = index.first_item_of_leaf.to(scores.device)
    items = torch.where(alive, first_item[leaves.clamp(min=0)], -1)
    offsets = torch.tensor(index.vocab_offsets, device=scores.device)
    codes = history.view(batch, num_beams, -1) - offsets
    codes = torch.where(alive[..., None], codes, -1)
    return BeamSearchResult(items, codes, scores, leaves, index)


def constrained_beam_search(
    step_fn: StepFn,
    batch_size: int,
    index: PrefixIndex,
    num_beams: int,
    *,
    reorder_state: Callable[[Any, torch.Tensor], Any] | None = None,
    state: Any = None,
    backend: str | None = None,
    new_leaves: torch.Tensor | None = None,
    max_new: int | torch.Tensor | None = None,
    banned_leaves=None,
) -> BeamSearchResult:
    """Beam search that only emits identifiers of real items: one fused
    letter_ext.constrained_beam_step per level (log_softmax over the full vocabulary row, as HF
    does, + beam score, top-K over the trie children of all beams of a row).

    step_fn, reorder_state, state: see the module docstring. index: on the logits' device.
    backend: the op's backend ('reference' | 'cpu' | 'cuda' | 'triton', default the fastest).
    new_leaves (bool [num_leaves]) with max_new (an int, or int64 [B] per row): the share control
    (TIGER's epsilon) -- at most `max_new` of each row's K identifiers may be flagged leaves; the
    last level then takes the best K expansions of the beams under that quota (`quota_last_step`),
    inside the search.
    banned_leaves: identifiers (leaf ids) never to return, per batch row: a list of B sequences
    of leaf ids, or a CSR (ptr int64 [B + 1], leaf int64 [nnz]) on the index's device such as
    PrefixIndex.banned_leaves(items_per_row) returns (items -> leaves, collision rule there).
    Prefixes all of whose leaves are banned are pruned at every level (TrieLevels.banned_nodes),
    so each row still gets min(K, allowed identifiers) results; scores are unchanged.
    Returns a BeamSearchResult; never a duplicate identifier within a row.
    """
    _check_search_args(step_fn, batch_size, index, num_beams)
    if (new_leaves is None) != (max_new is None):
        raise ValueError("new_leaves and max_new go together (the share control needs both)")
    if new_leaves is not None:
        if isinstance(max_new, torch.Tensor):
            if max_new.shape != (batch_size,) or max_new.dtype != torch.long or bool((max_new < 0).any()):
                raise ValueError(f"max_new must be an int >= 0 or an int64 tensor [{batch_size}] of them")
        elif not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 0:
            raise ValueError(f"max_new must be an int >= 0, got {max_new!r}")
        if new_leaves.dtype != torch.bool or new_leaves.shape != (index.num_leaves,):
            raise ValueError(f"new_leaves must be a bool tensor [{index.num_leaves}] (one flag per identifier)")
    bans = _level_bans(banned_leaves, batch_size, index)
    nodes = None

    def choose(level, logits, beam_scores, history):
        nonlocal nodes
        if level == 0:
            nodes = torch.zeros(beam_scores.shape, dtype=torch.long, device=beam_scores.device)
        banned_ptr, banned_node = bans[level] if bans is not None else (None, None)
        if new_leaves is not None and level == index.num_levels - 1 and bool((torch.as_tensor(max_new) < num_beams).any()):
            scores, parent, token, nodes = quota_last_step(
                logits, beam_scores, nodes, index.trie, num_beams, new_leaves.to(logits.device), max_new,
                banned_ptr=banned_ptr, banned_node=banned_node)
        else:
            scores, parent, token, nodes = letter_ext.constrained_beam_step(
                logits, beam_scores, nodes, index.trie, level, num_beams,
                banned_ptr=banned_ptr, banned_node=banned_node, backend=backend,
            )
        return scores, parent, token

    scores, history = _beam_loop(step_fn, batch_size, index, num_beams, choose, reorder_state, state)
    return _result(index, scores, history, nodes)


def quota_last_step(logits, beam_scores, nodes, trie, num_beams: int, new_leaves: torch.Tensor,
                    max_new: int | torch.Tensor, *, banned_ptr=None, banned_node=None):
    """The last level's beam step with a quota: among all expansions (k, t) of the live beams
    (score = beam_scores[b, k] + log_softmax(logits[b*K_in + k])[t], t a child of nodes[b, k]),
    the best `num_beams` per row with at most `max_new` (int, or int64 [B] per row) of them on
    leaves flagged in `new_leaves`
    (and none on row b's banned leaves banned_node[banned_ptr[b]:banned_ptr[b + 1]], if given).
    Exact: the best K of the unflagged expansions merged with the best `max_new` flagged ones is
    the quota-constrained top K. Ties go to the lowest (k, t), as in letter_ext.constrained_beam_step,
    whose (scores, parent, token, leaf) result layout this returns (empty slots: -inf, 0, -1, -1).
    Raises ValueError, as that op, when beam_scores holds NaN or +inf (-inf marks a dead beam) or a
    live beam's logits row holds NaN or +inf."""
    check_beam_scores(beam_scores)
    level = trie.num_levels - 1
    batch, k_in = beam_scores.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(dtype), -1)
    ptr, child = trie.row_ptr[level], trie.child_token[level]
    alive = (beam_scores > float("-inf")).reshape(-1)
    undefined = (alive & (torch.isnan(logits) | (logits == float("inf"))).any(1)).nonzero()
    if undefined.numel():  # as constrained_beam_step: a NaN would sort first and push live expansions out
        row = int(undefined[0, 0])
        raise ValueError(f"quota_last_step: logits row {row} (batch row {row // k_in}, beam {row % k_in}) of a live "
                         "beam contains NaN or +inf; its log-probabilities are undefined")
    node = torch.where(alive, nodes.reshape(-1), 0)
    start, count = ptr[node], torch.where(alive, ptr[node + 1] - ptr[node], 0)
    width = max(int(count.max()) if count.numel() else 0, 1)
    slot = torch.arange(width, device=logits.device)
    valid = slot[None] < count[:, None]  # [B*K_in, width]: expansion (k, slot) exists
    edge = torch.where(valid, start[:, None] + slot[None], 0)
    token = child[edge]
    score = beam_scores.reshape(-1, 1).to(dtype) + logp.gather(1, token)
    if banned_ptr is not None:  # per-row bans: (row, leaf) keys of the expansions against the banned ones
        rows = torch.arange(batch, device=logits.device)
        ban_rows = torch.repeat_interleave(rows, torch.diff(banned_ptr))
        row_of = rows.repeat_interleave(k_in)[:, None]
        valid = valid & ~torch.isin(row_of * trie.num_leaves + edge, ban_rows * trie.num_leaves + banned_node)
    score = torch.where(valid, score, float("-inf")).reshape(batch, k_in * width)
    flagged = (new_leaves[edge] & valid).reshape(batch, k_in * width)
    # expansions in (k, t) order per row; a stable sort keeps the lowest (k, t) first among ties
    old_scores, new_scores = score.masked_fill(flagged, float("-inf")), score.masked_fill(~flagged, float("-inf"))
    best_old = torch.sort(old_scores, dim=1, descending=True, stable=True).indices[:, :num_beams]
    quota = torch.as_tensor(max_new, device=logits.device).expand(batch)
    best_new = torch.sort(new_scores, dim=1, descending=True, stable=True).indices[:, :int(quota.max())]
    best_new_scores = new_scores.gather(1, best_new)
    best_new_scores[torch.arange(best_new.shape[1], device=logits.device)[None] >= quota[:, None]] = float("-inf")
    pool = torch.cat([best_old, best_new], 1)
    pool_scores = torch.cat([old_scores.gather(1, best_old), best_new_scores], 1)
    by_index = torch.sort(pool, dim=1).indices  # (k, t) order, then best first: ties to the lowest (k, t)
    pool, pool_scores = pool.gather(1, by_index), pool_scores.gather(1, by_index)
    pick = torch.sort(pool_scores, dim=1, descending=True, stable=True).indices[:, :num_beams]
    chosen, out_scores = pool.gather(1, pick), pool_scores.gather(1, pick)
    live = out_scores > float("-inf")
    parent = torch.where(live, chosen // width, 0)
    flat_edge = edge.reshape(batch, k_in * width).gather(1, chosen)
    out_token = torch.where(live, token.reshape(batch, k_in * width).gather(1, chosen), -1)
    leaf = torch.where(live, flat_edge, -1)
    return out_scores.masked_fill(~live, float("-inf")), parent, out_token, leaf


def hf_style_beam_search(
    step_fn: StepFn,
    batch_size: int,
    index: PrefixIndex,
    num_beams: int,
    *,
    reorder_state: Callable[[Any, torch.Tensor], Any] | None = None,
    state: Any = None,
) -> BeamSearchResult:
    """The research-code decoder, for comparison: HF generate()'s constrained beam search, a Python
    prefix_allowed_tokens_fn over a dict trie (index.dict_trie()) filling a -inf mask per beam,
    then log_softmax + mask + beam score and top-K over K * V. Same arguments and result as
    constrained_beam_search (ties may break differently: torch.topk's order is unspecified).
    """
    _check_search_args(step_fn, batch_size, index, num_beams)
    root = index.dict_trie()
    allowed = prefix_allowed_tokens_fn(root)

    def choose(level, logits, beam_scores, history):
        return hf_style_step(logits, beam_scores, history, allowed, num_beams)

    scores, history = _beam_loop(step_fn, batch_size, index, num_beams, choose, reorder_state, state)
    leaves = []
    for tokens in history.tolist():
        node = root
        for token in tokens:
            node = node.get(token, {}) if isinstance(node, dict) else {}
        leaves.append(node if isinstance(node, int) else -1)
    leaves = torch.tensor(leaves, dtype=torch.long).view(scores.shape)
    return _result(index, scores, history, leaves)
