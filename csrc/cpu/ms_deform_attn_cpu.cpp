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

namespace msda::cpu {

MSDA_DEFINE_CPU_KERNEL(ms_deform_attn_forward_kernel, ForwardKernel);
MSDA_DEFINE_CPU_KERNEL(ms_deform_attn_backward_kernel, BackwardKernel);

namespace {

// The arguments checked and made ready for the kernels: value contiguous,
// locations and weights in the accumulation type, the level table copied out.
// The value-reading checks run here because these tensors are on the CPU.
struct KernelInputs {
  Layout layout;
  at::ScalarType acc;
  at::Tensor value, loc, attn;
};

KernelInputs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const Problem p = check_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_level_values(spatial_shapes, level_start_index, p.S);
  const auto acc = accumulate_type(value.scalar_type());
  return {make_layout(p, spatial_shapes, level_start_index), acc, value.contiguous(),
          sampling_locations.to(acc).contiguous(), attention_weights.to(acc).contiguous()};
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const KernelInputs in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Problem& p = in.layout.p;
  at::Tensor out = at::empty({p.N, p.Lq, p.M * p.D}, value.options());
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
  const at::Tensor go = grad_output.to(in.acc).contiguous();
  // grad_value accumulates in the accumulation type and is cast at the end
  // (a no-op for float32 and float64).
  // The kernel's tasks are (n, head group, channel block): with no points or
  // no channels (D = 0 gives no channel blocks) no task runs, and every
  // gradient is zero. Zero the outputs here rather than trusting each kernel
  // path to write them: an empty output would hand back uninitialised memory.
  // (numel() is used, not a product of sizes, which could overflow.)
  const bool any_work = attention_weights.numel() > 0 && p.D > 0;
  const auto alloc = [any_work](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return any_work ? at::empty(sizes, options) : at::zeros(sizes, options);
  };
  // When it runs, the kernel writes every location and weight gradient, and
  // writes or zeroes all of grad_value (kernels.h).
  at::Tensor grad_value = alloc(value.sizes(), value.options().dtype(in.acc));
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
