// How the kernels cut work into tasks, and prefetching. Compiled per CPU
// capability (see dispatch.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/per_capability.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {

// How the kernels cut work into tasks: at least kTargetTasks of them, so that
// every core of a small machine has work even when N*M is small (8 measured
// faster than 4 on 2 cores: smaller tasks keep their rows in cache longer).
// `slices` independent (n, head group) slices come first; the channels are
// then cut into blocks only as far as needed for kTargetTasks, never below
// kMinBlock channels (a block repeats the location arithmetic), widths
// rounded to kAlign. A function of the shapes only, never of the thread
// count, which keeps the backward's sums in a fixed order.
constexpr int64_t kTargetTasks = 8;

struct ChannelBlocks {
  int64_t count, width;
};
inline ChannelBlocks channel_blocks(int64_t D, int64_t slices) {
  constexpr int64_t kMinBlock = 64, kAlign = 16;
  const int64_t wanted = (kTargetTasks + slices - 1) / std::max<int64_t>(1, slices);
  const int64_t count = std::max<int64_t>(1, std::min(wanted, D / kMinBlock));
  int64_t width = (D + count - 1) / count;
  width = std::max<int64_t>(1, std::min(D, (width + kAlign - 1) / kAlign * kAlign));
  return {(D + width - 1) / width, width};
}

inline void prefetch_range(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
}

}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu
