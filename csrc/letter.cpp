// Schemas of every LETTER op. Backend kernels register themselves with
// TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and csrc/cuda/<op>_binding.cpp.
#include <torch/library.h>

TORCH_LIBRARY(letter, m) {
  // Residual nearest-code search over L codebooks [L, N, d].
  // residuals is [B, L, d] when return_residuals, else an empty tensor.
  // (quantized comes first: a floating output first keeps opcheck's output sum in float.)
  m.def(
      "residual_quantize(Tensor x, Tensor codebooks, bool return_residuals=False)"
      " -> (Tensor quantized, Tensor codes, Tensor residuals)");
}
