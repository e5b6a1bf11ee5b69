"""letter_ext.residual_quantize: residual nearest-code search over L codebooks (RQ-VAE quantization).

The public function (argument checks, backend choice) and the fake (meta) and autograd
registration of letter::residual_quantize and letter::residual_quantize_triton. Kernels:
csrc/cpu/residual_quantize.cpp, csrc/cuda/residual_quantize.cu, letter_ext/triton/residual_quantize.py;
spec: letter_ext.reference.residual_quantize.
"""
import math

import torch

from . import reference
from ._backend import HAS_TRITON, has_schema, resolve, route_cuda_to_triton
from ._checks import check_finite, check_float_tensor


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

    Any finite magnitude works on every backend: when squared distances of the inputs could
    overflow (or underflow) the compute dtype, x and codebooks are scaled by a power of two first
    (argmin is scale invariant) and quantized/residuals scaled back, which is exact except for
    components that become subnormal (below 2^-126 times the largest value in fp32) and for results
    that themselves overflow x's dtype (inf). Traced (fake tensors, torch.compile) the magnitudes and
    NaN/inf are unknown: no check or rescaling is traced, so such a graph needs moderate finite inputs.
    """
    check_float_tensor("x", x, 2, "[B, d]")
    check_float_tensor("codebooks", codebooks, 3, "[L, N, d]")
    if codebooks.shape[0] == 0 or codebooks.shape[1] == 0:
        raise ValueError(f"codebooks must have L >= 1 levels and N >= 1 codes, got shape {tuple(codebooks.shape)}")
    if codebooks.shape[2] != x.shape[1]:
        raise ValueError(f"codebooks dim d={codebooks.shape[2]} does not match x dim d={x.shape[1]}")
    if codebooks.device != x.device:
        raise ValueError(f"x is on {x.device} but codebooks is on {codebooks.device}")
    largest = max(check_finite("x", x), check_finite("codebooks", codebooks))
    which = resolve("residual_quantize", x.device, backend)
    compute_dtype = reference.residual_quantize_dtype(x, codebooks) if which in ("reference", "cpu") else torch.float32
    scale = _safe_scale(largest, compute_dtype, x.shape[1], codebooks.shape[0])
    if scale != 1.0:
        # Scale in a dtype at least as wide as the compute dtype, so nothing leaves its range.
        x_in = x.to(torch.promote_types(x.dtype, compute_dtype)) * scale
        codebooks_in = codebooks.to(torch.promote_types(codebooks.dtype, compute_dtype)) * scale
    else:
        x_in, codebooks_in = x, codebooks
    if which == "reference":
        codes, quantized, residuals = reference.residual_quantize(x_in, codebooks_in, return_residuals)
    else:
        op = torch.ops.letter.residual_quantize_triton if which == "triton" else torch.ops.letter.residual_quantize
        quantized, codes, residuals = op(x_in, codebooks_in, return_residuals)
        if not codebooks.requires_grad:
            # quantized is a function of the codebooks only (codes are not differentiable): with
            # only x requiring grad it needs no graph, as on the reference backend.
            quantized = quantized.detach()
    if scale != 1.0:
        quantized = (quantized / scale).to(x.dtype)
        residuals = (residuals / scale).to(x.dtype)
    return (codes, quantized, residuals) if return_residuals else (codes, quantized)


def _safe_scale(largest: float, dtype: torch.dtype, d: int, levels: int) -> float:
    """1.0 if squared distances of values up to `largest` are safe in `dtype`, else the power of two
    that makes them safe (scaling by it is exact, and argmin does not change).

    Safe means: (1) no overflow: every score any backend forms (||r||^2, 2 r.c, ||c||^2 with
    |r_l| <= |x| + l codes) is below d * ((levels + 2) * largest)^2, kept under max / 2; (2) no
    underflow: largest^2 times eps (the resolution of a distance) stays a normal number, with 2^16 to
    spare for terms smaller than the largest one. Outside that range the scale moves `largest` to
    its nearest edge: the fewest components pushed into subnormals, and the scale and its inverse
    are representable in `dtype` (a fp32 scale of 2^150 would be inf).
    """
    if largest == 0.0:
        return 1.0
    info = torch.finfo(dtype)
    high = math.floor((math.log2(info.max) - 1 - math.log2(max(d, 1)) - 2 * math.log2(levels + 2)) / 2)
    low = math.ceil((math.log2(info.tiny) - math.log2(info.eps)) / 2) + 16
    exponent = math.frexp(largest)[1]  # largest is in [2^(exponent - 1), 2^exponent)
    if exponent - 1 < low:
        return math.ldexp(1.0, low + 1 - exponent)
    if exponent > high:
        return math.ldexp(1.0, high - exponent)
    return 1.0


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
    if has_schema("residual_quantize"):
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
        route_cuda_to_triton({"residual_quantize": rq_triton.residual_quantize})


_register_residual_quantize()
