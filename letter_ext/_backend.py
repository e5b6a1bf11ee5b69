"""Loading of the compiled library and choice of backend for each op call."""
import functools
import glob
import importlib.util
import os
import warnings

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")


def _load_library():
    """Load the compiled op library (it registers the letter:: ops); return its path."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(path for ext in ("so", "pyd") for path in glob.glob(os.path.join(glob.escape(here), f"_C*.{ext}")))
    if not found:
        raise ImportError("no compiled letter_ext/_C library in this installation")
    torch.ops.load_library(found[0])
    return found[0]


_C = None
if os.environ.get("LETTER_SKIP_EXT") == "1":
    warnings.warn(
        "LETTER_SKIP_EXT=1: the compiled letter_ext._C is not loaded; ops run on their "
        "Triton or pure-torch reference backends (slow on CPU).",
        stacklevel=2,
    )
else:
    try:
        _C = _load_library()
    except (ImportError, OSError) as e:  # a source checkout without a build, or LETTER_SKIP_EXT at build time
        warnings.warn(
            f"letter_ext._C could not be loaded ({e}); ops run on their Triton or pure-torch "
            "reference backends. Build it with `pip install --no-build-isolation -e .`.",
            stacklevel=2,
        )

HAS_TRITON = importlib.util.find_spec("triton") is not None

ISAS = ("scalar", "avx2", "avx512")


def isa() -> str | None:
    """The instruction set the C++ CPU kernels use now ('scalar' | 'avx2' | 'avx512'; None without
    the compiled library). Each kernel runs its widest path not above it (csrc/cpu/isa.h)."""
    return torch.ops.letter.isa() if _C is not None else None


def supported_isas() -> list[str]:
    """The instruction sets this CPU runs that the kernels have paths for, narrowest first."""
    if _C is None:
        return []
    return list(ISAS[: ISAS.index(torch.ops.letter.best_isa()) + 1])


def set_isa(name: str) -> None:
    """Force the C++ CPU kernels onto the `name` path (one of supported_isas()), for the whole
    process: to test every path on one machine, or to stand in for a CPU without AVX-512.
    $LETTER_ISA does the same when letter_ext is imported (see check_env_isa for a bad one)."""
    if _C is None:
        raise RuntimeError("set_isa needs the compiled letter_ext._C library")
    torch.ops.letter.set_isa(name)


def bf16_gemms() -> bool:
    """Whether bf16 inputs run their GEMMs in bf16 on CPU now (the chunked cross-entropy path): the
    CPU has AMX-BF16 or AVX512-BF16 and the avx512 path is active (csrc/cpu/isa.h)."""
    return bool(torch.ops.letter.bf16_gemms()) if _C is not None else False


# A bad $LETTER_ISA is not applied, and not raised here either: an error while importing would stop
# every program (the `letter` command included) before its own error handling; op calls refuse it.
_ENV_ISA_ERROR = None
if _C is not None and os.environ.get("LETTER_ISA"):
    try:
        set_isa(os.environ["LETTER_ISA"])
    except ValueError as e:
        _ENV_ISA_ERROR = f"$LETTER_ISA: {str(e).removeprefix('set_isa: ')}"


def check_env_isa() -> None:
    """ValueError naming $LETTER_ISA when the value it had at import was refused (not an ISA name, or
    one this CPU does not run). Every op call checks it; programs can check it up front."""
    if _ENV_ISA_ERROR is not None:
        raise ValueError(_ENV_ISA_ERROR)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the answer
def has_compiled_op(name: str, device_type: str) -> bool:
    """Whether letter::<name> has a compiled kernel for this device type: a constant (kernels are
    registered when letter_ext is imported, before any op call asks), which lets
    torch.compile(fullgraph=True) trace the op wrappers' backend choice."""
    return _has_compiled_kernel(name, device_type)


@functools.lru_cache(maxsize=None)
def _has_compiled_kernel(name: str, device_type: str) -> bool:
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"letter::{name}", key)


def has_schema(name: str) -> bool:
    """Whether the compiled library is loaded and defines letter::<name> (kernels or not)."""
    return _C is not None and hasattr(torch.ops.letter, name)


def route_cuda_to_triton(launchers: dict) -> None:
    """Register Triton launchers ({op name: function}) as the CUDA kernels of compiled ops that
    have no CUDA C++ kernel in this build, so CUDA tensors reach torch.ops.letter.<op> too.

    Called while letter_ext is imported, before has_compiled_op caches an answer.
    """
    for name, launch in launchers.items():
        qualname = f"letter::{name}"
        if has_schema(name) and not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"):
            torch.library.register_kernel(qualname, "cuda", launch)


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def env_backend() -> str | None:
    """$LETTER_BACKEND (None when unset or empty); ValueError naming it unless it is one of
    BACKENDS or 'auto'. Programs can check it up front, before any op call reads it."""
    value = os.environ.get("LETTER_BACKEND") or None
    if value is not None and value not in BACKENDS + ("auto",):
        raise ValueError(f"$LETTER_BACKEND must be one of {BACKENDS} or 'auto', got {value!r}")
    return value


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """Pick the backend of one call: the argument, else $LETTER_BACKEND, else the fastest available.

    Auto choice: the compiled kernel for the tensor's device, then Triton on CUDA, then the reference.
    """
    check_env_isa()
    choice = backend or env_backend() or "auto"
    if choice not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {choice!r}")
    if choice == "auto":
        if has_compiled_op(op, device.type):
            return device.type
        if device.type == "cuda" and triton_usable(device):
            return "triton"
        return "reference"
    if choice in ("cpu", "cuda"):
        if device.type != choice:
            raise ValueError(f"backend={choice!r} needs {choice} tensors, got {device.type} tensors")
        if not has_compiled_op(op, choice):
            raise RuntimeError(
                f"backend={choice!r}: letter::{op} has no compiled {choice} kernel in this build"
            )
    if choice == "triton" and not triton_usable(device):
        raise RuntimeError(
            "backend='triton' needs triton installed and CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
        )
    return choice
