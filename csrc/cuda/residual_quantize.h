// Launcher of the CUDA residual_quantize kernel. Plain pointers only, so the
// .cu file needs no torch headers; the binding lives in
// residual_quantize_binding.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace letter {

// Largest embedding width the register-resident kernel supports.
constexpr int kResidualQuantizeMaxDim = 256;

// x [B, d], codebooks [L, N, d] (fp32, contiguous). Writes codes [B, L],
// quantized [B, d] and, if residuals != nullptr, residuals [B, L, d].
cudaError_t launch_residual_quantize(const float* x, const float* codebooks, int64_t B, int64_t d,
                                     int64_t L, int64_t N, int64_t* codes, float* quantized,
                                     float* residuals, cudaStream_t stream);

}  // namespace letter
