"""Benchmark of dot_product_cross_entropy, forward + backward: torch-eager vs the fused backends,
each path separately (CPU: cpu_tile and cpu_chunked; CUDA: triton (tile) and cuda_chunked).

Baseline: `F.cross_entropy(F.linear(q, keys).float() / tau, targets)` in eager PyTorch (what an HF
causal LM's loss does), which materializes the B x M logits (and their gradient). Peak extra
memory of one forward+backward beyond the inputs: on CUDA torch.cuda.max_memory_allocated; on
CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) of a fresh subprocess,
since tracemalloc does not see torch's or the C++ kernel's allocations. Calls too slow to repeat on a small CPU are timed once, in that subprocess.
"""
import json
import subprocess
import sys
import time

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._backend import bf16_gemms, has_compiled_op, triton_usable
from ..dot_product_cross_entropy import dot_product_cross_entropy
from .common import interleaved_medians, peak_rss_bytes, rss_bytes, sync

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


@dataclass(frozen=True)
class Case:
    """One benchmark input: B queries x M keys of dimension d. dtype: of q and keys on CUDA, and on
    a CPU with bf16 GEMMs for bfloat16 (bf16_gemms(); other CPUs run float32); key_std: scale of the
    random keys; temperature: tau."""

    B: int
    M: int
    d: int
    name: str = ""
    temperature: float = TEMPERATURE
    dtype: str = "float32"
    key_std: float = 1.0

    def args(self) -> list[str]:
        return [str(self.B), str(self.M), str(self.d), repr(self.temperature), self.dtype, repr(self.key_std)]


# LC-Rec's ranking-guided loss at the output layer of LLaMA-7B: 8,192 response tokens (a batch of
# prompts' last positions) against the 32,000-token vocabulary + 4 x 256 identifier tokens, in bf16
# as LC-Rec trains (on GPU, and on a CPU with AMX/AVX512-BF16), tau = 1; keys scaled like a trained
# output layer (std d^-1/2).
LLAMA7B_LM_HEAD = Case(8192, 33024, 4096, name="llama7b_lm_head", temperature=1.0, dtype="bfloat16",
                       key_std=4096**-0.5)
# The same head in float32.
LLAMA7B_LM_HEAD_FP32 = Case(8192, 33024, 4096, name="llama7b_lm_head_fp32", temperature=1.0, dtype="float32",
                            key_std=4096**-0.5)
LLM_CASES = [LLAMA7B_LM_HEAD, LLAMA7B_LM_HEAD_FP32]


def llm_cases(device: torch.device) -> list[Case]:
    """The LLM cases this device runs: both on CUDA and on a CPU with bf16 GEMMs; elsewhere the
    float32 one only (a bf16 case would run in float32 there)."""
    if device.type == "cpu" and not bf16_gemms():
        return [LLAMA7B_LM_HEAD_FP32]
    return LLM_CASES
# On CPU the eager baseline is skipped above this many logits (B*M*4 bytes, several copies).
CPU_EAGER_MAX_LOGITS = 16384 * 32128
# On CPU the tile path is not timed above this d: it is an order of magnitude slower than the BLAS
# there (docs/BENCHMARKS.md), and one LLaMA-7B-head call takes minutes.
CPU_TILE_MAX_D = 1024
# On CPU, calls above this many multiply-adds per pass are timed once instead of repeated.
CPU_REPEAT_MAX_MACS = 8192 * 1030 * 128


def _as_case(case) -> Case:
    return case if isinstance(case, Case) else Case(*case)


def _dtype(case: Case, device: torch.device) -> torch.dtype:
    if device.type == "cuda" or (case.dtype == "bfloat16" and bf16_gemms()):
        return getattr(torch, case.dtype)
    return torch.float32


def make_inputs(case, device: torch.device):
    case = _as_case(case)
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = _dtype(case, device)
    q = torch.randn(case.B, case.d, generator=gen).to(device, dtype).requires_grad_(True)
    keys = (torch.randn(case.M, case.d, generator=gen) * case.key_std).to(device, dtype).requires_grad_(True)
    targets = torch.randint(0, case.M, (case.B,), generator=gen).to(device)
    return q, keys, targets


def eager_loss(q, keys, targets, temperature: float = TEMPERATURE):
    return F.cross_entropy(F.linear(q, keys).float() / temperature, targets)


def step(arm: str, q, keys, targets, temperature: float = TEMPERATURE) -> torch.Tensor:
    """One forward + backward of an arm ('eager', or BACKEND[_PATH] as 'cpu_chunked'); returns the
    (detached) loss."""
    q.grad = keys.grad = None
    if arm == "eager":
        loss = eager_loss(q, keys, targets, temperature)
    else:
        backend, _, path = arm.partition("_")
        loss = dot_product_cross_entropy(q, keys, targets, temperature=temperature, backend=backend,
                                         path=path or None)
    loss.backward()
    return loss.detach()


def single_run(backend: str, case, device: torch.device) -> dict:
    """Time and peak extra memory of one forward + backward (run in a fresh process on CPU)."""
    case = _as_case(case)
    q, keys, targets = make_inputs(case, device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = rss_bytes()
    t0 = time.perf_counter()
    loss = step(backend, q, keys, targets, case.temperature)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return {"seconds": seconds, "peak_extra_bytes": max(0, peak - base), "loss": float(loss)}


def _single_run_subprocess(backend: str, case: Case) -> dict:
    cmd = [sys.executable, "-m", "letter_ext.bench.dot_product_cross_entropy", backend, *case.args()]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_once(arm: str, case: Case, device: torch.device) -> dict:
    """One forward + backward of an arm: {'seconds', 'peak_extra_bytes', 'loss'}; on CPU in a fresh
    process, so that the peak resident set is this call's alone."""
    return single_run(arm, case, device) if device.type == "cuda" else _single_run_subprocess(arm, case)


def run(device: torch.device, quick: bool = False, cases=None) -> list[dict]:
    """Rows of eager vs each fused backend, forward + backward. cases: Case objects or (B, M, d)
    shapes (default: QUICK_SHAPES when quick, else SHAPES + llm_cases(device))."""
    backends = []
    if device.type == "cpu" and has_compiled_op("dot_product_cross_entropy_fwd", "cpu"):
        backends += ["cpu_tile", "cpu_chunked"]
    if device.type == "cuda" and triton_usable(device):
        backends += ["triton", "cuda_chunked"]  # the tile path is the Triton kernel
    if cases is None:
        cases = QUICK_SHAPES if quick else SHAPES + llm_cases(device)
    rows = []
    for case in map(_as_case, cases):
        B, M, d = case.B, case.M, case.d
        row = {"B": B, "M": M, "d": d}
        if case.name:
            row.update({"case": case.name, "dtype": str(_dtype(case, device)).replace("torch.", ""),
                        "tau": case.temperature})
        arms = []
        if device.type == "cuda" or B * M <= CPU_EAGER_MAX_LOGITS:
            arms.append("eager")
        else:
            row["eager_error"] = "skipped: logits too large for this CPU"
        for be in backends:
            if be == "cpu_tile" and device.type == "cpu" and case.d > CPU_TILE_MAX_D:
                row["cpu_tile_error"] = f"skipped: d > {CPU_TILE_MAX_D} (404 s at the LLaMA-7B head on the Xeon)"
            else:
                arms.append(be)
        once = {}
        for arm in arms:
            try:
                once[arm] = measure_once(arm, case, device)
            except (torch.OutOfMemoryError, subprocess.CalledProcessError) as e:
                row[f"{arm}_error"] = type(e).__name__
        if device.type == "cpu" and B * M * d > CPU_REPEAT_MAX_MACS:
            seconds, timing = {arm: res["seconds"] for arm, res in once.items()}, "single run"
        else:  # every arm interleaved, so a shared machine's slow phases hit them alike
            q, keys, targets = make_inputs(case, device)
            seconds = interleaved_medians(
                {arm: (lambda arm=arm: step(arm, q, keys, targets, case.temperature)) for arm in once}, device)
            timing = "median"
        eager = once.get("eager")
        if eager is not None:
            row.update({"eager_ms": seconds["eager"] * 1e3, "eager_extra_MiB": eager["peak_extra_bytes"] / 2**20})
        for be in backends:
            if be not in once:
                continue
            extra_mib = once[be]["peak_extra_bytes"] / 2**20
            row.update({f"{be}_ms": seconds[be] * 1e3, f"{be}_extra_MiB": extra_mib, f"{be}_timing": timing})
            if eager is not None:
                row[f"{be}_speedup"] = seconds["eager"] / seconds[be]
                row[f"{be}_mem_ratio"] = extra_mib / max(row["eager_extra_MiB"], 1e-9)
                row[f"{be}_loss_rel_diff"] = abs(once[be]["loss"] - eager["loss"]) / abs(eager["loss"])
        rows.append(row)
    return rows


def _case_from_argv(argv: list[str]) -> Case:
    B, M, d, *rest = argv
    case = Case(int(B), int(M), int(d))
    if rest:
        temperature, dtype, key_std = rest
        case = Case(case.B, case.M, case.d, temperature=float(temperature), dtype=dtype, key_std=float(key_std))
    return case


if __name__ == "__main__":
    if sys.argv[1:2] == ["--llm"]:
        # Only the LLM output-layer case(s): `python -m letter_ext.bench.dot_product_cross_entropy --llm [cpu|cuda]`.
        from .common import print_table

        dev = torch.device(sys.argv[2] if len(sys.argv) > 2 else ("cuda" if torch.cuda.is_available() else "cpu"))
        rows = run(dev, cases=llm_cases(dev))
        print_table(f"dot_product_cross_entropy, LLM output layer, on {dev}", rows,
                    list(dict.fromkeys(k for row in rows for k in row)))
        print(json.dumps(rows))
    else:
        # Child process of a CPU measurement:
        # `python -m letter_ext.bench.dot_product_cross_entropy BACKEND B M d [tau dtype key_std]`.
        backend_arg, *dims = sys.argv[1:]
        print(json.dumps(single_run(backend_arg, _case_from_argv(dims), torch.device("cpu"))))
