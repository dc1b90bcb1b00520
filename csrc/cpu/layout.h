// The problem as the CPU kernels see it: sizes, and the level table copied
// out of the tensors once.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"

namespace msda::cpu {

struct Layout {
  Problem p;
  std::vector<int64_t> H, W, start;
};

// spatial_shapes and level_start_index have been checked against S already
// (check_level_values); the kernels compute cell indices in 32 bits.
inline Layout make_layout(const Problem& p, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
  Layout layout{p, {}, {}, {}};
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  constexpr int64_t kMaxSide = std::numeric_limits<int32_t>::max() - 1;
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t h = shapes.data_ptr<int64_t>()[2 * l], w = shapes.data_ptr<int64_t>()[2 * l + 1];
    TORCH_CHECK_VALUE(h <= kMaxSide && w <= kMaxSide, "spatial_shapes: the CPU kernels support map sides up to ",
                      kMaxSide, ", got (H, W) = (", h, ", ", w, ") at level ", l);
    layout.H.push_back(h);
    layout.W.push_back(w);
    layout.start.push_back(starts.data_ptr<int64_t>()[l]);
  }
  return layout;
}

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

}  // namespace msda::cpu
