// ms_deform_attn's CPU kernels for one CPU capability: compiled once per
// capability with its flags (setup.py; dispatch.h explains the mechanism).
// Only the dtype dispatch lives here; the kernels are forward_kernel.h and
// backward_kernel.h, whose code is in the per-capability namespace.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cpu/backward_kernel.h"
#include "cpu/forward_kernel.h"
#include "cpu/head_copies.h"
#include "cpu/item_inputs.h"
#include "cpu/kernels.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename acc_t>
ItemInput<acc_t> item_input(const at::Tensor& t) {
  return {t.const_data_ptr(), t.scalar_type()};
}
template <typename acc_t>
ItemOutput<acc_t> item_output(at::Tensor& t) {
  return {t.mutable_data_ptr(), t.scalar_type()};
}

void forward(const Layout& layout, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
             at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    forward_kernel<scalar_t>(layout, value.const_data_ptr<scalar_t>(), item_input<acc_t>(loc),
                             item_input<acc_t>(attn), out.mutable_data_ptr<scalar_t>());
  });
}

void backward(const Layout& layout, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
              const at::Tensor& grad_out, at::Tensor& grad_value, at::Tensor& grad_loc, at::Tensor& grad_attn) {
  const bool copies = backward_uses_head_copies(layout.p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto run = [&](auto* grad_value_data) {
      backward_kernel<scalar_t>(layout, value.const_data_ptr<scalar_t>(), item_input<acc_t>(loc),
                                item_input<acc_t>(attn), item_input<acc_t>(grad_out), grad_value_data,
                                item_output<acc_t>(grad_loc), item_output<acc_t>(grad_attn));
    };
    if (grad_value.scalar_type() != c10::CppTypeToScalarType<acc_t>::value) {
      run(grad_value.mutable_data_ptr<scalar_t>());  // 16-bit: the kernel writes all of it
    } else {
      // In the accumulation type the kernel writes every element with
      // per-head copies, and accumulates into grad_value otherwise.
      if (!copies) grad_value.zero_();
      run(grad_value.mutable_data_ptr<acc_t>());
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu

MSDA_REGISTER_CPU_KERNEL(msda::cpu::ms_deform_attn_forward_kernel, &msda::cpu::CPU_CAPABILITY::forward);
MSDA_REGISTER_CPU_KERNEL(msda::cpu::ms_deform_attn_backward_kernel, &msda::cpu::CPU_CAPABILITY::backward);
