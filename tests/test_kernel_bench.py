"""The kernel benchmarks' quick mode runs end to end and reports correct results (timings are not
asserted: they belong to the benchmark, not the tests)."""
import json
import os
import subprocess
import sys

import pytest

from letter_ext._backend import has_compiled_op


def beam_whole(results):
    """The whole-search rows of the constrained_beam_step results."""
    return [row for row in results["constrained_beam_step"] if row["level"] == "all" and "hf_ms" in row]


@pytest.mark.skipif(not has_compiled_op("residual_quantize", "cpu"), reason="needs the compiled C++ ops")
def test_quick_kernel_benchmarks(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "letter_ext.bench", "--quick", "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    payload = json.loads(out.read_text())
    assert payload["machine"]["cpu"] and payload["machine"]["cpu_isa"] in ("scalar", "avx2", "avx512")
    results = payload["results"]
    rq = results["residual_quantize"]
    assert rq and all(row[key] == 1.0 for row in rq for key in row if key.endswith("_codes_equal_eager"))
    if payload["machine"]["cpu_isa"] != "scalar":  # each vector path the CPU runs has its columns
        assert "cpu_avx2_ms" in rq[0] and "cpu_avx2_ms" in beam_whole(results)[0]
    beam = results["constrained_beam_step"]
    whole = beam_whole(results)
    assert whole and all(row["scores_equal_torch"] for row in whole)
    banned = [row for row in beam if row.get("bans", "").endswith("leaves per user")]
    assert banned and all(row["banned_returned"] == 0 and row["empty_slots"] == 0 for row in banned)
    ce = results["dot_product_cross_entropy"]
    assert ce and all(row[key] < 1e-5 for row in ce for key in row if key.endswith("_loss_rel_diff"))
    assert all("eager_ms" in row and "cpu_chunked_ms" in row for row in ce)


@pytest.mark.skipif(not has_compiled_op("residual_quantize", "cpu"), reason="needs the compiled C++ ops")
def test_isa_cap_limits_the_benchmarked_paths():
    """$LETTER_ISA (the AVX2-only stand-in) caps the ISA columns and is recorded in the JSON's machine."""
    from letter_ext._backend import supported_isas

    if "avx2" not in supported_isas():
        pytest.skip("the CPU has no AVX2 path")
    code = ("import json; from letter_ext.bench.common import bench_isas, machine_info; import torch; "
            "print(json.dumps([bench_isas(), machine_info(torch.device('cpu'))['isa_caps']]))")
    from letter_ext.bench.common import ISA_CAP_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in ISA_CAP_VARIABLES}
    env.update(LETTER_ISA="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    isas, caps = json.loads(out.strip().splitlines()[-1])
    assert isas == ["avx2"]
    assert caps == {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "LETTER_ISA": "avx2"}
