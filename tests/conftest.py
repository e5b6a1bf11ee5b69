import os

import torch

# Without a GPU, Triton kernels run in the interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from letter_ext._backend import has_compiled_op, triton_usable  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def available_backends(op: str, device: str = "cpu") -> list[str]:
    """Non-reference backends of `op` that can run on `device` here."""
    dev = torch.device(device)
    out = []
    if has_compiled_op(op, dev.type):
        out.append(dev.type)
    if triton_usable(dev):
        out.append("triton")
    return out


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def shared_data():
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"real data not present at {path}")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded: on a shared 2-core CPU a second OpenMP thread only
    adds barrier waits. Restores the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
