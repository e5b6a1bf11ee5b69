"""Build checks: every CUDA source compiles with nvcc; the CLI entry point answers."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, arch, tmp_path):
    out = tmp_path / (os.path.basename(source) + ".o")
    cmd = ["nvcc", "-c", "-std=c++17", "-O2", f"-arch={arch}", "-Werror", "all-warnings", source, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0


def test_cuda_sources_exist():
    assert CU_SOURCES, "no csrc/cuda/*.cu found"


def test_cli_version_and_help():
    for args in (["--version"], ["--help"], ["bench", "kernels", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "letter.cli.main", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip()
