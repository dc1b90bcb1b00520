// Host side of the CUDA kernels: argument preparation, the choice of kernel
// variant and launch configuration, and the launches themselves.
//
// Shared by the real build (ms_deform_attn_cuda.cu) and the CUDA emulation
// harness (tests/cuda_emulation/), so the emulation tests exercise this exact
// launch configuration. The including file defines, before including this:
//   MSDA_LAUNCH(kernel, grid, block, shared_bytes, stream, args...)
// which launches `kernel` (a __global__ function pointer) and checks for
// launch errors. Tensors handed in are on the device (for the emulation: CPU
// memory that it treats as device memory); their values are never read here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Context.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "checks.h"
#include "cuda/ms_deform_attn_kernels.cuh"

#ifndef MSDA_LAUNCH
#error "define MSDA_LAUNCH before including ms_deform_attn_launch.h"
#endif

// The emulation poisons fresh outputs so that an element a kernel forgets to
// write shows up; on the GPU this costs nothing.
#ifndef MSDA_POISON_OUTPUT
#define MSDA_POISON_OUTPUT(tensor) ((void)0)
#endif

namespace msda {
namespace cuda_launch {

using cuda_kernels::kThreadsPerBlock;
using cuda_kernels::kWarpSize;

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();  // grid-stride loops cover the rest

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_power_of_two(int64_t x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

// Channels per thread: a 128-bit vector when D and every pointer the vector
// loads and stores touch allow it, else one.
template <typename scalar_t>
constexpr int vector_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

inline bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t>
bool can_vectorize(int64_t D, std::initializer_list<const at::Tensor*> tensors) {
  if (D % vector_width<scalar_t>() != 0) return false;
  for (const at::Tensor* t : tensors)
    if (!aligned_16(t->const_data_ptr())) return false;
  return true;
}

// The inputs, contiguous, with the index tensors as int64 and the locations
// and weights in the accumulation type (spec §3 allows float32 ones with a
// 16-bit value: converting up front keeps one kernel per value dtype).
struct Inputs {
  Problem p;
  at::Tensor value, shapes, starts, loc, attn;
};

inline Inputs prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  Inputs in;
  in.p = check_arguments(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const at::ScalarType acc = accumulate_type(value.scalar_type());
  in.value = value.contiguous();
  in.shapes = spatial_shapes.to(at::kLong).contiguous();
  in.starts = level_start_index.to(at::kLong).contiguous();
  in.loc = sampling_locations.to(acc).contiguous();
  in.attn = attention_weights.to(acc).contiguous();
  return in;
}

template <typename scalar_t, typename acc_t, int VEC, typename Stream>
void launch_forward(const Inputs& in, at::Tensor& out, Stream stream) {
  const Problem& p = in.p;
  const int64_t HQ = p.N * p.Lq * p.M;
  const int64_t threads_needed = HQ * (p.D / VEC);
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(threads_needed, kThreadsPerBlock), kMaxGridX)));
  const dim3 block(kThreadsPerBlock);
  const auto kernel = cuda_kernels::ms_deform_attn_forward_kernel<scalar_t, acc_t, VEC>;
  MSDA_LAUNCH(kernel, grid, block, 0, stream, in.value.const_data_ptr<scalar_t>(),
              in.shapes.const_data_ptr<int64_t>(), in.starts.const_data_ptr<int64_t>(),
              in.loc.const_data_ptr<acc_t>(), in.attn.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), HQ,
              p.S, p.M, p.D, p.Lq, p.L, p.P);
}

template <typename Stream>
at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights, Stream stream) {
  const Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Problem& p = in.p;
  at::Tensor out = at::empty({p.N, p.Lq, p.M * p.D}, value.options());
  if (out.numel() == 0) return out;  // a launch with an empty grid is an error
  MSDA_POISON_OUTPUT(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vector_width<scalar_t>();
    if (can_vectorize<scalar_t>(p.D, {&in.value, &out})) {
      launch_forward<scalar_t, acc_t, kVec>(in, out, stream);
    } else {
      launch_forward<scalar_t, acc_t, 1>(in, out, stream);
    }
  });
  return out;
}

template <typename scalar_t, typename acc_t, int VEC, typename Stream>
void launch_backward(const Inputs& in, const at::Tensor& grad_out, at::Tensor& grad_value, at::Tensor& grad_loc,
                     at::Tensor& grad_attn, Stream stream) {
  const Problem& p = in.p;
  const int64_t HQ = p.N * p.Lq * p.M;
  const int64_t groups = p.D / VEC;
  if (groups <= kWarpSize) {
    // A segment of `width` lanes per head-query, reduced with shuffles.
    const int width = next_power_of_two(groups);
    const dim3 grid(static_cast<unsigned>(std::min(ceil_div(HQ * width, kThreadsPerBlock), kMaxGridX)));
    const auto kernel = cuda_kernels::ms_deform_attn_backward_warp_kernel<scalar_t, acc_t, VEC>;
    MSDA_LAUNCH(kernel, grid, dim3(kThreadsPerBlock), 0, stream, in.value.const_data_ptr<scalar_t>(),
                in.shapes.const_data_ptr<int64_t>(), in.starts.const_data_ptr<int64_t>(),
                in.loc.const_data_ptr<acc_t>(), in.attn.const_data_ptr<acc_t>(), grad_out.const_data_ptr<scalar_t>(),
                grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
                grad_attn.mutable_data_ptr<acc_t>(), HQ, p.S, p.M, p.D, p.Lq, p.L, p.P, width);
  } else {
    // A block per head-query, just enough whole warps to cover the groups.
    const int64_t threads = std::min<int64_t>(ceil_div(groups, kWarpSize) * kWarpSize, kThreadsPerBlock);
    const dim3 grid(static_cast<unsigned>(std::min(HQ, kMaxGridX)));
    const auto kernel = cuda_kernels::ms_deform_attn_backward_block_kernel<scalar_t, acc_t, VEC>;
    MSDA_LAUNCH(kernel, grid, dim3(static_cast<unsigned>(threads)), 0, stream, in.value.const_data_ptr<scalar_t>(),
                in.shapes.const_data_ptr<int64_t>(), in.starts.const_data_ptr<int64_t>(),
                in.loc.const_data_ptr<acc_t>(), in.attn.const_data_ptr<acc_t>(), grad_out.const_data_ptr<scalar_t>(),
                grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
                grad_attn.mutable_data_ptr<acc_t>(), HQ, p.S, p.M, p.D, p.Lq, p.L, p.P);
  }
}

// grad_value is accumulated with atomics in the accumulation type: float32
// (a temporary buffer of N*S*M*D*4 bytes for float16/bfloat16 values, cast at
// the end) or float64. The atomics make the result order-dependent, so under
// torch.use_deterministic_algorithms(True) this raises torch's standard error.
template <typename Stream>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        const at::Tensor& grad_output, Stream stream) {
  const Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Problem& p = in.p;
  const std::vector<int64_t> out_shape{p.N, p.Lq, p.M * p.D};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(out_shape), "grad_output must have shape (N, Lq, M*D) = ",
                    shape_str(out_shape), ", got ", shape_str(grad_output.sizes()));
  TORCH_CHECK_VALUE(grad_output.device() == value.device(), "grad_output must be on the device of value (",
                    value.device(), "), got ", grad_output.device());
  at::globalContext().alertNotDeterministic("msda::ms_deform_attn_backward (CUDA)");
  const at::ScalarType acc = accumulate_type(value.scalar_type());
  const at::Tensor go = grad_output.to(value.scalar_type()).contiguous();
  at::Tensor grad_value = at::zeros(in.value.sizes(), value.options().dtype(acc));
  at::Tensor grad_loc = at::empty(in.loc.sizes(), in.loc.options());
  at::Tensor grad_attn = at::empty(in.attn.sizes(), in.attn.options());
  if (grad_attn.numel() > 0 && p.D > 0) {
    MSDA_POISON_OUTPUT(grad_loc);
    MSDA_POISON_OUTPUT(grad_attn);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          constexpr int kVec = vector_width<scalar_t>();
          if (can_vectorize<scalar_t>(p.D, {&in.value, &go})) {
            launch_backward<scalar_t, acc_t, kVec>(in, go, grad_value, grad_loc, grad_attn, stream);
          } else {
            launch_backward<scalar_t, acc_t, 1>(in, go, grad_value, grad_loc, grad_attn, stream);
          }
        });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace cuda_launch
}  // namespace msda
