// Deliberately wrong kernels, one per kind of out-of-bounds access: each must
// fail the emulation's memory checks (memory_checks.h) every time. Run by
// tests/test_cuda_emulation.py through emulated_ops.cpp's `selftest`. In
// namespace msda::cuda_kernels so that their __shared__ array is found like
// the real kernels' ones.
#pragma once

#include <cstdint>

namespace msda {
namespace cuda_kernels {
namespace selftest {

__global__ void read_past_end(const float* in, float* out, int64_t n) { out[threadIdx.x] = in[n + threadIdx.x]; }
__global__ void read_far_before(const float* in, float* out, int64_t n) { out[threadIdx.x] = in[-4096]; }
__global__ void write_past_end(const float* in, float* out, int64_t n) { out[n + threadIdx.x] = in[0]; }
__global__ void write_before_start(const float* in, float* out, int64_t n) { out[-1 - int64_t(threadIdx.x)] = in[0]; }
// Launched with more threads than the array has elements.
__global__ void shared_past_end(const float* in, float* out, int64_t n) {
  __shared__ float s[32];
  s[threadIdx.x] = in[0];
  __syncthreads();
  if (threadIdx.x < 32) out[threadIdx.x] = s[threadIdx.x];
}

}  // namespace selftest
}  // namespace cuda_kernels
}  // namespace msda
