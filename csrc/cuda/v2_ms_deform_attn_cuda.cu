// CUDA implementation of msda's v2 ops (schemas in csrc/v2_schema.cpp): a
// device guard, the current stream, launch errors raised as exceptions, as
// in ms_deform_attn_cuda.cu. The host side is v2_launch.h, the discrete
// kernels v2_discrete_kernels.cuh (both shared with the CUDA emulation tests).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch_check.h"
#include "cuda/v2_launch.h"

namespace msda {
namespace {

at::Tensor forward_v2_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                           const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                           const at::Tensor& attention_weights, at::IntArrayRef points_per_level,
                           c10::string_view method) {
  const c10::cuda::CUDAGuard guard(value.device());
  return cuda_v2_launch::forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                 points_per_level, method, at::cuda::getCurrentCUDAStream().stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_v2_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef points_per_level,
    c10::string_view method, const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  return cuda_v2_launch::backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                  points_per_level, method, grad_output, at::cuda::getCurrentCUDAStream().stream());
}

}  // namespace
}  // namespace msda

TORCH_LIBRARY_IMPL(msda, CUDA, m) {
  m.impl("ms_deform_attn_v2_forward", &msda::forward_v2_cuda);
  m.impl("ms_deform_attn_v2_backward", &msda::backward_v2_cuda);
}
