// CPU kernel of letter::residual_quantize.
//
// Rows are processed in blocks of kRows; a block keeps its residuals in a
// small buffer across all L levels and streams the (transposed, padded)
// codebook in tiles of kCodes codes, keeping a running (min, argmin) per row.
// The B x N distance matrix never exists. The score of code j is
// 0.5*||c_j||^2 - r.c_j, which orders codes exactly like ||r - c_j||^2.
// Paths (csrc/cpu/isa.h): AVX-512, AVX2 + FMA and portable. Every path forms each score by the same
// chain of fused multiply-adds in the same order, so all of them pick identical codes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "avx2_math.h"
#include "avx512_math.h"

namespace letter {
namespace {

constexpr int64_t kRows = 4;     // rows per micro-tile
constexpr int64_t kCodes = 32;   // codes per padded block: the AVX-512 micro-tile (two 16-wide vectors)
constexpr int64_t kCodes8 = 16;  // codes per AVX2 micro-tile (two 8-wide vectors)

// One level's codebook, transposed to [d][n_pad] so that the inner loop runs
// over contiguous codes, with padded codes scored +inf.
template <typename scalar_t>
struct PackedLevel {
  std::vector<scalar_t> codes_t;     // [d, n_pad]
  std::vector<scalar_t> half_norms;  // [n_pad]
  int64_t n_pad = 0;
};

template <typename scalar_t>
PackedLevel<scalar_t> pack_level(const scalar_t* codebook, int64_t n, int64_t d) {
  PackedLevel<scalar_t> p;
  p.n_pad = (n + kCodes - 1) / kCodes * kCodes;
  p.codes_t.assign(d * p.n_pad, scalar_t(0));
  p.half_norms.assign(p.n_pad, std::numeric_limits<scalar_t>::infinity());
  for (int64_t j = 0; j < n; ++j) {
    scalar_t norm = 0;
    for (int64_t k = 0; k < d; ++k) {
      const scalar_t c = codebook[j * d + k];
      p.codes_t[k * p.n_pad + j] = c;
      norm += c * c;
    }
    p.half_norms[j] = scalar_t(0.5) * norm;
  }
  return p;
}

// Nearest code of each of the kRows residuals `r` ([kRows, d]) -> best_code.
// Portable version; ties keep the lower code.
template <typename scalar_t>
void nearest_codes_generic(const scalar_t* r, int64_t d, const PackedLevel<scalar_t>& level,
                           int32_t* best_code) {
  for (int64_t i = 0; i < kRows; ++i) {
    scalar_t best = std::numeric_limits<scalar_t>::infinity();
    int32_t code = 0;
    for (int64_t j = 0; j < level.n_pad; ++j) {
      scalar_t s = level.half_norms[j];
      for (int64_t k = 0; k < d; ++k) {
        const scalar_t rk = r[i * d + k], c = level.codes_t[k * level.n_pad + j];
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
// AVX2+FMA micro-kernel: a 4-row x 16-code tile of scores lives in 8 ymm
// registers while the k loop streams two code vectors and four broadcasts.
__attribute__((target("avx2,fma"))) void nearest_codes_avx2(const float* r, int64_t d,
                                                            const PackedLevel<float>& level,
                                                            int32_t* best_code) {
  static_assert(kRows == 4 && kCodes8 == 16 && kCodes % kCodes8 == 0, "tile shape is hard-wired below");
  __m256 best[kRows][2];
  __m256i best_idx[kRows][2];
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int i = 0; i < kRows; ++i) {
    best[i][0] = best[i][1] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    best_idx[i][0] = lane;
    best_idx[i][1] = _mm256_add_epi32(lane, _mm256_set1_epi32(8));
  }
  const float* r0 = r;
  const float* r1 = r + d;
  const float* r2 = r + 2 * d;
  const float* r3 = r + 3 * d;
  for (int64_t j0 = 0; j0 < level.n_pad; j0 += kCodes8) {
    __m256 a00 = _mm256_loadu_ps(&level.half_norms[j0]);
    __m256 a01 = _mm256_loadu_ps(&level.half_norms[j0 + 8]);
    __m256 a10 = a00, a11 = a01, a20 = a00, a21 = a01, a30 = a00, a31 = a01;
    const float* ct = level.codes_t.data() + j0;
    for (int64_t k = 0; k < d; ++k) {
      const __m256 c0 = _mm256_loadu_ps(ct + k * level.n_pad);
      const __m256 c1 = _mm256_loadu_ps(ct + k * level.n_pad + 8);
      __m256 b = _mm256_broadcast_ss(r0 + k);
      a00 = _mm256_fnmadd_ps(b, c0, a00);
      a01 = _mm256_fnmadd_ps(b, c1, a01);
      b = _mm256_broadcast_ss(r1 + k);
      a10 = _mm256_fnmadd_ps(b, c0, a10);
      a11 = _mm256_fnmadd_ps(b, c1, a11);
      b = _mm256_broadcast_ss(r2 + k);
      a20 = _mm256_fnmadd_ps(b, c0, a20);
      a21 = _mm256_fnmadd_ps(b, c1, a21);
      b = _mm256_broadcast_ss(r3 + k);
      a30 = _mm256_fnmadd_ps(b, c0, a30);
      a31 = _mm256_fnmadd_ps(b, c1, a31);
    }
    const __m256 acc[kRows][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    const __m256i idx0 = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(j0)));
    const __m256i idx[2] = {idx0, _mm256_add_epi32(idx0, _mm256_set1_epi32(8))};
    for (int i = 0; i < kRows; ++i) {
      for (int h = 0; h < 2; ++h) {
        // Strict '<': within a lane the earlier (lower) code wins ties.
        const __m256 m = _mm256_cmp_ps(acc[i][h], best[i][h], _CMP_LT_OQ);
        best[i][h] = _mm256_blendv_ps(best[i][h], acc[i][h], m);
        best_idx[i][h] = _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_castsi256_ps(best_idx[i][h]), _mm256_castsi256_ps(idx[h]), m));
      }
    }
  }
  for (int i = 0; i < kRows; ++i) {
    alignas(32) float v[16];
    alignas(32) int32_t c[16];
    _mm256_store_ps(v, best[i][0]);
    _mm256_store_ps(v + 8, best[i][1]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), best_idx[i][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(c + 8), best_idx[i][1]);
    float bv = v[0];
    int32_t bc = c[0];
    for (int t = 1; t < 16; ++t) {
      if (v[t] < bv || (v[t] == bv && c[t] < bc)) {
        bv = v[t];
        bc = c[t];
      }
    }
    best_code[i] = bc;
  }
}
#endif

#ifdef LETTER_HAVE_AVX512_MATH
// AVX-512 micro-kernel: a 4-row x 32-code tile of scores in 8 zmm registers, as the AVX2 one.
LETTER_TARGET_AVX512 void nearest_codes_avx512(const float* r, int64_t d, const PackedLevel<float>& level,
                                               int32_t* best_code) {
  static_assert(kRows == 4 && kCodes == 32, "tile shape is hard-wired below");
  __m512 best[kRows][2];
  __m512i best_idx[kRows][2];
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int i = 0; i < kRows; ++i) {
    best[i][0] = best[i][1] = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    best_idx[i][0] = lane;
    best_idx[i][1] = _mm512_add_epi32(lane, _mm512_set1_epi32(16));
  }
  const float* r0 = r;
  const float* r1 = r + d;
  const float* r2 = r + 2 * d;
  const float* r3 = r + 3 * d;
  for (int64_t j0 = 0; j0 < level.n_pad; j0 += kCodes) {
    __m512 a00 = _mm512_loadu_ps(&level.half_norms[j0]);
    __m512 a01 = _mm512_loadu_ps(&level.half_norms[j0 + 16]);
    __m512 a10 = a00, a11 = a01, a20 = a00, a21 = a01, a30 = a00, a31 = a01;
    const float* ct = level.codes_t.data() + j0;
    for (int64_t k = 0; k < d; ++k) {
      const __m512 c0 = _mm512_loadu_ps(ct + k * level.n_pad);
      const __m512 c1 = _mm512_loadu_ps(ct + k * level.n_pad + 16);
      __m512 b = _mm512_set1_ps(r0[k]);
      a00 = _mm512_fnmadd_ps(b, c0, a00);
      a01 = _mm512_fnmadd_ps(b, c1, a01);
      b = _mm512_set1_ps(r1[k]);
      a10 = _mm512_fnmadd_ps(b, c0, a10);
      a11 = _mm512_fnmadd_ps(b, c1, a11);
      b = _mm512_set1_ps(r2[k]);
      a20 = _mm512_fnmadd_ps(b, c0, a20);
      a21 = _mm512_fnmadd_ps(b, c1, a21);
      b = _mm512_set1_ps(r3[k]);
      a30 = _mm512_fnmadd_ps(b, c0, a30);
      a31 = _mm512_fnmadd_ps(b, c1, a31);
    }
    const __m512 acc[kRows][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    const __m512i idx0 = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(j0)));
    const __m512i idx[2] = {idx0, _mm512_add_epi32(idx0, _mm512_set1_epi32(16))};
    for (int i = 0; i < kRows; ++i) {
      for (int h = 0; h < 2; ++h) {
        // Strict '<': within a lane the earlier (lower) code wins ties.
        const __mmask16 m = _mm512_cmp_ps_mask(acc[i][h], best[i][h], _CMP_LT_OQ);
        best[i][h] = _mm512_mask_mov_ps(best[i][h], m, acc[i][h]);
        best_idx[i][h] = _mm512_mask_mov_epi32(best_idx[i][h], m, idx[h]);
      }
    }
  }
  for (int i = 0; i < kRows; ++i) {
    alignas(64) float v[32];
    alignas(64) int32_t c[32];
    _mm512_store_ps(v, best[i][0]);
    _mm512_store_ps(v + 16, best[i][1]);
    _mm512_store_si512(c, best_idx[i][0]);
    _mm512_store_si512(c + 16, best_idx[i][1]);
    float bv = v[0];
    int32_t bc = c[0];
    for (int t = 1; t < 32; ++t) {
      if (v[t] < bv || (v[t] == bv && c[t] < bc)) {
        bv = v[t];
        bc = c[t];
      }
    }
    best_code[i] = bc;
  }
}
#endif

template <typename scalar_t>
using NearestCodesFn = void (*)(const scalar_t*, int64_t, const PackedLevel<scalar_t>&, int32_t*);

template <typename scalar_t>
NearestCodesFn<scalar_t> pick_nearest_codes() {
  if constexpr (std::is_same_v<scalar_t, float>) {
#ifdef LETTER_HAVE_AVX512_MATH
    if (active_isa() >= Isa::avx512) return nearest_codes_avx512;
#endif
#ifdef LETTER_HAVE_AVX2_KERNEL
    if (cpu_has_avx2_fma()) return nearest_codes_avx2;
#endif
  }
  return nearest_codes_generic<scalar_t>;
}

// Runs all levels for all rows; x [B, d], codebooks [L, N, d] contiguous.
template <typename scalar_t>
void residual_quantize_kernel(const scalar_t* xp, const scalar_t* cb, int64_t B, int64_t d,
                              int64_t L, int64_t N, int64_t* codes_p, scalar_t* q_p,
                              scalar_t* res_p) {
  std::vector<PackedLevel<scalar_t>> levels;
  levels.reserve(L);
  for (int64_t l = 0; l < L; ++l) levels.push_back(pack_level(cb + l * N * d, N, d));
  const NearestCodesFn<scalar_t> nearest_codes = pick_nearest_codes<scalar_t>();
  const int64_t blocks = (B + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> r(kRows * d), q(kRows * d);
    int32_t best[kRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t row0 = blk * kRows;
      const int64_t rows = std::min(kRows, B - row0);
      std::fill(r.begin(), r.end(), scalar_t(0));
      std::copy(xp + row0 * d, xp + (row0 + rows) * d, r.begin());
      std::fill(q.begin(), q.end(), scalar_t(0));
      for (int64_t l = 0; l < L; ++l) {
        if (res_p) {
          for (int64_t i = 0; i < rows; ++i)
            std::copy(&r[i * d], &r[i * d] + d, res_p + ((row0 + i) * L + l) * d);
        }
        nearest_codes(r.data(), d, levels[l], best);
        const scalar_t* level_cb = cb + l * N * d;
        for (int64_t i = 0; i < rows; ++i) {
          codes_p[(row0 + i) * L + l] = best[i];
          const scalar_t* c = level_cb + static_cast<int64_t>(best[i]) * d;
          for (int64_t k = 0; k < d; ++k) {
            r[i * d + k] -= c[k];
            q[i * d + k] += c[k];
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
        xa.data_ptr<scalar_t>(), cba.data_ptr<scalar_t>(), B, d, L, N, codes.data_ptr<int64_t>(),
        quantized.data_ptr<scalar_t>(), return_residuals ? residuals.data_ptr<scalar_t>() : nullptr);
  });
  return {quantized.to(x.scalar_type()), codes, residuals.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(letter, CPU, m) { m.impl("residual_quantize", &residual_quantize_cpu); }

}  // namespace letter
