"""The wheel from `python -m build --no-isolation` installs and works in a fresh venv."""
import glob
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_wheel_installs_in_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), ROOT], cwd=ROOT)
    wheels = glob.glob(str(dist / "letter-*.whl"))
    assert len(wheels) == 1
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    # The same torch as here (a local CPU wheel on CI machines), then the wheel with its dependencies.
    torch_req = f"torch=={torch.__version__.split('+')[0]}"
    run([py, "-m", "pip", "install", "-q", torch_req, wheels[0]])
    check = (
        "import os, torch, letter_ext, letter;"
        "assert letter_ext._backend._C, 'compiled library missing';"
        "c, q = letter_ext.residual_quantize(torch.randn(5, 4), torch.randn(2, 3, 4), backend='cpu');"
        "print(letter_ext.__file__, tuple(c.shape))"
    )
    out = run([py, "-c", check], cwd=str(tmp_path))
    assert str(venv) in out and "(5, 2)" in out
    out = run([str(venv / "bin" / "letter"), "--version"], cwd=str(tmp_path))
    assert "letter" in out
