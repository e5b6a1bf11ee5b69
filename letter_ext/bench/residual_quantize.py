"""Benchmark of residual_quantize: torch-eager (cdist + argmin per level) vs every backend."""
import torch

from .._backend import has_compiled_op, triton_usable
from ..residual_quantize import residual_quantize
from .common import median_time

L, N, D = 4, 256, 32


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
    backends = []
    if has_compiled_op("residual_quantize", device.type):
        backends.append(device.type)
    if triton_usable(device) and device.type == "cuda":
        backends.append("triton")
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for B in sizes:
        x = torch.randn(B, D, generator=gen).to(device)
        cb = torch.randn(L, N, D, generator=gen).to(device)
        t_eager = median_time(lambda: eager_baseline(x, cb), device)
        ref_codes = eager_baseline(x, cb)
        flops = 2.0 * B * L * N * D
        row = {"B": B, "d": D, "L": L, "N": N, "eager_ms": t_eager * 1e3}
        for be in backends:
            t = median_time(lambda: residual_quantize(x, cb, backend=be), device)
            codes, _ = residual_quantize(x, cb, backend=be)
            row[f"{be}_ms"] = t * 1e3
            row[f"{be}_speedup"] = t_eager / t
            row[f"{be}_codes_equal_eager"] = float((codes == ref_codes).float().mean())
            row[f"{be}_gflops"] = flops / t / 1e9
        rows.append(row)
    return rows
