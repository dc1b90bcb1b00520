// CPU entry points of msda::ms_deform_attn_forward / _backward: argument
// checks, preparation and allocation, then the kernel of the CPU capability
// chosen at load (kernels.h, dispatch.h). This file is compiled once, with
// the baseline flags; the kernels themselves are compiled once per capability
// (csrc/cpu/capability/).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
#include "cpu/layout.h"
#include "cpu/output_cache.h"

namespace msda::cpu {

MSDA_DEFINE_CPU_KERNEL(ms_deform_attn_forward_kernel, ForwardKernel);
MSDA_DEFINE_CPU_KERNEL(ms_deform_attn_backward_kernel, BackwardKernel);

namespace {

// The arguments checked and made ready for the kernels: value contiguous,
// locations and weights in the accumulation type or in value's 16-bit dtype
// (the kernels read both, kernels.h: no full-size conversion for 16-bit
// inputs), the level table copied out. The value-reading checks run here
// because these tensors are on the CPU.
struct KernelInputs {
  Layout layout;
  at::ScalarType acc;
  at::Tensor value, loc, attn;
};

// t contiguous, in a dtype the kernels read: its own when that is the
// accumulation type or value's dtype, else the accumulation type.
at::Tensor kernel_readable(const at::Tensor& t, at::ScalarType value_type, at::ScalarType acc) {
  const at::ScalarType type = t.scalar_type() == value_type ? value_type : acc;
  return t.to(type).contiguous();
}

KernelInputs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const Problem p = check_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_level_values(spatial_shapes, level_start_index, p.S);
  const auto acc = accumulate_type(value.scalar_type());
  return {make_layout(p, spatial_shapes, level_start_index), acc, value.contiguous(),
          kernel_readable(sampling_locations, value.scalar_type(), acc),
          kernel_readable(attention_weights, value.scalar_type(), acc)};
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const KernelInputs in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Problem& p = in.layout.p;
  at::Tensor out = cached_empty({p.N, p.Lq, p.M * p.D}, value.options());
  if (out.numel() == 0) return out;
  ms_deform_attn_forward_kernel.get()(in.layout, in.value, in.loc, in.attn, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights,
                                                             const at::Tensor& grad_output) {
  const KernelInputs in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Problem& p = in.layout.p;
  check_grad_output(grad_output, value, p);
  const at::Tensor go = kernel_readable(grad_output, value.scalar_type(), in.acc);
  // Every gradient is allocated in its input's dtype where the kernels write
  // that dtype (kernels.h), so the casts at the end are no-ops.
  // The kernel's tasks are (n, head group, channel block): with no points or
  // no channels (D = 0 gives no channel blocks) no task runs, and every
  // gradient is zero. Zero the outputs here rather than trusting each kernel
  // path to write them: an empty output would hand back uninitialised memory.
  // (numel() is used, not a product of sizes, which could overflow.)
  const bool any_work = attention_weights.numel() > 0 && p.D > 0;
  const auto alloc = [any_work](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return any_work ? cached_empty(sizes, options) : cached_zeros(sizes, options);
  };
  // When it runs, the kernel writes every location and weight gradient, and
  // writes or zeroes all of grad_value (kernels.h).
  at::Tensor grad_value = alloc(value.sizes(), value.options());
  at::Tensor grad_loc = alloc(sampling_locations.sizes(), in.loc.options());
  at::Tensor grad_attn = alloc(attention_weights.sizes(), in.attn.options());
  if (any_work) {
    ms_deform_attn_backward_kernel.get()(in.layout, in.value, in.loc, in.attn, go, grad_value, grad_loc, grad_attn);
  }
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace
}  // namespace msda::cpu

TORCH_LIBRARY_IMPL(msda, CPU, m) {
  m.impl("ms_deform_attn_forward", &msda::cpu::forward_cpu);
  m.impl("ms_deform_attn_backward", &msda::cpu::backward_cpu);
}
