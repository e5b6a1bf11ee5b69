import itertools
import math

import pytest
import torch

import letter_ext
from conftest import available_backends, devices, forced_isas

BACKEND_DEVICE = [(b, dev) for dev in devices() for b in available_backends("residual_quantize", dev)]


def assert_near_optimal(x, codebooks, codes, quantized, rel=1e-5):
    """Check by distance, in float64, following the backend's own choices level by level.

    A code is accepted when its distance is within 1e-6 * (||r||^2 + ||c||^2) of the best one, so
    near-ties may go either way but nothing else may.
    """
    x64, cb64 = x.double().cpu(), codebooks.double().cpu()
    codes = codes.cpu()
    r = x64
    total = torch.zeros_like(x64)
    for level in range(cb64.shape[0]):
        dist = ((r[:, None, :] - cb64[level][None]) ** 2).sum(-1)
        chosen = codes[:, level]
        assert ((chosen >= 0) & (chosen < cb64.shape[1])).all()
        d_chosen = dist.gather(1, chosen[:, None])[:, 0]
        tol = 1e-6 * ((r * r).sum(1) + (cb64[level][chosen] ** 2).sum(1)) + 1e-12
        assert (d_chosen <= dist.min(1).values + tol).all(), f"level {level}: a code far from the nearest"
        r = r - cb64[level][chosen]
        total = total + cb64[level][chosen]
    scale = (total.abs().max().item() if total.numel() else 0.0) + 1.0
    torch.testing.assert_close(quantized.double().cpu(), total, atol=rel * scale, rtol=rel)


SHAPES = list(itertools.product([0, 1, 7, 257], [1, 3, 32, 33, 64], [1, 2, 4], [1, 2, 255, 256]))
# The Triton interpreter is slow: on CPU it gets every (d, L) with a few (B, N) pairs.
INTERPRETER_BN = {(7, 255), (257, 256), (0, 2), (1, 1)}
CASES = [
    (backend, device, *shape)
    for backend, device in BACKEND_DEVICE
    for shape in SHAPES
    if not (backend == "triton" and device == "cpu" and (shape[0], shape[3]) not in INTERPRETER_BN)
]


@pytest.mark.parametrize("backend,device,B,d,L,N", CASES)
def test_matches_reference_by_distance(backend, device, B, d, L, N):
    gen = torch.Generator().manual_seed(B * 1000003 + d * 1009 + L * 101 + N)
    x = torch.randn(B, d, generator=gen).to(device)
    cb = torch.randn(L, N, d, generator=gen).to(device)
    codes, quantized, residuals = letter_ext.residual_quantize(x, cb, return_residuals=True, backend=backend)
    assert codes.shape == (B, L) and codes.dtype == torch.long
    assert quantized.shape == (B, d) and quantized.dtype == x.dtype
    assert residuals.shape == (B, L, d)
    assert_near_optimal(x, cb, codes, quantized)
    # residual l = x - sum of the codes chosen before level l
    chosen = torch.stack([cb[level][codes[:, level]] for level in range(L)], 1) if B else cb.new_zeros(0, L, d)
    expected = x[:, None, :] - torch.cumsum(chosen, 1) + chosen
    torch.testing.assert_close(residuals, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_exact_ties_pick_lowest_index(backend, device):
    gen = torch.Generator().manual_seed(1)
    distinct = torch.randn(5, 16, generator=gen)
    # 300 codes, each repeated many times, duplicates spread over several tiles.
    order = torch.arange(300) % 5
    cb = distinct[order][None].repeat(2, 1, 1).to(device)
    x = (distinct[torch.randint(0, 5, (64,), generator=gen)] + 0.01 * torch.randn(64, 16, generator=gen)).to(device)
    codes, q = letter_ext.residual_quantize(x, cb, backend=backend)
    assert_near_optimal(x, cb, codes, q)
    if backend == "triton":
        # tl.dot may round identical columns differently (BLAS blocking in the interpreter), so
        # duplicates are only equal within the tolerance the spec allows.
        return
    ref_codes, _ = letter_ext.residual_quantize(x, cb, backend="reference")
    assert torch.equal(codes.cpu(), ref_codes.cpu())
    assert (codes < 5).all(), "exact ties must resolve to the lowest index"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(backend, device, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(33, 32, generator=gen).to(device, dtype)
    cb = torch.randn(2, 64, 32, generator=gen).to(device, dtype)
    codes, quantized = letter_ext.residual_quantize(x, cb, backend=backend)
    assert quantized.dtype == dtype
    rel = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert_near_optimal(x.float(), cb.float(), codes, quantized, rel=rel)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_non_contiguous_inputs(backend, device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=gen).to(device)[::2, ::2]
    cb = torch.randn(3, 50, 64, generator=gen).to(device)[:, :, ::2]
    assert not x.is_contiguous() and not cb.is_contiguous()
    codes, q = letter_ext.residual_quantize(x, cb, backend=backend)
    codes_c, q_c = letter_ext.residual_quantize(x.contiguous(), cb.contiguous(), backend=backend)
    assert torch.equal(codes, codes_c) and torch.equal(q, q_c)


def test_codebook_gradient_matches_reference():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(50, 8, generator=gen)
    cb = torch.randn(3, 16, 8, generator=gen)
    weights_q, weights_r = torch.randn(50, 8, generator=gen), torch.randn(50, 3, 8, generator=gen)
    grads = {}
    for backend in ["reference"] + available_backends("residual_quantize"):
        xb = x.clone().requires_grad_(True)
        cbb = cb.clone().requires_grad_(True)
        _, q, r = letter_ext.residual_quantize(xb, cbb, return_residuals=True, backend=backend)
        ((q * weights_q).sum() + (r * weights_r).sum()).backward()
        grads[backend] = (xb.grad, cbb.grad)
    for backend, (gx, gcb) in grads.items():
        torch.testing.assert_close(gx, grads["reference"][0], msg=backend)
        torch.testing.assert_close(gcb, grads["reference"][1], msg=backend)


def test_quantized_gives_x_no_gradient():
    x = torch.randn(5, 4, requires_grad=True)
    cb = torch.randn(2, 8, 4, requires_grad=True)
    _, q = letter_ext.residual_quantize(x, cb)
    q.sum().backward()
    assert x.grad is None
    assert cb.grad is not None and cb.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference"] + available_backends("residual_quantize"))
def test_gradcheck_float64(backend):
    if backend == "triton":
        pytest.skip("the Triton kernel computes in fp32")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    cb = (3 * torch.randn(3, 9, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)

    def f(x, cb):
        _, q, r = letter_ext.residual_quantize(x, cb, return_residuals=True, backend=backend)
        return q, r

    assert torch.autograd.gradcheck(f, (x, cb))


@pytest.mark.skipif(not available_backends("residual_quantize"), reason="no compiled kernel")
def test_opcheck():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 6, generator=gen, requires_grad=True)
    cb = torch.randn(2, 7, 6, generator=gen, requires_grad=True)
    for ret in (False, True):
        torch.library.opcheck(torch.ops.letter.residual_quantize.default, (x, cb, ret))


@pytest.mark.skipif(not available_backends("residual_quantize"), reason="no compiled kernel")
@pytest.mark.parametrize("x_dtype,cb_dtype", [(torch.float16, torch.float64), (torch.bfloat16, torch.bfloat16),
                                              (torch.float64, torch.float32)])
def test_opcheck_other_dtypes_strides_and_empty_batch(x_dtype, cb_dtype):
    # the fake must give the kernel's dtypes (quantized, residuals: x's) and contiguous outputs
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 9, generator=gen).T.to(x_dtype).requires_grad_()  # strided
    cb = torch.randn(7, 6, 2, generator=gen).permute(2, 0, 1).to(cb_dtype).requires_grad_()
    op = torch.ops.letter.residual_quantize.default
    for ret in (False, True):
        torch.library.opcheck(op, (x, cb, ret))
    torch.library.opcheck(op, (x.detach()[:0], cb, True))


@pytest.mark.parametrize("device", devices())
def test_opcheck_triton(device):
    if "triton" not in available_backends("residual_quantize", device):
        pytest.skip("triton not usable here")
    x = torch.randn(9, 6, device=device, requires_grad=True)
    cb = torch.randn(2, 7, 6, device=device, requires_grad=True)
    utils = None
    if device == "cpu":
        # The interpreter cannot run a traced (fake-tensor) launch on CPU; on CUDA all checks run.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.letter.residual_quantize_triton.default, (x, cb, True), **kwargs)


# (dtype, largest |value|): squared distances overflow or underflow the compute dtype unless the
# wrapper rescales. Codebook sums stay below the dtype's max, so quantized and residuals are finite.
EXTREME_MAGNITUDES = [
    (torch.float32, 1e19),
    (torch.float32, 1e30),
    (torch.float32, torch.finfo(torch.float32).max / 8),
    (torch.float32, 1e-30),
    (torch.float32, 1e-42),  # subnormal inputs
    (torch.bfloat16, 1e30),
    (torch.float16, 65504.0 / 4),
    (torch.float16, 1e-5),
    (torch.float64, 1e200),
    (torch.float64, 1e-300),
]


def sequential_in(dtype, x, codebooks, codes):
    """quantized and residuals from the chosen codes, adding level by level in `dtype` like the kernels."""
    r, q, residuals = x.to(dtype), torch.zeros_like(x, dtype=dtype), []
    for level in range(codebooks.shape[0]):
        chosen = codebooks[level].to(dtype)[codes[:, level]]
        residuals.append(r)
        r, q = r - chosen, q + chosen
    return q, torch.stack(residuals, 1)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + BACKEND_DEVICE)
@pytest.mark.parametrize("dtype,magnitude", EXTREME_MAGNITUDES)
def test_extreme_magnitudes_match_float64(backend, device, dtype, magnitude):
    gen = torch.Generator().manual_seed(14)
    x = ((2 * torch.rand(33, 16, generator=gen, dtype=torch.float64) - 1) * magnitude).to(dtype)
    cb = ((2 * torch.rand(3, 40, 16, generator=gen, dtype=torch.float64) - 1) * magnitude).to(dtype)
    x[0, 0] = magnitude  # the largest value itself
    codes, quantized, residuals = letter_ext.residual_quantize(
        x.to(device), cb.to(device), return_residuals=True, backend=backend
    )
    codes, quantized, residuals = codes.cpu(), quantized.cpu(), residuals.cpu()
    assert quantized.dtype == residuals.dtype == dtype
    # float64 reference on a power-of-two rescaled copy (exact), so its own squares stay in range
    unit = 2.0 ** -math.frexp(magnitude)[1]
    x64, cb64 = x.double() * unit, cb.double() * unit
    assert_near_optimal(x64, cb64, codes, quantized.double() * unit, rel=1e-2 if dtype.itemsize == 2 else 1e-5)
    compute = torch.float64 if dtype == torch.float64 and backend != "triton" else torch.float32
    if dtype == torch.float64 and compute == torch.float32:
        return  # fp64 inputs rounded to fp32 by the Triton kernel: no exact sum to compare with
    # The rescaling is exact: the same sums, level by level in the compute dtype, as unscaled.
    want_q, want_r = sequential_in(compute, x, cb, codes)
    assert torch.equal(quantized, want_q.to(dtype))
    assert torch.equal(residuals, want_r.to(dtype))


def test_safe_scale_leaves_ordinary_inputs_alone():
    from letter_ext.residual_quantize import _safe_scale

    for largest in (1e-10, 1e-3, 1.0, 3e4, 1e12):
        assert _safe_scale(largest, torch.float32, 256, 8) == 1.0
    assert _safe_scale(0.0, torch.float32, 16, 3) == 1.0
    for dtype, largest in ((torch.float32, 1e19), (torch.float32, 1e-40), (torch.float64, 1e160), (torch.float64, 1e-300)):
        scale = _safe_scale(largest, dtype, 16, 3)
        mantissa, _ = math.frexp(scale)
        assert mantissa == 0.5 and scale != 1.0  # a power of two
        assert math.isfinite(float(torch.tensor(scale, dtype=dtype))) and float(torch.tensor(1 / scale, dtype=dtype)) > 0


def test_empty_batch():
    codes, q = letter_ext.residual_quantize(torch.zeros(0, 4), torch.randn(2, 3, 4))
    assert codes.shape == (0, 2) and q.shape == (0, 4)


@pytest.mark.parametrize(
    "x,cb,exc,words",
    [
        (torch.zeros(3), torch.zeros(1, 2, 3), ValueError, "x must be"),
        (torch.zeros(2, 3), torch.zeros(2, 3), ValueError, "codebooks must be"),
        (torch.zeros(2, 3), torch.zeros(1, 2, 4), ValueError, "does not match"),
        (torch.zeros(2, 3), torch.zeros(0, 2, 3), ValueError, "L >= 1"),
        (torch.zeros(2, 3), torch.zeros(1, 0, 3), ValueError, "N >= 1"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 2, 3), TypeError, "x must be a floating"),
        (torch.zeros(2, 3), torch.zeros(1, 2, 3, dtype=torch.int32), TypeError, "codebooks must be a floating"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), torch.zeros(1, 2, 3), ValueError, "x contains NaN"),
        (torch.zeros(2, 3), torch.full((1, 2, 3), float("inf")), ValueError, "codebooks contains NaN"),
        (torch.zeros(2, 3), torch.zeros(1, 2, 3, device="meta"), ValueError, "is on"),
        ([[0.0]], torch.zeros(1, 2, 1), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input(x, cb, exc, words):
    with pytest.raises(exc, match=words):
        letter_ext.residual_quantize(x, cb)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        letter_ext.residual_quantize(torch.zeros(1, 2), torch.zeros(1, 1, 2), backend="tpu")


@pytest.mark.skipif(not available_backends("residual_quantize"), reason="no compiled kernel")
@pytest.mark.parametrize("copies", [(9, 17, 33), (17, 33, 49)])
def test_exact_ties_across_lanes_and_tiles_pick_lowest_index_on_every_isa(copies):
    # Copies of the nearest code sit in different vector halves, lanes and code tiles of the
    # micro-kernels (AVX2: 16 codes per tile in two halves of 8; AVX-512: 32 in two halves of 16),
    # e.g. 17 (second half) against 33 (first half of the next tile) in the same lane.
    gen = torch.Generator().manual_seed(3)
    cb = torch.randn(1, 70, 8, generator=gen)
    for j in copies[1:]:
        cb[0, j] = cb[0, copies[0]]
    x = cb[0, copies[0]][None].repeat(13, 1) + 1e-3 * torch.randn(13, 8, generator=gen)
    before = letter_ext.isa()
    try:
        for name in forced_isas():
            letter_ext.set_isa(name)
            codes, _ = letter_ext.residual_quantize(x, cb, backend="cpu")
            assert (codes == copies[0]).all(), (name, codes.flatten().tolist())
    finally:
        letter_ext.set_isa(before)


@pytest.mark.skipif(not available_backends("residual_quantize"), reason="no compiled kernel")
@pytest.mark.parametrize("B,d,L,N", [(1, 1, 1, 1), (7, 33, 3, 255), (257, 64, 2, 257), (255, 4096, 2, 33)])
def test_every_isa_picks_identical_codes(B, d, L, N):
    # Each ISA's path forms the scores by the same fused multiply-adds: identical codes, identical
    # outputs, and (checked by distance) the nearest codes.
    gen = torch.Generator().manual_seed(B + d + N)
    x = torch.randn(B, d, generator=gen)
    cb = torch.randn(L, N, d, generator=gen)
    before = letter_ext.isa()
    results = {}
    try:
        for name in forced_isas():
            letter_ext.set_isa(name)
            results[name] = letter_ext.residual_quantize(x, cb, return_residuals=True, backend="cpu")
    finally:
        letter_ext.set_isa(before)
    first = results[forced_isas()[0]]
    assert_near_optimal(x, cb, first[0], first[1])
    for name, out in results.items():
        for got, want in zip(out, first):
            assert torch.equal(got, want), name


@pytest.mark.parametrize("backend", available_backends("residual_quantize"))
def test_autograd_with_only_x_requiring_grad_matches_reference(backend):
    x = torch.randn(6, 4, requires_grad=True)
    cb = torch.randn(2, 5, 4)
    _, q_ref, r_ref = letter_ext.residual_quantize(x, cb, return_residuals=True, backend="reference")
    _, q, r = letter_ext.residual_quantize(x, cb, return_residuals=True, backend=backend)
    assert (q.requires_grad, r.requires_grad) == (q_ref.requires_grad, r_ref.requires_grad) == (False, True)
    (grad_ref,) = torch.autograd.grad(r_ref.sum(), x)
    (grad,) = torch.autograd.grad(r.sum(), x)
    torch.testing.assert_close(grad, grad_ref)
