// Dynamic work sharing for the CPU kernels. at::parallel_for hands each thread one fixed slice, so
// a thread that starts late or is descheduled holds up the whole call: on a 2-vCPU guest, a beam
// step called between two torch ops (as in a decoding loop) took 2x its time alone. Here each
// thread claims the next block of `grain` indices until none is left, so a slow thread delays only
// the block it holds. Each index is computed by one thread with the same arithmetic, so results do
// not depend on which thread took which block.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace letter {

// at::parallel_for's contract (fn(b, e) over blocks covering [begin, end)) with blocks of `grain`
// indices handed out on demand.
template <typename Fn>
void parallel_blocks(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  if (begin >= end) return;
  grain = std::max<int64_t>(1, grain);
  std::atomic<int64_t> next{begin};
  const int64_t blocks = (end - begin + grain - 1) / grain;
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), blocks), 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(grain); b < end; b = next.fetch_add(grain)) fn(b, std::min(end, b + grain));
  });
}

}  // namespace letter
