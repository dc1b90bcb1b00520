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

// Every tensor reaches a kernel through these: the emulation hands the kernel
// a bounds-checked copy instead (tests/cuda_emulation/memory_checks.h). An
// undefined output is a null pointer.
#ifndef MSDA_IN
#define MSDA_IN(T, tensor) (tensor).const_data_ptr<T>()
#define MSDA_OUT(T, tensor) ((tensor).defined() ? (tensor).mutable_data_ptr<T>() : nullptr)
#endif

// The largest grid.x a launch uses; the emulation lowers it so that the
// kernels' grid-stride loops run several rounds.
#ifndef MSDA_GRID_CAP
#define MSDA_GRID_CAP std::numeric_limits<int32_t>::max()
#endif

namespace msda {
namespace cuda_launch {

using cuda_kernels::kThreadsPerBlock;
using cuda_kernels::kWarpSize;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// grid.x for `blocks` blocks of work: grid-stride loops cover what a capped grid leaves.
inline dim3 grid_for(int64_t blocks) {
  return dim3(static_cast<unsigned>(std::min<int64_t>(blocks, static_cast<int64_t>(MSDA_GRID_CAP))));
}

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
  const dim3 grid = grid_for(ceil_div(threads_needed, kThreadsPerBlock));
  const dim3 block(kThreadsPerBlock);
  const auto kernel = cuda_kernels::ms_deform_attn_forward_kernel<scalar_t, acc_t, VEC>;
  MSDA_LAUNCH(kernel, grid, block, 0, stream, MSDA_IN(scalar_t, in.value), MSDA_IN(int64_t, in.shapes),
              MSDA_IN(int64_t, in.starts), MSDA_IN(acc_t, in.loc), MSDA_IN(acc_t, in.attn), MSDA_OUT(scalar_t, out), HQ,
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

template <typename scalar_t, typename acc_t, int VEC, bool kScatter, typename Stream>
void launch_backward(const Inputs& in, const at::Tensor& grad_out, at::Tensor& grad_value, at::Tensor& grad_loc,
                     at::Tensor& grad_attn, Stream stream) {
  const Problem& p = in.p;
  const int64_t HQ = p.N * p.Lq * p.M;
  const int64_t groups = p.D / VEC;
  if (groups <= kWarpSize) {
    // A segment of `width` lanes per head-query, reduced with shuffles.
    const int width = next_power_of_two(groups);
    const dim3 grid = grid_for(ceil_div(HQ * width, kThreadsPerBlock));
    const auto kernel = cuda_kernels::ms_deform_attn_backward_warp_kernel<scalar_t, acc_t, VEC, kScatter>;
    MSDA_LAUNCH(kernel, grid, dim3(kThreadsPerBlock), 0, stream, MSDA_IN(scalar_t, in.value),
                MSDA_IN(int64_t, in.shapes), MSDA_IN(int64_t, in.starts), MSDA_IN(acc_t, in.loc),
                MSDA_IN(acc_t, in.attn), MSDA_IN(scalar_t, grad_out), MSDA_OUT(acc_t, grad_value),
                MSDA_OUT(acc_t, grad_loc), MSDA_OUT(acc_t, grad_attn), HQ, p.S, p.M, p.D, p.Lq, p.L, p.P, width);
  } else {
    // A block per head-query, just enough whole warps to cover the groups.
    const int64_t threads = std::min<int64_t>(ceil_div(groups, kWarpSize) * kWarpSize, kThreadsPerBlock);
    const dim3 grid = grid_for(HQ);
    const auto kernel = cuda_kernels::ms_deform_attn_backward_block_kernel<scalar_t, acc_t, VEC, kScatter>;
    MSDA_LAUNCH(kernel, grid, dim3(static_cast<unsigned>(threads)), 0, stream, MSDA_IN(scalar_t, in.value),
                MSDA_IN(int64_t, in.shapes), MSDA_IN(int64_t, in.starts), MSDA_IN(acc_t, in.loc),
                MSDA_IN(acc_t, in.attn), MSDA_IN(scalar_t, grad_out), MSDA_OUT(acc_t, grad_value),
                MSDA_OUT(acc_t, grad_loc), MSDA_OUT(acc_t, grad_attn), HQ, p.S, p.M, p.D, p.Lq, p.L, p.P);
  }
}

// Deterministic grad_value (see the kernels' comment): E = 4*N*Lq*M*L*P
// corner entries, each a 4-byte key and an acc_t weight, sorted (stable) into
// a permutation, and N*S*M + 1 row starts. Sums in acc_t, in entry order.
template <typename scalar_t, typename acc_t, int VEC, typename Stream>
void launch_grad_value_deterministic(const Inputs& in, const at::Tensor& grad_out, at::Tensor& grad_value,
                                     Stream stream) {
  const Problem& p = in.p;
  const int64_t HQ = p.N * p.Lq * p.M, rows = p.N * p.S * p.M, points = HQ * p.L * p.P;
  TORCH_CHECK(rows < std::numeric_limits<int32_t>::max(),
              "the deterministic CUDA backward needs N*S*M < 2**31 - 1 (value's rows times heads), got ", rows,
              " (value has shape ", shape_str(in.value.sizes()), ")");
  const int32_t none = static_cast<int32_t>(rows);  // sorts after every row
  at::Tensor key = at::empty({4 * points}, in.loc.options().dtype(at::kInt));
  at::Tensor weight = at::empty({4 * points}, in.loc.options());
  MSDA_POISON_OUTPUT(weight);
  if (points > 0) {
    const auto corners = cuda_kernels::ms_deform_attn_corner_kernel<acc_t>;
    MSDA_LAUNCH(corners, grid_for(ceil_div(points, kThreadsPerBlock)), dim3(kThreadsPerBlock), 0, stream,
                MSDA_IN(int64_t, in.shapes), MSDA_IN(int64_t, in.starts), MSDA_IN(acc_t, in.loc),
                MSDA_IN(acc_t, in.attn), MSDA_OUT(int32_t, key), MSDA_OUT(acc_t, weight), HQ, p.S, p.M, p.Lq, p.L,
                p.P, none);
  }
  // A stable sort keeps each row's entries in increasing entry order.
  const auto [sorted, order] = key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor row_begin = at::searchsorted(sorted, at::arange(rows + 1, key.options()));
  MSDA_POISON_OUTPUT(grad_value);
  if (rows == 0) return;
  const auto gather = cuda_kernels::ms_deform_attn_grad_value_gather_kernel<scalar_t, acc_t, VEC>;
  MSDA_LAUNCH(gather, grid_for(ceil_div(rows * (p.D / VEC), kThreadsPerBlock)), dim3(kThreadsPerBlock), 0, stream,
              MSDA_IN(int64_t, row_begin), MSDA_IN(int64_t, order), MSDA_IN(acc_t, weight),
              MSDA_IN(scalar_t, grad_out), MSDA_OUT(acc_t, grad_value), rows, p.D, p.L * p.P);
}

// grad_value is accumulated with atomics in the accumulation type: float32
// (a temporary buffer of N*S*M*D*4 bytes for float16/bfloat16 values, cast at
// the end) or float64. The atomics make the result order-dependent; under
// torch.use_deterministic_algorithms(True) launch_grad_value_deterministic
// computes it instead, in a fixed order.
template <typename Stream>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        const at::Tensor& grad_output, Stream stream) {
  const Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Problem& p = in.p;
  check_grad_output(grad_output, value, p);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const at::ScalarType acc = accumulate_type(value.scalar_type());
  const at::Tensor go = grad_output.to(value.scalar_type()).contiguous();
  at::Tensor grad_value = deterministic ? at::empty(in.value.sizes(), value.options().dtype(acc))
                                        : at::zeros(in.value.sizes(), value.options().dtype(acc));
  at::Tensor grad_loc = at::empty(in.loc.sizes(), in.loc.options());
  at::Tensor grad_attn = at::empty(in.attn.sizes(), in.attn.options());
  if (grad_attn.numel() > 0 && p.D > 0) {
    MSDA_POISON_OUTPUT(grad_loc);
    MSDA_POISON_OUTPUT(grad_attn);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          constexpr int kVec = vector_width<scalar_t>();
          at::Tensor none;  // the deterministic kernels take no grad_value
          const bool vec = can_vectorize<scalar_t>(p.D, {&in.value, &go});
          if (vec && !deterministic) {
            launch_backward<scalar_t, acc_t, kVec, true>(in, go, grad_value, grad_loc, grad_attn, stream);
          } else if (!deterministic) {
            launch_backward<scalar_t, acc_t, 1, true>(in, go, grad_value, grad_loc, grad_attn, stream);
          } else if (vec) {
            launch_backward<scalar_t, acc_t, kVec, false>(in, go, none, grad_loc, grad_attn, stream);
            launch_grad_value_deterministic<scalar_t, acc_t, kVec>(in, go, grad_value, stream);
          } else {
            launch_backward<scalar_t, acc_t, 1, false>(in, go, none, grad_loc, grad_attn, stream);
            launch_grad_value_deterministic<scalar_t, acc_t, 1>(in, go, grad_value, stream);
          }
        });
  } else {
    grad_value.zero_();
    grad_loc.zero_();
    grad_attn.zero_();
  }
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace cuda_launch
}  // namespace msda
