// The v2 op's discrete-mode CPU kernels as the common code calls them: one
// KernelTable per entry point, filled once per CPU capability by
// csrc/cpu/capability/v2_discrete_kernels.cpp (see dispatch.h). The default
// mode uses v1's tables (kernels.h) on a per-point layout.
//
// Arguments as prepared by v2_ms_deform_attn_cpu.cpp: value contiguous in its
// dtype; loc contiguous in the discrete index type (float64 for float64
// locations, float32 otherwise); attn and grad_out in the accumulation type;
// grad_value zeroed, grad_attn allocated (written whole).
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu/dispatch.h"
#include "cpu/layout.h"

namespace msda::cpu {

using DiscreteForwardKernel = void (*)(const Layout& layout, const at::Tensor& value, const at::Tensor& loc,
                                       const at::Tensor& attn, at::Tensor& out);
using DiscreteBackwardKernel = void (*)(const Layout& layout, const at::Tensor& value, const at::Tensor& loc,
                                        const at::Tensor& attn, const at::Tensor& grad_out, at::Tensor& grad_value,
                                        at::Tensor& grad_attn);

MSDA_DECLARE_CPU_KERNEL(v2_discrete_forward_kernel, DiscreteForwardKernel);
MSDA_DECLARE_CPU_KERNEL(v2_discrete_backward_kernel, DiscreteBackwardKernel);

}  // namespace msda::cpu
