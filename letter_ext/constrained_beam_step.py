"""letter_ext.constrained_beam_step: one fused step of trie-constrained beam search.

The public function (argument checks, backend choice) and the fake (meta) registration of
letter::constrained_beam_step and letter::constrained_beam_step_triton. Kernels:
csrc/cpu/constrained_beam_step.cpp, letter_ext/triton/constrained_beam_step.py (also the CUDA
path); spec: letter_ext.reference.constrained_beam_step. The trie is a letter_ext.trie.TrieLevels.
"""
import torch

from . import reference
from ._backend import HAS_TRITON, has_schema, resolve, route_cuda_to_triton
from ._checks import check_float_tensor, has_values
from .reference import accumulation_dtype
from .trie import TrieLevels, check_csr

if HAS_TRITON:
    from .triton import constrained_beam_step as cbs_triton


def _check_constrained_beam_step(logits, beam_scores, nodes, trie, level, num_beams):
    check_float_tensor("logits", logits, 2, "[B*K, V]")
    check_float_tensor("beam_scores", beam_scores, 2, "[B, K]")
    if not isinstance(nodes, torch.Tensor):
        raise TypeError(f"nodes must be a torch.Tensor, got {type(nodes).__name__}")
    if nodes.dtype != torch.long:
        raise TypeError(f"nodes must be an int64 tensor, got dtype {nodes.dtype}")
    if nodes.shape != beam_scores.shape:
        raise ValueError(f"nodes {tuple(nodes.shape)} must have the shape of beam_scores {tuple(beam_scores.shape)}")
    batch, k_in = beam_scores.shape
    if logits.shape[0] != batch * k_in:
        raise ValueError(f"logits must have B*K = {batch * k_in} rows (beam_scores is [{batch}, {k_in}]), got {logits.shape[0]}")
    if not isinstance(trie, TrieLevels):
        raise TypeError(f"trie must be a letter_ext.TrieLevels, got {type(trie).__name__}")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < trie.num_levels:
        raise ValueError(f"level must be an int in [0, {trie.num_levels}), got {level!r}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if logits.shape[1] < trie.vocab_size:
        raise ValueError(f"logits has V={logits.shape[1]} columns but the trie uses token ids up to {trie.vocab_size - 1}")
    for name, t in (("beam_scores", beam_scores), ("nodes", nodes), ("trie", trie)):
        if t.device != logits.device:
            raise ValueError(f"logits is on {logits.device} but {name} is on {t.device}")


def check_beam_scores(beam_scores):
    """-inf marks a dead beam; NaN or +inf is no score (a NaN beam would pass as dead, a +inf one win).
    Also the check of letter.decoding.quota_last_step, which takes beam scores the same way."""
    if has_values(beam_scores) and bool((torch.isnan(beam_scores) | (beam_scores == float("inf"))).any()):
        raise ValueError("beam_scores contains NaN or +inf; a beam's score is finite, or -inf for a dead beam")


def _check_live_nodes(beam_scores, nodes, trie, level):
    num_nodes = trie.row_ptr[level].numel() - 1
    if not (has_values(beam_scores) and has_values(nodes)):
        return
    live = beam_scores > float("-inf")
    if bool((live & ((nodes < 0) | (nodes >= num_nodes))).any()):
        raise ValueError(f"nodes of live beams must be node ids at depth {level}, in [0, {num_nodes})")


def _check_bans(banned_ptr, banned_node, batch: int, num_children: int, device: torch.device):
    """Validate a per-row CSR of banned child nodes; returns it with each row's ids sorted
    ascending (the order the kernels binary-search in), or (None, None) when nothing is banned."""
    if (banned_ptr is None) != (banned_node is None):
        raise ValueError("banned_ptr and banned_node go together: pass both or neither")
    if banned_ptr is None:
        return None, None
    check_csr("banned_ptr", "banned_node", banned_ptr, banned_node, num_children, device)
    if banned_ptr.numel() != batch + 1:
        raise ValueError(f"banned_ptr must be [B + 1] = [{batch + 1}], got shape {tuple(banned_ptr.shape)}")
    nnz = banned_node.numel()
    if nnz == 0:
        return None, None  # the kernels' no-ban path, at exactly its cost
    if has_values(banned_ptr) and has_values(banned_node):
        row_starts = banned_ptr[:-1]
        starts = torch.zeros(nnz, dtype=torch.bool, device=device)  # where a row's ids begin
        starts[row_starts[row_starts < nnz]] = True
        unsorted = bool(((banned_node[1:] < banned_node[:-1]) & ~starts[1:]).any())
    else:  # traced: the order is unknown
        unsorted = True
    if unsorted:  # sort by id, then stably by row
        row = torch.repeat_interleave(torch.arange(batch, device=device), torch.diff(banned_ptr), output_size=nnz)
        order = torch.sort(banned_node, stable=True).indices
        order = order[torch.sort(row[order], stable=True).indices]
        banned_node = banned_node[order]
    return banned_ptr, banned_node


def constrained_beam_step(
    logits,
    beam_scores,
    nodes,
    trie,
    level: int,
    num_beams: int,
    *,
    banned_ptr: torch.Tensor | None = None,
    banned_node: torch.Tensor | None = None,
    backend: str | None = None,
):
    """One fused step of trie-constrained beam search.

    Args:
        logits: [B*K_in, V] float; row b*K_in + k is the next-token logits of beam k of batch row
            b. V may exceed the trie's tokens (special tokens): they are never continuations.
        beam_scores: [B, K_in] float, sum of log-probs so far; -inf marks a dead beam (at step 0
            use [0, -inf, ...] or K_in = 1); NaN or +inf raises ValueError.
        nodes: [B, K_in] int64, each beam's trie node at depth `level` (0 at step 0); ignored for
            dead beams.
        trie: letter_ext.TrieLevels (see letter_ext.trie), on logits' device.
        level: the level being decoded, 0 <= level < trie.num_levels.
        num_beams: K, beams kept per batch row.
        banned_ptr, banned_node: optional per-row CSR (both or neither) of banned children:
            int64 banned_ptr [B + 1] and banned_node [nnz], node ids at depth level + 1 as
            returned in `node` (leaf ids at the last level), any order, duplicates allowed. A
            candidate whose child is banned for its row is never returned; the next best allowed
            ones fill the K slots. Scores are unchanged (log_softmax over the full row). To ban
            items, see TrieLevels.banned_nodes (leaves -> whole banned subtrees per level).
        backend: 'reference' | 'cpu' | 'cuda' | 'triton' (default: $LETTER_BACKEND or the fastest).

    Returns:
        (scores [B, K] (fp64 for fp64 logits, else fp32), parent [B, K] int64 beam index in
        [0, K_in), token [B, K] int64, node [B, K] int64 child node id at depth level + 1 (the
        leaf id after the last level)). Candidate (k, t) scores beam_scores[b, k] +
        log_softmax(logits[b*K_in + k])[t] for each child t of nodes[b, k]; the K best per row,
        best first, ties -> lowest (k, t). Slots beyond the valid candidates are
        (-inf, 0, -1, -1); candidates scoring -inf or NaN are never chosen.

    Raises ValueError naming the first logits row of a live beam that holds NaN or +inf (its
    log_softmax is undefined), on every backend; the fused ones find it in their log-sum-exp pass.
    -inf logits are impossible tokens (an all -inf row has no candidates); dead beams' logits are
    never read, so anything in them is ignored.
    """
    _check_constrained_beam_step(logits, beam_scores, nodes, trie, level, num_beams)
    check_beam_scores(beam_scores)
    banned_ptr, banned_node = _check_bans(
        banned_ptr, banned_node, beam_scores.shape[0], trie.child_token[level].numel(), logits.device
    )
    which = resolve("constrained_beam_step", logits.device, backend)
    if which != "cpu":  # the C++ kernel raises the same ValueError without extra passes over the beams
        _check_live_nodes(beam_scores, nodes, trie, level)
    args = (logits, beam_scores, nodes, trie.row_ptr[level], trie.child_token[level], num_beams, banned_ptr, banned_node)
    if which == "reference":
        return reference.constrained_beam_step(*args)
    if which == "triton":
        *out, bad_beam = torch.ops.letter.constrained_beam_step_triton(*args)
        cbs_triton.check_logits(bad_beam, beam_scores.shape[1])
        return tuple(out)
    return torch.ops.letter.constrained_beam_step(*args)


def _constrained_beam_step_fake(
    logits, beam_scores, nodes, row_ptr, child_token, num_beams, banned_ptr=None, banned_node=None
):
    shape = (beam_scores.shape[0], num_beams)
    index = logits.new_empty(shape, dtype=torch.long)
    return logits.new_empty(shape, dtype=accumulation_dtype(logits)), index, torch.empty_like(index), torch.empty_like(index)


def _constrained_beam_step_triton_fake(
    logits, beam_scores, nodes, row_ptr, child_token, num_beams, banned_ptr=None, banned_node=None
):
    bad_beam = logits.new_empty((beam_scores.shape[0],), dtype=torch.int32)
    return *_constrained_beam_step_fake(logits, beam_scores, nodes, row_ptr, child_token, num_beams), bad_beam


def _register_constrained_beam_step() -> None:
    if has_schema("constrained_beam_step"):
        torch.library.register_fake("letter::constrained_beam_step")(_constrained_beam_step_fake)
    if HAS_TRITON:
        # Its fifth output is the kernel's NaN/+inf flag (see cbs_triton.launch); callers check it
        # after the op, so that the op itself stays traceable.
        @torch.library.triton_op("letter::constrained_beam_step_triton", mutates_args=())
        def _cbs_triton(
            logits: torch.Tensor,
            beam_scores: torch.Tensor,
            nodes: torch.Tensor,
            row_ptr: torch.Tensor,
            child_token: torch.Tensor,
            num_beams: int,
            banned_ptr: torch.Tensor | None = None,
            banned_node: torch.Tensor | None = None,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            return cbs_triton.launch(
                logits, beam_scores, nodes, row_ptr, child_token, num_beams, banned_ptr, banned_node
            )

        _cbs_triton.register_fake(_constrained_beam_step_triton_fake)
        route_cuda_to_triton({"constrained_beam_step": cbs_triton.constrained_beam_step})


_register_constrained_beam_step()
