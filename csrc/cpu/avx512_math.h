// Vectorized math shared by the CPU kernels (AVX-512 F/BW/DQ/VL, fp32): the 16-wide twin of
// avx2_math.h, with the same polynomial and range reduction, so both paths round alike. Callers
// compile these only for x86-64 GCC/Clang and pick them at run time when active_isa() is avx512.
#pragma once
#include "isa.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define LETTER_HAVE_AVX512_MATH 1
#define LETTER_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

namespace letter {

// exp(r) for |r| <= ln2 / 2: the degree-6 Taylor polynomial (relative error ~1e-7).
LETTER_TARGET_AVX512 inline __m512 exp_reduced_avx512(__m512 r) {
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return p;
}

// exp(x), x <= 88.37: 2^n * p(r), n = round(x / ln 2) (as exp_avx2); exactly 0 below -87.33
// (including -inf).
LETTER_TARGET_AVX512 inline __m512 exp_avx512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_GE_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.37626f)), _mm512_set1_ps(-87.33654f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 p = exp_reduced_avx512(r);
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(bits));
}

// exp(x) for x <= 0 (inputs shifted by their maximum, as in a log-sum-exp): exp_nonpositive_avx2's
// operations 16 wide (same clamp, rounding constant and polynomial), so both paths round alike.
LETTER_TARGET_AVX512 inline __m512 exp_nonpositive_avx512(__m512 x) {
  const __m512 round = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: float add rounds to an integer
  x = _mm512_max_ps(_mm512_set1_ps(-87.33654f), x);  // max_ps returns its second operand for NaN
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), round);
  const __m512 n = _mm512_sub_ps(t, round);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), x);
  const __m512 p = exp_reduced_avx512(r);
  // t's bits are 0x4B400000 + n; shifting by 23 drops the constant and leaves n in the exponent.
  const __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(_mm512_castps_si512(t), 23), _mm512_set1_epi32(127 << 23));
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

}  // namespace letter
#endif
