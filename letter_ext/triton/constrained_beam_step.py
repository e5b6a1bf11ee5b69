"""Triton kernel of constrained_beam_step: one fused kernel per decoding step.

One program per batch row. For each live beam it computes the row's log-sum-exp in BLOCK_V tiles,
gathers the logits of the beam's trie children in BLOCK_C chunks and merges them into a running
top-BLOCK_C (tl.topk over the running best joined with the chunk). Candidates are packed into one
int64 sort key: the order-preserving bits of the fp32 score on top, (2^31 - 1 - (beam * V +
child rank)) below, so "largest key" is exactly "best score, then lowest (beam, token)" (children
are stored in increasing token order). No V-sized mask and no candidate list is written.

A live beam whose logits hold NaN or +inf is found in the max pass (a NaN-propagating maximum,
NaN lanes read as +inf) and reported through a [B] flag, its first such beam (K_in: none);
constrained_beam_step raises the spec's ValueError from it after the kernel.

Bans (HAS_BANS, a compile-time switch: without bans the kernel is the one above): each batch
row's banned child nodes, sorted, are looked up by a per-lane binary search, only for the chunks
that would enter the running top-K.
"""
import torch
import triton
import triton.language as tl

from .._checks import has_values
from ..reference import nonfinite_logits_error

_LOW_BITS = 2**31 - 1  # beam * V + child rank must stay below this


@triton.jit
def _order_bits(x):
    """fp32 -> int32 whose signed order matches the float order (flip the magnitude of negatives)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _is_banned(banned_node_ptr, first, last, edge):
    """Per lane: whether `edge` is in the sorted banned_node[first:last] (lower-bound search)."""
    lo = tl.zeros_like(edge) + first
    hi = tl.zeros_like(edge) + last
    remaining = last - first
    while remaining > 0:  # floor(log2(n)) + 1 halvings empty every lane's range
        active = lo < hi
        mid = (lo + hi) // 2
        below = active & (tl.load(banned_node_ptr + mid, mask=active, other=0) < edge)
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
        remaining = remaining // 2
    found = lo < last
    return found & (tl.load(banned_node_ptr + lo, mask=found, other=-1) == edge)


@triton.jit
def _constrained_beam_step_kernel(
    logits_ptr, beam_ptr, nodes_ptr, row_ptr_ptr, child_ptr, banned_ptr_ptr, banned_node_ptr,
    out_score_ptr, out_parent_ptr, out_token_ptr, out_node_ptr, bad_beam_ptr,
    K_IN, V, K_OUT,
    BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BANS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    if HAS_BANS:
        ban_first = tl.load(banned_ptr_ptr + b)
        ban_last = tl.load(banned_ptr_ptr + b + 1)
    empty = tl.full((BLOCK_C,), -(2**63), dtype=tl.int64)  # ranks below every real candidate
    top = empty
    offs_v = tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, BLOCK_C)
    # The first live beam whose logits hold NaN or +inf (K_IN: none); a tensor, not K_IN itself,
    # which Triton may specialize to a constant (K_IN = 1) that a loop cannot reassign.
    bad_beam = tl.full((), K_IN, dtype=tl.int32)
    for k in range(K_IN):
        beam = tl.load(beam_ptr + b * K_IN + k)
        if beam > float("-inf"):
            row = logits_ptr + (b * K_IN + k) * V
            run_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
            for v0 in range(0, V, BLOCK_V):
                x = tl.load(row + v0 + offs_v, mask=v0 + offs_v < V, other=float("-inf"))
                run_max = tl.maximum(run_max, x, propagate_nan=tl.PropagateNan.ALL)
            # +inf exactly when the row holds NaN or +inf (a NaN lane stays NaN)
            row_max = tl.max(tl.where(run_max == run_max, run_max, float("inf")), axis=0)
            if row_max == float("inf"):
                bad_beam = tl.minimum(bad_beam, k)
            elif row_max > float("-inf"):  # an all -inf row has no probabilities, hence no candidates
                run_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
                for v0 in range(0, V, BLOCK_V):
                    x = tl.load(row + v0 + offs_v, mask=v0 + offs_v < V, other=float("-inf"))
                    run_sum += tl.exp(x - row_max)
                base = beam - (row_max + tl.log(tl.sum(run_sum, axis=0)))
                node = tl.load(nodes_ptr + b * K_IN + k)
                first = tl.load(row_ptr_ptr + node)
                last = tl.load(row_ptr_ptr + node + 1)
                for c0 in range(first, last, BLOCK_C):
                    edge = c0 + offs_c
                    ok = edge < last
                    token = tl.load(child_ptr + edge, mask=ok, other=0)
                    ok = ok & (token >= 0) & (token < V)
                    score = base + tl.load(row + token, mask=ok, other=float("-inf"))
                    rank = k * V + (edge - first)
                    key = (_order_bits(score).to(tl.int64) << 32) + (_LOW_BITS - rank)
                    key = tl.where(ok & (score > float("-inf")), key, empty)  # drops -inf and NaN
                    if tl.max(key, axis=0) > tl.min(top, axis=0):  # merge only chunks that improve
                        if HAS_BANS:
                            key = tl.where(_is_banned(banned_node_ptr, ban_first, ban_last, edge), empty, key)
                        top = tl.topk(tl.reshape(tl.join(top, key), (2 * BLOCK_C,)), BLOCK_C)
    filled = top > -(2**63)
    score = _order_bits((top >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
    rank = _LOW_BITS - (top - ((top >> 32) << 32))
    parent = rank // V
    node = tl.load(nodes_ptr + b * K_IN + parent, mask=filled, other=0)
    edge = tl.load(row_ptr_ptr + node, mask=filled, other=0) + rank % V
    token = tl.load(child_ptr + edge, mask=filled, other=0)
    out = b * K_OUT + offs_c
    keep = offs_c < K_OUT
    tl.store(out_score_ptr + out, tl.where(filled, score, float("-inf")), mask=keep)
    tl.store(out_parent_ptr + out, tl.where(filled, parent, 0), mask=keep)
    tl.store(out_token_ptr + out, tl.where(filled, token, -1), mask=keep)
    tl.store(out_node_ptr + out, tl.where(filled, edge, -1), mask=keep)
    tl.store(bad_beam_ptr + b, bad_beam)


def launch(logits, beam_scores, nodes, row_ptr, child_token, num_beams: int, banned_ptr=None, banned_node=None):
    """Launch the kernel; returns (scores, parent, token, node) like letter::constrained_beam_step,
    and bad_beam [B] int32: per batch row its first live beam whose logits hold NaN or +inf, K_in
    if none (check_logits turns it into the error). Bans as in the op's schema (rows sorted).

    Computes in fp32 (scores are cast back to fp64 for fp64 logits).
    """
    batch, k_in = beam_scores.shape
    vocab = logits.shape[1]
    if k_in * vocab >= _LOW_BITS:
        raise ValueError(f"triton constrained_beam_step needs K_in * V < 2^31, got {k_in} * {vocab}")
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    device = logits.device
    scores = torch.empty((batch, num_beams), dtype=torch.float32, device=device)
    parent = torch.empty((batch, num_beams), dtype=torch.long, device=device)
    token = torch.empty((batch, num_beams), dtype=torch.long, device=device)
    node = torch.empty((batch, num_beams), dtype=torch.long, device=device)
    bad_beam = torch.empty((batch,), dtype=torch.int32, device=device)
    has_bans = banned_ptr is not None
    if not has_bans:  # unused pointers of the ban-free kernel
        banned_ptr = banned_node = row_ptr
    if batch > 0:
        # wrap_triton makes the launch traceable (torch.compile / opcheck); eager it just launches.
        torch.library.wrap_triton(_constrained_beam_step_kernel)[(batch,)](
            logits.float().contiguous(), beam_scores.float().contiguous(), nodes.long().contiguous(),
            row_ptr.long().contiguous(), child_token.long().contiguous(),
            banned_ptr.long().contiguous(), banned_node.long().contiguous(),
            scores, parent, token, node, bad_beam,
            k_in, vocab, num_beams,
            BLOCK_V=min(1024, triton.next_power_of_2(vocab)),
            BLOCK_C=max(16, triton.next_power_of_2(num_beams)),
            HAS_BANS=has_bans,
        )
    return scores.to(out_dtype), parent, token, node, bad_beam


def check_logits(bad_beam: torch.Tensor, k_in: int) -> None:
    """Raise the spec's ValueError for the first flagged row of launch's bad_beam (one device sync;
    none while tracing: a fake bad_beam has no values)."""
    if not has_values(bad_beam):
        return
    flagged = torch.nonzero(bad_beam < k_in)
    if flagged.numel():
        b = int(flagged[0, 0])
        raise nonfinite_logits_error(b * k_in + int(bad_beam[b]), k_in)


def constrained_beam_step(
    logits, beam_scores, nodes, row_ptr, child_token, num_beams: int, banned_ptr=None, banned_node=None
):
    """launch, then check_logits: the CUDA kernel of letter::constrained_beam_step in builds without one."""
    *out, bad_beam = launch(logits, beam_scores, nodes, row_ptr, child_token, num_beams, banned_ptr, banned_node)
    check_logits(bad_beam, beam_scores.shape[1])
    return tuple(out)
