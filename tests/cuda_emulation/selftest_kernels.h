// Deliberately wrong kernels: one per kind of out-of-bounds access, each of
// which must fail the emulation's memory checks (memory_checks.h) every time,
// and racy ones, which race detection must report (tsan_check.py), beside
// their correct versions. Run through emulated_ops.cpp's `selftest`. In
// namespace msda::cuda_kernels so that their __shared__ arrays are found like
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

// Every thread adds to out[0]: a plain += races, atomicAdd does not.
__global__ void racy_add(const float* in, float* out, int64_t n) { out[0] += in[0]; }
__global__ void atomic_add(const float* in, float* out, int64_t n) { atomicAdd(out, in[0]); }
// Each thread reads its neighbour's shared element: without the barrier the
// read races with the neighbour's write; with it, a write after the read
// without a second barrier races with the neighbour's read.
// (Each block writes its own part of out.)
__global__ void shared_read_before_barrier(const float* in, float* out, int64_t n) {
  __shared__ float s[256];
  s[threadIdx.x] = in[threadIdx.x];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
__global__ void shared_write_after_barrier(const float* in, float* out, int64_t n) {
  __shared__ float s[256];
  s[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
  s[threadIdx.x] = 0;
}
__global__ void shared_with_barriers(const float* in, float* out, int64_t n) {
  __shared__ float s[256];
  s[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
  __syncthreads();
  s[threadIdx.x] = 0;
}

// What a kernel sees of its launch: MSDA_LAUNCH(kernel, grid, block, ...)
// must reach it as gridDim = grid, blockDim = block (the real macro's order).
__global__ void launch_dims(const float* in, float* out, int64_t n) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    out[0] = static_cast<float>(gridDim.x);
    out[1] = static_cast<float>(blockDim.x);
  }
}

}  // namespace selftest
}  // namespace cuda_kernels
}  // namespace msda
