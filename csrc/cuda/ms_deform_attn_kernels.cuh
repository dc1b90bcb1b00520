// Device code of the CUDA kernels: forward, and two backward variants.
//
// This file is compiled twice: by nvcc for the real kernels (csrc/cuda/
// ms_deform_attn_cuda.cu) and, unchanged, as host C++ by the CUDA emulation
// harness (tests/cuda_emulation/), which provides threadIdx, __syncthreads,
// warp shuffles and atomics on the CPU. So: no inline PTX, no CUDA-only
// intrinsics beyond those the emulation header provides.
//
// Layout (all contiguous): value (N, S, M, D); spatial_shapes (L, 2) and
// level_start_index (L,) as int64; sampling_locations (N, Lq, M, L, P, 2) and
// attention_weights (N, Lq, M, L, P) in the accumulation type acc_t (float32,
// float64 for float64 values); output (N, Lq, M*D).
//
// A "head-query" hq = (n*Lq + q)*M + m owns D channels. Each thread handles
// VEC consecutive channels (a 128-bit load where alignment allows), so the
// location and weight math of a sampling point is done once for VEC channels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// The emulation harness defines this to assert the alignment a GPU requires.
#ifndef MSDA_CHECK_ALIGNED
#define MSDA_CHECK_ALIGNED(ptr, bytes) ((void)0)
#endif

namespace msda {
namespace cuda_kernels {

constexpr int kWarpSize = 32;
// Every launch uses at most this many threads, so any register count ptxas
// picks (<= 255) fits. No __launch_bounds__: with it ptxas aims at a higher
// occupancy and spills a few registers in some instantiations.
constexpr int kThreadsPerBlock = 256;
constexpr int kMaxWarpsPerBlock = kThreadsPerBlock / kWarpSize;
constexpr int kPointsPerChunk = 32;     // (l, p) entries reduced per shared-memory round

// VEC values of type T, aligned so that a copy is one vector load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// On the device one vector load/store through the Pack type; compiled as host
// C++ (the emulation) a memcpy, since reading T objects through a Pack lvalue
// breaks strict aliasing there (undefined behaviour the optimiser may use).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  MSDA_CHECK_ALIGNED(p, sizeof(Pack<T, VEC>));
#ifdef __CUDA_ARCH__
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
#else
  Pack<T, VEC> x;
  std::memcpy(&x, p, sizeof(x));
  return x;
#endif
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& x) {
  MSDA_CHECK_ALIGNED(p, sizeof(Pack<T, VEC>));
#ifdef __CUDA_ARCH__
  *reinterpret_cast<Pack<T, VEC>*>(p) = x;
#else
  std::memcpy(p, &x, sizeof(x));
#endif
}

// acc[i] += a * x[i] over a pack of VEC channels read at p.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void add_scaled_pack(acc_t (&acc)[VEC], acc_t a, const scalar_t* p) {
  const Pack<scalar_t, VEC> x = load_pack<scalar_t, VEC>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] += a * static_cast<acc_t>(x.v[i]);
}

// The VEC accumulators converted to scalar_t and stored at p.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void store_acc_pack(scalar_t* p, const acc_t (&acc)[VEC]) {
  Pack<scalar_t, VEC> o;
#pragma unroll
  for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
  store_pack<scalar_t, VEC>(p, o);
}

// a / b for a >= 0, b >= 1, without 64-bit integer division: on the GPU that
// is a subroutine call, and the registers saved around it show up as spills.
// 32-bit division when both fit (always, in practice), else shift-and-subtract.
__device__ __forceinline__ int64_t div_floor(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  const uint64_t ua = static_cast<uint64_t>(a), ub = static_cast<uint64_t>(b);
  uint64_t q = 0, r = 0;
#pragma unroll 1
  for (int bit = 63; bit >= 0; --bit) {
    r = (r << 1) | ((ua >> bit) & 1u);
    if (r >= ub) {
      r -= ub;
      q |= uint64_t(1) << bit;
    }
  }
  return static_cast<int64_t>(q);
}

// One level of the value tensor. `valid` is false when spatial_shapes or
// level_start_index (device values nobody checked) would put the level outside
// the S rows of value; such a level is skipped, so no index can leave value.
struct Level {
  int64_t start, H, W;
  bool valid;
};

__device__ __forceinline__ Level read_level(const int64_t* shapes, const int64_t* starts, int64_t l, int64_t S) {
  Level lv;
  lv.H = shapes[2 * l];
  lv.W = shapes[2 * l + 1];
  lv.start = starts[l];
  // A 128-bit product, so that absurd sizes cannot overflow.
  lv.valid = lv.H >= 1 && lv.W >= 1 && lv.start >= 0 && lv.start <= S && static_cast<unsigned __int128>(lv.H) * static_cast<uint64_t>(lv.W) <= static_cast<uint64_t>(S - lv.start);
  return lv;
}

// The four neighbours of a sampling point and their bilinear weights.
// Corner k = 2*dy + dx; an out-of-map corner has ok[k] false.
template <typename acc_t>
struct Corners {
  int64_t row[4];  // row of value (level start + y*W + x)
  acc_t w[4];
  bool ok[4];
  acc_t lx, ly, hx, hy;  // fractional parts and their complements
};

__device__ __forceinline__ float floor_acc(float x) { return floorf(x); }
__device__ __forceinline__ double floor_acc(double x) { return floor(x); }

// grid_sample's pixel coordinates (align_corners=False). Returns false when the
// point is not sampled: outside -1 < x < W, -1 < y < H, or not finite (NaN
// fails every comparison).
template <typename acc_t>
__device__ __forceinline__ bool locate(acc_t loc_x, acc_t loc_y, const Level& lv, Corners<acc_t>& c) {
  const acc_t W = static_cast<acc_t>(lv.W), H = static_cast<acc_t>(lv.H);
  const acc_t x = loc_x * W - acc_t(0.5), y = loc_y * H - acc_t(0.5);
  if (!(x > acc_t(-1) && x < W && y > acc_t(-1) && y < H)) return false;
  const acc_t fx = floor_acc(x), fy = floor_acc(y);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  c.lx = x - fx;
  c.ly = y - fy;
  c.hx = acc_t(1) - c.lx;
  c.hy = acc_t(1) - c.ly;
  const bool x_ok[2] = {x0 >= 0, x0 + 1 < lv.W};
  const bool y_ok[2] = {y0 >= 0, y0 + 1 < lv.H};
  const acc_t wx[2] = {c.hx, c.lx}, wy[2] = {c.hy, c.ly};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int dy = k >> 1, dx = k & 1;
    c.ok[k] = y_ok[dy] && x_ok[dx];
    c.w[k] = wy[dy] * wx[dx];
    c.row[k] = lv.start + (y0 + dy) * lv.W + (x0 + dx);
  }
  return true;
}

// Index arithmetic of a thread: which head-query and which value rows it reads.
struct HeadQuery {
  int64_t n, m;
  int64_t value_offset;  // element offset of (n, row 0, m, channel 0) in value
};

__device__ __forceinline__ HeadQuery head_query(int64_t hq, int64_t S, int64_t M, int64_t D, int64_t Lq) {
  HeadQuery h;
  h.m = hq - div_floor(hq, M) * M;
  h.n = div_floor(hq, Lq * M);
  h.value_offset = (h.n * S * M + h.m) * D;
  return h;
}

// ---------------------------------------------------------------------------
// Forward: one thread per (head-query, group of VEC channels), no
// synchronisation, a grid-stride loop for grids larger than the launch.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void ms_deform_attn_forward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const acc_t* __restrict__ loc, const acc_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t HQ, int64_t S,
    int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t groups = D / VEC;
  const int64_t total = HQ * groups;
  const int64_t row_stride = M * D;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hq = div_floor(t, groups);
    const int64_t c = (t - hq * groups) * VEC;
    const HeadQuery h = head_query(hq, S, M, D, Lq);
    const scalar_t* v = value + h.value_offset + c;
    const acc_t* hq_loc = loc + hq * L * P * 2;
    const acc_t* hq_attn = attn + hq * L * P;
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    for (int64_t l = 0; l < L; ++l) {
      const Level lv = read_level(shapes, starts, l, S);
      if (!lv.valid) continue;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t lp = l * P + p;
        Corners<acc_t> cn;
        if (!locate(hq_loc[2 * lp], hq_loc[2 * lp + 1], lv, cn)) continue;
        const acc_t a = hq_attn[lp];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (cn.ok[k]) add_scaled_pack<scalar_t, acc_t, VEC>(acc, a * cn.w[k], v + cn.row[k] * row_stride);
        }
      }
    }
    store_acc_pack<scalar_t, acc_t, VEC>(out + hq * D + c, acc);
  }
}

// ---------------------------------------------------------------------------
// Backward, shared part: for one sampling point and VEC channels, scatter
// grad_value (float32/float64 atomics; not without kScatter, for the
// deterministic algorithm, which computes it apart) and return this thread's
// partial sums of d/d(attention weight) and d/d(pixel x, y) over its channels.
// (A template flag rather than a null check: the check costs the 16-bit
// 8-wide warp kernel 16-24 more registers.)
template <typename scalar_t, typename acc_t, int VEC, bool kScatter>
__device__ __forceinline__ void backward_point(const scalar_t* v, acc_t* gv, int64_t row_stride,
                                               const Corners<acc_t>& cn, acc_t a, const acc_t* go, acc_t& g_attn,
                                               acc_t& g_x, acc_t& g_y) {
  acc_t corner[4][VEC];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (cn.ok[k]) {
      const Pack<scalar_t, VEC> x = load_pack<scalar_t, VEC>(v + cn.row[k] * row_stride);
#pragma unroll
      for (int i = 0; i < VEC; ++i) corner[k][i] = static_cast<acc_t>(x.v[i]);
      if constexpr (kScatter) {
        const acc_t aw = a * cn.w[k];
        acc_t* dst = gv + cn.row[k] * row_stride;
#pragma unroll
        for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, aw * go[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) corner[k][i] = acc_t(0);
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const acc_t sample = cn.w[0] * corner[0][i] + cn.w[1] * corner[1][i] + cn.w[2] * corner[2][i] +
                         cn.w[3] * corner[3][i];
    g_attn += go[i] * sample;
    g_x += go[i] * (cn.hy * (corner[1][i] - corner[0][i]) + cn.ly * (corner[3][i] - corner[2][i]));
    g_y += go[i] * (cn.hx * (corner[2][i] - corner[0][i]) + cn.lx * (corner[3][i] - corner[1][i]));
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void load_grad_output(const scalar_t* grad_out, acc_t* go) {
  const Pack<scalar_t, VEC> x = load_pack<scalar_t, VEC>(grad_out);
#pragma unroll
  for (int i = 0; i < VEC; ++i) go[i] = static_cast<acc_t>(x.v[i]);
}

// Sum over the `width` lanes of an aligned segment of the warp (all of which
// call this together; `mask` names exactly them). Every lane gets the sum.
template <typename acc_t>
__device__ __forceinline__ acc_t segment_sum(acc_t x, unsigned mask, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(mask, x, offset, width);
  return x;
}

// The mask of this thread's aligned segment of `width` lanes (a power of two <= 32).
__device__ __forceinline__ unsigned segment_mask(int width) {
  const int lane = threadIdx.x % kWarpSize;
  const unsigned segment_bits = width == kWarpSize ? 0xffffffffu : ((1u << width) - 1u);
  return segment_bits << (lane & ~(width - 1));
}

// Backward for D/VEC <= 32 channel groups: a head-query is an aligned segment
// of `width` lanes (the next power of two >= D/VEC; lanes past D/VEC only add
// zeros). Location and weight gradients are reduced with warp shuffles and
// written once, by the segment's first lane.
template <typename scalar_t, typename acc_t, int VEC, bool kScatter>
__global__ void ms_deform_attn_backward_warp_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const acc_t* __restrict__ loc, const acc_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
    acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_loc, acc_t* __restrict__ grad_attn, int64_t HQ,
    int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P, int width) {
  const int64_t groups = D / VEC;
  const int64_t total = HQ * width;
  const int64_t row_stride = M * D;
  const unsigned mask = segment_mask(width);
  // total and the stride are multiples of width, so a segment iterates together.
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hq = div_floor(t, width);
    const int64_t g = t - hq * width;
    const bool active = g < groups;
    const int64_t c = active ? g * VEC : 0;
    const HeadQuery h = head_query(hq, S, M, D, Lq);
    const scalar_t* v = value + h.value_offset + c;
    acc_t* gv = kScatter ? grad_value + h.value_offset + c : nullptr;
    const acc_t* hq_loc = loc + hq * L * P * 2;
    const acc_t* hq_attn = attn + hq * L * P;
    acc_t go[VEC];
    if (active) {
      load_grad_output<scalar_t, acc_t, VEC>(grad_out + hq * D + c, go);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) go[i] = acc_t(0);
    }
    for (int64_t l = 0; l < L; ++l) {
      const Level lv = read_level(shapes, starts, l, S);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t lp = hq * L * P + l * P + p;
        acc_t g_attn = 0, g_x = 0, g_y = 0;
        Corners<acc_t> cn;
        const acc_t a = hq_attn[l * P + p];
        // Uniform across the segment (same head-query and point).
        if (lv.valid && locate(hq_loc[2 * (l * P + p)], hq_loc[2 * (l * P + p) + 1], lv, cn)) {
          if (active)
            backward_point<scalar_t, acc_t, VEC, kScatter>(v, gv, row_stride, cn, a, go, g_attn, g_x, g_y);
          g_attn = segment_sum(g_attn, mask, width);
          g_x = segment_sum(g_x, mask, width) * a * static_cast<acc_t>(lv.W);
          g_y = segment_sum(g_y, mask, width) * a * static_cast<acc_t>(lv.H);
        }
        if (g == 0) {
          grad_attn[lp] = g_attn;
          grad_loc[2 * lp] = g_x;
          grad_loc[2 * lp + 1] = g_y;
        }
      }
    }
  }
}

// Backward for D/VEC > 32 channel groups: one block per head-query, each
// thread looping over channel groups. Per point, warps reduce with shuffles
// into shared memory; after a barrier the block sums the warps' partials and
// writes each gradient once.
template <typename scalar_t, typename acc_t, int VEC, bool kScatter>
__global__ void ms_deform_attn_backward_block_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const acc_t* __restrict__ loc, const acc_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
    acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_loc, acc_t* __restrict__ grad_attn, int64_t HQ,
    int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  __shared__ acc_t partial[kMaxWarpsPerBlock][kPointsPerChunk][3];
  const int64_t groups = D / VEC;
  const int64_t row_stride = M * D;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int64_t LP = L * P;
  for (int64_t hq = blockIdx.x; hq < HQ; hq += gridDim.x) {
    const HeadQuery h = head_query(hq, S, M, D, Lq);
    const acc_t* hq_loc = loc + hq * LP * 2;
    const acc_t* hq_attn = attn + hq * LP;
    for (int64_t first = 0; first < LP; first += kPointsPerChunk) {
      const int64_t count = LP - first < kPointsPerChunk ? LP - first : kPointsPerChunk;
      for (int64_t j = 0; j < count; ++j) {
        const int64_t lp = first + j;
        const Level lv = read_level(shapes, starts, div_floor(lp, P), S);
        acc_t g_attn = 0, g_x = 0, g_y = 0;
        Corners<acc_t> cn;
        const acc_t a = hq_attn[lp];
        if (lv.valid && locate(hq_loc[2 * lp], hq_loc[2 * lp + 1], lv, cn)) {  // uniform in the block
          for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
            const int64_t c = g * VEC;
            acc_t go[VEC];
            load_grad_output<scalar_t, acc_t, VEC>(grad_out + hq * D + c, go);
            backward_point<scalar_t, acc_t, VEC, kScatter>(value + h.value_offset + c,
                                                           kScatter ? grad_value + h.value_offset + c : nullptr,
                                                           row_stride, cn, a, go, g_attn, g_x, g_y);
          }
          g_attn = segment_sum(g_attn, 0xffffffffu, kWarpSize);
          g_x = segment_sum(g_x, 0xffffffffu, kWarpSize) * a * static_cast<acc_t>(lv.W);
          g_y = segment_sum(g_y, 0xffffffffu, kWarpSize) * a * static_cast<acc_t>(lv.H);
        }
        if (lane == 0) {
          partial[warp][j][0] = g_attn;
          partial[warp][j][1] = g_x;
          partial[warp][j][2] = g_y;
        }
      }
      __syncthreads();
      for (int64_t i = threadIdx.x; i < count * 3; i += blockDim.x) {
        const int64_t j = i / 3, k = i % 3;
        acc_t sum = 0;
        for (int w = 0; w < warps; ++w) sum += partial[w][j][k];
        const int64_t lp = hq * LP + first + j;
        if (k == 0) {
          grad_attn[lp] = sum;
        } else {
          grad_loc[2 * lp + (k - 1)] = sum;
        }
      }
      __syncthreads();  // the next round overwrites `partial`
    }
  }
}

// ---------------------------------------------------------------------------
// Deterministic grad_value, for torch.use_deterministic_algorithms(True).
// Step 1: one thread per sampling point writes, for each of its 4 corners
// e = 4 * point + k, the row of grad_value it adds to, key[e] = (n*S + row)*M + m
// (or `none` for a corner off the map or a point not sampled), and the factor
// weight[e] = attention * bilinear weight. Step 2 (host): a stable sort of the
// keys gives, for every row, its entries in increasing e, and a binary search
// where each row's entries start. Step 3: one thread per (row, VEC channels)
// sums weight[e] * grad_out[hq(e)] over its entries in that order and writes
// the row: no atomics, one fixed order, so the same bits whatever the
// scheduling. The products are those of the atomic algorithm.
template <typename acc_t>
__global__ void ms_deform_attn_corner_kernel(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                             const acc_t* __restrict__ loc, const acc_t* __restrict__ attn,
                                             int32_t* __restrict__ key, acc_t* __restrict__ weight, int64_t HQ,
                                             int64_t S, int64_t M, int64_t Lq, int64_t L, int64_t P, int32_t none) {
  const int64_t points = HQ * L * P;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < points;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hq = div_floor(t, L * P);
    const int64_t lp = t - hq * L * P;
    const Level lv = read_level(shapes, starts, div_floor(lp, P), S);
    Corners<acc_t> cn;
    const bool sampled = lv.valid && locate(loc[2 * t], loc[2 * t + 1], lv, cn);
    const acc_t a = attn[t];
    const int64_t m = hq - div_floor(hq, M) * M;
    const int64_t n = div_floor(hq, Lq * M);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool ok = sampled && cn.ok[k];
      key[4 * t + k] = ok ? static_cast<int32_t>((n * S + cn.row[k]) * M + m) : none;
      weight[4 * t + k] = ok ? a * cn.w[k] : acc_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void ms_deform_attn_grad_value_gather_kernel(const int64_t* __restrict__ row_begin,
                                                        const int64_t* __restrict__ order,
                                                        const acc_t* __restrict__ weight,
                                                        const scalar_t* __restrict__ grad_out,
                                                        acc_t* __restrict__ grad_value, int64_t rows, int64_t D,
                                                        int64_t LP) {
  const int64_t groups = D / VEC;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < rows * groups;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = div_floor(t, groups);
    const int64_t c = (t - row * groups) * VEC;
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    for (int64_t j = row_begin[row]; j < row_begin[row + 1]; ++j) {
      const int64_t e = order[j];
      const acc_t w = weight[e];
      const int64_t hq = div_floor(e, 4 * LP);
      const Pack<scalar_t, VEC> g = load_pack<scalar_t, VEC>(grad_out + hq * D + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += w * static_cast<acc_t>(g.v[i]);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) grad_value[row * D + c + i] = acc[i];
  }
}

}  // namespace cuda_kernels
}  // namespace msda
