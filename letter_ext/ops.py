"""Public LETTER ops: argument checks, backend choice, fake (meta) and autograd registration.

Every op has one name across backends: `reference` (letter_ext.reference, the spec), `cpu` and
`cuda` (compiled kernels behind torch.ops.letter.<op>), and `triton` (letter_ext.triton, exposed as
torch.ops.letter.<op>_triton). Pick one with `backend=` or $LETTER_BACKEND; the default is the
fastest one available for the tensors' device.
"""
import torch

from . import reference
from ._backend import HAS_TRITON, _C, resolve

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {shape_doc}, got shape {tuple(t.shape)}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


# ----------------------------------------------------------------------------------------------
# residual_quantize
# ----------------------------------------------------------------------------------------------


def residual_quantize(x, codebooks, *, return_residuals: bool = False, backend: str | None = None):
    """Residual nearest-code search over L codebooks.

    Args:
        x: [B, d] float tensor (fp16/bf16/fp32/fp64; kernels compute in fp32).
        codebooks: [L, N, d] float tensor on the same device.
        return_residuals: also return r_0..r_{L-1} as [B, L, d].
        backend: 'reference' | 'cpu' | 'cuda' | 'triton' (default: $LETTER_BACKEND or the fastest).

    Returns:
        (codes [B, L] int64, quantized [B, d] in x's dtype) or, with return_residuals,
        (codes, quantized, residuals [B, L, d]). Level l picks argmin_j ||r_l - C_l[j]||^2 (ties ->
        lowest j) and r_{l+1} = r_l - C_l[c_l]; quantized = sum_l C_l[c_l]. `quantized` is
        differentiable w.r.t. codebooks only (a scatter-add on the chosen rows; apply the
        straight-through estimator yourself); `residuals` w.r.t. x and codebooks.
    """
    _check_float_tensor("x", x, 2, "[B, d]")
    _check_float_tensor("codebooks", codebooks, 3, "[L, N, d]")
    if codebooks.shape[0] == 0 or codebooks.shape[1] == 0:
        raise ValueError(f"codebooks must have L >= 1 levels and N >= 1 codes, got shape {tuple(codebooks.shape)}")
    if codebooks.shape[2] != x.shape[1]:
        raise ValueError(f"codebooks dim d={codebooks.shape[2]} does not match x dim d={x.shape[1]}")
    if codebooks.device != x.device:
        raise ValueError(f"x is on {x.device} but codebooks is on {codebooks.device}")
    _check_finite("x", x)
    _check_finite("codebooks", codebooks)
    which = resolve("residual_quantize", x.device, backend)
    if which == "reference":
        codes, quantized, residuals = reference.residual_quantize(x, codebooks, return_residuals)
    else:
        op = torch.ops.letter.residual_quantize_triton if which == "triton" else torch.ops.letter.residual_quantize
        quantized, codes, residuals = op(x, codebooks, return_residuals)
    return (codes, quantized, residuals) if return_residuals else (codes, quantized)


def _residual_quantize_fake(x, codebooks, return_residuals=False):
    B, d = x.shape
    L = codebooks.shape[0]
    codes = x.new_empty((B, L), dtype=torch.long)
    residuals = x.new_empty((B, L, d) if return_residuals else (0,))
    return x.new_empty((B, d)), codes, residuals


def _residual_quantize_setup(ctx, inputs, output):
    x, codebooks, return_residuals = inputs
    ctx.save_for_backward(output[1])
    ctx.num_codes = codebooks.shape[1]
    ctx.return_residuals = return_residuals
    ctx.cb_dtype = codebooks.dtype


def _residual_quantize_backward(ctx, grad_quantized, grad_codes, grad_residuals):
    (codes,) = ctx.saved_tensors
    B, L = codes.shape
    N = ctx.num_codes
    g_q = grad_quantized.float() if grad_quantized is not None else None
    per_level = None  # [B, L, d]: gradient reaching C_l[c_l] through each row
    grad_x = None
    if ctx.return_residuals and grad_residuals is not None and grad_residuals.numel():
        g_r = grad_residuals.float()
        grad_x = g_r.sum(1)
        # r_l = x - sum_{k<l} C_k[c_k]  =>  dC_k[c_k] = -sum_{l>k} g_r[:, l]
        after = g_r.flip(1).cumsum(1).flip(1) - g_r
        per_level = -after
    if g_q is not None:
        per_level = g_q[:, None, :].expand(B, L, -1) if per_level is None else per_level + g_q[:, None, :]
    grad_cb = None
    if per_level is not None:
        d = per_level.shape[-1]
        flat_idx = (codes + torch.arange(L, device=codes.device) * N).reshape(-1)
        grad_cb = torch.zeros((L * N, d), dtype=torch.float32, device=codes.device)
        grad_cb.index_add_(0, flat_idx, per_level.reshape(-1, d))
        grad_cb = grad_cb.view(L, N, d).to(ctx.cb_dtype)
    if grad_x is not None:
        grad_x = grad_x.to(grad_residuals.dtype)
    return grad_x, grad_cb, None


def _register_residual_quantize() -> None:
    if _C is not None:
        torch.library.register_fake("letter::residual_quantize")(_residual_quantize_fake)
        torch.library.register_autograd(
            "letter::residual_quantize", _residual_quantize_backward, setup_context=_residual_quantize_setup
        )
    if HAS_TRITON:
        from .triton import residual_quantize as rq_triton

        @torch.library.triton_op("letter::residual_quantize_triton", mutates_args=())
        def _rq_triton(x: torch.Tensor, codebooks: torch.Tensor, return_residuals: bool = False) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor
        ]:
            return rq_triton.residual_quantize(x, codebooks, return_residuals)

        _rq_triton.register_fake(_residual_quantize_fake)
        _rq_triton.register_autograd(_residual_quantize_backward, setup_context=_residual_quantize_setup)
        if _C is not None and not torch._C._dispatch_has_kernel_for_dispatch_key("letter::residual_quantize", "CUDA"):
            # CPU-only or Triton-only builds: CUDA tensors go to the Triton kernel.
            torch.library.register_kernel("letter::residual_quantize", "cuda", rq_triton.residual_quantize)


_register_residual_quantize()


# ----------------------------------------------------------------------------------------------
# dot_product_cross_entropy (+ info_nce, codebook_diversity_loss)
# ----------------------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def _check_index_tensor(name: str, t, length: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.long:
        raise TypeError(f"{name} must be an int64 tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be [B] with B={length} (the rows of q), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"q is on {device} but {name} is on {t.device}")


def _check_dot_product_cross_entropy(q, keys, targets, temperature, exclude, bias, ignore_index, reduction):
    _check_float_tensor("q", q, 2, "[B, d]")
    _check_float_tensor("keys", keys, 2, "[M, d]")
    B, M = q.shape[0], keys.shape[0]
    if M == 0:
        raise ValueError("keys must have M >= 1 rows, got shape (0, d)")
    if keys.shape[1] != q.shape[1]:
        raise ValueError(f"keys dim d={keys.shape[1]} does not match q dim d={q.shape[1]}")
    if keys.device != q.device:
        raise ValueError(f"q is on {q.device} but keys is on {keys.device}")
    if keys.dtype != q.dtype:
        raise ValueError(f"keys dtype {keys.dtype} does not match q dtype {q.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_index_tensor("targets", targets, B, q.device)
    valid = targets != ignore_index
    if bool(((targets < 0) | (targets >= M))[valid].any()):
        raise ValueError(f"targets must be in [0, M={M}) or ignore_index={ignore_index}")
    if exclude is not None:
        _check_index_tensor("exclude", exclude, B, q.device)
        if bool(((exclude < -1) | (exclude >= M)).any()):
            raise ValueError(f"exclude must be in [0, M={M}) or -1 (none)")
        if M == 1 and bool((exclude == 0).any()):
            raise ValueError("exclude removes every key of a row (M=1); such a row has no softmax")
        if bool(((exclude == targets) & valid).any()):
            row = int(torch.nonzero((exclude == targets) & valid)[0, 0])
            raise ValueError(f"targets[{row}] is excluded by exclude[{row}]: its loss would be infinite")
    if bias is not None:
        _check_float_tensor("bias", bias, 1, "[M]")
        if bias.shape[0] != M:
            raise ValueError(f"bias must be [M] with M={M}, got shape {tuple(bias.shape)}")
        if bias.device != q.device:
            raise ValueError(f"q is on {q.device} but bias is on {bias.device}")
        if bias.dtype != q.dtype:
            raise ValueError(f"bias dtype {bias.dtype} does not match q dtype {q.dtype}")
    for name, t in (("q", q), ("keys", keys), ("bias", bias)):
        if t is not None:
            _check_finite(name, t)


def dot_product_cross_entropy(
    q,
    keys,
    targets,
    *,
    temperature: float = 1.0,
    exclude=None,
    bias=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
):
    """Softmax cross-entropy over dot products, without the B x M logit matrix (fused backends).

    Args:
        q: [B, d] queries (fp16/bf16/fp32 computed in fp32; fp64 in fp64 on cpu/reference).
        keys: [M, d] keys, same dtype and device as q.
        targets: [B] int64, each in [0, M) or ignore_index.
        temperature: tau > 0; logits are divided by it.
        exclude: optional [B] int64; key exclude_i is removed from row i's softmax (-1: none).
        bias: optional [M] per-key bias, same dtype as q.
        ignore_index: target value of rows that contribute no loss and no gradient.
        reduction: 'mean' (over non-ignored rows; NaN when there are none, like torch),
            'sum' or 'none' ([B], 0 on ignored rows).
        backend: 'reference' | 'cpu' | 'cuda' | 'triton' (default: $LETTER_BACKEND or the fastest).

    logits_ij = (q_i . k_j + bias_j) / tau, excluded entries -inf,
    loss_i = logsumexp_j logits_ij - logits_i,targets_i. Differentiable w.r.t. q, keys and bias.
    The fused backends keep only the per-row logsumexp and recompute the logits in tiles in backward.
    """
    _check_dot_product_cross_entropy(q, keys, targets, temperature, exclude, bias, ignore_index, reduction)
    which = resolve("dot_product_cross_entropy_fwd", q.device, backend)
    temperature = float(temperature)
    if which == "reference":
        loss_rows, _ = reference.dot_product_cross_entropy_rows(
            q, keys, targets, temperature, exclude, bias, ignore_index
        )
    else:
        op = (
            torch.ops.letter.dot_product_cross_entropy_fwd_triton
            if which == "triton"
            else torch.ops.letter.dot_product_cross_entropy_fwd
        )
        loss_rows, _ = op(q, keys, targets, exclude, bias, temperature, ignore_index)
    if reduction == "none":
        return loss_rows.to(q.dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / (targets != ignore_index).sum()
    return total.to(q.dtype)


def info_nce(z, h, temperature: float = 1.0, symmetric: bool = False, *, backend: str | None = None):
    """In-batch InfoNCE (LETTER's collaborative regularization): row i of z against all rows of h.

    loss = mean_i -log softmax_j(z_i . h_j / tau)[i]; with symmetric=True the mean of that and the
    same loss with z and h swapped. Normalize z and h first for a cosine-similarity InfoNCE.
    """
    _check_float_tensor("z", z, 2, "[B, d]")
    _check_float_tensor("h", h, 2, "[B, d]")
    if h.shape[0] != z.shape[0]:
        raise ValueError(f"h must have the B={z.shape[0]} rows of z (row i is z_i's positive), got {h.shape[0]}")
    targets = torch.arange(z.shape[0], device=z.device)
    loss = dot_product_cross_entropy(z, h, targets, temperature=temperature, backend=backend)
    if symmetric:
        loss = 0.5 * (loss + dot_product_cross_entropy(h, z, targets, temperature=temperature, backend=backend))
    return loss


def codebook_diversity_loss(
    selected, codebook, positives, selected_idx, temperature: float = 1.0, *, backend: str | None = None
):
    """LETTER's diversity regularization for one codebook level.

    selected: [B, d] the chosen code embeddings e_c; codebook: [N, d] the level's codebook;
    positives: [B] int64, a code sampled from c's cluster (must differ from c); selected_idx: [B]
    int64, c itself, removed from the softmax. loss = mean_i -log softmax_{j != c_i}(e_c . e_j / tau)[+].
    """
    return dot_product_cross_entropy(
        selected, codebook, positives, temperature=temperature, exclude=selected_idx, backend=backend
    )


def _has_schema(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    return _C is not None and hasattr(getattr(torch.ops, namespace), name)


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _dpce_fwd_fake(q, keys, targets, exclude, bias, temperature, ignore_index):
    rows = q.new_empty((q.shape[0],), dtype=_acc_dtype(q))
    return rows, torch.empty_like(rows)


def _dpce_bwd_fake(grad_rows, q, keys, targets, exclude, bias, lse, temperature, ignore_index):
    dbias = torch.empty_like(bias) if bias is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(keys), dbias


def _dpce_setup(ctx, inputs, output):
    q, keys, targets, exclude, bias, temperature, ignore_index = inputs
    ctx.save_for_backward(q, keys, targets, exclude, bias, output[1])
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1])  # lse is a saved statistic, not a result


def _make_dpce_backward(bwd_op):
    def backward(ctx, grad_rows, _grad_lse):
        q, keys, targets, exclude, bias, lse = ctx.saved_tensors
        dq, dkeys, dbias = bwd_op(
            grad_rows.contiguous(), q, keys, targets, exclude, bias, lse, ctx.temperature, ctx.ignore_index
        )
        return dq, dkeys, None, None, dbias if bias is not None else None, None, None

    return backward


def _register_dot_product_cross_entropy() -> None:
    if _has_schema("letter::dot_product_cross_entropy_fwd"):
        torch.library.register_fake("letter::dot_product_cross_entropy_fwd")(_dpce_fwd_fake)
        torch.library.register_fake("letter::dot_product_cross_entropy_bwd")(_dpce_bwd_fake)
        torch.library.register_autograd(
            "letter::dot_product_cross_entropy_fwd",
            _make_dpce_backward(torch.ops.letter.dot_product_cross_entropy_bwd),
            setup_context=_dpce_setup,
        )
    if HAS_TRITON:
        from .triton import dot_product_cross_entropy as dpce_triton

        @torch.library.triton_op("letter::dot_product_cross_entropy_fwd_triton", mutates_args=())
        def _fwd_triton(
            q: torch.Tensor,
            keys: torch.Tensor,
            targets: torch.Tensor,
            exclude: torch.Tensor | None,
            bias: torch.Tensor | None,
            temperature: float,
            ignore_index: int,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return dpce_triton.forward(q, keys, targets, exclude, bias, temperature, ignore_index)

        @torch.library.triton_op("letter::dot_product_cross_entropy_bwd_triton", mutates_args=())
        def _bwd_triton(
            grad_rows: torch.Tensor,
            q: torch.Tensor,
            keys: torch.Tensor,
            targets: torch.Tensor,
            exclude: torch.Tensor | None,
            bias: torch.Tensor | None,
            lse: torch.Tensor,
            temperature: float,
            ignore_index: int,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return dpce_triton.backward(grad_rows, q, keys, targets, exclude, bias, lse, temperature, ignore_index)

        _fwd_triton.register_fake(_dpce_fwd_fake)
        _bwd_triton.register_fake(_dpce_bwd_fake)
        _fwd_triton.register_autograd(
            _make_dpce_backward(torch.ops.letter.dot_product_cross_entropy_bwd_triton), setup_context=_dpce_setup
        )
        if _has_schema("letter::dot_product_cross_entropy_fwd") and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "letter::dot_product_cross_entropy_fwd", "CUDA"
        ):
            # No hand-written CUDA kernel: CUDA tensors go to the Triton kernels.
            torch.library.register_kernel("letter::dot_product_cross_entropy_fwd", "cuda", dpce_triton.forward)
            torch.library.register_kernel("letter::dot_product_cross_entropy_bwd", "cuda", dpce_triton.backward)


_register_dot_product_cross_entropy()


# ----------------------------------------------------------------------------------------------
# constrained_beam_step
# ----------------------------------------------------------------------------------------------


def _check_constrained_beam_step(logits, beam_scores, nodes, trie, level, num_beams):
    from .trie import TrieLevels

    _check_float_tensor("logits", logits, 2, "[B*K, V]")
    _check_float_tensor("beam_scores", beam_scores, 2, "[B, K]")
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


def _check_live_nodes(beam_scores, nodes, trie, level):
    num_nodes = trie.row_ptr[level].numel() - 1
    live = beam_scores > float("-inf")
    if bool((live & ((nodes < 0) | (nodes >= num_nodes))).any()):
        raise ValueError(f"nodes of live beams must be node ids at depth {level}, in [0, {num_nodes})")


def constrained_beam_step(logits, beam_scores, nodes, trie, level: int, num_beams: int, *, backend: str | None = None):
    """One fused step of trie-constrained beam search.

    Args:
        logits: [B*K_in, V] float; row b*K_in + k is the next-token logits of beam k of batch row
            b. V may exceed the trie's tokens (special tokens): they are never continuations.
        beam_scores: [B, K_in] float, sum of log-probs so far; -inf marks a dead beam (at step 0
            use [0, -inf, ...] or K_in = 1).
        nodes: [B, K_in] int64, each beam's trie node at depth `level` (0 at step 0); ignored for
            dead beams.
        trie: letter_ext.TrieLevels (see letter_ext.trie), on logits' device.
        level: the level being decoded, 0 <= level < trie.num_levels.
        num_beams: K, beams kept per batch row.
        backend: 'reference' | 'cpu' | 'cuda' | 'triton' (default: $LETTER_BACKEND or the fastest).

    Returns:
        (scores [B, K] (fp64 for fp64 logits, else fp32), parent [B, K] int64 beam index in
        [0, K_in), token [B, K] int64, node [B, K] int64 child node id at depth level + 1 (the
        leaf id after the last level)). Candidate (k, t) scores beam_scores[b, k] +
        log_softmax(logits[b*K_in + k])[t] for each child t of nodes[b, k]; the K best per row,
        best first, ties -> lowest (k, t). Slots beyond the valid candidates are
        (-inf, 0, -1, -1); candidates scoring -inf or NaN are never chosen.
    """
    _check_constrained_beam_step(logits, beam_scores, nodes, trie, level, num_beams)
    which = resolve("constrained_beam_step", logits.device, backend)
    if which != "cpu":  # the C++ kernel raises the same ValueError without extra passes over the beams
        _check_live_nodes(beam_scores, nodes, trie, level)
    row_ptr, child_token = trie.row_ptr[level], trie.child_token[level]
    if which == "reference":
        return reference.constrained_beam_step(logits, beam_scores, nodes, row_ptr, child_token, num_beams)
    op = (
        torch.ops.letter.constrained_beam_step_triton if which == "triton" else torch.ops.letter.constrained_beam_step
    )
    return op(logits, beam_scores, nodes, row_ptr, child_token, num_beams)


def _constrained_beam_step_fake(logits, beam_scores, nodes, row_ptr, child_token, num_beams):
    shape = (beam_scores.shape[0], num_beams)
    index = logits.new_empty(shape, dtype=torch.long)
    return logits.new_empty(shape, dtype=_acc_dtype(logits)), index, torch.empty_like(index), torch.empty_like(index)


def _register_constrained_beam_step() -> None:
    if _has_schema("letter::constrained_beam_step"):
        torch.library.register_fake("letter::constrained_beam_step")(_constrained_beam_step_fake)
    if HAS_TRITON:
        from .triton import constrained_beam_step as cbs_triton

        @torch.library.triton_op("letter::constrained_beam_step_triton", mutates_args=())
        def _cbs_triton(
            logits: torch.Tensor,
            beam_scores: torch.Tensor,
            nodes: torch.Tensor,
            row_ptr: torch.Tensor,
            child_token: torch.Tensor,
            num_beams: int,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            return cbs_triton.constrained_beam_step(logits, beam_scores, nodes, row_ptr, child_token, num_beams)

        _cbs_triton.register_fake(_constrained_beam_step_fake)
        if _has_schema("letter::constrained_beam_step") and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "letter::constrained_beam_step", "CUDA"
        ):
            # No CUDA C++ kernel for this op: CUDA tensors go to the Triton kernel.
            torch.library.register_kernel("letter::constrained_beam_step", "cuda", cbs_triton.constrained_beam_step)


_register_constrained_beam_step()
