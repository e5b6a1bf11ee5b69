"""Shared helpers of the kernel benchmarks: timing, memory, machine info, output."""
import datetime
import json
import os
import platform
import re
import resource
import statistics
import tempfile
import time

import torch

from .._backend import isa, set_isa, supported_isas


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))
    except OSError:
        return None


def rss_bytes() -> int:
    """This process's resident set now (Linux)."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM, which counts only this program's own memory (the
    ru_maxrss of a process started by subprocess also counts its parent's resident set at the fork,
    so a child of a large process reads the parent's size); ru_maxrss where /proc is missing."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


ISA_CAP_VARIABLES = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "LETTER_ISA")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, *, repeat: int = 5, max_seconds: float = 20.0) -> float:
    """Median wall time of fn() in seconds (CUDA-synchronized, after one warm-up call); fewer
    repeats if one call is slow."""
    return interleaved_medians({"fn": fn}, device, repeat=repeat, max_seconds=max_seconds)["fn"]


def interleaved_medians(fns: dict, device: torch.device, *, repeat: int = 5, max_seconds: float = 60.0) -> dict:
    """Median wall seconds of each function, calling them in turn on every repeat, so that a shared
    machine's slow phases (a 2-vCPU guest's stolen time, another process) hit all of them alike and
    their ratios stay fair; fewer repeats if a round is slow."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    sync(device)
    t_start = time.perf_counter()
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > max_seconds:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def bench_isas() -> list[str]:
    """The vector instruction sets to time the C++ kernels on: those the CPU runs, up to the one
    active at start ($LETTER_ISA caps it, e.g. for an AVX2-only CPU's stand-in)."""
    isas = supported_isas()
    return [name for name in isas[: isas.index(isa()) + 1] if name != "scalar"] if isas else []


def with_isa(name: str | None, fn):
    """fn, run with the C++ kernels forced to one instruction set (None: fn as dispatched)."""
    if name is None:
        return fn

    def forced():
        default = isa()
        set_isa(name)
        try:
            return fn()
        finally:
            set_isa(default)

    return forced


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's, as lscpu shows it), or the architecture where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # what eager's kernels use
        "cpu_isa": isa(),  # the C++ kernels' instruction set (letter_ext.isa())
        "threads": torch.get_num_threads(),
        "device": str(device),
        # Instruction-set caps of this run (e.g. an AVX2-only CPU's stand-in on an AVX-512 one:
        # MKL, oneDNN, eager's kernels and ours all capped), when set.
        "isa_caps": {name: os.environ[name] for name in ISA_CAP_VARIABLES if name in os.environ},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n## {title}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def write_json(path: str, payload: dict) -> None:
    """Atomic write: a reader never sees a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
