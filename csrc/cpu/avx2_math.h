// Vectorized math shared by the CPU kernels (AVX2 + FMA, fp32). Callers compile these only for
// x86-64 GCC/Clang and pick them at run time with cpu_has_avx2_fma().
#pragma once
#include "isa.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define LETTER_HAVE_AVX2_MATH 1

namespace letter {

// Whether the callers' AVX2 + FMA kernels may run: this CPU runs them and no lower ISA is forced.
inline bool cpu_has_avx2_fma() { return active_isa() >= Isa::avx2; }

// exp(r) for |r| <= ln2 / 2: the degree-6 Taylor polynomial (relative error ~1e-7).
__attribute__((target("avx2,fma"))) inline __m256 exp_reduced_avx2(__m256 r) {
  __m256 p = _mm256_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  return p;
}

// exp(x), x <= 88.37: 2^n * p(r) with n = round(x / ln 2), |r| <= ln2 / 2 and p the degree-6
// Taylor polynomial (relative error ~1e-7); exactly 0 below -87.33 (including -inf).
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_GE_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.37626f)), _mm256_set1_ps(-87.33654f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in a high part exact in float and a low correction.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 p = exp_reduced_avx2(r);
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), keep);
}

// exp(x) for x <= 0 (inputs already shifted by their maximum, as in a log-sum-exp), with fewer
// operations than exp_avx2: the exponent comes from the rounding constant's low mantissa bits,
// r uses one FMA with float ln2 (error n * 2e-9), and x is clamped at -87.33 so that -inf gives
// 2^-126 * p(r) ~ 1e-38 instead of 0 (negligible next to the maximum's 1 in a sum). NaN gives NaN,
// so a NaN in a log-sum-exp makes the sum NaN.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive_avx2(__m256 x) {
  const __m256 round = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: float add rounds to an integer
  x = _mm256_max_ps(_mm256_set1_ps(-87.33654f), x);  // max_ps returns its second operand for NaN
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), round);
  const __m256 n = _mm256_sub_ps(t, round);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147181f), x);
  const __m256 p = exp_reduced_avx2(r);
  // t's bits are 0x4B400000 + n; shifting by 23 drops the constant and leaves n in the exponent.
  const __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23), _mm256_set1_epi32(127 << 23));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

}  // namespace letter
#endif
