// CUDA implementation of msda's ops: a device guard (tensors on cuda:1 work),
// the current stream, launch errors raised as exceptions. The kernels are in
// ms_deform_attn_kernels.cuh, the launch configuration in ms_deform_attn_launch.h
// (both shared with the CPU-side CUDA emulation tests).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch_check.h"
#include "cuda/ms_deform_attn_launch.h"

namespace msda {
namespace {

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  return cuda_launch::forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                              at::cuda::getCurrentCUDAStream().stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights,
                                                             const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  return cuda_launch::backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               grad_output, at::cuda::getCurrentCUDAStream().stream());
}

}  // namespace
}  // namespace msda

TORCH_LIBRARY_IMPL(msda, CUDA, m) {
  m.impl("ms_deform_attn_forward", &msda::forward_cuda);
  m.impl("ms_deform_attn_backward", &msda::backward_cuda);
}
