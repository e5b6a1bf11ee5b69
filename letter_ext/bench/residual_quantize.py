"""Benchmark of residual_quantize: torch-eager (cdist + argmin per level) vs every backend, on CPU
once per instruction set the machine runs (cpu_avx2, cpu_avx512: letter_ext.set_isa), and the fp32
GEMM rates (a square 1024^3 GEMM: the ceiling; and x @ C_l^T per level, the same multiply-adds)."""
import torch

from .._backend import has_compiled_op, triton_usable
from ..residual_quantize import residual_quantize
from .common import bench_isas, interleaved_medians, with_isa

L, N, D = 4, 256, 32
SQUARE = 1024  # side of the GEMM that measures the BLAS's fp32 rate


def eager_baseline(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """What a plain PyTorch RQ-VAE does: full distance matrix and argmin, level by level."""
    r = x
    codes = []
    for level in codebooks:
        code = torch.cdist(r, level).argmin(1)
        codes.append(code)
        r = r - level[code]
    return torch.stack(codes, 1)


def run(device: torch.device, quick: bool = False) -> list[dict]:
    sizes = [4096] if quick else [4096, 65536, 262144]
    backends = []  # (label, backend, forced ISA or None)
    if has_compiled_op("residual_quantize", device.type):
        if device.type == "cpu":
            backends += [(f"cpu_{name}", "cpu", name) for name in bench_isas()]
        else:
            backends.append((device.type, device.type, None))
    if triton_usable(device) and device.type == "cuda":
        backends.append(("triton", "triton", None))
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    square = torch.randn(SQUARE, SQUARE, generator=gen).to(device)
    for B in sizes:
        x = torch.randn(B, D, generator=gen).to(device)
        cb = torch.randn(L, N, D, generator=gen).to(device)
        flops = 2.0 * B * L * N * D
        # Every method interleaved (see interleaved_medians), so the ratios are fair on a shared machine.
        fns = {"eager": lambda: eager_baseline(x, cb)}
        if device.type == "cpu":
            # The BLAS's fp32 rate: on a compute-bound square GEMM (the ceiling), and on the same
            # multiply-adds as x @ C_l^T (memory-bound: it writes the B x N distances).
            fns["square_gemm"] = lambda: square @ square
            fns["gemm_same_shape"] = lambda: [x @ level.T for level in cb]
        for label, be, forced in backends:
            fns[label] = with_isa(forced, lambda be=be: residual_quantize(x, cb, backend=be)[0])
        times = interleaved_medians(fns, device)
        t_eager = times.pop("eager")
        ref_codes = eager_baseline(x, cb)
        row = {"B": B, "d": D, "L": L, "N": N, "eager_ms": t_eager * 1e3}
        if device.type == "cpu":
            row["gemm_gflops"] = 2.0 * SQUARE**3 / times.pop("square_gemm") / 1e9
            row["gemm_same_shape_gflops"] = flops / times.pop("gemm_same_shape") / 1e9
        for label, be, forced in backends:
            t = times[label]
            codes = fns[label]()
            row[f"{label}_ms"] = t * 1e3
            row[f"{label}_speedup"] = t_eager / t
            row[f"{label}_codes_equal_eager"] = float((codes == ref_codes).float().mean())
            row[f"{label}_gflops"] = flops / t / 1e9
            if "gemm_gflops" in row:
                row[f"{label}_vs_gemm"] = row[f"{label}_gflops"] / row["gemm_gflops"]
        rows.append(row)
    return rows
