"""Triton kernels of dot_product_cross_entropy, Inf-CL style: the B x M logits exist only as tiles.

- forward: one program per BLOCK_B rows streams the keys in BLOCK_M tiles with an online logsumexp
  and picks the target logit out of the tile it falls in; only lse [B] is stored.
- backward: dq per row block (loop over key tiles) and, in a separate kernel, dkeys/dbias per key
  block (loop over row tiles), both recomputing P = exp(logits - lse). Every output element is
  written by exactly one program, so results are deterministic (no atomics).
logits_ij = q'_i . k_j + b'_j with q' = q / tau, b' = bias / tau; all math in fp32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _logit_tile(q, k_ptr, bias_ptr, excl, offs_m, offs_d, M, D, HAS_BIAS: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                inv_tau):
    """Logits of a [BLOCK_B] x [BLOCK_M] tile (q already scaled by 1/tau); -inf outside the softmax."""
    m_ok = offs_m < M
    k = tl.load(k_ptr + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    # ieee: TF32 would cost ~3 decimal digits, amplified by small temperatures.
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    if HAS_BIAS:
        s += tl.load(bias_ptr + offs_m, mask=m_ok, other=0.0)[None, :] * inv_tau
    keep = m_ok[None, :]
    if HAS_EXCLUDE:
        keep = keep & (offs_m[None, :] != excl[:, None])
    return tl.where(keep, s, float("-inf")), k


@triton.jit
def _load_exclude(excl_ptr, rows, row_ok, BLOCK_B: tl.constexpr, HAS_EXCLUDE: tl.constexpr):
    if HAS_EXCLUDE:
        excl = tl.load(excl_ptr + rows, mask=row_ok, other=-1)
    else:
        excl = tl.full((BLOCK_B,), -1, dtype=tl.int64)
    return excl


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, t_ptr, excl_ptr, bias_ptr, loss_ptr, lse_ptr, B, M, D, inv_tau, ignore_index,
                HAS_BIAS: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    q = q * inv_tau
    t = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    excl = _load_exclude(excl_ptr, rows, row_ok, BLOCK_B, HAS_EXCLUDE)
    run_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        s, _ = _logit_tile(q, k_ptr, bias_ptr, excl, offs_m, offs_d, M, D, HAS_BIAS, HAS_EXCLUDE, inv_tau)
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        # A row whose keys so far are all excluded keeps max -inf; shift by 0 there to avoid inf - inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        run_max = new_max
        target_logit += tl.sum(tl.where(offs_m[None, :] == t[:, None], s, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(t != ignore_index, lse - target_logit, 0.0), mask=row_ok)


@triton.jit
def _dscores(s, lse, g, t, offs_m):
    """dS = g * (softmax - onehot(target)) for a tile; g is 0 on ignored rows."""
    p = tl.exp(s - lse[:, None])
    return g[:, None] * (p - tl.where(offs_m[None, :] == t[:, None], 1.0, 0.0))


@triton.jit
def _bwd_q_kernel(q_ptr, k_ptr, t_ptr, excl_ptr, bias_ptr, lse_ptr, g_ptr, dq_ptr, B, M, D, inv_tau, ignore_index,
                  HAS_BIAS: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    qd_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0) * inv_tau
    t = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    excl = _load_exclude(excl_ptr, rows, row_ok, BLOCK_B, HAS_EXCLUDE)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))  # padding rows: P = 0
    g = tl.where(t != ignore_index, tl.load(g_ptr + rows, mask=row_ok, other=0.0), 0.0)
    dq = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        s, k = _logit_tile(q, k_ptr, bias_ptr, excl, offs_m, offs_d, M, D, HAS_BIAS, HAS_EXCLUDE, inv_tau)
        ds = _dscores(s, lse, g, t, offs_m)
        dq += tl.dot(ds, k, input_precision="ieee")
    tl.store(dq_ptr + rows[:, None] * D + offs_d[None, :], dq * inv_tau, mask=qd_mask)


@triton.jit
def _bwd_keys_kernel(q_ptr, k_ptr, t_ptr, excl_ptr, bias_ptr, lse_ptr, g_ptr, dk_ptr, dbias_ptr, B, M, D, inv_tau,
                     ignore_index, HAS_BIAS: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D),
                    other=0.0) * inv_tau
        t = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
        excl = _load_exclude(excl_ptr, rows, row_ok, BLOCK_B, HAS_EXCLUDE)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))  # padding rows: P = 0
        g = tl.where(t != ignore_index, tl.load(g_ptr + rows, mask=row_ok, other=0.0), 0.0)
        s, _ = _logit_tile(q, k_ptr, bias_ptr, excl, offs_m, offs_d, M, D, HAS_BIAS, HAS_EXCLUDE, inv_tau)
        ds = _dscores(s, lse, g, t, offs_m)
        dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        dbias += tl.sum(ds, axis=0)
    m_ok = offs_m < M
    tl.store(dk_ptr + offs_m[:, None] * D + offs_d[None, :], dk, mask=m_ok[:, None] & (offs_d[None, :] < D))
    if HAS_BIAS:
        tl.store(dbias_ptr + offs_m, dbias * inv_tau, mask=m_ok)


def _launch_config(D: int) -> dict:
    block_d = max(16, triton.next_power_of_2(D))
    block = 64 if block_d <= 64 else 32
    return {"BLOCK_B": block, "BLOCK_M": block, "BLOCK_D": block_d}


def _prepare(q, keys, targets, exclude, bias):
    qf, kf = q.float().contiguous(), keys.float().contiguous()
    tc = targets.contiguous()
    # Absent optional inputs: any valid pointer; the constexpr flags keep the kernels from reading it.
    ec = exclude.contiguous() if exclude is not None else tc
    bf = bias.float().contiguous() if bias is not None else qf
    return qf, kf, tc, ec, bf


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def forward(q, keys, targets, exclude, bias, temperature: float, ignore_index: int):
    """(loss_rows, lse) [B], the outputs of letter::dot_product_cross_entropy_fwd."""
    B, D = q.shape
    M = keys.shape[0]
    qf, kf, tc, ec, bf = _prepare(q, keys, targets, exclude, bias)
    loss = torch.empty(B, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, dtype=torch.float32, device=q.device)
    if B > 0:
        cfg = _launch_config(D)
        grid = (triton.cdiv(B, cfg["BLOCK_B"]),)
        torch.library.wrap_triton(_fwd_kernel)[grid](
            qf, kf, tc, ec, bf, loss, lse, B, M, D, 1.0 / temperature, ignore_index,
            HAS_BIAS=bias is not None, HAS_EXCLUDE=exclude is not None, **cfg,
        )
    return loss.to(_acc_dtype(q)), lse.to(_acc_dtype(q))


def backward(grad_rows, q, keys, targets, exclude, bias, lse, temperature: float, ignore_index: int):
    """(dq, dkeys, dbias), the outputs of letter::dot_product_cross_entropy_bwd (dbias empty without bias)."""
    B, D = q.shape
    M = keys.shape[0]
    qf, kf, tc, ec, bf = _prepare(q, keys, targets, exclude, bias)
    g = grad_rows.float().contiguous()
    lse_f = lse.float().contiguous()
    dq = torch.zeros((B, D), dtype=torch.float32, device=q.device)
    dk = torch.zeros((M, D), dtype=torch.float32, device=q.device)
    dbias = torch.zeros(M if bias is not None else 0, dtype=torch.float32, device=q.device)
    if B > 0:
        cfg = _launch_config(D)
        flags = {"HAS_BIAS": bias is not None, "HAS_EXCLUDE": exclude is not None, **cfg}
        torch.library.wrap_triton(_bwd_q_kernel)[(triton.cdiv(B, cfg["BLOCK_B"]),)](
            qf, kf, tc, ec, bf, lse_f, g, dq, B, M, D, 1.0 / temperature, ignore_index, **flags,
        )
        torch.library.wrap_triton(_bwd_keys_kernel)[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            qf, kf, tc, ec, bf, lse_f, g, dk, dbias if bias is not None else dk, B, M, D, 1.0 / temperature,
            ignore_index, **flags,
        )
    dbias = dbias.to(bias.dtype) if bias is not None else q.new_empty((0,))
    return dq.to(q.dtype), dk.to(keys.dtype), dbias
