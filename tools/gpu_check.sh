#!/usr/bin/env bash
# GPU check for a lent GPU machine (no internet; torch+CUDA, triton, nvcc installed there).
# Builds with CUDA, runs the kernel tests on the GPU (CUDA and compiled Triton vs the reference),
# every trainer, the pipeline and `letter serve` on CUDA (tests/test_gpu_training.py), compute-sanitizer on one small
# case per op, and the kernel benchmarks (dot_product_cross_entropy: eager vs the Triton tile path vs
# the chunked cuBLAS path, up to the LLaMA-7B head in bf16 and fp32). Results go to ${OUT:-gpu_results}/.
# Usage (device tool): bash tools/gpu_check.sh      Budget: under 8 minutes (each step has a timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
arch="$(python3 -c 'import torch; p=torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}")')"
echo "== build (TORCH_CUDA_ARCH_LIST=$arch)"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 timeout 120 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, letter_ext
from letter_ext._backend import has_compiled_op
print("torch", torch.__version__, "gpu", torch.cuda.get_device_name(0))
for op in ("residual_quantize", "dot_product_cross_entropy_fwd", "constrained_beam_step"):
    print(op, "cuda kernel:", has_compiled_op(op, "cuda"))
PY
echo "== op tests on the GPU"
timeout 110 python3 -m pytest -q -x -p no:cacheprovider tests/test_residual_quantize.py \
  tests/test_dot_product_cross_entropy.py tests/test_constrained_beam_step.py tests/test_decoding.py 2>&1 \
  | tee "$OUT/op_tests.txt" | tail -15
echo "== every trainer, the pipeline and the server with --device cuda"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_training.txt" | tail -15
echo "== compute-sanitizer (one small case per op)"
if command -v compute-sanitizer >/dev/null; then
  timeout 45 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -c "
import torch, letter_ext
x = torch.randn(257, 33, device='cuda'); cb = torch.randn(3, 255, 33, device='cuda')
for be in ('cuda', 'triton'):
    letter_ext.residual_quantize(x, cb, return_residuals=True, backend=be)
q = torch.randn(257, 33, device='cuda', requires_grad=True); k = torch.randn(129, 33, device='cuda', requires_grad=True)
t = torch.randint(0, 129, (257,), device='cuda'); b = torch.randn(129, device='cuda', requires_grad=True)
for be, path in (('cuda', 'tile'), ('cuda', 'chunked'), ('triton', None)):  # 'cuda' tile: the Triton kernel
    letter_ext.dot_product_cross_entropy(q, k, t, temperature=0.1, exclude=(t + 1) % 129, bias=b, backend=be,
                                         path=path).backward()
codes = torch.randint(0, 16, (300, 3), device='cuda')
trie, _, _ = letter_ext.build_trie_levels(codes, [16, 16, 16])
logits = torch.randn(7, 48, device='cuda'); beams = torch.zeros(7, 1, device='cuda')
nodes = torch.zeros(7, 1, dtype=torch.long, device='cuda')
letter_ext.constrained_beam_step(logits, beams, nodes, trie, 0, 5, backend='triton')
torch.cuda.synchronize(); print('sanitizer run ok')
" 2>&1 | tail -5 | tee "$OUT/sanitizer.txt"
fi
echo "== benchmarks"
timeout 110 python3 -m letter_ext.bench --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.txt"
