// The v2 op's discrete-mode CPU kernels for one CPU capability (compiled once
// per capability, see dispatch.h): the dtype dispatch around
// v2_discrete_kernel.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <type_traits>

#include "cpu/v2_discrete_kernel.h"
#include "cpu/v2_kernels.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Calls f with a null pointer of the discrete index type. Only a float64
// value can have float64 locations, so other value dtypes instantiate the
// float32 index type alone.
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

void forward(const Layout& layout, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
             at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_v2_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    with_index_type<scalar_t>(loc, [&](auto tag) {
      using loc_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      discrete_forward<scalar_t>(layout, value.const_data_ptr<scalar_t>(), loc.const_data_ptr<loc_t>(),
                                 attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
    });
  });
}

void backward(const Layout& layout, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
              const at::Tensor& grad_out, at::Tensor& grad_value, at::Tensor& grad_attn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_v2_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    with_index_type<scalar_t>(loc, [&](auto tag) {
      using loc_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      discrete_backward<scalar_t>(layout, value.const_data_ptr<scalar_t>(), loc.const_data_ptr<loc_t>(),
                                  attn.const_data_ptr<acc_t>(), grad_out.const_data_ptr<acc_t>(),
                                  grad_value.mutable_data_ptr<acc_t>(), grad_attn.mutable_data_ptr<acc_t>());
    });
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu

MSDA_REGISTER_CPU_KERNEL(msda::cpu::v2_discrete_forward_kernel, &msda::cpu::CPU_CAPABILITY::forward);
MSDA_REGISTER_CPU_KERNEL(msda::cpu::v2_discrete_backward_kernel, &msda::cpu::CPU_CAPABILITY::backward);
