// ms_deform_attn's CPU kernels for one CPU capability: compiled once per
// capability with its flags (setup.py; dispatch.h explains the mechanism).
// Only the dtype dispatch lives here; the kernels are forward_kernel.h and
// backward_kernel.h, whose code is in the per-capability namespace.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cpu/backward_kernel.h"
#include "cpu/forward_kernel.h"
#include "cpu/head_copies.h"
#include "cpu/kernels.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {
namespace {

void forward(const Layout& layout, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
             at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    forward_kernel<scalar_t>(layout, value.const_data_ptr<scalar_t>(), loc.const_data_ptr<acc_t>(),
                             attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
  });
}

void backward(const Layout& layout, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
              const at::Tensor& grad_out, at::Tensor& grad_value, at::Tensor& grad_loc, at::Tensor& grad_attn) {
  // With per-head copies the kernel writes every element of grad_value;
  // otherwise it accumulates into it.
  if (!backward_uses_head_copies(layout.p)) grad_value.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    backward_kernel<scalar_t>(layout, value.const_data_ptr<scalar_t>(), loc.const_data_ptr<acc_t>(),
                              attn.const_data_ptr<acc_t>(), grad_out.const_data_ptr<acc_t>(),
                              grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
                              grad_attn.mutable_data_ptr<acc_t>());
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu

MSDA_REGISTER_CPU_KERNEL(msda::cpu::ms_deform_attn_forward_kernel, &msda::cpu::CPU_CAPABILITY::forward);
MSDA_REGISTER_CPU_KERNEL(msda::cpu::ms_deform_attn_backward_kernel, &msda::cpu::CPU_CAPABILITY::backward);
