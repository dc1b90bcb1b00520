// CPU kernels of msda::ms_deform_attn_v2_forward / _backward (schemas in
// csrc/v2_schema.cpp): argument preparation, dtype dispatch, registration.
//
// method="default" with points per level is v1's bilinear op on a per-point
// level table: a problem with L levels of P_l points each is the same as one
// with sum(P_l) "levels" of one point, level j being the level of point j.
// v1's kernels build their geometry from such a per-point table anyway
// (geometry.h: PointLevels), so they run unchanged, at v1's speed.
// method="discrete" has its own kernels (v2_discrete_kernel.h).

// The instruction-set selection of ms_deform_attn_cpu.cpp, which this file
// must share: it includes the same kernel headers.
#if !defined(CPU_CAPABILITY) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__) && !defined(MSDA_NO_AVX512)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif !defined(CPU_CAPABILITY) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/backward_kernel.h"
#include "cpu/forward_kernel.h"
#include "cpu/head_copies.h"
#include "cpu/layout.h"
#include "cpu/v2_discrete_kernel.h"
#include "cpu/vec_ops.h"
#include "v2_checks.h"

namespace msda::cpu {
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
// Only a float64 value can have float64 locations, so other value dtypes
// instantiate the float32 index type alone.
template <typename scalar_t, typename F>
void with_index_type(const at::Tensor& loc, F&& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    if (loc.scalar_type() == at::kDouble) {
      f(static_cast<const double*>(nullptr));
      return;
    }
  }
  f(static_cast<const float*>(nullptr));
}

at::Tensor forward_v2_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights, at::IntArrayRef points_per_level,
                          c10::string_view method) {
  const V2Inputs in = prepare_v2(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                 points_per_level, method);
  const Problem& p = in.layout.p;
  if (p.L == 0) return at::zeros({p.N, p.Lq, p.M * p.D}, value.options());  // a sum over no points
  at::Tensor out = at::empty({p.N, p.Lq, p.M * p.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_v2_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    if (in.method == V2Method::kDefault) {
      forward_kernel<scalar_t>(in.layout, in.value.const_data_ptr<scalar_t>(), in.loc.const_data_ptr<acc_t>(),
                               in.attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
    } else {
      with_index_type<scalar_t>(in.loc, [&](auto tag) {
        using loc_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        discrete_forward<scalar_t>(in.layout, in.value.const_data_ptr<scalar_t>(), in.loc.const_data_ptr<loc_t>(),
                                   in.attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
      });
    }
  });
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
  // v1's backward with per-head copies writes every element of grad_value;
  // the other paths accumulate into zeros (as in ms_deform_attn_cpu.cpp).
  at::Tensor grad_value = any_points && !discrete && backward_uses_head_copies(p)
                              ? at::empty(value.sizes(), value.options().dtype(in.acc))
                              : at::zeros(value.sizes(), value.options().dtype(in.acc));
  // Discrete locations get a zero gradient; the default kernel writes it whole.
  at::Tensor grad_loc = discrete || !any_points ? at::zeros(sampling_locations.sizes(), value.options().dtype(in.acc))
                                                : at::empty(sampling_locations.sizes(), value.options().dtype(in.acc));
  at::Tensor grad_attn = any_points ? at::empty(attention_weights.sizes(), in.attn.options())
                                    : at::zeros(attention_weights.sizes(), in.attn.options());
  if (any_points) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_v2_backward_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      if (!discrete) {
        backward_kernel<scalar_t>(in.layout, in.value.const_data_ptr<scalar_t>(), in.loc.const_data_ptr<acc_t>(),
                                  in.attn.const_data_ptr<acc_t>(), go.const_data_ptr<acc_t>(),
                                  grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
                                  grad_attn.mutable_data_ptr<acc_t>());
      } else {
        with_index_type<scalar_t>(in.loc, [&](auto tag) {
          using loc_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
          discrete_backward<scalar_t>(in.layout, in.value.const_data_ptr<scalar_t>(), in.loc.const_data_ptr<loc_t>(),
                                      in.attn.const_data_ptr<acc_t>(), go.const_data_ptr<acc_t>(),
                                      grad_value.mutable_data_ptr<acc_t>(), grad_attn.mutable_data_ptr<acc_t>());
        });
      }
    });
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
