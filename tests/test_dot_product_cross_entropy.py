import itertools

import pytest
import torch
import torch.nn.functional as F

import letter_ext
from conftest import available_backends, devices, forced_isas
from letter_ext.dot_product_cross_entropy import DOUBLE_BACKWARD_ERROR, chunked_torch

BACKENDS = available_backends("dot_product_cross_entropy_fwd")
BACKEND_DEVICE = [(b, dev) for dev in devices() for b in available_backends("dot_product_cross_entropy_fwd", dev)]


def make_inputs(B, M, d, *, seed, exclude=False, bias=False, ignore=False, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(B, d, generator=gen, dtype=dtype)
    keys = scale * torch.randn(M, d, generator=gen, dtype=dtype)
    targets = torch.randint(0, M, (B,), generator=gen)
    excl = None
    if exclude and M > 1:
        # a key other than the target, or -1 on some rows
        shift = torch.randint(1, M, (B,), generator=gen)
        excl = (targets + shift) % M
        excl[torch.rand(B, generator=gen) < 0.25] = -1
    if ignore:
        targets[torch.rand(B, generator=gen) < 0.3] = -100
    b = torch.randn(M, generator=gen, dtype=dtype) if bias else None
    return q, keys, targets, excl, b


def torch_cross_entropy(q, keys, targets, temperature, exclude, bias, reduction):
    """Independent spec: F.cross_entropy on explicitly built float64 logits."""
    logits = q.double() @ keys.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits / temperature
    if exclude is not None:
        for i, e in enumerate(exclude.tolist()):
            if e >= 0:
                logits[i, e] = float("-inf")
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("exclude,bias,ignore", [(False, False, False), (True, True, True)])
def test_reference_matches_torch_cross_entropy(reduction, exclude, bias, ignore):
    q, keys, targets, excl, b = make_inputs(13, 29, 7, seed=0, exclude=exclude, bias=bias, ignore=ignore)
    got = letter_ext.dot_product_cross_entropy(
        q.double(), keys.double(), targets, temperature=0.7, exclude=excl,
        bias=None if b is None else b.double(), reduction=reduction, backend="reference",
    )
    want = torch_cross_entropy(q, keys, targets, 0.7, excl, b, reduction)
    torch.testing.assert_close(got, want)


def test_info_nce_is_in_batch_cross_entropy():
    z, h, *_ = make_inputs(9, 9, 5, seed=1)
    want = F.cross_entropy((z @ h.T) / 0.3, torch.arange(9))
    torch.testing.assert_close(letter_ext.info_nce(z, h, 0.3), want)
    sym = 0.5 * (want + F.cross_entropy((h @ z.T) / 0.3, torch.arange(9)))
    torch.testing.assert_close(letter_ext.info_nce(z, h, 0.3, symmetric=True), sym)


def test_codebook_diversity_loss_excludes_the_selected_code():
    gen = torch.Generator().manual_seed(2)
    codebook = torch.randn(11, 4, generator=gen)
    selected_idx = torch.randint(0, 11, (6,), generator=gen)
    positives = (selected_idx + 3) % 11
    selected = codebook[selected_idx]
    logits = selected @ codebook.T / 0.5
    logits[torch.arange(6), selected_idx] = float("-inf")
    want = F.cross_entropy(logits, positives)
    got = letter_ext.codebook_diversity_loss(selected, codebook, positives, selected_idx, 0.5)
    torch.testing.assert_close(got, want)


def test_info_nce_needs_one_positive_per_row():
    with pytest.raises(ValueError, match="h must have the B=3 rows"):
        letter_ext.info_nce(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"h \(torch.float64, cpu\) must have z's dtype and device \(torch.float32"):
        letter_ext.info_nce(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="h must have z's width d=2, got 5"):
        letter_ext.info_nce(torch.zeros(3, 2), torch.zeros(3, 5))


def test_info_nce_and_diversity_errors_name_their_own_arguments():
    z, h = torch.randn(4, 3), torch.randn(4, 3)
    bad = z.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="^z contains NaN or inf"):
        letter_ext.info_nce(bad, h)
    with pytest.raises(ValueError, match="^h contains NaN or inf"):
        letter_ext.info_nce(z, bad, symmetric=True)
    positives, selected_idx = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0])
    cases = [
        ((z, h, positives, positives), r"^positives\[0\] is excluded by selected_idx\[0\]"),
        ((z, h, torch.tensor([0, 1, 2, 9]), selected_idx), r"^positives must be in \[0, M=4\)"),
        ((z, h, positives, torch.tensor([1, 2, 3, 7])), r"^selected_idx must be in \[0, M=4\)"),
        ((z, h, positives.int(), selected_idx), "^positives must be an int64 tensor"),
        ((z, h, positives[:3], selected_idx), r"^positives must be \[B\] with B=4 \(the rows of selected\)"),
        ((z, h[:, :2], positives, selected_idx), "^codebook dim d=2 does not match selected dim d=3"),
        ((z, h[:0], positives, selected_idx), r"^codebook must have M >= 1 rows"),
        ((bad, h, positives, selected_idx), "^selected contains NaN or inf"),
        ((z.long(), h, positives, selected_idx), "^selected must be a floating-point tensor"),
    ]
    for args, message in cases:
        with pytest.raises((TypeError, ValueError), match=message):
            letter_ext.codebook_diversity_loss(*args)


def test_all_rows_ignored_mean_is_nan_like_torch():
    q, keys, targets, _, _ = make_inputs(3, 4, 2, seed=3)
    targets[:] = -100
    assert torch.isnan(letter_ext.dot_product_cross_entropy(q, keys, targets))
    assert letter_ext.dot_product_cross_entropy(q, keys, targets, reduction="sum") == 0


Q, K, T = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize(
    "args,kwargs,exc,words",
    [
        ((torch.zeros(3), K, T), {}, ValueError, "q must be"),
        ((Q, torch.zeros(5), T), {}, ValueError, "keys must be"),
        ((Q, torch.zeros(0, 4), T), {}, ValueError, "M >= 1"),
        ((Q, torch.zeros(5, 3), T), {}, ValueError, "does not match q dim"),
        ((Q, K.double(), T), {}, ValueError, "keys dtype"),
        ((Q, K.to("meta"), T), {}, ValueError, "keys is on"),
        ((Q.long(), K, T), {}, TypeError, "q must be a floating"),
        ((Q, K, T.int()), {}, TypeError, "targets must be an int64"),
        ((Q, K, T[:2]), {}, ValueError, "targets must be"),
        ((Q, K, torch.tensor([0, 5, 1])), {}, ValueError, "targets must be in"),
        ((Q, K, torch.tensor([0, -1, 1])), {}, ValueError, "targets must be in"),
        ((Q, K, T), {"temperature": 0.0}, ValueError, "temperature"),
        ((Q, K, T), {"temperature": -1.0}, ValueError, "temperature"),
        ((Q, K, T), {"temperature": "hot"}, TypeError, "temperature"),
        ((Q, K, T), {"reduction": "max"}, ValueError, "reduction"),
        ((Q, K, T), {"exclude": torch.tensor([1, 2, -2])}, ValueError, "exclude must be in"),
        ((Q, K, T), {"exclude": torch.tensor([1, 0, 2])}, ValueError, r"targets\[1\] is excluded"),
        ((Q, torch.zeros(1, 4), T), {"exclude": torch.tensor([-1, 0, -1])}, ValueError, "every key"),
        ((Q, K, T), {"exclude": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "exclude must be an int64"),
        ((Q, K, T), {"bias": torch.zeros(4)}, ValueError, "bias must be"),
        ((Q, K, T), {"bias": torch.zeros(5, dtype=torch.float64)}, ValueError, "bias dtype"),
        ((Q, K, T), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        ((torch.full((3, 4), float("nan")), K, T), {}, ValueError, "q contains NaN"),
        ((Q, K, T), {"bias": torch.full((5,), float("inf"))}, ValueError, "bias contains NaN"),
    ],
)
def test_bad_input(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        letter_ext.dot_product_cross_entropy(*args, **kwargs)


def run_backend(backend, q, keys, targets, excl, b, temperature, w, reduction="none", path=None):
    """Loss and gradients (q, keys, bias) of sum(loss * w) on one backend (and path)."""
    q = q.detach().clone().requires_grad_(True)
    keys = keys.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    loss = letter_ext.dot_product_cross_entropy(
        q, keys, targets, temperature=temperature, exclude=excl, bias=b, reduction=reduction, backend=backend,
        path=path,
    )
    (loss * w).sum().backward()
    return loss.detach(), q.grad, keys.grad, None if b is None else b.grad


def assert_matches_float64_reference(backend, device, B, M, d, exclude, bias, ignore, tau, seed, scale=1.0, rel=1e-4,
                                     path=None, reduction="none"):
    q, keys, targets, excl, b = make_inputs(B, M, d, seed=seed, exclude=exclude, bias=bias, ignore=ignore, scale=scale)
    w = torch.randn(B, generator=torch.Generator().manual_seed(seed + 1))
    if reduction != "none":
        w = w[:1]  # a reduced loss: one upstream weight
    want = run_backend("reference", q.double(), keys.double(), targets, excl, None if b is None else b.double(), tau,
                       w.double(), reduction)
    move = (lambda t: None if t is None else t.to(device))
    got = run_backend(backend, move(q), move(keys), move(targets), move(excl), move(b), tau, w.to(device), reduction,
                      path)
    for name, g, r in zip(("loss", "dq", "dkeys", "dbias"), got, want):
        if r is None:
            assert g is None, name
            continue
        assert torch.isfinite(g).all(), name
        # fp32 kernels: errors scale with the largest logit-sized quantity of the tensor.
        atol = rel * (r.abs().max().item() + 1.0)
        torch.testing.assert_close(g.cpu().double(), r, atol=atol, rtol=rel, msg=lambda m: f"{name}: {m}")


SIZES = [1, 2, 7, 129, 1000]
DIMS = [1, 31, 32, 128]
OPTIONS = list(itertools.product([False, True], repeat=3))  # (exclude, bias, ignore)
TAUS = [0.07, 0.7, 1.0]
# Every (B, M, d) of the grid, each with one (options, tau) variant so that all variants occur.
GRID = [
    (B, M, d, *OPTIONS[n % len(OPTIONS)], TAUS[n % len(TAUS)])
    for n, (B, M, d) in enumerate(itertools.product(SIZES, SIZES, DIMS))
]
# The Triton interpreter is slow on CPU: a sample covering every size, d and variant.
INTERPRETER_GRID = [c for n, c in enumerate(GRID) if n % 9 == 0 and c[0] * c[1] <= 129 * 1000]
CASES = [
    (backend, device, *case)
    for backend, device in BACKEND_DEVICE
    for case in (INTERPRETER_GRID if (backend, device) == ("triton", "cpu") else GRID)
]


@pytest.mark.parametrize("backend,device,B,M,d,exclude,bias,ignore,tau", CASES)
def test_matches_float64_reference(backend, device, B, M, d, exclude, bias, ignore, tau):
    seed = B * 1000003 + M * 1009 + d
    assert_matches_float64_reference(backend, device, B, M, d, exclude, bias, ignore, tau, seed)


# Every (options, tau) combination on one shape; the interpreter gets each option set once.
VARIANTS = [
    (backend, device, *options, tau)
    for backend, device in BACKEND_DEVICE
    for n, (options, tau) in enumerate(itertools.product(OPTIONS, TAUS))
    if (backend, device) != ("triton", "cpu") or n % len(TAUS) == (n // len(TAUS)) % len(TAUS)
]


@pytest.mark.parametrize("backend,device,exclude,bias,ignore,tau", VARIANTS)
def test_every_variant_on_one_shape(backend, device, exclude, bias, ignore, tau):
    assert_matches_float64_reference(backend, device, 70, 45, 33, exclude, bias, ignore, tau, seed=7)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_large_logits_stay_finite_and_correct(backend, device):
    # x100 inputs: logits around 1e5 / tau; a naive exp would overflow.
    assert_matches_float64_reference(backend, device, 129, 300, 32, True, True, True, 0.07, seed=8, scale=100.0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(backend, device, reduction):
    q, keys, targets, excl, b = make_inputs(40, 23, 16, seed=9, exclude=True, bias=True, ignore=True)
    want = run_backend("reference", q.double(), keys.double(), targets, excl, b.double(), 0.5, 1.0, reduction)
    got = run_backend(backend, q.to(device), keys.to(device), targets.to(device), excl.to(device), b.to(device), 0.5,
                      1.0, reduction)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_deterministic(backend, device):
    # Several row and key tiles of both kernels (kept small for the interpreter).
    q, keys, targets, excl, b = make_inputs(150, 270, 32, seed=10, exclude=True, bias=True, ignore=True)
    args = [t.to(device) for t in (q, keys, targets, excl, b)]
    w = torch.randn(150).to(device)
    first = run_backend(backend, *args, 0.07, w)
    second = run_backend(backend, *args, 0.07, w)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    if backend == "cpu":
        # Every output row belongs to one task: the thread count does not change a bit.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = run_backend(backend, *args, 0.07, w)
        finally:
            torch.set_num_threads(threads)
        for a, c in zip(first, single):
            assert torch.equal(a, c)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, device, dtype):
    q, keys, targets, excl, b = make_inputs(65, 40, 32, seed=11, exclude=True, bias=True, dtype=dtype)
    w = torch.randn(65)
    got = run_backend(backend, q.to(device), keys.to(device), targets.to(device), excl.to(device), b.to(device), 0.7,
                      w.to(device, dtype))
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype and got[3].dtype == dtype
    # fp32 accumulation: the only errors are the rounding of the outputs to dtype.
    want = run_backend("reference", q.double(), keys.double(), targets, excl, b.double(), 0.7, w.to(dtype).double())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), r, atol=2e-2 * (r.abs().max().item() + 1), rtol=2e-2)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_non_contiguous_inputs(backend, device):
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(30, 40, generator=gen).to(device)[::2, ::2]
    keys = torch.randn(20, 40, generator=gen).to(device).T[:17]
    targets = torch.randint(0, 17, (30,), generator=gen).to(device)[::2]
    assert not q.is_contiguous() and not keys.is_contiguous() and not targets.is_contiguous()
    got = letter_ext.dot_product_cross_entropy(q, keys, targets, reduction="none", backend=backend)
    want = letter_ext.dot_product_cross_entropy(q.contiguous(), keys.contiguous(), targets.contiguous(),
                                                reduction="none", backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_empty_batch(backend, device):
    q, keys = torch.zeros(0, 4, device=device, requires_grad=True), torch.randn(3, 4, device=device, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=device)
    loss = letter_ext.dot_product_cross_entropy(q, keys, targets, reduction="sum", backend=backend)
    loss.backward()
    assert loss.item() == 0 and keys.grad.abs().sum() == 0


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_wrappers_are_the_op(backend, device):
    gen = torch.Generator().manual_seed(13)
    z, h = torch.randn(20, 8, generator=gen).to(device), torch.randn(20, 8, generator=gen).to(device)
    for sym in (False, True):
        torch.testing.assert_close(
            letter_ext.info_nce(z, h, 0.2, sym, backend=backend).cpu(),
            letter_ext.info_nce(z.cpu(), h.cpu(), 0.2, sym, backend="reference"),
        )
    codebook = torch.randn(9, 8, generator=gen).to(device)
    idx = torch.randint(0, 9, (20,), generator=gen).to(device)
    pos = (idx + 1) % 9
    torch.testing.assert_close(
        letter_ext.codebook_diversity_loss(codebook[idx], codebook, pos, idx, 0.1, backend=backend).cpu(),
        letter_ext.codebook_diversity_loss(codebook[idx].cpu(), codebook.cpu(), pos.cpu(), idx.cpu(), 0.1,
                                           backend="reference"),
    )


@pytest.mark.parametrize("backend", ["reference"] + [b for b in BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    q, keys, targets, excl, b = make_inputs(6, 7, 3, seed=14, exclude=True, bias=True, ignore=True,
                                            dtype=torch.float64)

    def f(q, keys, b):
        return letter_ext.dot_product_cross_entropy(
            q, keys, targets, temperature=0.7, exclude=excl, bias=b, reduction="none", backend=backend
        )

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_(True) for t in (q, keys, b)))


def _op_args(requires_grad=True):
    q, keys, targets, excl, b = make_inputs(9, 11, 6, seed=15, exclude=True, bias=True, ignore=True)
    for t in (q, keys, b):
        t.requires_grad_(requires_grad)
    return q, keys, targets, excl, b


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
def test_opcheck():
    q, keys, targets, excl, b = _op_args()
    fwd = torch.ops.letter.dot_product_cross_entropy_fwd.default
    bwd = torch.ops.letter.dot_product_cross_entropy_bwd.default
    torch.library.opcheck(fwd, (q, keys, targets, excl, b, 0.7, -100))
    _, lse = fwd(q, keys, targets, excl, b, 0.7, -100)
    grad_rows = torch.randn(9)
    torch.library.opcheck(bwd, (grad_rows, q.detach(), keys.detach(), targets, excl, b.detach(), lse, 0.7, -100))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_opcheck_other_dtypes_and_strides(dtype):
    # the fakes must give the kernels' dtypes (rows and lse in the accumulation dtype, gradients
    # in the inputs') and contiguous gradients for strided inputs
    _, _, targets, excl, _ = _op_args()
    gen = torch.Generator().manual_seed(16)
    q = torch.randn(6, 9, generator=gen, dtype=dtype).T.requires_grad_()
    keys = torch.randn(6, 11, generator=gen, dtype=dtype).T.requires_grad_()
    b = torch.randn(22, generator=gen, dtype=dtype)[::2].requires_grad_()
    fwd = torch.ops.letter.dot_product_cross_entropy_fwd.default
    torch.library.opcheck(fwd, (q, keys, targets, excl, b, 0.7, -100))
    _, lse = fwd(q, keys, targets, excl, b, 0.7, -100)
    grad_rows = torch.randn(18, generator=gen, dtype=lse.dtype)[::2]
    inputs = (q.detach(), keys.detach(), targets, excl, b.detach())
    torch.library.opcheck(torch.ops.letter.dot_product_cross_entropy_bwd.default,
                          (grad_rows, *inputs, lse, 0.7, -100))
    for rows in (None, grad_rows):
        torch.library.opcheck(torch.ops.letter.dot_product_cross_entropy_chunked.default,
                              (*inputs, 0.7, -100, rows))


@pytest.mark.parametrize("device", devices())
def test_opcheck_triton(device):
    if "triton" not in available_backends("dot_product_cross_entropy_fwd", device):
        pytest.skip("triton not usable here")
    q, keys, targets, excl, b = (t.to(device).detach().requires_grad_(t.requires_grad) for t in _op_args())
    kwargs = {}
    if device == "cpu":
        # The interpreter cannot run a traced (fake-tensor) launch on CPU; on CUDA all checks run.
        kwargs["test_utils"] = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        torch.ops.letter.dot_product_cross_entropy_fwd_triton.default, (q, keys, targets, excl, b, 0.7, -100), **kwargs
    )


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
def test_compiled_op_checks_indices_itself():
    # Called directly (no Python checks), out-of-range indices must not reach the kernel's memory reads.
    q, keys = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="targets out of range"):
        torch.ops.letter.dot_product_cross_entropy_fwd(q, keys, torch.tensor([0, 9, 1]), None, None, 1.0, -100)
    with pytest.raises(ValueError, match="exclude out of range"):
        torch.ops.letter.dot_product_cross_entropy_fwd(q, keys, torch.tensor([0, 1, 1]), torch.tensor([5, -1, -1]),
                                                       None, 1.0, -100)


def test_auto_backend_is_the_compiled_kernel_when_built():
    from letter_ext._backend import resolve

    expected = "cpu" if "cpu" in BACKENDS else "reference"
    assert resolve("dot_product_cross_entropy_fwd", torch.device("cpu"), None) == expected


# -- the two CPU paths (tile, chunked) on every instruction set this machine runs ----------------

CPU_PATH_SHAPES = [  # (B, M, d): odd sizes around the kernels' blocks, d up to 4096
    (1, 1, 1), (7, 255, 33), (257, 7, 4096), (255, 257, 128), (64, 1031, 17),
]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
@pytest.mark.parametrize("force_isa", forced_isas(), indirect=True)
@pytest.mark.parametrize("path", ["tile", "chunked"])
@pytest.mark.parametrize("B,M,d", CPU_PATH_SHAPES)
def test_every_cpu_path_and_isa_matches_reference(force_isa, path, B, M, d):
    for n, (reduction, tau) in enumerate([("none", 0.07), ("mean", 1.0), ("sum", 0.7)]):
        options = OPTIONS[(n + B + d) % len(OPTIONS)] if B > 1 and M > 1 else (False, True, False)
        assert_matches_float64_reference("cpu", "cpu", B, M, d, *options, tau, seed=B + M + d + n, path=path,
                                         reduction=reduction)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
@pytest.mark.parametrize("force_isa", forced_isas(), indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_path_across_chunk_boundaries(force_isa, reduction):
    # 32 MiB chunks hold 254 rows of M = 33,000 fp32 logits: rows 0-253, 254-507, 508-519. The
    # middle chunk has only ignored rows; its neighbours have ignored rows at their edges.
    B, M, d = 520, 33000, 3
    q, keys, targets, excl, b = make_inputs(B, M, d, seed=20, exclude=True, bias=True)
    targets[254:508] = -100
    targets[[0, 253, 508, 519]] = -100
    w = torch.randn(B, generator=torch.Generator().manual_seed(21)) if reduction == "none" else torch.ones(1)
    want = run_backend("reference", q.double(), keys.double(), targets, excl, b.double(), 0.5, w.double(), reduction)
    for path in ("chunked", "tile"):
        got = run_backend("cpu", q, keys, targets, excl, b, 0.5, w, reduction, path)
        for name, g, r in zip(("loss", "dq", "dkeys", "dbias"), got, want):
            torch.testing.assert_close(g.double(), r, atol=1e-4 * (r.abs().max().item() + 1), rtol=1e-4,
                                       msg=lambda m: f"{path} {name}: {m}")
        assert got[1][254:508].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
@pytest.mark.parametrize("force_isa", forced_isas(), indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_path_bf16_matches_reference_within_bf16_rounding(force_isa, reduction):
    # bf16 inputs: bf16 GEMMs where bf16_gemms() (logits rounded to bf16 like eager F.linear; the
    # dkeys update in blocks of 4,096 keys: M = 9,000 spans three), else fp32 GEMMs on the bf16
    # values. Either way within bf16 rounding of the float64 reference on the same bf16 values.
    from letter_ext._backend import bf16_gemms

    B, M, d = 200, 9000, 40
    q, keys, targets, excl, b = make_inputs(B, M, d, seed=22, exclude=True, bias=True, ignore=True, scale=0.4)
    q, keys, b = q.bfloat16(), keys.bfloat16(), b.bfloat16()
    w = torch.randn(B, generator=torch.Generator().manual_seed(23)) if reduction == "none" else torch.ones(1)
    got = run_backend("cpu", q, keys, targets, excl, b, 0.5, w.bfloat16(), reduction, "chunked")
    want = run_backend("reference", q.double(), keys.double(), targets, excl, b.double(), 0.5, w.double(), reduction)
    assert got[0].dtype == got[1].dtype == got[2].dtype == got[3].dtype == torch.bfloat16
    for name, g, r in zip(("loss", "dq", "dkeys", "dbias"), got, want):
        torch.testing.assert_close(g.double(), r, atol=2e-2 * (r.abs().max().item() + 1e-3), rtol=2e-2,
                                   msg=lambda m: f"{name} (bf16 GEMMs: {bf16_gemms()}): {m}")


@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_chunked_torch_kernel_matches_reference(chunk_rows):
    # The CUDA kernel of the chunked path is plain torch: checked here on CPU, chunks of a few rows.
    B, M, d = 67, 45, 9
    q, keys, targets, excl, b = make_inputs(B, M, d, seed=22, exclude=True, bias=True, ignore=True)
    targets[5:10] = -100  # a whole chunk of ignored rows at chunk_rows = 5
    g = torch.randn(B, generator=torch.Generator().manual_seed(23))
    loss, lse, dq, dk, db = chunked_torch(q, keys, targets, excl, b, 0.3, -100, g, chunk_bytes=chunk_rows * M * 4)
    q64, k64, b64 = (t.double().requires_grad_(True) for t in (q, keys, b))
    rows, rlse = letter_ext.reference.dot_product_cross_entropy_rows(q64, k64, targets, 0.3, excl, b64, -100)
    (rows * g.double()).sum().backward()
    for got, want in ((loss, rows), (lse, rlse), (dq, q64.grad), (dk, k64.grad), (db, b64.grad)):
        torch.testing.assert_close(got.double(), want.detach(), atol=1e-4 * (want.abs().max().item() + 1), rtol=1e-4)
    without = chunked_torch(q, keys, targets, excl, b, 0.3, -100, None, chunk_bytes=chunk_rows * M * 4)
    assert torch.equal(without[0], loss) and without[2].numel() == 0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("path", ["tile", "chunked"])
def test_gradcheck_float64_each_path(path, reduction):
    q, keys, targets, excl, b = make_inputs(6, 7, 3, seed=24, exclude=True, bias=True, ignore=True,
                                            dtype=torch.float64)

    def f(q, keys, b):
        return letter_ext.dot_product_cross_entropy(q, keys, targets, temperature=0.7, exclude=excl, bias=b,
                                                    reduction=reduction, backend="cpu", path=path)

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_(True) for t in (q, keys, b)))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
@pytest.mark.parametrize("force_isa", forced_isas(), indirect=True)
def test_opcheck_chunked(force_isa):
    q, keys, targets, excl, b = (t.detach() if t.is_floating_point() else t for t in _op_args())
    op = torch.ops.letter.dot_product_cross_entropy_chunked.default
    for grad_rows in (None, torch.randn(9)):
        torch.library.opcheck(op, (q, keys, targets, excl, b, 0.7, -100, grad_rows))
        torch.library.opcheck(op, (q, keys, targets, None, None, 0.7, -100, grad_rows))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
@pytest.mark.parametrize("path", ["tile", "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_raises_on_fused_paths(path, reduction):
    q, keys, targets, *_ = _op_args()
    loss = letter_ext.dot_product_cross_entropy(q, keys, targets, reduction=reduction, backend="cpu", path=path)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss.sum(), q, create_graph=True)
    # The reference materializes the logits and differentiates twice through plain autograd.
    loss = letter_ext.dot_product_cross_entropy(q.double(), keys.double(), targets, reduction=reduction,
                                                backend="reference")
    (dq,) = torch.autograd.grad(loss.sum(), q, create_graph=True)
    assert dq.requires_grad
    assert DOUBLE_BACKWARD_ERROR.startswith("dot_product_cross_entropy")


def test_path_argument_is_checked():
    q, keys, targets, *_ = make_inputs(3, 4, 2, seed=25)
    with pytest.raises(ValueError, match="path must be one of"):
        letter_ext.dot_product_cross_entropy(q, keys, targets, path="blas")
    with pytest.raises(ValueError, match="path='chunked' runs on"):
        letter_ext.dot_product_cross_entropy(q, keys, targets, path="chunked", backend="reference")


@pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in available_backends("dot_product_cross_entropy_fwd", "cuda"),
    reason="no CUDA backend here",
)
@pytest.mark.parametrize("path", ["tile", "chunked"])
@pytest.mark.parametrize("B,M,d", CPU_PATH_SHAPES)
def test_cuda_paths_match_reference(path, B, M, d):
    options = (True, True, True) if B > 1 and M > 1 else (False, True, False)
    for reduction in ("none", "mean"):
        assert_matches_float64_reference("cuda", "cuda", B, M, d, *options, 0.07, seed=B + M + d, path=path,
                                         reduction=reduction)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
def test_chunked_reduced_loss_backward_twice():
    # The gradients computed in the forward pass serve any number of backward calls and scales.
    q, keys, targets, *_ = _op_args()
    want = run_backend("reference", q.double(), keys.double(), targets, None, None, 1.0, torch.ones(1), "mean")
    loss = letter_ext.dot_product_cross_entropy(q, keys, targets, backend="cpu", path="chunked")
    (2 * loss).backward(retain_graph=True)
    torch.testing.assert_close(q.grad.double(), 2 * want[1], atol=1e-5, rtol=1e-4)
    q.grad = None
    loss.backward()
    torch.testing.assert_close(q.grad.double(), want[1], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled kernel")
def test_fake_outputs_are_contiguous_like_the_kernels_for_non_contiguous_inputs():
    # The kernels return contiguous gradients whatever the inputs' strides; the fake (meta)
    # registration must say the same, or torch.compile plans for strides the kernel never writes.
    gen = torch.Generator().manual_seed(26)
    q = torch.randn(6, 5, generator=gen).T
    keys = torch.randn(6, 7, generator=gen).T
    targets = torch.randint(0, 7, (5,), generator=gen)
    bias = torch.randn(14, generator=gen)[::2]
    assert not q.is_contiguous() and not keys.is_contiguous() and not bias.is_contiguous()
    _, lse = torch.ops.letter.dot_product_cross_entropy_fwd(q, keys, targets, None, bias, 0.7, -100)
    torch.library.opcheck(torch.ops.letter.dot_product_cross_entropy_bwd.default,
                          (torch.randn(5, generator=gen), q, keys, targets, None, bias, lse, 0.7, -100))
    torch.library.opcheck(torch.ops.letter.dot_product_cross_entropy_chunked.default,
                          (q, keys, targets, None, bias, 0.7, -100, torch.randn(5, generator=gen)))
