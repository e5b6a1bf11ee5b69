"""letter_ext.dot_product_cross_entropy: softmax cross-entropy over dot products without the B x M
logits, and the paper's losses built on it (info_nce, codebook_diversity_loss).

The public functions (argument checks, backend choice) and the fake (meta) and autograd
registration of letter::dot_product_cross_entropy_{fwd,bwd} and their _triton twins. Kernels:
csrc/cpu/dot_product_cross_entropy.cpp, letter_ext/triton/dot_product_cross_entropy.py (also the
CUDA path); spec: letter_ext.reference.dot_product_cross_entropy_rows.
"""
import torch

from . import reference
from ._backend import HAS_TRITON, has_schema, resolve, route_cuda_to_triton
from ._checks import check_finite, check_float_tensor, check_index_tensor
from .reference import accumulation_dtype


_REDUCTIONS = ("mean", "sum", "none")


def _check_dot_product_cross_entropy(q, keys, targets, temperature, exclude, bias, ignore_index, reduction):
    check_float_tensor("q", q, 2, "[B, d]")
    check_float_tensor("keys", keys, 2, "[M, d]")
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
    check_index_tensor("targets", targets, B, q.device)
    valid = targets != ignore_index
    if bool(((targets < 0) | (targets >= M))[valid].any()):
        raise ValueError(f"targets must be in [0, M={M}) or ignore_index={ignore_index}")
    if exclude is not None:
        check_index_tensor("exclude", exclude, B, q.device)
        if bool(((exclude < -1) | (exclude >= M)).any()):
            raise ValueError(f"exclude must be in [0, M={M}) or -1 (none)")
        if M == 1 and bool((exclude == 0).any()):
            raise ValueError("exclude removes every key of a row (M=1); such a row has no softmax")
        if bool(((exclude == targets) & valid).any()):
            row = int(torch.nonzero((exclude == targets) & valid)[0, 0])
            raise ValueError(f"targets[{row}] is excluded by exclude[{row}]: its loss would be infinite")
    if bias is not None:
        check_float_tensor("bias", bias, 1, "[M]")
        if bias.shape[0] != M:
            raise ValueError(f"bias must be [M] with M={M}, got shape {tuple(bias.shape)}")
        if bias.device != q.device:
            raise ValueError(f"q is on {q.device} but bias is on {bias.device}")
        if bias.dtype != q.dtype:
            raise ValueError(f"bias dtype {bias.dtype} does not match q dtype {q.dtype}")
    for name, t in (("q", q), ("keys", keys), ("bias", bias)):
        if t is not None:
            check_finite(name, t)


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
    check_float_tensor("z", z, 2, "[B, d]")
    check_float_tensor("h", h, 2, "[B, d]")
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


def _dpce_fwd_fake(q, keys, targets, exclude, bias, temperature, ignore_index):
    rows = q.new_empty((q.shape[0],), dtype=accumulation_dtype(q))
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
    if has_schema("dot_product_cross_entropy_fwd"):
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
        route_cuda_to_triton(
            {"dot_product_cross_entropy_fwd": dpce_triton.forward, "dot_product_cross_entropy_bwd": dpce_triton.backward}
        )


_register_dot_product_cross_entropy()
