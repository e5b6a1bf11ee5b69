// CPU kernels of letter::dot_product_cross_entropy_{fwd,bwd} (the tile path) and
// letter::dot_product_cross_entropy_chunked (the chunked-GEMM path).
//
// Tile path. logits_ij = q'_i . k_j + b'_j with q' = q / tau and b' = bias / tau. Nothing of size
// B x M is ever allocated: logits are computed in tiles of kRows x kTile into a small per-thread
// buffer by an AVX2 micro-kernel.
//  - forward (row-parallel): online logsumexp over key tiles; keeps lse [B] only.
//  - backward pass 1 (row-parallel): recompute P = exp(logits - lse), dS = g (P - onehot),
//    dq = dS K / tau.
//  - backward pass 2 (key-parallel): the same tiles transposed, dkeys = dS^T q', dbias = colsum / tau.
// Each output row is owned by one task, so results are deterministic (no atomics, no reductions
// whose order depends on the thread count).
//
// Chunked-GEMM path. Rows in chunks (chunk_rows): the BLAS (at::mm: MKL/oneDNN, which pick
// AVX-512/AMX themselves) writes a chunk's logits into one preallocated buffer, a row-parallel pass
// turns them into the loss and log-sum-exp and, when upstream row gradients g are given, into
// dS = g (P - onehot) / tau in place, and two more GEMMs give the chunk's dq rows and add its share
// of dkeys. With g known in the forward (a reduced loss), forward + backward is the three GEMMs
// eager pays, without eager's B x M logits and their gradient in memory. bf16 inputs on a CPU with
// bf16 GEMMs (AMX or AVX512-BF16, and the avx512 path active) run the three GEMMs in bf16 like
// eager F.linear (logits rounded to bf16, fp32 accumulation inside the GEMM); the row pass, dq and
// dkeys stay fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "avx2_math.h"
#include "avx512_math.h"
#include "parallel.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace letter {
namespace {

constexpr int64_t kRows = 4;    // rows per micro-tile
constexpr int64_t kCols = 16;   // columns per micro-tile (two 8-wide vectors)
constexpr int64_t kTile = 256;  // columns per cache tile; the score buffer is [kRows][kTile]
constexpr int64_t kBlock = 64;  // rows (keys in pass 2) per parallel task, a multiple of kRows

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A [n, d] matrix (times `scale`) in both layouts the passes need, zero-padded to n_pad rows:
// `rows` [n_pad, d] (micro-kernel A operand, accumulation source) and `cols`, transposed tile by
// tile: [n / kTile][d][kTile]. A tile is contiguous, so the micro-kernel's k loop stays within a
// few pages (a plain [d, n] layout strides n floats per k: a TLB miss per step at large n).
template <typename T>
struct Operand {
  std::vector<T> rows, cols;
  int64_t n_pad = 0;
  // The transposed tile starting at column j0 (a multiple of kTile), with row stride kTile.
  const T* tile(int64_t j0, int64_t d) const { return &cols[j0 * d]; }
};

template <typename T>
Operand<T> make_operand(const T* src, int64_t n, int64_t d, T scale) {
  Operand<T> op;
  op.n_pad = round_up(n, kCols);
  op.rows.assign(op.n_pad * d, T(0));
  op.cols.assign(d * round_up(op.n_pad, kTile), T(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < d; ++k) {
      const T v = src[i * d + k] * scale;
      op.rows[i * d + k] = v;
      op.cols[(i / kTile) * d * kTile + k * kTile + i % kTile] = v;
    }
  }
  return op;
}

// ---- portable primitives (also the fp64 path) ------------------------------------------------

// out[i][j] = (sum_k a[i][k] * bt[k][j] + bias) + shift for kRows rows and nc columns, where
// (bias, shift) = (col_add[j], row_add[i]), or (row_add[i], col_add[j]) when bias_in_rows. The
// fixed order makes every pass round a logit (dot + bias) and logit - lse bit-identically.
template <typename T>
void scores_generic(const T* a, int64_t d, const T* bt, int64_t ldb, int64_t nc, const T* row_add,
                    const T* col_add, bool bias_in_rows, T* out) {
  for (int64_t i = 0; i < kRows; ++i) {
    T* o = out + i * kTile;
    for (int64_t j = 0; j < nc; ++j) o[j] = T(0);
    for (int64_t k = 0; k < d; ++k) {
      const T aik = a[i * d + k];
      const T* b = bt + k * ldb;
      for (int64_t j = 0; j < nc; ++j) o[j] += aik * b[j];
    }
    for (int64_t j = 0; j < nc; ++j)
      o[j] = bias_in_rows ? (o[j] + row_add[i]) + col_add[j] : (o[j] + col_add[j]) + row_add[i];
  }
}

template <typename T>
T row_max_generic(const T* s, int64_t n) {
  T m = kNegInf<T>;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

template <typename T>
T exp_sum_generic(const T* s, int64_t n, T shift) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(s[j] - shift);
  return sum;
}

// s[j] = exp(s[j]) * (col_scale ? col_scale[j] : 1) * scale; returns the sum of the new s.
template <typename T>
T exp_scale_generic(T* s, int64_t n, const T* col_scale, T scale) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j]) * (col_scale ? col_scale[j] : T(1)) * scale;
    sum += s[j];
  }
  return sum;
}

// acc[i][:] += sum_j coef[i][j] * src[j][:] for kRows rows; coef rows have stride kTile.
template <typename T>
void accumulate_generic(const T* coef, int64_t nc, const T* src, int64_t d, T* acc) {
  for (int64_t i = 0; i < kRows; ++i) {
    for (int64_t j = 0; j < nc; ++j) {
      const T c = coef[i * kTile + j];
      for (int64_t k = 0; k < d; ++k) acc[i * d + k] += c * src[j * d + k];
    }
  }
}

// ---- AVX2 + FMA primitives (fp32), chosen at run time ----------------------------------------
#if defined(__x86_64__) && defined(__GNUC__)
#define LETTER_HAVE_AVX2_KERNEL 1

__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

// A 4-row x 16-column tile of dot products lives in 8 ymm registers while k streams two column
// vectors and four broadcasts (nc is a multiple of kCols).
__attribute__((target("avx2,fma"))) void scores_avx2(const float* a, int64_t d, const float* bt,
                                                     int64_t ldb, int64_t nc, const float* row_add,
                                                     const float* col_add, bool bias_in_rows, float* out) {
  static_assert(kRows == 4 && kCols == 16, "tile shape is hard-wired below");
  const float* a0 = a;
  const float* a1 = a + d;
  const float* a2 = a + 2 * d;
  const float* a3 = a + 3 * d;
  for (int64_t j0 = 0; j0 < nc; j0 += kCols) {
    __m256 s00 = _mm256_setzero_ps(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00,
           s30 = s00, s31 = s00;
    const float* b = bt + j0;
    for (int64_t k = 0; k < d; ++k) {
      const __m256 c0 = _mm256_loadu_ps(b + k * ldb);
      const __m256 c1 = _mm256_loadu_ps(b + k * ldb + 8);
      __m256 v = _mm256_broadcast_ss(a0 + k);
      s00 = _mm256_fmadd_ps(v, c0, s00);
      s01 = _mm256_fmadd_ps(v, c1, s01);
      v = _mm256_broadcast_ss(a1 + k);
      s10 = _mm256_fmadd_ps(v, c0, s10);
      s11 = _mm256_fmadd_ps(v, c1, s11);
      v = _mm256_broadcast_ss(a2 + k);
      s20 = _mm256_fmadd_ps(v, c0, s20);
      s21 = _mm256_fmadd_ps(v, c1, s21);
      v = _mm256_broadcast_ss(a3 + k);
      s30 = _mm256_fmadd_ps(v, c0, s30);
      s31 = _mm256_fmadd_ps(v, c1, s31);
    }
    const __m256 col0 = _mm256_loadu_ps(col_add + j0);
    const __m256 col1 = _mm256_loadu_ps(col_add + j0 + 8);
    const __m256 acc[kRows][2] = {{s00, s01}, {s10, s11}, {s20, s21}, {s30, s31}};
    for (int i = 0; i < kRows; ++i) {
      const __m256 r = _mm256_set1_ps(row_add[i]);
      const __m256 first0 = bias_in_rows ? r : col0, second0 = bias_in_rows ? col0 : r;
      const __m256 first1 = bias_in_rows ? r : col1, second1 = bias_in_rows ? col1 : r;
      _mm256_storeu_ps(out + i * kTile + j0, _mm256_add_ps(_mm256_add_ps(acc[i][0], first0), second0));
      _mm256_storeu_ps(out + i * kTile + j0 + 8, _mm256_add_ps(_mm256_add_ps(acc[i][1], first1), second1));
    }
  }
}

// The buffers below have n a multiple of 8 (tiles are multiples of kCols).
__attribute__((target("avx2,fma"))) float row_max_avx2(const float* s, int64_t n) {
  __m256 m = _mm256_set1_ps(kNegInf<float>);
  for (int64_t j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = t[0];
  for (int i = 1; i < 8; ++i) r = std::max(r, t[i]);
  return r;
}

__attribute__((target("avx2,fma"))) float exp_sum_avx2(const float* s, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) sum = _mm256_add_ps(sum, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), sh)));
  return hsum_avx2(sum);
}

__attribute__((target("avx2,fma"))) float exp_scale_avx2(float* s, int64_t n, const float* col_scale,
                                                         float scale) {
  const __m256 sc = _mm256_set1_ps(scale);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    __m256 v = _mm256_mul_ps(exp_avx2(_mm256_loadu_ps(s + j)), sc);
    if (col_scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(col_scale + j));
    _mm256_storeu_ps(s + j, v);
    sum = _mm256_add_ps(sum, v);
  }
  return hsum_avx2(sum);
}

// Register-blocked over 8 columns of d at a time: per j one vector load, four broadcasts, four FMAs.
__attribute__((target("avx2,fma"))) void accumulate_avx2(const float* coef, int64_t nc, const float* src,
                                                         int64_t d, float* acc) {
  int64_t k0 = 0;
  for (; k0 + 8 <= d; k0 += 8) {
    __m256 r0 = _mm256_loadu_ps(acc + k0), r1 = _mm256_loadu_ps(acc + d + k0);
    __m256 r2 = _mm256_loadu_ps(acc + 2 * d + k0), r3 = _mm256_loadu_ps(acc + 3 * d + k0);
    for (int64_t j = 0; j < nc; ++j) {
      const __m256 v = _mm256_loadu_ps(src + j * d + k0);
      r0 = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + j), v, r0);
      r1 = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + kTile + j), v, r1);
      r2 = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + 2 * kTile + j), v, r2);
      r3 = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + 3 * kTile + j), v, r3);
    }
    _mm256_storeu_ps(acc + k0, r0);
    _mm256_storeu_ps(acc + d + k0, r1);
    _mm256_storeu_ps(acc + 2 * d + k0, r2);
    _mm256_storeu_ps(acc + 3 * d + k0, r3);
  }
  for (; k0 < d; ++k0) {  // the d % 8 tail
    for (int64_t i = 0; i < kRows; ++i) {
      float s = acc[i * d + k0];
      for (int64_t j = 0; j < nc; ++j) s += coef[i * kTile + j] * src[j * d + k0];
      acc[i * d + k0] = s;
    }
  }
}
#endif

template <typename T>
struct Kernels {
  void (*scores)(const T*, int64_t, const T*, int64_t, int64_t, const T*, const T*, bool, T*);
  T (*row_max)(const T*, int64_t);
  T (*exp_sum)(const T*, int64_t, T);
  T (*exp_scale)(T*, int64_t, const T*, T);
  void (*accumulate)(const T*, int64_t, const T*, int64_t, T*);
};

template <typename T>
Kernels<T> pick_kernels() {
  if constexpr (std::is_same_v<T, float>) {
#ifdef LETTER_HAVE_AVX2_KERNEL
    if (cpu_has_avx2_fma())
      return {scores_avx2, row_max_avx2, exp_sum_avx2, exp_scale_avx2, accumulate_avx2};
#endif
  }
  return {scores_generic<T>, row_max_generic<T>, exp_sum_generic<T>, exp_scale_generic<T>,
          accumulate_generic<T>};
}

// Everything both directions share, in the accumulation type T.
template <typename T>
struct Problem {
  int64_t B, M, d;
  T inv_tau;
  Operand<T> q;         // q / tau
  Operand<T> k;         // keys
  std::vector<T> bias;  // bias / tau (0 without bias), -inf on the padding keys
  const int64_t* targets;
  const int64_t* exclude;  // nullptr: no exclusions
  int64_t ignore_index;

  bool valid(int64_t i) const { return targets[i] != ignore_index; }
  // Index of the key excluded from row i, or -1.
  int64_t excluded(int64_t i) const { return exclude ? exclude[i] : -1; }
};

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& targets,
                        const at::Tensor& exclude, const at::Tensor& bias, double temperature,
                        int64_t ignore_index) {
  Problem<T> p;
  p.B = q.size(0);
  p.M = keys.size(0);
  p.d = q.size(1);
  p.inv_tau = T(1) / static_cast<T>(temperature);
  p.q = make_operand(q.data_ptr<T>(), p.B, p.d, p.inv_tau);
  p.k = make_operand(keys.data_ptr<T>(), p.M, p.d, T(1));
  p.bias.assign(p.k.n_pad, kNegInf<T>);
  for (int64_t j = 0; j < p.M; ++j) p.bias[j] = bias.defined() ? bias.data_ptr<T>()[j] * p.inv_tau : T(0);
  p.targets = targets.data_ptr<int64_t>();
  p.exclude = exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr;
  p.ignore_index = ignore_index;
  return p;
}

template <typename T>
void forward_kernel(const Problem<T>& p, T* loss, T* lse) {
  const Kernels<T> kern = pick_kernels<T>();
  const int64_t d = p.d, n_keys = p.k.n_pad;
  const int64_t blocks = (p.B + kBlock - 1) / kBlock;
  parallel_blocks(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(kRows * kTile);
    const T no_row_add[kRows] = {};
    T run_max[kBlock], run_sum[kBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kBlock, r1 = std::min(r0 + kBlock, p.B);
      std::fill(run_max, run_max + kBlock, kNegInf<T>);
      std::fill(run_sum, run_sum + kBlock, T(0));
      for (int64_t j0 = 0; j0 < n_keys; j0 += kTile) {
        const int64_t nc = std::min(kTile, n_keys - j0);
        for (int64_t row = r0; row < r1; row += kRows) {
          kern.scores(&p.q.rows[row * d], d, p.k.tile(j0, d), kTile, nc, no_row_add, &p.bias[j0], false, buf.data());
          for (int64_t i = 0; i < std::min(kRows, r1 - row); ++i) {
            T* s = &buf[i * kTile];
            const int64_t e = p.excluded(row + i);
            if (e >= j0 && e < j0 + nc) s[e - j0] = kNegInf<T>;
            const T tile_max = kern.row_max(s, nc);
            if (tile_max == kNegInf<T>) continue;
            T& m = run_max[row + i - r0];
            const T new_max = std::max(m, tile_max);
            run_sum[row + i - r0] = run_sum[row + i - r0] * std::exp(m - new_max) + kern.exp_sum(s, nc, new_max);
            m = new_max;
          }
        }
      }
      for (int64_t i = r0; i < r1; ++i) {
        lse[i] = run_max[i - r0] + std::log(run_sum[i - r0]);
        loss[i] = T(0);
        if (p.valid(i)) {
          const T* qi = &p.q.rows[i * d];
          const T* kt = &p.k.rows[p.targets[i] * d];
          T dot = 0;
          for (int64_t k = 0; k < d; ++k) dot += qi[k] * kt[k];
          loss[i] = lse[i] - (dot + p.bias[p.targets[i]]);
        }
      }
    }
  });
}

// Pass 1: dq'_i = sum_j dS_ij k_j, rows in parallel (dq = dq' / tau, applied by the caller).
template <typename T>
void backward_rows_kernel(const Problem<T>& p, const std::vector<T>& g, const std::vector<T>& neg_lse, T* dq) {
  const Kernels<T> kern = pick_kernels<T>();
  const int64_t d = p.d, n_keys = p.k.n_pad;
  const int64_t blocks = (p.B + kBlock - 1) / kBlock;
  parallel_blocks(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(kRows * kTile);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kBlock, r1 = std::min(r0 + kBlock, p.B);
      for (int64_t j0 = 0; j0 < n_keys; j0 += kTile) {
        const int64_t nc = std::min(kTile, n_keys - j0);
        for (int64_t row = r0; row < r1; row += kRows) {
          const int64_t rows = std::min(kRows, r1 - row);
          if (std::all_of(&g[row], &g[row] + rows, [](T v) { return v == T(0); })) continue;
          kern.scores(&p.q.rows[row * d], d, p.k.tile(j0, d), kTile, nc, &neg_lse[row], &p.bias[j0], false, buf.data());
          for (int64_t i = 0; i < kRows; ++i) {
            T* s = &buf[i * kTile];
            const int64_t e = i < rows ? p.excluded(row + i) : -1;
            if (e >= j0 && e < j0 + nc) s[e - j0] = kNegInf<T>;
            kern.exp_scale(s, nc, nullptr, g[row + i]);
            if (i < rows && p.valid(row + i)) {
              const int64_t t = p.targets[row + i];
              if (t >= j0 && t < j0 + nc) s[t - j0] -= g[row + i];
            }
          }
          kern.accumulate(buf.data(), nc, &p.k.rows[j0 * d], d, &dq[row * d]);
        }
      }
    }
  });
}

// Pass 2: dk_j = sum_i dS_ij q'_i and dbias'_j = sum_i dS_ij, keys in parallel, on the transposed
// tiles (keys as micro-tile rows, query rows as columns).
template <typename T>
void backward_keys_kernel(const Problem<T>& p, const std::vector<T>& g, const std::vector<T>& neg_lse_cols,
                          T* dk, T* dbias) {
  const Kernels<T> kern = pick_kernels<T>();
  const int64_t d = p.d, n_rows = p.q.n_pad;
  const int64_t blocks = (p.M + kBlock - 1) / kBlock;
  parallel_blocks(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(kRows * kTile);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t k0 = blk * kBlock, k1 = std::min(k0 + kBlock, p.M);
      std::vector<std::pair<int64_t, int64_t>> excluded_hits, target_hits;  // (row, key) in this block
      for (int64_t i0 = 0; i0 < n_rows; i0 += kTile) {
        const int64_t nc = std::min(kTile, n_rows - i0), i1 = std::min(i0 + nc, p.B);
        excluded_hits.clear();
        target_hits.clear();
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t e = p.excluded(i), t = p.targets[i];
          if (e >= k0 && e < k1) excluded_hits.emplace_back(i, e);
          if (p.valid(i) && g[i] != T(0) && t >= k0 && t < k1) target_hits.emplace_back(i, t);
        }
        for (int64_t key = k0; key < k1; key += kRows) {
          kern.scores(&p.k.rows[key * d], d, p.q.tile(i0, d), kTile, nc, &p.bias[key], &neg_lse_cols[i0], true,
                      buf.data());
          for (const auto& [i, e] : excluded_hits)
            if (e >= key && e < key + kRows) buf[(e - key) * kTile + (i - i0)] = kNegInf<T>;
          for (int64_t jj = 0; jj < kRows; ++jj)
            dbias[key + jj] += kern.exp_scale(&buf[jj * kTile], nc, &g[i0], T(1));
          for (const auto& [i, t] : target_hits) {
            if (t >= key && t < key + kRows) {
              buf[(t - key) * kTile + (i - i0)] -= g[i];
              dbias[t] -= g[i];
            }
          }
          kern.accumulate(buf.data(), nc, &p.q.rows[i0 * d], d, &dk[key * d]);
        }
      }
    }
  });
}

// ---- chunked-GEMM path: the row pass over one chunk of logits ---------------------------------

// Logits per chunk: at least about this many bytes (M = 33,024 keys: ~250 rows, enough for the
// BLAS to run at full rate; the buffer stays far below eager's B x M logits).
constexpr int64_t kChunkBytes = int64_t(32) << 20;

// Rows per chunk. Each chunk's dkeys += dS^T Q re-reads and rewrites the whole [M, d] accumulator
// (8 M d bytes in fp32) for 2 M rows d multiply-add flops: rows / 4 flops per byte of that traffic.
// At least d / 4 rows makes the chunk buffer (rows M) a quarter of the accumulator (M d) and the
// traffic small next to the GEMM on any CPU (1,024 rows at d = 4,096: 8 chunks of 8,192 rows, not
// 33, for a 129 MiB buffer next to dkeys' 516 MiB).
int64_t chunk_rows(int64_t B, int64_t M, int64_t d, int64_t element_bytes) {
  const int64_t rows = std::max(kChunkBytes / (M * element_bytes), d / 4);
  return std::clamp<int64_t>(rows, 1, std::max<int64_t>(B, 1));
}

// Keys per block of the bf16 dkeys update: its bf16 product [block, d] is added to the fp32
// accumulator block by block, so the temporary stays small.
constexpr int64_t kKeyBlock = 4096;

// s[j] = (s[j] + bias[j]) * inv_tau (bias may be null); returns max_j s[j].
template <typename T>
T affine_max_generic(T* s, int64_t n, const T* bias, T inv_tau) {
  T m = kNegInf<T>;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = (s[j] + (bias ? bias[j] : T(0))) * inv_tau;
    m = std::max(m, s[j]);
  }
  return m;
}

// Returns sum_j exp(s[j] - shift); with store, s[j] becomes exp(s[j] - shift).
template <typename T>
T exp_shift_sum_generic(T* s, int64_t n, T shift, bool store) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T e = std::exp(s[j] - shift);
    if (store) s[j] = e;
    sum += e;
  }
  return sum;
}

#ifdef LETTER_HAVE_AVX2_KERNEL
__attribute__((target("avx2,fma"))) float affine_max_avx2(float* s, int64_t n, const float* bias, float inv_tau) {
  const __m256 scale = _mm256_set1_ps(inv_tau);
  __m256 m = _mm256_set1_ps(kNegInf<float>);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_loadu_ps(s + j);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    v = _mm256_mul_ps(v, scale);
    _mm256_storeu_ps(s + j, v);
    m = _mm256_max_ps(m, v);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = t[0];
  for (int i = 1; i < 8; ++i) r = std::max(r, t[i]);
  return std::max(r, affine_max_generic(s + j, n - j, bias ? bias + j : nullptr, inv_tau));
}

__attribute__((target("avx2,fma"))) float exp_shift_sum_avx2(float* s, int64_t n, float shift, bool store) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = sum0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 e0 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), sh));
    const __m256 e1 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), sh));
    if (store) {
      _mm256_storeu_ps(s + j, e0);
      _mm256_storeu_ps(s + j + 8, e1);
    }
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
  }
  return hsum_avx2(_mm256_add_ps(sum0, sum1)) + exp_shift_sum_generic(s + j, n - j, shift, store);
}
#endif

#ifdef LETTER_HAVE_AVX512_MATH
LETTER_TARGET_AVX512 float affine_max_avx512(float* s, int64_t n, const float* bias, float inv_tau) {
  const __m512 scale = _mm512_set1_ps(inv_tau);
  __m512 m = _mm512_set1_ps(kNegInf<float>);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(live, s + j);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, bias + j));
    v = _mm512_mul_ps(v, scale);
    _mm512_mask_storeu_ps(s + j, live, v);
    m = _mm512_mask_max_ps(m, live, m, v);
  }
  return _mm512_reduce_max_ps(m);
}

LETTER_TARGET_AVX512 float exp_shift_sum_avx512(float* s, int64_t n, float shift, bool store) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = sum0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + j), sh));
    const __m512 e1 = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), sh));
    if (store) {
      _mm512_storeu_ps(s + j, e0);
      _mm512_storeu_ps(s + j + 16, e1);
    }
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
  }
  for (; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(live, exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), sh)));
    if (store) _mm512_mask_storeu_ps(s + j, live, e);
    sum0 = _mm512_add_ps(sum0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}
#endif

template <typename T>
struct RowPass {
  T (*affine_max)(T*, int64_t, const T*, T);
  T (*exp_shift_sum)(T*, int64_t, T, bool);
};

template <typename T>
RowPass<T> pick_row_pass() {
  if constexpr (std::is_same_v<T, float>) {
#ifdef LETTER_HAVE_AVX512_MATH
    if (active_isa() >= Isa::avx512) return {affine_max_avx512, exp_shift_sum_avx512};
#endif
#ifdef LETTER_HAVE_AVX2_KERNEL
    if (cpu_has_avx2_fma()) return {affine_max_avx2, exp_shift_sum_avx2};
#endif
  }
  return {affine_max_generic<T>, exp_shift_sum_generic<T>};
}

// Losses and lse of every row; with g (upstream gradient per row, ignored rows skipped), also
// dq [B, d] (written; in the GEMM dtype, which is what the dq GEMM produces), dk [M, d] (written
// by the first chunk, accumulated by the others: no separate zeroing pass over it) and dbias [M]
// (accumulated, zero on entry, when defined).
// q and keys are in T (the accumulation dtype) or in bf16 (bf16 GEMMs; see the file comment).
template <typename T>
void chunked_kernel(const at::Tensor& q, const at::Tensor& keys, const T* bias, const int64_t* targets,
                    const int64_t* exclude, int64_t ignore_index, T inv_tau, const T* g, T* loss, T* lse,
                    at::Tensor& dq, at::Tensor& dk, at::Tensor& dbias) {
  const int64_t B = q.size(0), M = keys.size(0), d = q.size(1);
  const bool low_precision_gemm = q.scalar_type() != c10::CppTypeToScalarType<T>::value;
  const int64_t chunk = chunk_rows(B, M, d, sizeof(T));
  const RowPass<T> rp = pick_row_pass<T>();
  const auto acc_options = q.options().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor buffer = at::empty({chunk, M}, acc_options);
  // bf16 GEMMs: their logits and dS go through a bf16 twin of the buffer.
  at::Tensor gemm_buffer = low_precision_gemm ? at::empty({chunk, M}, q.options()) : at::Tensor();
  const at::Tensor keys_t = keys.t();
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t rows = std::min(chunk, B - r0);
    at::Tensor s = buffer.narrow(0, 0, rows);
    const at::Tensor q_chunk = q.narrow(0, r0, rows);
    if (low_precision_gemm) {
      at::Tensor s_gemm = gemm_buffer.narrow(0, 0, rows);
      at::mm_out(s_gemm, q_chunk, keys_t);
      s.copy_(s_gemm);
    } else {
      at::mm_out(s, q_chunk, keys_t);
    }
    T* sp = s.data_ptr<T>();
    parallel_blocks(0, rows, std::max<int64_t>(1, 4096 / M), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = r0 + i;
        T* row = sp + i * M;
        T m = rp.affine_max(row, M, bias, inv_tau);
        const int64_t e = exclude ? exclude[r] : -1;
        if (e >= 0) {
          const bool was_max = row[e] == m;
          row[e] = kNegInf<T>;
          if (was_max) m = row_max_generic(row, M);
        }
        const bool valid = targets[r] != ignore_index;
        const T target_logit = valid ? row[targets[r]] : T(0);
        const T gi = g && valid ? g[r] : T(0);
        const T sum = rp.exp_shift_sum(row, M, m, g != nullptr);
        lse[r] = m + std::log(sum);
        loss[r] = valid ? lse[r] - target_logit : T(0);
        if (!g) continue;
        if (gi == T(0)) {
          std::fill(row, row + M, T(0));
          continue;
        }
        const T coef = gi * inv_tau / sum;
        for (int64_t j = 0; j < M; ++j) row[j] *= coef;
        row[targets[r]] -= gi * inv_tau;
      }
    });
    if (!g) continue;
    at::Tensor dq_rows = dq.narrow(0, r0, rows);
    const bool first_chunk = r0 == 0;
    if (low_precision_gemm) {
      at::Tensor ds = gemm_buffer.narrow(0, 0, rows);
      ds.copy_(s);
      at::mm_out(dq_rows, ds, keys);
      for (int64_t k0 = 0; k0 < M; k0 += kKeyBlock) {
        const int64_t keys_in_block = std::min(kKeyBlock, M - k0);
        // The block's columns transposed into a contiguous [keys, rows] copy: oneDNN's bf16 GEMM
        // on the strided or transposed slice ran at half the rate of the other two GEMMs.
        const at::Tensor product = at::mm(ds.narrow(1, k0, keys_in_block).t().contiguous(), q_chunk);
        at::Tensor dk_block = dk.narrow(0, k0, keys_in_block);
        if (first_chunk) {
          dk_block.copy_(product);
        } else {
          dk_block.add_(product);
        }
      }
    } else {
      at::mm_out(dq_rows, s, keys);
      if (first_chunk) {
        at::mm_out(dk, s.t(), q_chunk);
      } else {
        dk.addmm_(s.t(), q_chunk);
      }
    }
    if (dbias.defined()) dbias.add_(s.sum(0));
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& targets,
                  const at::Tensor& exclude, const at::Tensor& bias, double temperature, int64_t ignore_index) {
  TORCH_CHECK_VALUE(q.dim() == 2 && keys.dim() == 2 && keys.size(1) == q.size(1) && keys.size(0) >= 1,
                    "dot_product_cross_entropy: expected q [B, d] and keys [M, d] with M >= 1");
  TORCH_CHECK_VALUE(q.is_floating_point() && keys.scalar_type() == q.scalar_type(),
                    "dot_product_cross_entropy: q and keys must be floating-point of one dtype");
  TORCH_CHECK_VALUE(temperature > 0, "dot_product_cross_entropy: temperature must be > 0");
  const int64_t B = q.size(0), M = keys.size(0);
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == B && targets.scalar_type() == at::kLong,
                    "dot_product_cross_entropy: targets must be int64 [B]");
  // Indices are checked here too: they address memory in the kernels.
  const at::Tensor bad_target = (targets != ignore_index) & ((targets < 0) | (targets >= M));
  TORCH_CHECK_VALUE(!bad_target.any().item<bool>(), "dot_product_cross_entropy: targets out of range");
  if (exclude.defined()) {
    TORCH_CHECK_VALUE(exclude.dim() == 1 && exclude.size(0) == B && exclude.scalar_type() == at::kLong,
                      "dot_product_cross_entropy: exclude must be int64 [B]");
    TORCH_CHECK_VALUE(!((exclude < -1) | (exclude >= M)).any().item<bool>(),
                      "dot_product_cross_entropy: exclude out of range");
  }
  if (bias.defined()) {
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == M && bias.scalar_type() == q.scalar_type(),
                      "dot_product_cross_entropy: bias must be [M] of q's dtype");
  }
}

at::ScalarType acc_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor contiguous_as(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() && t->defined() ? t->to(dtype).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> dot_product_cross_entropy_fwd_cpu(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& targets, const std::optional<at::Tensor>& exclude,
    const std::optional<at::Tensor>& bias, double temperature, int64_t ignore_index) {
  const auto acc = acc_type(q);
  const at::Tensor qa = q.to(acc).contiguous(), ka = keys.to(acc).contiguous();
  const at::Tensor ta = targets.contiguous(), ea = contiguous_as(exclude, at::kLong), ba = contiguous_as(bias, acc);
  check_inputs(q, keys, ta, ea, bias.has_value() ? *bias : at::Tensor(), temperature, ignore_index);
  at::Tensor loss = at::empty({q.size(0)}, q.options().dtype(acc));
  at::Tensor lse = at::empty({q.size(0)}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "dot_product_cross_entropy_fwd_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(qa, ka, ta, ea, ba, temperature, ignore_index);
    forward_kernel(p, loss.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dot_product_cross_entropy_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& q, const at::Tensor& keys, const at::Tensor& targets,
    const std::optional<at::Tensor>& exclude, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    double temperature, int64_t ignore_index) {
  const auto acc = acc_type(q);
  const at::Tensor qa = q.to(acc).contiguous(), ka = keys.to(acc).contiguous();
  const at::Tensor ta = targets.contiguous(), ea = contiguous_as(exclude, at::kLong), ba = contiguous_as(bias, acc);
  check_inputs(q, keys, ta, ea, bias.has_value() ? *bias : at::Tensor(), temperature, ignore_index);
  const int64_t B = q.size(0), M = keys.size(0), d = q.size(1);
  TORCH_CHECK_VALUE(grad_rows.dim() == 1 && grad_rows.size(0) == B && lse.dim() == 1 && lse.size(0) == B,
                    "dot_product_cross_entropy_bwd: grad_rows and lse must be [B]");
  const at::Tensor ga = grad_rows.to(acc).contiguous(), la = lse.to(acc).contiguous();
  at::Tensor dq, dk, dbias;
  AT_DISPATCH_FLOATING_TYPES(acc, "dot_product_cross_entropy_bwd_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(qa, ka, ta, ea, ba, temperature, ignore_index);
    // Per-row upstream gradient (0 on ignored rows and padding) and -lse (-inf on padding rows, and
    // in pass 2's copy also where g = 0, so that those entries get P = 0 exactly).
    std::vector<scalar_t> g(p.q.n_pad, scalar_t(0)), neg_lse(p.q.n_pad, kNegInf<scalar_t>),
        neg_lse_cols(p.q.n_pad, kNegInf<scalar_t>);
    for (int64_t i = 0; i < B; ++i) {
      g[i] = p.valid(i) ? ga.data_ptr<scalar_t>()[i] : scalar_t(0);
      neg_lse[i] = -la.data_ptr<scalar_t>()[i];
      if (g[i] != scalar_t(0)) neg_lse_cols[i] = neg_lse[i];
    }
    at::Tensor dq_acc = at::zeros({p.q.n_pad, d}, qa.options());
    at::Tensor dk_acc = at::zeros({p.k.n_pad, d}, qa.options());
    std::vector<scalar_t> dbias_acc(p.k.n_pad, scalar_t(0));
    backward_rows_kernel(p, g, neg_lse, dq_acc.data_ptr<scalar_t>());
    backward_keys_kernel(p, g, neg_lse_cols, dk_acc.data_ptr<scalar_t>(), dbias_acc.data());
    dq = dq_acc.narrow(0, 0, B).mul_(p.inv_tau).to(q.scalar_type());
    dk = dk_acc.narrow(0, 0, M).to(keys.scalar_type());
    if (ba.defined()) {
      dbias = at::empty({M}, qa.options());
      for (int64_t j = 0; j < M; ++j) dbias.data_ptr<scalar_t>()[j] = dbias_acc[j] * p.inv_tau;
      dbias = dbias.to(bias->scalar_type());
    } else {
      dbias = at::empty({0}, q.options());
    }
  });
  return {dq, dk, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dot_product_cross_entropy_chunked_cpu(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& targets, const std::optional<at::Tensor>& exclude,
    const std::optional<at::Tensor>& bias, double temperature, int64_t ignore_index,
    const std::optional<at::Tensor>& grad_rows) {
  const auto acc = acc_type(q);
  const auto gemm_dtype = q.scalar_type() == at::kBFloat16 && bf16_gemms_pay() ? at::kBFloat16 : acc;
  const at::Tensor qa = q.to(gemm_dtype).contiguous(), ka = keys.to(gemm_dtype).contiguous();
  const at::Tensor ta = targets.contiguous(), ea = contiguous_as(exclude, at::kLong), ba = contiguous_as(bias, acc);
  check_inputs(q, keys, ta, ea, bias.has_value() ? *bias : at::Tensor(), temperature, ignore_index);
  const int64_t B = q.size(0), M = keys.size(0), d = q.size(1);
  const at::Tensor ga = contiguous_as(grad_rows, acc);
  TORCH_CHECK_VALUE(!ga.defined() || (ga.dim() == 1 && ga.size(0) == B),
                    "dot_product_cross_entropy_chunked: grad_rows must be [B]");
  const auto acc_options = q.options().dtype(acc);
  at::Tensor loss = at::empty({B}, acc_options), lse = at::empty({B}, acc_options);
  // dq is one GEMM's output per chunk, so it stays in the GEMM dtype (bf16 GEMMs: half the memory
  // of an fp32 copy, same values); dk accumulates over chunks, in the accumulation dtype.
  at::Tensor dq = at::empty({ga.defined() ? B : 0, d}, q.options().dtype(gemm_dtype));
  // Written by the kernel's first chunk; zeros when there is none (B = 0).
  at::Tensor dk = B > 0 ? at::empty({ga.defined() ? M : 0, d}, acc_options) : at::zeros({ga.defined() ? M : 0, d}, acc_options);
  at::Tensor dbias = ga.defined() && ba.defined() ? at::zeros({M}, acc_options) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "dot_product_cross_entropy_chunked_cpu", [&] {
    chunked_kernel<scalar_t>(qa, ka, ba.defined() ? ba.data_ptr<scalar_t>() : nullptr, ta.data_ptr<int64_t>(),
                             ea.defined() ? ea.data_ptr<int64_t>() : nullptr, ignore_index,
                             scalar_t(1) / static_cast<scalar_t>(temperature),
                             ga.defined() ? ga.data_ptr<scalar_t>() : nullptr, loss.data_ptr<scalar_t>(),
                             lse.data_ptr<scalar_t>(), dq, dk, dbias);
  });
  if (!dbias.defined()) dbias = at::empty({0}, q.options());
  return {loss, lse, dq.to(q.scalar_type()), dk.to(keys.scalar_type()),
          dbias.to(bias.has_value() && bias->defined() ? bias->scalar_type() : q.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(letter, CPU, m) {
  m.impl("dot_product_cross_entropy_fwd", &dot_product_cross_entropy_fwd_cpu);
  m.impl("dot_product_cross_entropy_bwd", &dot_product_cross_entropy_bwd_cpu);
  m.impl("dot_product_cross_entropy_chunked", &dot_product_cross_entropy_chunked_cpu);
}

}  // namespace letter
