// The CPU kernels of ms_deform_attn as the common code calls them: one
// KernelTable per entry point, filled once per CPU capability by
// csrc/cpu/capability/ms_deform_attn_kernels.cpp (see dispatch.h).
//
// The arguments are prepared by ms_deform_attn_cpu.cpp: value contiguous in
// its dtype; loc, attn and grad_out contiguous, each in the accumulation type
// (float64 for double, float32 otherwise) or in value's 16-bit dtype (the
// kernels widen one item at a time); the outputs allocated: out in value's
// dtype; grad_loc and grad_attn in the accumulation type or value's dtype;
// grad_value uninitialised, in the accumulation type or value's dtype (the
// kernel writes or zeroes all of it).
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu/dispatch.h"
#include "cpu/layout.h"

namespace msda::cpu {

using ForwardKernel = void (*)(const Layout& layout, const at::Tensor& value, const at::Tensor& loc,
                               const at::Tensor& attn, at::Tensor& out);
using BackwardKernel = void (*)(const Layout& layout, const at::Tensor& value, const at::Tensor& loc,
                                const at::Tensor& attn, const at::Tensor& grad_out, at::Tensor& grad_value,
                                at::Tensor& grad_loc, at::Tensor& grad_attn);

MSDA_DECLARE_CPU_KERNEL(ms_deform_attn_forward_kernel, ForwardKernel);
MSDA_DECLARE_CPU_KERNEL(ms_deform_attn_backward_kernel, BackwardKernel);

}  // namespace msda::cpu
