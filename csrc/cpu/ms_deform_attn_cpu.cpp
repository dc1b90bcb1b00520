// CPU kernels of msda::ms_deform_attn_forward / _backward: argument
// preparation, dtype dispatch and registration. The kernels themselves are in
// forward_kernel.h and backward_kernel.h.

// Use torch's vector types for the widest instruction set the compiler
// targets (setup.py passes -march=native by default): AVX-512 (F, BW, VL, DQ)
// or AVX2. The distinct CPU_CAPABILITY namespace keeps these inline functions
// apart from libtorch's own copies. MSDA_NO_AVX512 keeps AVX2.
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
#include <vector>

#include "checks.h"
#include "cpu/backward_kernel.h"
#include "cpu/forward_kernel.h"
#include "cpu/head_copies.h"
#include "cpu/layout.h"
#include "cpu/vec_ops.h"
#include "cpu/vector_path.h"

namespace msda::cpu {

const char* vector_path() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX-512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "portable";
#endif
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    forward_kernel<scalar_t>(in.layout, in.value.const_data_ptr<scalar_t>(), in.loc.const_data_ptr<acc_t>(),
                             in.attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights,
                                                             const at::Tensor& grad_output) {
  const KernelInputs in = prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Problem& p = in.layout.p;
  const std::vector<int64_t> out_shape{p.N, p.Lq, p.M * p.D};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(out_shape), "grad_output must have shape (N, Lq, M*D) = ",
                    shape_str(out_shape), ", got ", shape_str(grad_output.sizes()));
  TORCH_CHECK_VALUE(grad_output.is_floating_point(), "grad_output must be a floating-point tensor, got ",
                    grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == value.device(), "grad_output must be on the device of value (",
                    value.device(), "), got ", grad_output.device());
  const at::Tensor go = grad_output.to(in.acc).contiguous();
  // grad_value accumulates in the accumulation type and is cast at the end
  // (a no-op for float32 and float64).
  // The kernel's tasks are (n, head group, channel block): with no points or
  // no channels (D = 0 gives no channel blocks) no task runs, and every
  // gradient is zero. Zero the outputs here rather than trusting each kernel
  // path to write them: an empty output would hand back uninitialised memory.
  // (numel() is used, not a product of sizes, which could overflow.)
  const bool any_work = attention_weights.numel() > 0 && p.D > 0;
  const auto alloc = [any_work](at::IntArrayRef sizes, const at::TensorOptions& options, bool written) {
    return any_work && written ? at::empty(sizes, options) : at::zeros(sizes, options);
  };
  // With per-head copies the kernel writes every element of grad_value;
  // location and weight gradients are written for every point.
  at::Tensor grad_value = alloc(value.sizes(), value.options().dtype(in.acc), backward_uses_head_copies(p));
  at::Tensor grad_loc = alloc(sampling_locations.sizes(), in.loc.options(), true);
  at::Tensor grad_attn = alloc(attention_weights.sizes(), in.attn.options(), true);
  if (any_work) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      backward_kernel<scalar_t>(in.layout, in.value.const_data_ptr<scalar_t>(), in.loc.const_data_ptr<acc_t>(),
                                in.attn.const_data_ptr<acc_t>(), go.const_data_ptr<acc_t>(),
                                grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
                                grad_attn.mutable_data_ptr<acc_t>());
    });
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
