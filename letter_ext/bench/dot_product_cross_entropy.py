"""Benchmark of dot_product_cross_entropy, forward + backward: torch-eager vs the fused backends.

Baseline: `F.cross_entropy(q @ keys.T / tau, targets)` in eager PyTorch, which materializes the
B x M logits (and their gradient). Peak extra memory of one forward+backward beyond the inputs:
on CUDA torch.cuda.max_memory_allocated; on CPU the peak resident set (VmHWM, reset through
/proc/self/clear_refs) of a fresh subprocess, since tracemalloc does not see torch's or the C++
kernel's allocations. Calls too slow to repeat on a small CPU are timed once, in that subprocess.
"""
import json
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from .._backend import has_compiled_op, triton_usable
from ..dot_product_cross_entropy import dot_product_cross_entropy
from .common import median_time, sync

TEMPERATURE = 0.07
# (B, M, d) of the issue.
SHAPES = [
    (4096, 4096, 32),
    (16384, 16384, 32),
    (65536, 65536, 32),
    (8192, 256, 32),
    (8192, 1030, 128),
    (8192, 32128, 128),
]
QUICK_SHAPES = [(4096, 4096, 32), (8192, 256, 32)]
# On CPU the eager baseline is skipped above this many logits (B*M*4 bytes, several copies).
CPU_EAGER_MAX_LOGITS = 16384 * 32128
# On CPU, calls above this many multiply-adds per pass are timed once instead of repeated.
CPU_REPEAT_MAX_MACS = 8192 * 1030 * 128


def make_inputs(B: int, M: int, d: int, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, d, generator=gen).to(device).requires_grad_(True)
    keys = torch.randn(M, d, generator=gen).to(device).requires_grad_(True)
    targets = torch.randint(0, M, (B,), generator=gen).to(device)
    return q, keys, targets


def eager_loss(q, keys, targets):
    return F.cross_entropy(q @ keys.T / TEMPERATURE, targets)


def step(backend: str, q, keys, targets) -> torch.Tensor:
    """One forward + backward; returns the (detached) loss."""
    q.grad = keys.grad = None
    if backend == "eager":
        loss = eager_loss(q, keys, targets)
    else:
        loss = dot_product_cross_entropy(q, keys, targets, temperature=TEMPERATURE, backend=backend)
    loss.backward()
    return loss.detach()


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def single_run(backend: str, B: int, M: int, d: int, device: torch.device) -> dict:
    """Time and peak extra memory of one forward + backward (run in a fresh process on CPU)."""
    q, keys, targets = make_inputs(B, M, d, device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_bytes()
    t0 = time.perf_counter()
    loss = step(backend, q, keys, targets)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _vm_hwm_bytes()
    return {"seconds": seconds, "peak_extra_bytes": max(0, peak - base), "loss": float(loss)}


def _single_run_subprocess(backend: str, B: int, M: int, d: int) -> dict:
    cmd = [sys.executable, "-m", "letter_ext.bench.dot_product_cross_entropy", backend, str(B), str(M), str(d)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(backend: str, B: int, M: int, d: int, device: torch.device) -> dict:
    """{'ms', 'extra_MiB', 'loss', 'timing'} of one backend on one shape."""
    if device.type == "cuda":
        once = single_run(backend, B, M, d, device)
    else:
        once = _single_run_subprocess(backend, B, M, d)
    out = {"extra_MiB": once["peak_extra_bytes"] / 2**20, "loss": once["loss"]}
    if device.type == "cpu" and B * M * d > CPU_REPEAT_MAX_MACS:
        out["ms"], out["timing"] = once["seconds"] * 1e3, "single run"
    else:
        q, keys, targets = make_inputs(B, M, d, device)
        out["ms"] = median_time(lambda: step(backend, q, keys, targets), device) * 1e3
        out["timing"] = "median"
    return out


def run(device: torch.device, quick: bool = False) -> list[dict]:
    backends = []
    if device.type == "cpu" and has_compiled_op("dot_product_cross_entropy_fwd", "cpu"):
        backends.append("cpu")
    if device.type == "cuda" and triton_usable(device):
        backends.append("triton")  # there is no hand-written CUDA kernel for this op
    rows = []
    for B, M, d in QUICK_SHAPES if quick else SHAPES:
        row = {"B": B, "M": M, "d": d}
        eager = None
        if device.type == "cuda" or B * M <= CPU_EAGER_MAX_LOGITS:
            try:
                eager = measure("eager", B, M, d, device)
            except (torch.OutOfMemoryError, subprocess.CalledProcessError) as e:
                row["eager_error"] = type(e).__name__
        if eager is not None:
            row.update({"eager_ms": eager["ms"], "eager_extra_MiB": eager["extra_MiB"]})
        else:
            row.setdefault("eager_error", "skipped: logits too large for this CPU")
        for be in backends:
            res = measure(be, B, M, d, device)
            row[f"{be}_ms"] = res["ms"]
            row[f"{be}_extra_MiB"] = res["extra_MiB"]
            row[f"{be}_timing"] = res["timing"]
            if eager is not None:
                row[f"{be}_speedup"] = eager["ms"] / res["ms"]
                row[f"{be}_mem_ratio"] = res["extra_MiB"] / max(eager["extra_MiB"], 1e-9)
                row[f"{be}_loss_rel_diff"] = abs(res["loss"] - eager["loss"]) / abs(eager["loss"])
        rows.append(row)
    return rows


if __name__ == "__main__":
    # Child process of a CPU measurement: `python -m letter_ext.bench.dot_product_cross_entropy BACKEND B M d`.
    backend_arg, *dims = sys.argv[1:]
    print(json.dumps(single_run(backend_arg, *map(int, dims), torch.device("cpu"))))
