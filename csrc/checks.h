// Argument checks shared by the CPU and CUDA kernels. The wording matches the
// Python checks (src/msda/checks.py) so that callers of torch.ops.msda.* get
// the same messages: the argument, the expected shape or dtype, what was given.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>
#include <vector>

namespace msda {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  if (sizes.size() == 1) out << ",";
  out << ")";
  return out.str();
}

// Sizes of the problem, read from the checked arguments.
struct Problem {
  int64_t N, S, M, D, Lq, L, P;
};

inline bool is_value_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline bool is_index_dtype(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

// Shape, dtype and device checks; they read no tensor values.
inline Problem check_arguments(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  TORCH_CHECK_VALUE(value.dim() == 4, "value must have shape (N, S, M, D) (4 dimensions), got ",
                    shape_str(value.sizes()));
  TORCH_CHECK_VALUE(is_value_dtype(value.scalar_type()),
                    "value must have dtype float64, float32, bfloat16 or float16, got ", value.scalar_type());
  Problem p{};
  p.N = value.size(0);
  p.S = value.size(1);
  p.M = value.size(2);
  p.D = value.size(3);
  // The output's last dimension is M*D. With N or S = 0, value holds no
  // elements whatever M and D are, so the product is not bounded by any
  // allocation: check it before anything multiplies.
  int64_t md = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(p.M, p.D, &md),
                    "value must have M*D (the output's last dimension) below 2**63, got (N, S, M, D) = ",
                    shape_str(value.sizes()));
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "spatial_shapes must have shape (L, 2), got ", shape_str(spatial_shapes.sizes()));
  TORCH_CHECK_VALUE(is_index_dtype(spatial_shapes.scalar_type()),
                    "spatial_shapes must have dtype int32 or int64, got ", spatial_shapes.scalar_type());
  p.L = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(p.L >= 1, "spatial_shapes must describe at least one level (L >= 1), got ",
                    shape_str(spatial_shapes.sizes()));
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == p.L,
                    "level_start_index must have shape (L,) = (", p.L, ",), got ",
                    shape_str(level_start_index.sizes()));
  TORCH_CHECK_VALUE(is_index_dtype(level_start_index.scalar_type()),
                    "level_start_index must have dtype int32 or int64, got ", level_start_index.scalar_type());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6,
                    "sampling_locations must have shape (N, Lq, M, L, P, 2) (6 dimensions), got ",
                    shape_str(sampling_locations.sizes()));
  p.Lq = sampling_locations.size(1);
  p.P = sampling_locations.size(4);
  const std::vector<int64_t> loc_shape{p.N, p.Lq, p.M, p.L, p.P, 2};
  TORCH_CHECK_VALUE(sampling_locations.sizes() == at::IntArrayRef(loc_shape),
                    "sampling_locations must have shape (N, Lq, M, L, P, 2) = ", shape_str(loc_shape), ", got ",
                    shape_str(sampling_locations.sizes()));
  const std::vector<int64_t> attn_shape{p.N, p.Lq, p.M, p.L, p.P};
  TORCH_CHECK_VALUE(attention_weights.sizes() == at::IntArrayRef(attn_shape),
                    "attention_weights must have shape (N, Lq, M, L, P) = ", shape_str(attn_shape), ", got ",
                    shape_str(attention_weights.sizes()));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"sampling_locations", sampling_locations},
                                std::pair<const char*, const at::Tensor&>{"attention_weights", attention_weights}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == value.scalar_type() || t.scalar_type() == at::kFloat, name,
                      " must have the dtype of value (", value.scalar_type(), ") or float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == value.device(), name, " must be on the device of value (", value.device(),
                      "), got ", t.device());
  }
  TORCH_CHECK_VALUE(spatial_shapes.device() == value.device(), "spatial_shapes must be on the device of value (",
                    value.device(), "), got ", spatial_shapes.device());
  TORCH_CHECK_VALUE(level_start_index.device() == value.device(),
                    "level_start_index must be on the device of value (", value.device(), "), got ",
                    level_start_index.device());
  return p;
}

// grad_output of a backward op (v1 and v2, CPU and CUDA): (N, Lq, M*D),
// floating point, on value's device.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Problem& p) {
  const std::vector<int64_t> out_shape{p.N, p.Lq, p.M * p.D};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(out_shape), "grad_output must have shape (N, Lq, M*D) = ",
                    shape_str(out_shape), ", got ", shape_str(grad_output.sizes()));
  TORCH_CHECK_VALUE(grad_output.is_floating_point(), "grad_output must be a floating-point tensor, got ",
                    grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == value.device(), "grad_output must be on the device of value (",
                    value.device(), "), got ", grad_output.device());
}

// Checks that read the (CPU) values of spatial_shapes and level_start_index:
// every H, W >= 1, sum(H*W) == S, and level_start_index the exclusive cumsum.
// Overflow-safe by construction: h*w is only formed once h <= (S - total) / w
// is known, so it cannot exceed S - total; absurd values raise instead of
// wrapping (signed overflow is undefined behaviour, -fwrapv or not).
inline void check_level_values(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t S) {
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t L = shapes.size(0);
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t h = hw[2 * l], w = hw[2 * l + 1];
    // total <= S holds here (each step adds at most S - total), and w >= 1
    // is checked before the division.
    TORCH_CHECK_VALUE(h >= 1 && w >= 1 && h <= (S - total) / w,
                      "spatial_shapes must describe value's S = ", S,
                      " rows (sum of H*W with H, W >= 1), got (H, W) = (", h, ", ", w, ") at level ", l,
                      " after ", total, " rows of earlier levels");
    TORCH_CHECK_VALUE(st[l] == total, "level_start_index must be the exclusive cumulative sum of H*W: expected ",
                      total, " at level ", l, ", got ", st[l]);
    total += h * w;
  }
  TORCH_CHECK_VALUE(total == S, "spatial_shapes must describe value's S = ", S, " rows, but sum of H*W is ", total);
}

// Accumulation type of a value dtype: float64 stays float64, the rest use float32.
inline at::ScalarType accumulate_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace msda
