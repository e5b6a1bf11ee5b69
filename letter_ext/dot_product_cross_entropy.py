"""letter_ext.dot_product_cross_entropy: softmax cross-entropy over dot products without the B x M
logits, and the paper's losses built on it (info_nce, codebook_diversity_loss).

The public functions (argument checks, backend and path choice), the fake (meta) and autograd
registration of letter::dot_product_cross_entropy_{fwd,bwd} and their _triton twins, and the
chunked-GEMM path: letter::dot_product_cross_entropy_chunked (CPU kernel in C++, CUDA kernel
`chunked_torch` below: cuBLAS GEMMs and torch ops) driven by _ChunkedCrossEntropy. Kernels:
csrc/cpu/dot_product_cross_entropy.cpp, letter_ext/triton/dot_product_cross_entropy.py (the CUDA
tile path); spec: letter_ext.reference.dot_product_cross_entropy_rows.

Two paths compute the same loss:
  tile     the logits are recomputed in small tiles by our own micro-kernels (CPU: AVX2 C++,
           CUDA: Triton); forward keeps lse only, backward makes two recomputing passes.
  chunked  a chunk of rows' logits at a time by one BLAS GEMM into a reused buffer, a fused
           softmax row pass, and (when autograd needs a reduced loss) dq and dkeys by two more
           GEMMs in the same pass: the three GEMMs eager pays, without its B x M logits.
Which one runs by default is chunked_path_wins() (measured rule, see there).
"""
import torch

from . import reference
from ._backend import HAS_TRITON, has_schema, resolve, route_cuda_to_triton
from ._checks import check_finite, check_float_tensor, check_index_tensor, has_values
from .reference import accumulation_dtype


_REDUCTIONS = ("mean", "sum", "none")
PATHS = ("tile", "chunked")
DOUBLE_BACKWARD_ERROR = (
    "dot_product_cross_entropy: double backward (create_graph=True) is not supported by the fused "
    "backends; use backend='reference' (materialized logits) for higher-order gradients"
)
# Logits per chunk of chunked_torch: on CPU a chunk small enough to stay cheap (32 MiB: ~250 rows
# at M = 33,024, a full-rate GEMM; the C++ CPU kernel takes at least d/4 rows, see chunk_rows there);
# on CUDA larger chunks keep the launches few.
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}


def chunked_path_wins(B: int, M: int, d: int, device_type: str = "cpu") -> bool:
    """Whether the chunked-GEMM path is the default for a [B, d] x [M, d] problem.

    CPU: always. Measured on a 2-core Xeon (AVX-512/AMX, 2 threads, busy; docs/BENCHMARKS.md,
    "tile vs chunked"), forward + backward of the mean loss, chunked vs tile: d 4-16 with M 4,096-16,384
    1.2-3.2x faster, d 32 with M 256-8,192 1.1-2x, d 64-128 1.7-2.6x, the LLaMA-7B head (d 4,096)
    ~15x; in CPU time on one thread also the small problems (256x256x32: 1.8 vs 3.1 ms, 64x1030x128:
    3.6 vs 8.0 ms). The tile kernel makes five d-long dot-product passes of its own per logit where
    the BLAS makes three; the chunk's extra memory passes cost less than that even at d = 4. The
    rule uses no CPU feature, so an AVX2-only machine chooses alike (its BLAS and our row pass
    both drop to AVX2). The tile path stays available (path='tile') and is tested against it.
    CUDA (not measured yet; tools/gpu_check.sh times both): the Triton tile kernel below d = 128,
    where a GEMM is memory-bound, cuBLAS (tensor cores) from d = 128 on.
    """
    return device_type == "cpu" or d >= 128


# The op's argument names; info_nce and codebook_diversity_loss pass their own, so that an error
# names the argument their caller gave (z, positives...), not the op's.
OP_NAMES = {"q": "q", "keys": "keys", "targets": "targets", "exclude": "exclude"}


def _check_dot_product_cross_entropy(q, keys, targets, temperature, exclude, bias, ignore_index, reduction,
                                     names=OP_NAMES):
    n_q, n_keys, n_targets, n_exclude = (names[k] for k in ("q", "keys", "targets", "exclude"))
    check_float_tensor(n_q, q, 2, "[B, d]")
    check_float_tensor(n_keys, keys, 2, "[M, d]")
    B, M = q.shape[0], keys.shape[0]
    if M == 0:
        raise ValueError(f"{n_keys} must have M >= 1 rows, got shape (0, d)")
    if keys.shape[1] != q.shape[1]:
        raise ValueError(f"{n_keys} dim d={keys.shape[1]} does not match {n_q} dim d={q.shape[1]}")
    if keys.device != q.device:
        raise ValueError(f"{n_q} is on {q.device} but {n_keys} is on {keys.device}")
    if keys.dtype != q.dtype:
        raise ValueError(f"{n_keys} dtype {keys.dtype} does not match {n_q} dtype {q.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_index_tensor(n_targets, targets, B, q.device, n_q)
    if exclude is not None:
        check_index_tensor(n_exclude, exclude, B, q.device, n_q)
    if has_values(targets):
        valid = targets != ignore_index
        if bool((((targets < 0) | (targets >= M)) & valid).any()):
            raise ValueError(f"{n_targets} must be in [0, M={M}) or ignore_index={ignore_index}")
    if exclude is not None and has_values(exclude):
        if bool(((exclude < -1) | (exclude >= M)).any()):
            raise ValueError(f"{n_exclude} must be in [0, M={M}) or -1 (none)")
        if M == 1 and bool((exclude == 0).any()):
            raise ValueError(f"{n_exclude} removes every key of a row (M=1); such a row has no softmax")
        if has_values(targets) and bool(((exclude == targets) & valid).any()):
            row = int(torch.nonzero((exclude == targets) & valid)[0, 0])
            raise ValueError(f"{n_targets}[{row}] is excluded by {n_exclude}[{row}]: its loss would be infinite")
    if bias is not None:
        check_float_tensor("bias", bias, 1, "[M]")
        if bias.shape[0] != M:
            raise ValueError(f"bias must be [M] with M={M}, got shape {tuple(bias.shape)}")
        if bias.device != q.device:
            raise ValueError(f"{n_q} is on {q.device} but bias is on {bias.device}")
        if bias.dtype != q.dtype:
            raise ValueError(f"bias dtype {bias.dtype} does not match {n_q} dtype {q.dtype}")
    for name, t in ((n_q, q), (n_keys, keys), ("bias", bias)):
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
    path: str | None = None,
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
        path: 'tile' | 'chunked' on the 'cpu' and 'cuda' backends (default: chunked_path_wins;
            'triton' is the tile path).

    logits_ij = (q_i . k_j + bias_j) / tau, excluded entries -inf,
    loss_i = logsumexp_j logits_ij - logits_i,targets_i. Differentiable w.r.t. q, keys and bias
    (once: the fused backends raise on double backward, create_graph=True). The fused backends never
    hold the B x M logits (see the module docstring for the two paths). bf16/fp16 inputs on CUDA's
    chunked path use GEMMs in that dtype (fp32 accumulation), like eager F.linear; so do bf16
    inputs on CPU's chunked path where letter_ext._backend.bf16_gemms() (AMX/AVX512-BF16).
    """
    return _loss(q, keys, targets, temperature, exclude, bias, ignore_index, reduction, backend, path, OP_NAMES)


def _loss(q, keys, targets, temperature, exclude, bias, ignore_index, reduction, backend, path, names):
    """dot_product_cross_entropy, its argument errors naming `names` (see OP_NAMES)."""
    _check_dot_product_cross_entropy(q, keys, targets, temperature, exclude, bias, ignore_index, reduction, names)
    which = resolve("dot_product_cross_entropy_fwd", q.device, backend)
    temperature = float(temperature)
    if path not in PATHS + (None,):
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    if path == "chunked" and which not in ("cpu", "cuda"):
        raise ValueError(f"path='chunked' runs on the 'cpu' and 'cuda' backends, not {which!r}")
    if which in ("cpu", "cuda"):
        if path is None:
            path = "chunked" if chunked_path_wins(q.shape[0], keys.shape[0], q.shape[1], q.device.type) else "tile"
        if path == "chunked":
            return _chunked(q, keys, targets, exclude, bias, temperature, ignore_index, reduction)
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
    # checked here to name z and h, not the op's q and keys
    if h.shape[1] != z.shape[1]:
        raise ValueError(f"h must have z's width d={z.shape[1]}, got {h.shape[1]}")
    if h.dtype != z.dtype or h.device != z.device:
        raise ValueError(f"h ({h.dtype}, {h.device}) must have z's dtype and device ({z.dtype}, {z.device})")
    targets = torch.arange(z.shape[0], device=z.device)
    loss = _loss(z, h, targets, temperature, None, None, -100, "mean", backend, None, {**OP_NAMES, "q": "z", "keys": "h"})
    if symmetric:
        swapped = {**OP_NAMES, "q": "h", "keys": "z"}
        loss = 0.5 * (loss + _loss(h, z, targets, temperature, None, None, -100, "mean", backend, None, swapped))
    return loss


def codebook_diversity_loss(
    selected, codebook, positives, selected_idx, temperature: float = 1.0, *, backend: str | None = None
):
    """LETTER's diversity regularization for one codebook level.

    selected: [B, d] the chosen code embeddings e_c; codebook: [N, d] the level's codebook;
    positives: [B] int64, a code sampled from c's cluster (must differ from c); selected_idx: [B]
    int64, c itself, removed from the softmax. loss = mean_i -log softmax_{j != c_i}(e_c . e_j / tau)[+].
    """
    names = {"q": "selected", "keys": "codebook", "targets": "positives", "exclude": "selected_idx"}
    return _loss(selected, codebook, positives, temperature, selected_idx, None, -100, "mean", backend, None, names)


def _reduce(loss_rows, targets, ignore_index, reduction, dtype):
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / (targets != ignore_index).sum()
    return total.to(dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Autograd of the chunked path. A reduced loss has one scalar upstream gradient, so the
    forward computes the gradients for an upstream 1 in its single pass and backward only scales
    them; with reduction='none' backward runs the op again with the row gradients."""

    @staticmethod
    def forward(ctx, q, keys, bias, targets, exclude, temperature, ignore_index, reduction):
        op = torch.ops.letter.dot_product_cross_entropy_chunked
        grad_rows = None
        if reduction != "none":
            # In the accumulation dtype from the start: 1/n rounded to fp32 would cost fp64 inputs
            # their precision.
            weight = torch.ones((), dtype=accumulation_dtype(q), device=q.device)
            if reduction == "mean":
                weight = weight / (targets != ignore_index).sum()
            grad_rows = weight.expand(q.shape[0])
        loss_rows, _, dq, dkeys, dbias = op(q, keys, targets, exclude, bias, temperature, ignore_index, grad_rows)
        if grad_rows is not None:
            ctx.save_for_backward(dq, dkeys, dbias)
        else:
            ctx.save_for_backward(q, keys, targets, exclude, bias)
        ctx.temperature, ctx.ignore_index, ctx.reduction = temperature, ignore_index, reduction
        ctx.has_bias = bias is not None
        return _reduce(loss_rows, targets, ignore_index, reduction, q.dtype)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the kernels are not differentiable
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        if ctx.reduction != "none":
            dq, dkeys, dbias = ctx.saved_tensors
            # An upstream 1 (loss.backward()) returns the saved gradients themselves: autograd frees
            # its saved copy before storing them as .grad, so no second copy of dkeys is made.
            if not (has_values(grad) and bool(grad == 1)):  # traced: the upstream gradient is unknown
                dq, dkeys, dbias = (g * grad.to(g.dtype) for g in (dq, dkeys, dbias))
        else:
            q, keys, targets, exclude, bias = ctx.saved_tensors
            _, _, dq, dkeys, dbias = torch.ops.letter.dot_product_cross_entropy_chunked(
                q, keys, targets, exclude, bias, ctx.temperature, ctx.ignore_index, grad.contiguous()
            )
        return dq, dkeys, dbias if ctx.has_bias else None, None, None, None, None, None


def _chunked(q, keys, targets, exclude, bias, temperature, ignore_index, reduction):
    inputs = (q, keys) if bias is None else (q, keys, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _ChunkedCrossEntropy.apply(q, keys, bias, targets, exclude, temperature, ignore_index, reduction)
    loss_rows = torch.ops.letter.dot_product_cross_entropy_chunked(
        q, keys, targets, exclude, bias, temperature, ignore_index, None
    )[0]
    return _reduce(loss_rows, targets, ignore_index, reduction, q.dtype)


def chunked_torch(q, keys, targets, exclude, bias, temperature: float, ignore_index: int, grad_rows,
                  chunk_bytes: int | None = None):
    """letter::dot_product_cross_entropy_chunked in torch ops (the CUDA kernel: cuBLAS GEMMs).

    The same chunks as the C++ kernel: per chunk one GEMM for the logits, the softmax in the
    accumulation dtype, and with grad_rows dS = g (P - onehot) / tau, dq rows = dS K and
    dkeys += dS^T q. bf16/fp16 inputs on CUDA run the GEMMs in their dtype (fp32 accumulation in
    the GEMM; logits rounded to that dtype, as eager F.linear does), dkeys accumulates in fp32.
    """
    acc = accumulation_dtype(q)
    B, d = q.shape
    M = keys.shape[0]
    gemm_dtype = q.dtype if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else acc
    qg, kg = q.to(gemm_dtype).contiguous(), keys.to(gemm_dtype).contiguous()
    inv_tau = 1.0 / temperature
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    loss, lse = q.new_empty(B, dtype=acc), q.new_empty(B, dtype=acc)
    with_grad = grad_rows is not None
    dq = q.new_empty((B if with_grad else 0, d), dtype=acc)
    dkeys = q.new_zeros((M if with_grad else 0, d), dtype=acc)
    dbias = q.new_zeros(M, dtype=acc) if with_grad and bias is not None else q.new_empty(0, dtype=acc)
    budget = chunk_bytes or CHUNK_BYTES.get(q.device.type, CHUNK_BYTES["cuda"])
    chunk = max(1, min(B, budget // (M * 4)))
    for r0 in range(0, B, chunk):
        rows = slice(r0, min(r0 + chunk, B))
        s = (qg[rows] @ kg.T).to(acc)
        if bias is not None:
            s += bias.to(acc)
        s *= inv_tau
        if exclude is not None:
            hit = torch.nonzero(exclude[rows] >= 0)[:, 0]
            s[hit, exclude[rows][hit]] = float("-inf")
        row_max = s.amax(1, keepdim=True)
        target_logit = s.gather(1, safe_targets[rows, None])[:, 0]
        s.sub_(row_max).exp_()
        sum_exp = s.sum(1)
        lse[rows] = row_max[:, 0] + sum_exp.log()
        loss[rows] = torch.where(valid[rows], lse[rows] - target_logit, 0.0)
        if not with_grad:
            continue
        g = torch.where(valid[rows], grad_rows[rows].to(acc), 0.0) * inv_tau
        s.mul_((g / sum_exp)[:, None])
        s.scatter_add_(1, safe_targets[rows, None], -g[:, None])
        ds = s.to(gemm_dtype)
        dq[rows] = ds @ kg
        dkeys += (ds.T @ qg[rows]).to(acc)
        if bias is not None:
            dbias += s.sum(0)
    out_bias_dtype = bias.dtype if bias is not None else q.dtype
    return loss, lse, dq.to(q.dtype), dkeys.to(keys.dtype), dbias.to(out_bias_dtype)


def _dpce_fwd_fake(q, keys, targets, exclude, bias, temperature, ignore_index):
    rows = q.new_empty((q.shape[0],), dtype=accumulation_dtype(q))
    return rows, torch.empty_like(rows)


def _dpce_bwd_fake(grad_rows, q, keys, targets, exclude, bias, lse, temperature, ignore_index):
    # new_empty, not empty_like: the kernels return contiguous gradients for inputs of any strides.
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty((0,))
    return q.new_empty(q.shape), keys.new_empty(keys.shape), dbias


def _dpce_chunked_fake(q, keys, targets, exclude, bias, temperature, ignore_index, grad_rows):
    rows, lse = _dpce_fwd_fake(q, keys, targets, exclude, bias, temperature, ignore_index)
    if grad_rows is None:
        return rows, lse, q.new_empty((0, q.shape[1])), keys.new_empty((0, keys.shape[1])), q.new_empty((0,))
    dq, dkeys, dbias = _dpce_bwd_fake(grad_rows, q, keys, targets, exclude, bias, lse, temperature, ignore_index)
    return rows, lse, dq, dkeys, dbias


def _dpce_setup(ctx, inputs, output):
    q, keys, targets, exclude, bias, temperature, ignore_index = inputs
    ctx.save_for_backward(q, keys, targets, exclude, bias, output[1])
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1])  # lse is a saved statistic, not a result


def _make_dpce_backward(bwd_op):
    def backward(ctx, grad_rows, _grad_lse):
        if torch.is_grad_enabled():  # create_graph=True: the bwd kernels are not differentiable
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
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
    if has_schema("dot_product_cross_entropy_chunked"):
        torch.library.register_fake("letter::dot_product_cross_entropy_chunked")(_dpce_chunked_fake)
        torch.library.register_kernel("letter::dot_product_cross_entropy_chunked", "cuda", chunked_torch)
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
