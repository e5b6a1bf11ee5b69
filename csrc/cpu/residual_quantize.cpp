// CPU kernel of letter::residual_quantize.
//
// A GEMM-style nearest-code search with the argmin fused in. Each level's codebook is packed once
// per call into panels of kPanel codes laid out [d][kPanel] (so the micro-kernel's loads are
// contiguous and a panel streams through L1), with 0.5*||c_j||^2 alongside. Rows go in tiles of the
// micro-kernel's height; a tile keeps its residuals in a small buffer across all L levels. The
// micro-kernel holds a rows x codes block of scores s_j = 0.5*||c_j||^2 - r.c_j (which orders codes
// exactly like ||r - c_j||^2) in registers while it runs over d, then folds the block into a running
// per-lane (min, argmin) while the scores are still in registers; after the last panel one vector
// reduction gives each row's code, and the residual update r -= c, q += c follows at once. The
// B x N distance matrix never exists.
//
// Paths (csrc/cpu/isa.h): AVX-512 (12 rows x 32 codes: 24 zmm accumulators), AVX2 + FMA (6 rows x
// 16 codes: 12 ymm accumulators) and portable. Every path forms each score by the same chain of
// fused multiply-adds in the same order (k = 0..d-1 from 0.5*||c_j||^2), and every path breaks ties
// towards the lower code, so all of them pick identical codes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "avx2_math.h"
#include "avx512_math.h"
#include "parallel.h"

namespace letter {
namespace {

constexpr int64_t kPanel = 32;           // codes per packed panel: the AVX-512 tile width (two zmm)
constexpr int64_t kRowsPortable = 4;     // rows per tile of the portable path
constexpr int64_t kRowsAvx2 = 6;         // 6 rows x 16 codes = 12 ymm accumulators (of 16 registers)
constexpr int64_t kRowsAvx512 = 12;      // 12 rows x 32 codes = 24 zmm accumulators (of 32 registers)

// One level's codebook in the micro-kernels' layout: panel p holds codes [p*kPanel, (p+1)*kPanel)
// as [d][kPanel]; padded codes are zeros scored +inf (their half norm), so they never win.
template <typename scalar_t>
struct PackedLevel {
  at::Tensor storage;  // 64-byte aligned (the CPU allocator's): vector loads never split a line
  const scalar_t* panels = nullptr;      // [n_pad / kPanel][d][kPanel]
  const scalar_t* half_norms = nullptr;  // [n_pad]
  int64_t n_pad = 0;
};

template <typename scalar_t>
PackedLevel<scalar_t> pack_level(const scalar_t* codebook, int64_t n, int64_t d, const at::TensorOptions& options) {
  PackedLevel<scalar_t> p;
  p.n_pad = (n + kPanel - 1) / kPanel * kPanel;
  p.storage = at::zeros({p.n_pad * (d + 1)}, options);
  scalar_t* panels = p.storage.template data_ptr<scalar_t>();
  scalar_t* half_norms = panels + p.n_pad * d;
  for (int64_t j = 0; j < p.n_pad; ++j) {
    scalar_t* column = panels + (j / kPanel) * d * kPanel + j % kPanel;
    if (j >= n) {
      half_norms[j] = std::numeric_limits<scalar_t>::infinity();
      continue;
    }
    scalar_t norm = 0;
    for (int64_t k = 0; k < d; ++k) {
      const scalar_t c = codebook[j * d + k];
      column[k * kPanel] = c;
      norm += c * c;
    }
    half_norms[j] = scalar_t(0.5) * norm;
  }
  p.panels = panels;
  p.half_norms = half_norms;
  return p;
}

// Nearest code of each of the `rows` residuals r ([rows, d]) -> best_code. Portable version;
// ties keep the lower code.
template <typename scalar_t>
void nearest_codes_generic(const scalar_t* r, int64_t rows, int64_t d, const PackedLevel<scalar_t>& level,
                           int32_t* best_code) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t best = std::numeric_limits<scalar_t>::infinity();
    int32_t code = 0;
    for (int64_t j = 0; j < level.n_pad; ++j) {
      const scalar_t* column = level.panels + (j / kPanel) * d * kPanel + j % kPanel;
      scalar_t s = level.half_norms[j];
      for (int64_t k = 0; k < d; ++k) {
        const scalar_t rk = r[i * d + k], c = column[k * kPanel];
        if constexpr (std::is_same_v<scalar_t, float>) {
          s = std::fma(-rk, c, s);  // rounds like the vector paths' fnmadd
        } else {
          s -= rk * c;
        }
      }
      if (s < best) {
        best = s;
        code = static_cast<int32_t>(j);
      }
    }
    best_code[i] = code;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LETTER_HAVE_AVX2_KERNEL 1
// The lowest code among the lanes holding the smallest score. Each lane is a running argmin that
// kept its lower code on ties, so this is the tile's tie-breaking rule too. The scores are never
// NaN (a NaN score never replaces the initial +inf).
__attribute__((target("avx2,fma"))) inline int32_t lowest_best_code_avx2(__m256 v0, __m256 v1, __m256i c0, __m256i c1) {
  __m256 m = _mm256_min_ps(v0, v1);
  m = _mm256_min_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m256i none = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
  c0 = _mm256_blendv_epi8(none, c0, _mm256_castps_si256(_mm256_cmp_ps(v0, m, _CMP_EQ_OQ)));
  c1 = _mm256_blendv_epi8(none, c1, _mm256_castps_si256(_mm256_cmp_ps(v1, m, _CMP_EQ_OQ)));
  __m256i t = _mm256_min_epi32(c0, c1);
  t = _mm256_min_epi32(t, _mm256_permute2x128_si256(t, t, 1));
  t = _mm256_min_epi32(t, _mm256_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm256_min_epi32(t, _mm256_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm256_cvtsi256_si32(t);
}

// AVX2+FMA micro-kernel over one tile of `rows` <= 6 residuals (the tile buffer's rows beyond are
// zeros, scored harmlessly): a 6-row x 16-code block of scores lives in 12 ymm registers while the
// k loop streams two code vectors and six broadcasts.
__attribute__((target("avx2,fma"))) void nearest_codes_avx2(const float* r, int64_t rows, int64_t d,
                                                            const PackedLevel<float>& level, int32_t* best_code) {
  __m256 best[kRowsAvx2][2];
  __m256i best_idx[kRowsAvx2][2];
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int i = 0; i < kRowsAvx2; ++i) {
    best[i][0] = best[i][1] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    best_idx[i][0] = lane;
    best_idx[i][1] = _mm256_add_epi32(lane, _mm256_set1_epi32(8));
  }
  for (int64_t j0 = 0; j0 < level.n_pad; j0 += 16) {
    const float* ct = level.panels + (j0 / kPanel) * d * kPanel + j0 % kPanel;
    __m256 acc[kRowsAvx2][2];
    acc[0][0] = _mm256_load_ps(level.half_norms + j0);
    acc[0][1] = _mm256_load_ps(level.half_norms + j0 + 8);
#pragma GCC unroll 8
    for (int i = 1; i < kRowsAvx2; ++i) {
      acc[i][0] = acc[0][0];
      acc[i][1] = acc[0][1];
    }
    for (int64_t k = 0; k < d; ++k) {
      const __m256 c0 = _mm256_load_ps(ct + k * kPanel);
      const __m256 c1 = _mm256_load_ps(ct + k * kPanel + 8);
#pragma GCC unroll 8
      for (int i = 0; i < kRowsAvx2; ++i) {
        const __m256 b = _mm256_broadcast_ss(r + i * d + k);
        acc[i][0] = _mm256_fnmadd_ps(b, c0, acc[i][0]);
        acc[i][1] = _mm256_fnmadd_ps(b, c1, acc[i][1]);
      }
    }
    const __m256i idx0 = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(j0)));
    const __m256i idx1 = _mm256_add_epi32(idx0, _mm256_set1_epi32(8));
#pragma GCC unroll 8
    for (int i = 0; i < kRowsAvx2; ++i) {
      // Strict '<': within a lane the earlier (lower) code wins ties.
      const __m256 m0 = _mm256_cmp_ps(acc[i][0], best[i][0], _CMP_LT_OQ);
      const __m256 m1 = _mm256_cmp_ps(acc[i][1], best[i][1], _CMP_LT_OQ);
      best[i][0] = _mm256_blendv_ps(best[i][0], acc[i][0], m0);
      best[i][1] = _mm256_blendv_ps(best[i][1], acc[i][1], m1);
      best_idx[i][0] = _mm256_blendv_epi8(best_idx[i][0], idx0, _mm256_castps_si256(m0));
      best_idx[i][1] = _mm256_blendv_epi8(best_idx[i][1], idx1, _mm256_castps_si256(m1));
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    best_code[i] = lowest_best_code_avx2(best[i][0], best[i][1], best_idx[i][0], best_idx[i][1]);
}
#endif

#ifdef LETTER_HAVE_AVX512_MATH
// AVX-512 micro-kernel over one tile of `rows` <= 12 residuals (rows beyond are zeros): a 12-row x
// 32-code block of scores in 24 zmm registers while the k loop streams two code vectors and twelve
// broadcasts.
LETTER_TARGET_AVX512 void nearest_codes_avx512(const float* r, int64_t rows, int64_t d,
                                               const PackedLevel<float>& level, int32_t* best_code) {
  alignas(64) float best[kRowsAvx512][kPanel];
  alignas(64) int32_t best_idx[kRowsAvx512][kPanel];
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int i = 0; i < kRowsAvx512; ++i) {
    _mm512_store_ps(best[i], _mm512_set1_ps(std::numeric_limits<float>::infinity()));
    _mm512_store_ps(best[i] + 16, _mm512_set1_ps(std::numeric_limits<float>::infinity()));
    _mm512_store_si512(best_idx[i], lane);
    _mm512_store_si512(best_idx[i] + 16, _mm512_add_epi32(lane, _mm512_set1_epi32(16)));
  }
  for (int64_t j0 = 0; j0 < level.n_pad; j0 += kPanel) {
    const float* ct = level.panels + j0 * d;
    __m512 acc[kRowsAvx512][2];
    acc[0][0] = _mm512_load_ps(level.half_norms + j0);
    acc[0][1] = _mm512_load_ps(level.half_norms + j0 + 16);
#pragma GCC unroll 16
    for (int i = 1; i < kRowsAvx512; ++i) {
      acc[i][0] = acc[0][0];
      acc[i][1] = acc[0][1];
    }
    for (int64_t k = 0; k < d; ++k) {
      const __m512 c0 = _mm512_load_ps(ct + k * kPanel);
      const __m512 c1 = _mm512_load_ps(ct + k * kPanel + 16);
#pragma GCC unroll 16
      for (int i = 0; i < kRowsAvx512; ++i) {
        const __m512 b = _mm512_set1_ps(r[i * d + k]);
        acc[i][0] = _mm512_fnmadd_ps(b, c0, acc[i][0]);
        acc[i][1] = _mm512_fnmadd_ps(b, c1, acc[i][1]);
      }
    }
    const __m512i idx0 = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(j0)));
    const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(16));
#pragma GCC unroll 16
    for (int i = 0; i < kRowsAvx512; ++i) {
      // Strict '<': within a lane the earlier (lower) code wins ties. The running (min, argmin)
      // lives in L1: the registers hold the accumulators.
      const __mmask16 m0 = _mm512_cmp_ps_mask(acc[i][0], _mm512_load_ps(best[i]), _CMP_LT_OQ);
      const __mmask16 m1 = _mm512_cmp_ps_mask(acc[i][1], _mm512_load_ps(best[i] + 16), _CMP_LT_OQ);
      _mm512_mask_store_ps(best[i], m0, acc[i][0]);
      _mm512_mask_store_ps(best[i] + 16, m1, acc[i][1]);
      _mm512_mask_store_epi32(best_idx[i], m0, idx0);
      _mm512_mask_store_epi32(best_idx[i] + 16, m1, idx1);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    // The lowest code among the lanes holding the smallest score (see lowest_best_code_avx2).
    const __m512 v0 = _mm512_load_ps(best[i]), v1 = _mm512_load_ps(best[i] + 16);
    const __m512 m = _mm512_set1_ps(_mm512_reduce_min_ps(_mm512_min_ps(v0, v1)));
    const __m512i none = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
    const __m512i c0 = _mm512_mask_mov_epi32(none, _mm512_cmp_ps_mask(v0, m, _CMP_EQ_OQ), _mm512_load_si512(best_idx[i]));
    const __m512i c1 =
        _mm512_mask_mov_epi32(none, _mm512_cmp_ps_mask(v1, m, _CMP_EQ_OQ), _mm512_load_si512(best_idx[i] + 16));
    best_code[i] = _mm512_reduce_min_epi32(_mm512_min_epi32(c0, c1));
  }
}
#endif

template <typename scalar_t>
using NearestCodesFn = void (*)(const scalar_t*, int64_t, int64_t, const PackedLevel<scalar_t>&, int32_t*);

// The micro-kernel of the active ISA and its tile height.
template <typename scalar_t>
std::pair<NearestCodesFn<scalar_t>, int64_t> pick_nearest_codes() {
  if constexpr (std::is_same_v<scalar_t, float>) {
#ifdef LETTER_HAVE_AVX512_MATH
    if (active_isa() >= Isa::avx512) return {nearest_codes_avx512, kRowsAvx512};
#endif
#ifdef LETTER_HAVE_AVX2_KERNEL
    if (cpu_has_avx2_fma()) return {nearest_codes_avx2, kRowsAvx2};
#endif
  }
  return {nearest_codes_generic<scalar_t>, kRowsPortable};
}

// Runs all levels for all rows; x [B, d], codebooks [L, N, d] contiguous.
template <typename scalar_t>
void residual_quantize_kernel(const scalar_t* xp, const scalar_t* cb, int64_t B, int64_t d, int64_t L, int64_t N,
                              const at::TensorOptions& options, int64_t* codes_p, scalar_t* q_p, scalar_t* res_p) {
  std::vector<PackedLevel<scalar_t>> levels;
  levels.reserve(L);
  for (int64_t l = 0; l < L; ++l) levels.push_back(pack_level(cb + l * N * d, N, d, options));
  const auto [nearest_codes, tile_rows] = pick_nearest_codes<scalar_t>();
  const int64_t tiles = (B + tile_rows - 1) / tile_rows;
  // ~64 rows per task at least: fewer would make the per-task setup show.
  parallel_blocks(0, tiles, std::max<int64_t>(1, 64 / tile_rows), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> r(tile_rows * d), q(tile_rows * d);
    std::vector<int32_t> best(tile_rows);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t row0 = tile * tile_rows;
      const int64_t rows = std::min(tile_rows, B - row0);
      std::fill(r.begin(), r.end(), scalar_t(0));
      std::copy(xp + row0 * d, xp + (row0 + rows) * d, r.begin());
      std::fill(q.begin(), q.end(), scalar_t(0));
      for (int64_t l = 0; l < L; ++l) {
        if (res_p) {
          for (int64_t i = 0; i < rows; ++i)
            std::copy(&r[i * d], &r[i * d] + d, res_p + ((row0 + i) * L + l) * d);
        }
        nearest_codes(r.data(), rows, d, levels[l], best.data());
        const scalar_t* level_cb = cb + l * N * d;
        for (int64_t i = 0; i < rows; ++i) {
          codes_p[(row0 + i) * L + l] = best[i];
          const scalar_t* c = level_cb + static_cast<int64_t>(best[i]) * d;
          scalar_t* ri = &r[i * d];
          scalar_t* qi = &q[i * d];
          for (int64_t k = 0; k < d; ++k) {
            ri[k] -= c[k];
            qi[k] += c[k];
          }
        }
      }
      std::copy(q.begin(), q.begin() + rows * d, q_p + row0 * d);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_quantize_cpu(
    const at::Tensor& x, const at::Tensor& codebooks, bool return_residuals) {
  TORCH_CHECK(x.dim() == 2, "residual_quantize: x must be [B, d]");
  TORCH_CHECK(codebooks.dim() == 3, "residual_quantize: codebooks must be [L, N, d]");
  TORCH_CHECK(codebooks.size(2) == x.size(1), "residual_quantize: d mismatch");
  TORCH_CHECK(codebooks.size(0) > 0 && codebooks.size(1) > 0,
              "residual_quantize: codebooks must have L >= 1 and N >= 1");
  TORCH_CHECK(x.is_floating_point() && codebooks.is_floating_point(),
              "residual_quantize: floating-point inputs required");
  const int64_t B = x.size(0), d = x.size(1);
  const int64_t L = codebooks.size(0), N = codebooks.size(1);

  // fp64 inputs are computed in fp64 (exact gradchecks); everything else in fp32.
  const bool fp64 = x.scalar_type() == at::kDouble || codebooks.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  const at::Tensor xa = x.to(acc).contiguous();
  const at::Tensor cba = codebooks.to(acc).contiguous();
  at::Tensor codes = at::empty({B, L}, x.options().dtype(at::kLong));
  at::Tensor quantized = at::empty({B, d}, x.options().dtype(acc));
  at::Tensor residuals = return_residuals ? at::empty({B, L, d}, x.options().dtype(acc))
                                          : at::empty({0}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "residual_quantize_cpu", [&] {
    residual_quantize_kernel<scalar_t>(
        xa.data_ptr<scalar_t>(), cba.data_ptr<scalar_t>(), B, d, L, N, cba.options(), codes.data_ptr<int64_t>(),
        quantized.data_ptr<scalar_t>(), return_residuals ? residuals.data_ptr<scalar_t>() : nullptr);
  });
  return {quantized.to(x.scalar_type()), codes, residuals.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(letter, CPU, m) { m.impl("residual_quantize", &residual_quantize_cpu); }

}  // namespace letter
