// Argument checks of the v2 op, shared by its CPU and CUDA kernels; the
// wording matches src/msda/checks_v2.py. The v2-specific parts
// (points_per_level, method, the point dimension) are checked here; value,
// the level tables, dtypes and devices by v1's check_arguments, on views of
// the locations and weights with a level dimension added (metadata only).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <vector>

#include "checks.h"

namespace msda {

enum class V2Method { kDefault, kDiscrete };

inline V2Method parse_v2_method(c10::string_view method) {
  if (method == "default") return V2Method::kDefault;
  if (method == "discrete") return V2Method::kDiscrete;
  TORCH_CHECK_VALUE(false, "method must be \"default\" or \"discrete\", got \"", std::string(method), "\"");
}

// Sizes of a v2 problem: p.L levels, p.P the total number of points
// (sum of points_per_level), and the points of each level.
struct V2Problem {
  Problem p;
  std::vector<int64_t> points;
};

inline V2Problem check_arguments_v2(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                    const at::Tensor& attention_weights, at::IntArrayRef points_per_level) {
  TORCH_CHECK_VALUE(sampling_locations.dim() == 5,
                    "sampling_locations must have shape (N, Lq, M, sum(points_per_level), 2) (5 dimensions), got ",
                    shape_str(sampling_locations.sizes()));
  TORCH_CHECK_VALUE(attention_weights.dim() == 4,
                    "attention_weights must have shape (N, Lq, M, sum(points_per_level)) (4 dimensions), got ",
                    shape_str(attention_weights.sizes()));
  int64_t total = 0;
  for (size_t l = 0; l < points_per_level.size(); ++l) {
    TORCH_CHECK_VALUE(points_per_level[l] >= 0, "points_per_level must have entries >= 0, got ",
                      points_per_level[l], " at level ", l);
    total += points_per_level[l];
  }
  if (spatial_shapes.dim() == 2) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(points_per_level.size()) == spatial_shapes.size(0),
                      "points_per_level must have one entry per level (L = ", spatial_shapes.size(0), "), got ",
                      points_per_level.size(), " entries");
  }
  TORCH_CHECK_VALUE(sampling_locations.size(3) == total, "points_per_level must sum to the point dimension of ",
                    "sampling_locations (", sampling_locations.size(3), "), got sum ", total);
  if (value.dim() == 4) {
    const int64_t N = value.size(0), M = value.size(2), Lq = sampling_locations.size(1);
    const std::vector<int64_t> loc_shape{N, Lq, M, total, 2};
    TORCH_CHECK_VALUE(sampling_locations.sizes() == at::IntArrayRef(loc_shape),
                      "sampling_locations must have shape (N, Lq, M, sum(points_per_level), 2) = ",
                      shape_str(loc_shape), ", got ", shape_str(sampling_locations.sizes()));
    const std::vector<int64_t> attn_shape{N, Lq, M, total};
    TORCH_CHECK_VALUE(attention_weights.sizes() == at::IntArrayRef(attn_shape),
                      "attention_weights must have shape (N, Lq, M, sum(points_per_level)) = ", shape_str(attn_shape),
                      ", got ", shape_str(attention_weights.sizes()));
  }
  const int64_t L = spatial_shapes.dim() == 2 ? spatial_shapes.size(0) : 1;
  auto with_levels = [L](const at::Tensor& t) {
    std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
    sizes.insert(sizes.begin() + 3, L);
    return t.unsqueeze(3).expand(sizes);
  };
  const Problem p = check_arguments(value, spatial_shapes, level_start_index, with_levels(sampling_locations),
                                    with_levels(attention_weights));
  return {p, std::vector<int64_t>(points_per_level.begin(), points_per_level.end())};
}

// The level of each point (points of level 0 first), for per-point level tables.
inline std::vector<int64_t> level_of_points(const std::vector<int64_t>& points) {
  std::vector<int64_t> levels;
  for (size_t l = 0; l < points.size(); ++l) levels.insert(levels.end(), points[l], static_cast<int64_t>(l));
  return levels;
}

// The discrete mode's arithmetic type for the pixel index: float64 for
// float64 locations, float32 for every other dtype (also 16-bit ones).
inline at::ScalarType discrete_index_type(const at::Tensor& sampling_locations) {
  return sampling_locations.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace msda
