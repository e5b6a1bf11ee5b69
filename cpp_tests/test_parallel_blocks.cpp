// C++ check of letter::parallel_blocks: every index of [begin, end) is handed out exactly once, in
// blocks of at most `grain` that start on the grain, whatever the thread count.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdio>
#include <vector>

#include "../csrc/cpu/parallel.h"

int main() {
  int failures = 0;
  for (int threads : {1, 2, 4}) {
    at::set_num_threads(threads);
    for (int64_t begin : {0, 5}) {
      for (int64_t n : {0, 1, 7, 1000, 1001}) {
        for (int64_t grain : {0, 1, 3, 64, 5000}) {
          const int64_t end = begin + n;
          std::vector<std::atomic<int>> hits(static_cast<size_t>(end));
          std::atomic<int> bad_blocks{0};
          letter::parallel_blocks(begin, end, grain, [&](int64_t b, int64_t e) {
            const int64_t g = grain < 1 ? 1 : grain;
            if (b < begin || e > end || b >= e || e - b > g || (b - begin) % g != 0) ++bad_blocks;
            for (int64_t i = b; i < e; ++i) ++hits[static_cast<size_t>(i)];
          });
          for (int64_t i = 0; i < end; ++i) {
            const int want = i >= begin ? 1 : 0;
            if (hits[static_cast<size_t>(i)] != want) {
              std::printf("threads=%d begin=%ld n=%ld grain=%ld: index %ld handed out %d times\n", threads, begin, n,
                          grain, i, hits[static_cast<size_t>(i)].load());
              ++failures;
            }
          }
          if (bad_blocks) {
            std::printf("threads=%d begin=%ld n=%ld grain=%ld: %d blocks out of shape\n", threads, begin, n, grain,
                        bad_blocks.load());
            ++failures;
          }
        }
      }
    }
  }
  std::printf("%s\n", failures ? "FAILED" : "parallel_blocks: ok");
  return failures ? 1 : 0;
}
