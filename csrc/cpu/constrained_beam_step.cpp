// CPU kernel of letter::constrained_beam_step.
//
// One batch row per task. For each live beam: log-sum-exp of its logits row
// (two passes over V, the row stays in L1), then one gather per child of the
// beam's trie node into a thresholded top-K buffer ordered by (score desc,
// beam asc, token asc). V is never sorted and no V-sized mask exists; dead beams skip
// their row entirely (at step 0 that is all beams but one). A live row holding NaN or +inf
// (its log-sum-exp is NaN or +inf) is a ValueError naming the first such row.
//
// Bans: each batch row's banned child nodes are sorted, and a beam's children are the contiguous
// edge range [first, last), so two binary searches give the bans of one beam; the children scan
// then walks them alongside (one comparison per chunk of 8 when the beam has none).
//
// Paths (csrc/cpu/isa.h): AVX-512 (the log-sum-exp 16 wide; the children scan is AVX2's: a few to
// 256 gathers per beam), AVX2 + FMA (log-sum-exp and children scan) and portable.
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

namespace letter {
namespace {

template <typename scalar_t>
struct Candidate {
  scalar_t score;
  int64_t beam;
  int64_t token;
  int64_t edge;
};

// A function object rather than a function pointer, so that sort/nth_element inline it.
struct RanksBefore {
  template <typename scalar_t>
  bool operator()(const Candidate<scalar_t>& a, const Candidate<scalar_t>& b) const {
    if (a.score != b.score) return a.score > b.score;
    if (a.beam != b.beam) return a.beam < b.beam;
    return a.token < b.token;
  }
};

// Top-k selection in amortized O(1) per candidate: candidates at or above the current k-th
// score go to a buffer; a full buffer is cut back to its k best with nth_element, which raises
// the threshold. No sorted insertion per candidate.
template <typename scalar_t>
class TopKBuffer {
 public:
  explicit TopKBuffer(int64_t k) : k_(k), capacity_(std::max<int64_t>(4 * k, 32)) {
    items_.reserve(capacity_);
  }
  void clear() {
    items_.clear();
    threshold_ = -std::numeric_limits<scalar_t>::infinity();
  }
  // Strictly below the k-th best so far: can never be chosen (equal scores may still win on
  // (beam, token), so they are kept).
  bool rejects(scalar_t score) const { return score < threshold_; }
  scalar_t threshold() const { return threshold_; }
  void push(const Candidate<scalar_t>& c) {
    items_.push_back(c);
    if (static_cast<int64_t>(items_.size()) == capacity_) cut_to_k();
  }
  // The k best (fewer if fewer were pushed), best first.
  const std::vector<Candidate<scalar_t>>& best() {
    cut_to_k();
    std::sort(items_.begin(), items_.end(), RanksBefore{});
    return items_;
  }

 private:
  void cut_to_k() {
    if (static_cast<int64_t>(items_.size()) <= k_) return;
    std::nth_element(items_.begin(), items_.begin() + (k_ - 1), items_.end(),
                     RanksBefore{});
    items_.resize(k_);
    threshold_ = items_[k_ - 1].score;
  }

  int64_t k_, capacity_;
  scalar_t threshold_ = -std::numeric_limits<scalar_t>::infinity();
  std::vector<Candidate<scalar_t>> items_;
};

// The log-sum-exp functions below return NaN for a row holding a NaN, +inf for a row holding +inf
// (and no NaN), -inf for an all -inf row, else the finite log-sum-exp. Their max pass skips NaN
// (max_ps and std::max return the running maximum when the new value is NaN) and their exp pass
// turns a NaN into a NaN sum; only a row whose maximum is not finite gets this extra look.
template <typename scalar_t>
scalar_t log_sum_exp_of_infinite_max(const scalar_t* x, int64_t n, scalar_t mx) {
  if (mx > 0) return mx;  // +inf
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return x[i];
  }
  return mx;  // all -inf
}

template <typename scalar_t>
scalar_t log_sum_exp_generic(const scalar_t* x, int64_t n, const scalar_t* /*next*/) {
  scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  if (!std::isfinite(mx)) return log_sum_exp_of_infinite_max(x, n, mx);
  scalar_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(x[i] - mx);
  return mx + std::log(sum);
}

#ifdef LETTER_HAVE_AVX2_MATH
// `next` (may be null) is the row the caller reads after this one: it is prefetched during the
// exp pass, which is compute bound, so that the next row's max pass does not wait on memory.
__attribute__((target("avx2,fma"))) float log_sum_exp_avx2(const float* x, int64_t n, const float* next) {
  // Four running maxima: one would wait on max_ps's latency at every step.
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 max0 = neg_inf, max1 = neg_inf, max2 = neg_inf, max3 = neg_inf;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    max0 = _mm256_max_ps(_mm256_loadu_ps(x + i), max0);
    max1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), max1);
    max2 = _mm256_max_ps(_mm256_loadu_ps(x + i + 16), max2);
    max3 = _mm256_max_ps(_mm256_loadu_ps(x + i + 24), max3);
  }
  for (; i + 8 <= n; i += 8) max0 = _mm256_max_ps(_mm256_loadu_ps(x + i), max0);
  // The running maxima hold no NaN (max_ps kept the old value), so their order does not matter.
  const __m256 vmax = _mm256_max_ps(_mm256_max_ps(max0, max1), _mm256_max_ps(max2, max3));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float mx = lanes[0];
  for (int t = 1; t < 8; ++t) mx = std::max(mx, lanes[t]);
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  if (!std::isfinite(mx)) return log_sum_exp_of_infinite_max(x, n, mx);
  const __m256 shift = _mm256_set1_ps(mx);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  i = 0;
  for (; i + 32 <= n; i += 32) {  // 32 floats = two cache lines
    if (next != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + i + 16), _MM_HINT_T0);
    }
    acc0 = _mm256_add_ps(acc0, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift)));
    acc1 = _mm256_add_ps(acc1, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), shift)));
    acc2 = _mm256_add_ps(acc2, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i + 16), shift)));
    acc3 = _mm256_add_ps(acc3, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i + 24), shift)));
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_add_ps(acc0, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift)));
  if (next != nullptr) {
    for (int64_t j = n - n % 32; j < n; j += 16) _mm_prefetch(reinterpret_cast<const char*>(next + j), _MM_HINT_T0);
  }
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  float sum = 0.f;
  for (int t = 0; t < 8; ++t) sum += lanes[t];
  for (; i < n; ++i) sum += std::exp(x[i] - mx);
  return mx + std::log(sum);
}
#endif

#ifdef LETTER_HAVE_AVX512_MATH
// log_sum_exp_avx2 16 wide, with masked tails instead of scalar ones.
LETTER_TARGET_AVX512 float log_sum_exp_avx512(const float* x, int64_t n, const float* next) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 max0 = neg_inf, max1 = neg_inf, max2 = neg_inf, max3 = neg_inf;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    max0 = _mm512_max_ps(_mm512_loadu_ps(x + i), max0);
    max1 = _mm512_max_ps(_mm512_loadu_ps(x + i + 16), max1);
    max2 = _mm512_max_ps(_mm512_loadu_ps(x + i + 32), max2);
    max3 = _mm512_max_ps(_mm512_loadu_ps(x + i + 48), max3);
  }
  for (; i + 16 <= n; i += 16) max0 = _mm512_max_ps(_mm512_loadu_ps(x + i), max0);
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);  // n - i < 16
  if (tail != 0) max0 = _mm512_mask_max_ps(max0, tail, _mm512_maskz_loadu_ps(tail, x + i), max0);
  const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(max0, max1), _mm512_max_ps(max2, max3)));
  if (!std::isfinite(mx)) return log_sum_exp_of_infinite_max(x, n, mx);
  const __m512 shift = _mm512_set1_ps(mx);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
  i = 0;
  for (; i + 64 <= n; i += 64) {  // 64 floats = four cache lines
    if (next != nullptr) {
      for (int line = 0; line < 64; line += 16) _mm_prefetch(reinterpret_cast<const char*>(next + i + line), _MM_HINT_T0);
    }
    acc0 = _mm512_add_ps(acc0, exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift)));
    acc1 = _mm512_add_ps(acc1, exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), shift)));
    acc2 = _mm512_add_ps(acc2, exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + i + 32), shift)));
    acc3 = _mm512_add_ps(acc3, exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + i + 48), shift)));
  }
  if (next != nullptr) {
    for (int64_t j = i; j < n; j += 16) _mm_prefetch(reinterpret_cast<const char*>(next + j), _MM_HINT_T0);
  }
  for (; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp_nonpositive_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + i), shift));
    acc0 = _mm512_add_ps(acc0, _mm512_maskz_mov_ps(live, e));
  }
  const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
  return mx + std::log(sum);
}
#endif

#ifdef LETTER_HAVE_AVX2_MATH
// The scalar candidate loop, vectorized: gather the children's logits 8 at a time into `scores`
// (the same single float add as the scalar loop), then push those that can enter the top-K
// (score > -inf and >= the threshold). While the buffer has no threshold yet, a wide node first
// raises it to the k-th largest of the maxima of 8g >= k disjoint groups of its scores (lane l of
// every g-th chunk of 8): k of those maxima are candidates, so the k-th best overall is at least
// that, and only a few children reach the buffer. Stops before the first chunk holding a token
// outside [0, V) and returns the first edge it did not handle; the scalar loop goes on from there
// (and reports the bad token). [bans, bans_end): the beam's banned edges, sorted, inside
// [first, last); their scores become -inf before anything reads them, and `bans` is left at the
// first ban at or after the returned edge.
__attribute__((target("avx2,fma"))) int64_t scan_children_avx2(const float* row, float base,
                                                                const int64_t* child_token, int64_t first,
                                                                int64_t last, int64_t V, int64_t beam, int64_t k,
                                                                const int64_t*& bans, const int64_t* bans_end,
                                                                std::vector<float>& scores, TopKBuffer<float>& top) {
  const __m256i below = _mm256_set1_epi64x(-1), width = _mm256_set1_epi64x(V);
  const __m256i steps_low = _mm256_setr_epi64x(0, 1, 2, 3), steps_high = _mm256_setr_epi64x(4, 5, 6, 7);
  const __m256 vbase = _mm256_set1_ps(base);
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  scores.resize(last - first);
  // g accumulators of 8 lanes: 8g >= k group maxima (NaN scores are skipped: max_ps returns its
  // second operand when either is NaN).
  constexpr int64_t kMaxGroups = 16;
  const int64_t groups = (k + 7) / 8;
  __m256 group_max[kMaxGroups];
  const bool bound_wanted = groups <= kMaxGroups && !(top.threshold() > neg_inf);
  for (int64_t g = 0; bound_wanted && g < groups; ++g) group_max[g] = _mm256_set1_ps(neg_inf);
  int64_t e = first;
  for (int64_t chunk = 0; e + 8 <= last; e += 8, ++chunk) {
    const __m256i t0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(child_token + e));
    const __m256i t1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(child_token + e + 4));
    const __m256i in_range =
        _mm256_and_si256(_mm256_and_si256(_mm256_cmpgt_epi64(t0, below), _mm256_cmpgt_epi64(width, t0)),
                         _mm256_and_si256(_mm256_cmpgt_epi64(t1, below), _mm256_cmpgt_epi64(width, t1)));
    if (_mm256_movemask_epi8(in_range) != -1) break;
    // Runs of consecutive tokens (dense trie levels) are one load; gathers are slow on some CPUs.
    const __m256i start = _mm256_set1_epi64x(child_token[e]);
    const __m256i consecutive = _mm256_and_si256(_mm256_cmpeq_epi64(t0, _mm256_add_epi64(start, steps_low)),
                                                 _mm256_cmpeq_epi64(t1, _mm256_add_epi64(start, steps_high)));
    const __m256 x = _mm256_movemask_epi8(consecutive) == -1
                         ? _mm256_loadu_ps(row + child_token[e])
                         : _mm256_set_m128(_mm256_i64gather_ps(row, t1, 4), _mm256_i64gather_ps(row, t0, 4));
    __m256 score = _mm256_add_ps(vbase, x);
    if (bans != bans_end && *bans < e + 8) {  // banned children in this chunk: no candidates
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, score);
      for (; bans != bans_end && *bans < e + 8; ++bans) lanes[*bans - e] = neg_inf;
      score = _mm256_load_ps(lanes);
    }
    _mm256_storeu_ps(scores.data() + (e - first), score);
    if (bound_wanted) {
      __m256& m = group_max[chunk % groups];
      m = _mm256_max_ps(score, m);
    }
  }
  const int64_t n = e - first;
  float threshold = top.threshold();
  if (bound_wanted && n >= std::max(2 * k, 8 * groups)) {  // every group has a score
    alignas(32) float maxima[8 * kMaxGroups];
    for (int64_t g = 0; g < groups; ++g) _mm256_store_ps(maxima + 8 * g, group_max[g]);
    std::nth_element(maxima, maxima + (k - 1), maxima + 8 * groups, std::greater<float>());
    threshold = std::max(threshold, maxima[k - 1]);
  }
  const __m256 neg_inf8 = _mm256_set1_ps(neg_inf);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 score = _mm256_loadu_ps(scores.data() + i);
    threshold = std::max(threshold, top.threshold());
    const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(score, neg_inf8, _CMP_GT_OQ),
                                      _mm256_cmp_ps(score, _mm256_set1_ps(threshold), _CMP_GE_OQ));
    for (int mask = _mm256_movemask_ps(keep); mask != 0; mask &= mask - 1) {
      const int j = __builtin_ctz(mask);
      top.push({scores[i + j], beam, child_token[first + i + j], first + i + j});
    }
  }
  return e;
}
#endif

template <typename scalar_t>
using LogSumExpFn = scalar_t (*)(const scalar_t*, int64_t, const scalar_t*);

template <typename scalar_t>
LogSumExpFn<scalar_t> pick_log_sum_exp() {
  if constexpr (std::is_same_v<scalar_t, float>) {
#ifdef LETTER_HAVE_AVX512_MATH
    if (active_isa() >= Isa::avx512) return log_sum_exp_avx512;
#endif
#ifdef LETTER_HAVE_AVX2_MATH
    if (cpu_has_avx2_fma()) return log_sum_exp_avx2;
#endif
  }
  return log_sum_exp_generic<scalar_t>;
}

template <typename scalar_t>
void beam_step_kernel(const scalar_t* logits, const scalar_t* beam_scores, const int64_t* nodes,
                      const int64_t* row_ptr, int64_t num_nodes, const int64_t* child_token,
                      int64_t num_edges, const int64_t* banned_ptr, const int64_t* banned_node,
                      int64_t B, int64_t k_in, int64_t V, int64_t k_out, scalar_t* out_scores,
                      int64_t* out_parent, int64_t* out_token, int64_t* out_node) {
  const LogSumExpFn<scalar_t> log_sum_exp = pick_log_sum_exp<scalar_t>();
#ifdef LETTER_HAVE_AVX2_MATH
  const bool vector_scan = cpu_has_avx2_fma();
#endif
  constexpr scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  constexpr scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  // Per batch row, its first live beam whose logits hold NaN or +inf (k_in: none); the error is
  // raised after the parallel loop, for the first such row whatever the thread count.
  std::vector<int64_t> first_bad_beam(B, k_in);
  parallel_blocks(0, B, 1, [&](int64_t begin, int64_t end) {
    TopKBuffer<scalar_t> top(k_out);
    std::vector<float> scratch;  // the vectorized scan's child scores of one beam
    for (int64_t b = begin; b < end; ++b) {
      top.clear();
      // This row's banned edges, sorted (empty without bans).
      const int64_t* row_bans = banned_node == nullptr ? nullptr : banned_node + banned_ptr[b];
      const int64_t* row_bans_end = banned_node == nullptr ? nullptr : banned_node + banned_ptr[b + 1];
      for (int64_t k = 0; k < k_in; ++k) {
        const scalar_t beam = beam_scores[b * k_in + k];
        if (!(beam > neg_inf)) continue;
        const int64_t node = nodes[b * k_in + k];
        // ValueError in Python, like the wrapper's own input checks (which leave this one to us).
        TORCH_CHECK_VALUE(node >= 0 && node < num_nodes, "constrained_beam_step: nodes of live beams must be ",
                          "node ids of this level, in [0, ", num_nodes, "), got ", node);
        const int64_t first = row_ptr[node], last = row_ptr[node + 1];
        TORCH_CHECK(0 <= first && first <= last && last <= num_edges,
                    "constrained_beam_step: row_ptr is not a valid CSR row pointer");
        const int64_t r = b * k_in + k;
        const scalar_t* row = logits + r * V;
        const scalar_t lse = log_sum_exp(row, V, r + 1 < B * k_in ? row + V : nullptr);
        if (!(lse < inf)) {  // NaN or +inf
          first_bad_beam[b] = k;
          break;
        }
        // lse = -inf (every logit -inf): base = +inf and every score NaN, so no candidates.
        const scalar_t base = beam - lse;
        const int64_t* bans = row_bans;
        const int64_t* bans_end = row_bans_end;
        if (bans != bans_end) {
          bans = std::lower_bound(bans, bans_end, first);
          bans_end = std::lower_bound(bans, bans_end, last);
        }
        int64_t e = first;
#ifdef LETTER_HAVE_AVX2_MATH
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (vector_scan) {
            e = scan_children_avx2(row, base, child_token, first, last, V, k, k_out, bans, bans_end, scratch, top);
          }
        }
#endif
        for (; e < last; ++e) {
          const int64_t token = child_token[e];
          TORCH_CHECK_VALUE(token >= 0 && token < V, "constrained_beam_step: child token ", token,
                            " outside the logits width ", V);
          if (bans != bans_end && *bans == e) {  // every ban left is >= e: skip e and its duplicates
            while (bans != bans_end && *bans == e) ++bans;
            continue;
          }
          const scalar_t score = base + row[token];
          if (!(score > neg_inf) || top.rejects(score)) continue;  // also drops NaN
          top.push({score, k, token, e});
        }
      }
      const auto& best = top.best();
      for (int64_t j = 0; j < k_out; ++j) {
        const int64_t o = b * k_out + j;
        const bool filled = j < static_cast<int64_t>(best.size());
        out_scores[o] = filled ? best[j].score : neg_inf;
        out_parent[o] = filled ? best[j].beam : 0;
        out_token[o] = filled ? best[j].token : -1;
        out_node[o] = filled ? best[j].edge : -1;
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    const int64_t k = first_bad_beam[b];
    TORCH_CHECK_VALUE(k == k_in, "constrained_beam_step: logits row ", b * k_in + k, " (batch row ", b,
                      ", beam ", k, ") of a live beam contains NaN or +inf; its log-probabilities are undefined");
  }
}

// The bans as contiguous int64 tensors, after checking what the kernel relies on: a row pointer
// over banned_node with each row sorted (ids outside the level only never match).
std::optional<std::pair<at::Tensor, at::Tensor>> checked_bans(const std::optional<at::Tensor>& banned_ptr,
                                                              const std::optional<at::Tensor>& banned_node,
                                                              int64_t B) {
  TORCH_CHECK_VALUE(banned_ptr.has_value() == banned_node.has_value(),
                    "constrained_beam_step: banned_ptr and banned_node go together: pass both or neither");
  if (!banned_ptr.has_value()) return std::nullopt;
  TORCH_CHECK_VALUE(banned_ptr->dim() == 1 && banned_ptr->size(0) == B + 1 && banned_node->dim() == 1,
                    "constrained_beam_step: banned_ptr must be [B + 1] and banned_node [nnz]");
  TORCH_CHECK_VALUE(banned_ptr->scalar_type() == at::kLong && banned_node->scalar_type() == at::kLong,
                    "constrained_beam_step: banned_ptr and banned_node must be int64");
  at::Tensor ptr = banned_ptr->contiguous(), ids = banned_node->contiguous();
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t* v = ids.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(p[0] == 0 && p[B] == ids.size(0),
                    "constrained_beam_step: banned_ptr must start at 0 and end at nnz = ", ids.size(0));
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(p[b] <= p[b + 1], "constrained_beam_step: banned_ptr decreases at row ", b);
  }
  for (int64_t b = 0; b < B; ++b) {  // in bounds now that the pointer is monotone
    TORCH_CHECK_VALUE(std::is_sorted(v + p[b], v + p[b + 1]),
                      "constrained_beam_step: banned_node of batch row ", b, " is not sorted ascending");
  }
  return std::make_pair(ptr, ids);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> constrained_beam_step_cpu(
    const at::Tensor& logits, const at::Tensor& beam_scores, const at::Tensor& nodes,
    const at::Tensor& row_ptr, const at::Tensor& child_token, int64_t num_beams,
    const std::optional<at::Tensor>& banned_ptr, const std::optional<at::Tensor>& banned_node) {
  TORCH_CHECK(logits.dim() == 2 && beam_scores.dim() == 2 && nodes.sizes() == beam_scores.sizes(),
              "constrained_beam_step: expected logits [B*K, V], beam_scores and nodes [B, K]");
  TORCH_CHECK(logits.size(0) == beam_scores.size(0) * beam_scores.size(1),
              "constrained_beam_step: logits must have B*K rows");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && child_token.dim() == 1,
              "constrained_beam_step: row_ptr [n+1] and child_token [E] expected");
  TORCH_CHECK(num_beams >= 1, "constrained_beam_step: num_beams must be >= 1");
  TORCH_CHECK(logits.is_floating_point() && beam_scores.is_floating_point(),
              "constrained_beam_step: floating-point logits and beam_scores required");
  const int64_t B = beam_scores.size(0), k_in = beam_scores.size(1), V = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lg = logits.to(acc).contiguous();
  const at::Tensor bs = beam_scores.to(acc).contiguous();
  const at::Tensor nd = nodes.to(at::kLong).contiguous();
  const at::Tensor rp = row_ptr.to(at::kLong).contiguous();
  const at::Tensor ct = child_token.to(at::kLong).contiguous();
  const auto bans = checked_bans(banned_ptr, banned_node, B);
  const auto long_opts = logits.options().dtype(at::kLong);
  at::Tensor scores = at::empty({B, num_beams}, logits.options().dtype(acc));
  at::Tensor parent = at::empty({B, num_beams}, long_opts);
  at::Tensor token = at::empty({B, num_beams}, long_opts);
  at::Tensor node = at::empty({B, num_beams}, long_opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "constrained_beam_step_cpu", [&] {
    beam_step_kernel<scalar_t>(lg.data_ptr<scalar_t>(), bs.data_ptr<scalar_t>(),
                               nd.data_ptr<int64_t>(), rp.data_ptr<int64_t>(), rp.size(0) - 1,
                               ct.data_ptr<int64_t>(), ct.size(0),
                               bans ? bans->first.data_ptr<int64_t>() : nullptr,
                               bans ? bans->second.data_ptr<int64_t>() : nullptr, B, k_in, V, num_beams,
                               scores.data_ptr<scalar_t>(), parent.data_ptr<int64_t>(),
                               token.data_ptr<int64_t>(), node.data_ptr<int64_t>());
  });
  return {scores, parent, token, node};
}

}  // namespace

TORCH_LIBRARY_IMPL(letter, CPU, m) { m.impl("constrained_beam_step", &constrained_beam_step_cpu); }

}  // namespace letter
