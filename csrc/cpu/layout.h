// The problem as the CPU kernels see it: sizes, and the level table copied
// out of the tensors once. Shared by the common code and every capability's
// kernels (see dispatch.h), so it holds data and the code that fills it only.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace msda::cpu
