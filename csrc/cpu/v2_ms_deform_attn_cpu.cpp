// CPU kernels of msda::ms_deform_attn_v2_forward / _backward (schemas in
// csrc/v2_schema.cpp): argument preparation, dtype dispatch, registration.
//
// method="default" with points per level is v1's bilinear op on a per-point
// level table: a problem with L levels of P_l points each is the same as one
// with sum(P_l) "levels" of one point, level j being the level of point j.
// v1's kernels build their geometry from such a per-point table anyway
// (geometry.h: PointLevels), so they run unchanged, at v1's speed.
// method="discrete" has its own kernels (v2_discrete_kernel.h, compiled per CPU capability).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
#include "cpu/layout.h"
#include "cpu/output_cache.h"
#include "cpu/v2_kernels.h"
#include "v2_checks.h"

namespace msda::cpu {

// The kernels behind these tables (and v1's) are compiled once per CPU
// capability and picked at load time (dispatch.h); this file is common code.
MSDA_DEFINE_CPU_KERNEL(v2_discrete_forward_kernel, DiscreteForwardKernel);
MSDA_DEFINE_CPU_KERNEL(v2_discrete_backward_kernel, DiscreteBackwardKernel);

namespace {

// The checked arguments: a per-point layout (p.L = sum(P_l) points, p.P = 1,
// H, W and start per point), value contiguous, weights in the accumulation
// type, locations in the accumulation type (default) or the discrete index
// type (discrete).
struct V2Inputs {
  Layout layout;
  V2Method method;
  at::ScalarType acc;
  at::Tensor value, loc, attn;
};

V2Inputs prepare_v2(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                    at::IntArrayRef points_per_level, c10::string_view method_name) {
  const V2Method method = parse_v2_method(method_name);
  const V2Problem v2 = check_arguments_v2(value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights, points_per_level);
  check_level_values(spatial_shapes, level_start_index, v2.p.S);
  const Layout levels = make_layout(v2.p, spatial_shapes, level_start_index);
  Problem per_point = v2.p;
  per_point.P = 1;
  per_point.L = v2.p.P;
  Layout layout{per_point, {}, {}, {}};
  for (const int64_t l : level_of_points(v2.points)) {
    layout.H.push_back(levels.H[l]);
    layout.W.push_back(levels.W[l]);
    layout.start.push_back(levels.start[l]);
  }
  const at::ScalarType acc = accumulate_type(value.scalar_type());
  const at::ScalarType loc_type = method == V2Method::kDiscrete ? discrete_index_type(sampling_locations) : acc;
  return {layout, method, acc, value.contiguous(), sampling_locations.to(loc_type).contiguous(),
          attention_weights.to(acc).contiguous()};
}

// Calls f with a null pointer of the discrete index type (float or double).
at::Tensor forward_v2_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights, at::IntArrayRef points_per_level,
                          c10::string_view method) {
  const V2Inputs in = prepare_v2(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                 points_per_level, method);
  const Problem& p = in.layout.p;
  if (p.L == 0) return cached_zeros({p.N, p.Lq, p.M * p.D}, value.options());  // a sum over no points
  at::Tensor out = cached_empty({p.N, p.Lq, p.M * p.D}, value.options());
  if (out.numel() == 0) return out;
  if (in.method == V2Method::kDefault) {
    ms_deform_attn_forward_kernel.get()(in.layout, in.value, in.loc, in.attn, out);
  } else {
    v2_discrete_forward_kernel.get()(in.layout, in.value, in.loc, in.attn, out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_v2_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef points_per_level,
    c10::string_view method, const at::Tensor& grad_output) {
  const V2Inputs in = prepare_v2(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                 points_per_level, method);
  const Problem& p = in.layout.p;
  check_grad_output(grad_output, value, p);
  const at::Tensor go = grad_output.to(in.acc).contiguous();
  const bool any_points = p.N * p.Lq * p.M * p.L > 0;
  const bool discrete = in.method == V2Method::kDiscrete;
  // v1's backward kernel writes or zeroes all of grad_value (kernels.h); the
  // discrete one accumulates into zeros.
  at::Tensor grad_value = any_points && !discrete ? cached_empty(value.sizes(), value.options().dtype(in.acc))
                                                  : cached_zeros(value.sizes(), value.options().dtype(in.acc));
  // Discrete locations get a zero gradient; the default kernel writes it whole.
  const at::TensorOptions loc_options = value.options().dtype(in.acc);
  at::Tensor grad_loc = discrete || !any_points ? cached_zeros(sampling_locations.sizes(), loc_options)
                                                : cached_empty(sampling_locations.sizes(), loc_options);
  at::Tensor grad_attn = any_points ? cached_empty(attention_weights.sizes(), in.attn.options())
                                    : cached_zeros(attention_weights.sizes(), in.attn.options());
  if (any_points && !discrete) {
    ms_deform_attn_backward_kernel.get()(in.layout, in.value, in.loc, in.attn, go, grad_value, grad_loc, grad_attn);
  } else if (any_points) {
    v2_discrete_backward_kernel.get()(in.layout, in.value, in.loc, in.attn, go, grad_value, grad_attn);
  }
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace
}  // namespace msda::cpu

TORCH_LIBRARY_IMPL(msda, CPU, m) {
  m.impl("ms_deform_attn_v2_forward", &msda::cpu::forward_v2_cpu);
  m.impl("ms_deform_attn_v2_backward", &msda::cpu::backward_v2_cpu);
}
