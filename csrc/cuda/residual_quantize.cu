// CUDA kernel of letter::residual_quantize: one thread per row keeps its
// residual in registers for all L levels; the block streams each level's
// codebook through shared memory in tiles (every thread reads the same code,
// a broadcast) with a running (min, argmin). No B x N distances are stored.
#include <cfloat>

#include "residual_quantize.h"

namespace letter {
namespace {

constexpr int kThreads = 128;
constexpr int kSmemFloats = 8192;  // 32 KiB of codes per tile

template <int MAXD>
__global__ void residual_quantize_kernel(const float* __restrict__ x,
                                         const float* __restrict__ codebooks, int64_t B, int d,
                                         int L, int N, int64_t* __restrict__ codes,
                                         float* __restrict__ quantized,
                                         float* __restrict__ residuals) {
  extern __shared__ float smem[];
  const int tile_codes = min(N, kSmemFloats / (d + 1));
  float* tile = smem;                        // [tile_codes, d]
  float* half_norm = smem + tile_codes * d;  // [tile_codes]

  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = row < B;
  float r[MAXD];
  float q[MAXD];
#pragma unroll
  for (int k = 0; k < MAXD; ++k) {
    r[k] = (active && k < d) ? x[row * d + k] : 0.f;
    q[k] = 0.f;
  }

  for (int l = 0; l < L; ++l) {
    const float* level = codebooks + static_cast<int64_t>(l) * N * d;
    if (active && residuals != nullptr) {
#pragma unroll
      for (int k = 0; k < MAXD; ++k)
        if (k < d) residuals[(row * L + l) * d + k] = r[k];
    }
    float best = FLT_MAX;
    int best_code = 0;
    bool found = false;
    for (int j0 = 0; j0 < N; j0 += tile_codes) {
      const int n = min(tile_codes, N - j0);
      __syncthreads();
      for (int i = threadIdx.x; i < n * d; i += kThreads) tile[i] = level[j0 * d + i];
      __syncthreads();
      for (int j = threadIdx.x; j < n; j += kThreads) {
        float s = 0.f;
        for (int k = 0; k < d; ++k) s = fmaf(tile[j * d + k], tile[j * d + k], s);
        half_norm[j] = 0.5f * s;
      }
      __syncthreads();
      for (int j = 0; j < n; ++j) {
        float s = half_norm[j];
#pragma unroll
        for (int k = 0; k < MAXD; ++k)
          if (k < d) s = fmaf(-r[k], tile[j * d + k], s);
        if (!found || s < best) {  // strict: ties keep the lower code
          best = s;
          best_code = j0 + j;
          found = true;
        }
      }
    }
    if (active) {
      codes[row * L + l] = best_code;
      const float* c = level + static_cast<int64_t>(best_code) * d;
#pragma unroll
      for (int k = 0; k < MAXD; ++k) {
        if (k < d) {
          r[k] -= c[k];
          q[k] += c[k];
        }
      }
    }
  }
  if (active) {
#pragma unroll
    for (int k = 0; k < MAXD; ++k)
      if (k < d) quantized[row * d + k] = q[k];
  }
}

template <int MAXD>
cudaError_t launch(const float* x, const float* codebooks, int64_t B, int d, int L, int N,
                   int64_t* codes, float* quantized, float* residuals, cudaStream_t stream) {
  const int tile_codes = min(N, kSmemFloats / (d + 1));
  const size_t smem = static_cast<size_t>(tile_codes) * (d + 1) * sizeof(float);
  const unsigned blocks = static_cast<unsigned>((B + kThreads - 1) / kThreads);
  residual_quantize_kernel<MAXD><<<blocks, kThreads, smem, stream>>>(
      x, codebooks, B, d, L, N, codes, quantized, residuals);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_residual_quantize(const float* x, const float* codebooks, int64_t B, int64_t d,
                                     int64_t L, int64_t N, int64_t* codes, float* quantized,
                                     float* residuals, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (d > kResidualQuantizeMaxDim) return cudaErrorInvalidValue;
  const int di = static_cast<int>(d), li = static_cast<int>(L), ni = static_cast<int>(N);
  if (d <= 32) return launch<32>(x, codebooks, B, di, li, ni, codes, quantized, residuals, stream);
  if (d <= 64) return launch<64>(x, codebooks, B, di, li, ni, codes, quantized, residuals, stream);
  if (d <= 128)
    return launch<128>(x, codebooks, B, di, li, ni, codes, quantized, residuals, stream);
  return launch<256>(x, codebooks, B, di, li, ni, codes, quantized, residuals, stream);
}

}  // namespace letter
