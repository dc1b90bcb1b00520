// Device code of the v2 op's discrete mode (each point reads the single
// pixel of csrc/v2_discrete_index.h). Like ms_deform_attn_kernels.cuh, whose
// helpers it uses, this file is compiled by nvcc and, unchanged, as host C++
// by the CUDA emulation (tests/cuda_emulation/emulated_ops_v2.cpp).
//
// Layout (contiguous): value (N, S, M, D); per-point level tables shapes
// (T, 2) and starts (T,) as int64 (entry i: the level of point i);
// sampling_locations (N, Lq, M, T, 2) in loc_t (float32, or float64 for
// float64 locations); attention_weights (N, Lq, M, T) in acc_t.
#pragma once

#include "cuda/ms_deform_attn_kernels.cuh"
#include "v2_discrete_index.h"

namespace msda {
namespace cuda_kernels {

// The row of value (level start + y * W + x) that a discrete point reads, or
// -1 when it reads nothing: a NaN location, or a level table entry that
// would leave value (device values nobody checked).
template <typename loc_t>
__device__ __forceinline__ int64_t discrete_row(const int64_t* shapes, const int64_t* starts, int64_t i, int64_t S,
                                                loc_t loc_x, loc_t loc_y) {
  const Level lv = read_level(shapes, starts, i, S);
  if (!lv.valid) return -1;
  const int64_t x = discrete_index(loc_x, static_cast<loc_t>(lv.W), lv.W);
  const int64_t y = discrete_index(loc_y, static_cast<loc_t>(lv.H), lv.H);
  return (x < 0 || y < 0) ? -1 : lv.start + y * lv.W + x;
}

// One thread per (head-query, VEC channels), as the bilinear forward.
template <typename scalar_t, typename acc_t, typename loc_t, int VEC>
__global__ void v2_discrete_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                           const int64_t* __restrict__ starts, const loc_t* __restrict__ loc,
                                           const acc_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t HQ,
                                           int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t T) {
  const int64_t groups = D / VEC;
  const int64_t total = HQ * groups;
  const int64_t row_stride = M * D;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hq = div_floor(t, groups);
    const int64_t c = (t - hq * groups) * VEC;
    const HeadQuery h = head_query(hq, S, M, D, Lq);
    const scalar_t* v = value + h.value_offset + c;
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
    for (int64_t i = 0; i < T; ++i) {
      const int64_t point = hq * T + i;
      const int64_t row = discrete_row(shapes, starts, i, S, loc[2 * point], loc[2 * point + 1]);
      if (row < 0) continue;
      add_scaled_pack<scalar_t, acc_t, VEC>(acc, attn[point], v + row * row_stride);
    }
    store_acc_pack<scalar_t, acc_t, VEC>(out + hq * D + c, acc);
  }
}

// A head-query is an aligned segment of `width` lanes (a power of two <= 32);
// lane g handles channel groups g, g + width, ... Per point: grad_value by
// atomics, the weight gradient (grad_output . pixel) reduced with shuffles
// and written once by the segment's first lane. Locations get no gradient.
template <typename scalar_t, typename acc_t, typename loc_t, int VEC>
__global__ void v2_discrete_backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                            const int64_t* __restrict__ starts, const loc_t* __restrict__ loc,
                                            const acc_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                                            acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_attn, int64_t HQ,
                                            int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t T, int width) {
  const int64_t groups = D / VEC;
  const int64_t total = HQ * width;
  const int64_t row_stride = M * D;
  const unsigned mask = segment_mask(width);
  // total and the stride are multiples of width, so a segment iterates together.
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hq = div_floor(t, width);
    const int64_t first = t - hq * width;
    const HeadQuery h = head_query(hq, S, M, D, Lq);
    for (int64_t i = 0; i < T; ++i) {
      const int64_t point = hq * T + i;
      // Uniform across the segment (same head-query and point).
      const int64_t row = discrete_row(shapes, starts, i, S, loc[2 * point], loc[2 * point + 1]);
      acc_t dot = 0;
      if (row >= 0) {
        const acc_t a = attn[point];
        const int64_t offset = h.value_offset + row * row_stride;
        for (int64_t g = first; g < groups; g += width) {
          const int64_t c = g * VEC;
          acc_t go[VEC];
          load_grad_output<scalar_t, acc_t, VEC>(grad_out + hq * D + c, go);
          const Pack<scalar_t, VEC> x = load_pack<scalar_t, VEC>(value + offset + c);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            dot += go[k] * static_cast<acc_t>(x.v[k]);
            atomicAdd(grad_value + offset + c + k, a * go[k]);
          }
        }
        dot = segment_sum(dot, mask, width);
      }
      if (first == 0) grad_attn[point] = dot;
    }
  }
}

}  // namespace cuda_kernels
}  // namespace msda
