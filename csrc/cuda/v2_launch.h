// Host side of the v2 op's CUDA kernels. method="default" runs v1's
// launches (ms_deform_attn_launch.h) on per-point level tables: L levels of
// P_l points each are sum(P_l) "levels" of one point, level i being the
// level of point i (v1's kernels read the level table per point anyway).
// method="discrete" launches v2_discrete_kernels.cuh.
//
// Shared by the real build (v2_ms_deform_attn_cuda.cu) and the CUDA
// emulation (tests/cuda_emulation/emulated_ops_v2.cpp); the including file
// defines MSDA_LAUNCH as for ms_deform_attn_launch.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/ms_deform_attn_launch.h"
#include "cuda/v2_discrete_kernels.cuh"
#include "v2_checks.h"

namespace msda {
namespace cuda_v2_launch {

using cuda_launch::ceil_div;
using cuda_launch::grid_for;

// The per-point level tables (T, 2) and (T,) as int64, on value's device.
// The point-to-level map is built on the host and copied (T int64s).
inline std::pair<at::Tensor, at::Tensor> per_point_tables(const at::Tensor& spatial_shapes,
                                                          const at::Tensor& level_start_index,
                                                          const std::vector<int64_t>& points) {
  const std::vector<int64_t> levels = level_of_points(points);
  const at::Tensor index =
      at::tensor(levels, at::TensorOptions().dtype(at::kLong)).to(spatial_shapes.device());
  return {spatial_shapes.to(at::kLong).index_select(0, index).contiguous(),
          level_start_index.to(at::kLong).index_select(0, index).contiguous()};
}

// The checked arguments; index tensors moved to value's device first.
struct V2Args {
  V2Method method;
  V2Problem v2;
  at::Tensor shapes, starts;  // per-point tables
};

inline V2Args prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                      at::IntArrayRef points_per_level, c10::string_view method) {
  V2Args args;
  args.method = parse_v2_method(method);
  args.v2 = check_arguments_v2(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               points_per_level);
  if (args.v2.p.P > 0) std::tie(args.shapes, args.starts) = per_point_tables(spatial_shapes, level_start_index, args.v2.points);
  return args;
}

// Locations and weights viewed with a one-point level dimension, as v1 wants them.
inline at::Tensor v1_locations(const at::Tensor& loc) { return loc.unsqueeze(4); }
inline at::Tensor v1_weights(const at::Tensor& attn) { return attn.unsqueeze(4); }

template <typename scalar_t, typename acc_t, typename loc_t, int VEC, typename Stream>
void launch_discrete_forward(const Problem& p, const at::Tensor& value, const at::Tensor& shapes,
                             const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn, at::Tensor& out,
                             Stream stream) {
  const int64_t HQ = p.N * p.Lq * p.M;
  const int64_t threads_needed = HQ * (p.D / VEC);
  const dim3 grid = grid_for(ceil_div(threads_needed, cuda_kernels::kThreadsPerBlock));
  const auto kernel = cuda_kernels::v2_discrete_forward_kernel<scalar_t, acc_t, loc_t, VEC>;
  MSDA_LAUNCH(kernel, grid, dim3(cuda_kernels::kThreadsPerBlock), 0, stream, MSDA_IN(scalar_t, value),
              MSDA_IN(int64_t, shapes), MSDA_IN(int64_t, starts), MSDA_IN(loc_t, loc), MSDA_IN(acc_t, attn),
              MSDA_OUT(scalar_t, out), HQ, p.S, p.M, p.D, p.Lq, p.P);
}

template <typename scalar_t, typename acc_t, typename loc_t, int VEC, typename Stream>
void launch_discrete_backward(const Problem& p, const at::Tensor& value, const at::Tensor& shapes,
                              const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn,
                              const at::Tensor& go, at::Tensor& grad_value, at::Tensor& grad_attn, Stream stream) {
  const int64_t HQ = p.N * p.Lq * p.M;
  const int width = cuda_launch::next_power_of_two(std::min<int64_t>(p.D / VEC, cuda_kernels::kWarpSize));
  const dim3 grid = grid_for(ceil_div(HQ * width, cuda_kernels::kThreadsPerBlock));
  const auto kernel = cuda_kernels::v2_discrete_backward_kernel<scalar_t, acc_t, loc_t, VEC>;
  MSDA_LAUNCH(kernel, grid, dim3(cuda_kernels::kThreadsPerBlock), 0, stream, MSDA_IN(scalar_t, value),
              MSDA_IN(int64_t, shapes), MSDA_IN(int64_t, starts), MSDA_IN(loc_t, loc), MSDA_IN(acc_t, attn),
              MSDA_IN(scalar_t, go), MSDA_OUT(acc_t, grad_value), MSDA_OUT(acc_t, grad_attn), HQ, p.S, p.M, p.D,
              p.Lq, p.P, width);
}

// Calls f(loc_t*) with the discrete index type of the (converted) locations.
// Only a float64 value can have float64 locations, so other value dtypes
// instantiate the float32 index type alone.
template <typename scalar_t, typename F>
void with_index_type(const at::Tensor& loc, F&& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    if (loc.scalar_type() == at::kDouble) {
      f(static_cast<double*>(nullptr));
      return;
    }
  }
  f(static_cast<float*>(nullptr));
}

template <typename Stream>
at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   at::IntArrayRef points_per_level, c10::string_view method, Stream stream) {
  const V2Args args = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                              points_per_level, method);
  const Problem& p = args.v2.p;
  if (p.P == 0) return at::zeros({p.N, p.Lq, p.M * p.D}, value.options());  // a sum over no points
  if (args.method == V2Method::kDefault) {
    return cuda_launch::forward(value, args.shapes, args.starts, v1_locations(sampling_locations),
                                v1_weights(attention_weights), stream);
  }
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.to(discrete_index_type(sampling_locations)).contiguous();
  const at::Tensor attn = attention_weights.to(accumulate_type(value.scalar_type())).contiguous();
  at::Tensor out = at::empty({p.N, p.Lq, p.M * p.D}, value.options());
  if (out.numel() == 0) return out;
  MSDA_POISON_OUTPUT(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_v2_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type<scalar_t>(loc, [&](auto tag) {
      using loc_t = std::remove_pointer_t<decltype(tag)>;
      if (cuda_launch::can_vectorize<scalar_t>(p.D, {&v, &out})) {
        launch_discrete_forward<scalar_t, acc_t, loc_t, cuda_launch::vector_width<scalar_t>()>(
            p, v, args.shapes, args.starts, loc, attn, out, stream);
      } else {
        launch_discrete_forward<scalar_t, acc_t, loc_t, 1>(p, v, args.shapes, args.starts, loc, attn, out, stream);
      }
    });
  });
  return out;
}

// Discrete: grad_value by float32/float64 atomics (order-dependent, so
// torch.use_deterministic_algorithms(True) raises torch's standard error, as
// for v1), locations a zero gradient.
template <typename Stream>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        at::IntArrayRef points_per_level, c10::string_view method,
                                                        const at::Tensor& grad_output, Stream stream) {
  const V2Args args = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                              points_per_level, method);
  const Problem& p = args.v2.p;
  check_grad_output(grad_output, value, p);
  if (p.P == 0) {
    return {at::zeros_like(value, at::MemoryFormat::Contiguous),
            at::zeros_like(sampling_locations, at::MemoryFormat::Contiguous),
            at::zeros_like(attention_weights, at::MemoryFormat::Contiguous)};
  }
  if (args.method == V2Method::kDefault) {
    auto [grad_value, grad_loc, grad_attn] =
        cuda_launch::backward(value, args.shapes, args.starts, v1_locations(sampling_locations),
                              v1_weights(attention_weights), grad_output, stream);
    return {grad_value, grad_loc.view(sampling_locations.sizes()), grad_attn.view(attention_weights.sizes())};
  }
  at::globalContext().alertNotDeterministic("msda::ms_deform_attn_v2_backward (CUDA, discrete)");
  const at::ScalarType acc = accumulate_type(value.scalar_type());
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.to(discrete_index_type(sampling_locations)).contiguous();
  const at::Tensor attn = attention_weights.to(acc).contiguous();
  const at::Tensor go = grad_output.to(value.scalar_type()).contiguous();
  at::Tensor grad_value = at::zeros(v.sizes(), value.options().dtype(acc));
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
  if (grad_attn.numel() > 0 && p.D > 0) {
    MSDA_POISON_OUTPUT(grad_attn);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_v2_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_index_type<scalar_t>(loc, [&](auto tag) {
        using loc_t = std::remove_pointer_t<decltype(tag)>;
        if (cuda_launch::can_vectorize<scalar_t>(p.D, {&v, &go})) {
          launch_discrete_backward<scalar_t, acc_t, loc_t, cuda_launch::vector_width<scalar_t>()>(
              p, v, args.shapes, args.starts, loc, attn, go, grad_value, grad_attn, stream);
        } else {
          launch_discrete_backward<scalar_t, acc_t, loc_t, 1>(p, v, args.shapes, args.starts, loc, attn, go,
                                                              grad_value, grad_attn, stream);
        }
      });
    });
  } else {
    grad_attn.zero_();
  }
  return {grad_value.to(value.scalar_type()),
          at::zeros(sampling_locations.sizes(), sampling_locations.options()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace cuda_v2_launch
}  // namespace msda
