// CPU kernels of the v2 op's discrete mode (compiled once per CPU
// capability through csrc/cpu/capability/v2_discrete_kernels.cpp): each point reads the single
// pixel of csrc/v2_discrete_index.h, weighted by its attention weight.
//
// Layout: the per-point Layout of v2_ms_deform_attn_cpu.cpp (p.L = the
// item's points, p.P = 1, H/W/start per point). Forward: items (n, q, m) in
// memory order, channels accumulated in vector registers. Backward:
// deterministic without atomics as in backward_kernel.h: a task owns
// grad_value[n, :, m, channel block] and walks its queries in order; the
// weight gradients of channel blocks are combined afterwards in block order.
// Locations get no gradient in this mode (the caller returns zeros).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/layout.h"
#include "cpu/per_capability.h"
#include "cpu/tasks.h"
#include "cpu/vec_ops.h"
#include "v2_discrete_index.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Float32 indices of a whole item at once (below); the baseline capability
// keeps the scalar path, whose volatile store is the portable way to stop a
// multiply-add contraction.
#define MSDA_DISCRETE_VECTOR_INDEX 1
using IndexVec = at::vec::Vectorized<float>;

// v, its lanes rounded to float as they are: the empty asm makes the compiler
// materialise the product, so it cannot fuse it with the following + 0.5
// into one multiply-add (which would round once, see v2_discrete_index.h).
inline IndexVec separately_rounded(IndexVec v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  __asm__("" : "+v"(r));
#else
  __m256 r = v;
  __asm__("" : "+x"(r));
#endif
  return IndexVec(r);
}
#endif

// The size and first row of each point's level, in the index type loc_t.
template <typename loc_t>
struct DiscretePoints {
  std::vector<loc_t> width_f, height_f;
  std::vector<int64_t> width, height, start;
  // For the vector path: (W_i, H_i) and (W_i - 1, H_i - 1) interleaved like
  // the locations, padded to whole vectors; used only when every side is
  // exact in float32 (<= 2**24), so that the clamp to the last pixel is exact.
  std::vector<float> size_xy, last_xy;
  bool vector_index = false;

#if defined(CPU_CAPABILITY_AVX512)
  // For item_pointers: per coordinate lane (x, y of each point, 16 points at
  // most), y's factor W (x's: 1) and the level's first row (on x's lane).
  static constexpr int64_t kItemPoints = 16;
  alignas(64) int32_t row_factor[2 * kItemPoints] = {};
  alignas(64) int32_t row_start[2 * kItemPoints] = {};
  bool item_vector = false;
#endif

  explicit DiscretePoints(const Layout& layout)
      : width(layout.W), height(layout.H), start(layout.start) {
    constexpr int64_t kExactInFloat = int64_t(1) << 24;
    vector_index = std::is_same_v<loc_t, float>;
    bool rows_in_int32 = true;
    for (int64_t i = 0; i < layout.p.L; ++i) {
      width_f.push_back(static_cast<loc_t>(width[i]));
      height_f.push_back(static_cast<loc_t>(height[i]));
      size_xy.insert(size_xy.end(), {static_cast<float>(width[i]), static_cast<float>(height[i])});
      last_xy.insert(last_xy.end(), {static_cast<float>(width[i] - 1), static_cast<float>(height[i] - 1)});
      vector_index = vector_index && width[i] <= kExactInFloat && height[i] <= kExactInFloat;
      rows_in_int32 = rows_in_int32 && start[i] + width[i] * height[i] <= INT32_MAX;
    }
    size_xy.resize(std::max<int64_t>(scratch_size(), 32), 1.f);
    last_xy.resize(std::max<int64_t>(scratch_size(), 32), 0.f);
#if defined(CPU_CAPABILITY_AVX512)
    item_vector = vector_index && rows_in_int32 && layout.p.L <= kItemPoints;
    for (int64_t i = 0; item_vector && i < layout.p.L; ++i) {
      row_factor[2 * i] = 1;
      row_factor[2 * i + 1] = static_cast<int32_t>(width[i]);
      row_start[2 * i] = static_cast<int32_t>(start[i]);
    }
#else
    (void)rows_in_int32;
#endif
  }

#if defined(CPU_CAPABILITY_AVX512)
  // One item's row pointers and weights in a few vector instructions (when
  // item_vector): the pixel as rows() finds it, row = start + y * W + x in
  // int32 lanes, address = head + row * stride_bytes; a NaN point gets `zeros`
  // and weight 0. The per-point scalar work of rows() (its int32 lanes read
  // back one by one, a 64-bit multiply-add per point) cost a quarter of the
  // forward. clamp(v) then a truncating conversion equals clamping trunc(v):
  // the bounds are whole numbers. max/min keep a NaN when it is the second
  // operand, and the conversion turns it into INT32_MIN.
  template <typename scalar_t>
  void item_pointers(const float* loc, const float* attn, const char* head, int64_t stride_bytes,
                     const scalar_t* zeros, const scalar_t** rows_out, float* weight_out) const {
    const int64_t points = static_cast<int64_t>(width.size());
    uint32_t valid_points = 0;
    for (int64_t h = 0; 16 * h < 2 * points; ++h) {
      const int64_t lanes = std::min<int64_t>(16, 2 * points - 16 * h);
      const __m512 l = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << lanes) - 1), loc + 16 * h);
      __m512 product = _mm512_mul_ps(l, _mm512_loadu_ps(&size_xy[16 * h]));
      __asm__("" : "+v"(product));  // rounded before the + 0.5 (see separately_rounded)
      const __m512 v = _mm512_add_ps(product, _mm512_set1_ps(0.5f));
      const __m512 clamped = _mm512_min_ps(_mm512_loadu_ps(&last_xy[16 * h]), _mm512_max_ps(_mm512_setzero_ps(), v));
      const __m512i xy = _mm512_cvttps_epi32(clamped);
      // Each 64-bit lane holds one point's (x, y); y * W is brought down onto x's half.
      const __m512i scaled = _mm512_mullo_epi32(xy, _mm512_load_si512(row_factor + 16 * h));
      const __m512i row = _mm512_add_epi32(_mm512_add_epi32(scaled, _mm512_srli_epi64(scaled, 32)),
                                           _mm512_load_si512(row_start + 16 * h));
      const __m512i row64 = _mm512_srli_epi64(_mm512_slli_epi64(row, 32), 32);
      const __mmask8 nan = _mm512_test_epi64_mask(_mm512_or_si512(xy, _mm512_srli_epi64(xy, 32)),
                                                  _mm512_set1_epi64(int64_t(0x80000000)));
      const __m512i address = _mm512_add_epi64(_mm512_set1_epi64(reinterpret_cast<int64_t>(head)),
                                               _mm512_mullo_epi64(row64, _mm512_set1_epi64(stride_bytes)));
      const __m512i pointers =
          _mm512_mask_blend_epi64(nan, address, _mm512_set1_epi64(reinterpret_cast<int64_t>(zeros)));
      const __mmask8 in_item = static_cast<__mmask8>((1u << (lanes / 2)) - 1);
      _mm512_mask_storeu_epi64(rows_out + 8 * h, in_item, pointers);
      valid_points |= static_cast<uint32_t>(static_cast<uint8_t>(~nan) & in_item) << (8 * h);
    }
    const __mmask16 in_item = static_cast<__mmask16>((1u << points) - 1);
    _mm512_mask_storeu_ps(weight_out, in_item,
                          _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid_points) & in_item, attn));
  }
#endif

  // Entries of scratch that rows() needs: the item's coordinates, rounded up to whole vectors.
  int64_t scratch_size() const {
#ifdef MSDA_DISCRETE_VECTOR_INDEX
    return (2 * static_cast<int64_t>(width.size()) + IndexVec::size() - 1) / IndexVec::size() * IndexVec::size();
#else
    return 0;
#endif
  }

  // Row (level start + y * W + x) that point i of an item reads, or -1 when
  // its location is NaN. loc: the item's (x, y) pairs.
  int64_t row(int64_t i, const loc_t* loc) const {
    const int64_t x = discrete_index(loc[2 * i], width_f[i], width[i]);
    const int64_t y = discrete_index(loc[2 * i + 1], height_f[i], height[i]);
    return (x < 0 || y < 0) ? -1 : start[i] + y * width[i] + x;
  }

  // row(i, loc) for every point of an item. The vector path computes the same
  // pixel: trunc(loc * size + 0.5) with the product rounded first, clamped to
  // [0, size - 1] (trunc is <= 0 below 1; >= size - 1 + 1 at or past size),
  // NaN kept by maximum/minimum and turned into -1.
  void rows(const loc_t* loc, int64_t* out, int32_t* scratch) const {
    const int64_t points = static_cast<int64_t>(width.size());
#ifdef MSDA_DISCRETE_VECTOR_INDEX
    if constexpr (std::is_same_v<loc_t, float>) {
      if (vector_index) {
        const int64_t coords = 2 * points;
        for (int64_t j = 0; j < coords; j += IndexVec::size()) {
          const int64_t count = std::min<int64_t>(IndexVec::size(), coords - j);
          const IndexVec product = separately_rounded(IndexVec::loadu(loc + j, count) * IndexVec::loadu(&size_xy[j]));
          const IndexVec pixel = (product + IndexVec(0.5f)).trunc();
          const IndexVec clamped = at::vec::minimum(at::vec::maximum(pixel, IndexVec(0.f)), IndexVec::loadu(&last_xy[j]));
          // x86's truncating conversion turns NaN into INT32_MIN, the only negative result.
          at::vec::convert_to_int_of_same_size(clamped).store(scratch + j);
        }
        for (int64_t i = 0; i < points; ++i) {
          const int32_t x = scratch[2 * i], y = scratch[2 * i + 1];
          out[i] = (x | y) < 0 ? -1 : start[i] + static_cast<int64_t>(y) * width[i] + x;
        }
        return;
      }
    }
#endif
    (void)scratch;
    for (int64_t i = 0; i < points; ++i) out[i] = row(i, loc);
  }
};

// out[c, c + kVecs * Vec::size()) = sum_i weight[i] * rows[i][c...], in two
// accumulator sets (even and odd points) to keep dependency chains short,
// summed in a fixed order.
template <int kVecs, typename scalar_t, typename acc_t>
inline void gather_channels(const acc_t* weight, const scalar_t* const* rows, int64_t count, int64_t c,
                            scalar_t* out) {
  using Load = VecLoad<scalar_t>;
  using Vec = typename Load::Vec;
  Vec acc[2][kVecs];
  for (int s = 0; s < 2; ++s)
    for (int j = 0; j < kVecs; ++j) acc[s][j] = Vec(acc_t(0));
  // Points two at a time (a runtime index into acc would keep it in memory).
  int64_t i = 0;
  for (; i + 1 < count; i += 2) {
    const Vec w0(weight[i]), w1(weight[i + 1]);
    const scalar_t* v0 = rows[i] + c;
    const scalar_t* v1 = rows[i + 1] + c;
    for (int j = 0; j < kVecs; ++j) {
      acc[0][j] = at::vec::fmadd(w0, Load::load(v0 + j * Vec::size()), acc[0][j]);
      acc[1][j] = at::vec::fmadd(w1, Load::load(v1 + j * Vec::size()), acc[1][j]);
    }
  }
  if (i < count) {
    const Vec w(weight[i]);
    const scalar_t* v = rows[i] + c;
    for (int j = 0; j < kVecs; ++j) acc[0][j] = at::vec::fmadd(w, Load::load(v + j * Vec::size()), acc[0][j]);
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // Straight into the output: a detour through a buffer and a scalar copy
    // costs as much as a few points' loads.
    for (int j = 0; j < kVecs; ++j) (acc[0][j] + acc[1][j]).store(out + c + j * Vec::size());
  } else {
    alignas(64) acc_t buffer[kVecs * Vec::size()];
    for (int j = 0; j < kVecs; ++j) (acc[0][j] + acc[1][j]).store(buffer + j * Vec::size());
    for (int64_t j = 0; j < kVecs * Vec::size(); ++j) out[c + j] = static_cast<scalar_t>(buffer[j]);
  }
}

// One item's D output channels: blocks of 4, 2 and 1 vectors, then scalars.
template <typename scalar_t, typename acc_t>
inline void gather_item(const acc_t* weight, const scalar_t* const* rows, int64_t count, int64_t D, scalar_t* out) {
  using Vec = typename VecLoad<scalar_t>::Vec;
  int64_t c = 0;
  for (; c + 4 * Vec::size() <= D; c += 4 * Vec::size()) gather_channels<4>(weight, rows, count, c, out);
  for (; c + 2 * Vec::size() <= D; c += 2 * Vec::size()) gather_channels<2>(weight, rows, count, c, out);
  for (; c + Vec::size() <= D; c += Vec::size()) gather_channels<1>(weight, rows, count, c, out);
  for (; c < D; ++c) {
    acc_t total = 0;
    for (int64_t i = 0; i < count; ++i) total += weight[i] * static_cast<acc_t>(rows[i][c]);
    out[c] = static_cast<scalar_t>(total);
  }
}

// Items computed this many ahead of the one being summed, their rows
// prefetched meanwhile (the forward waits on scattered rows of value; as in
// forward_kernel.h's pipeline). On the RT-DETR decoder shape (12 points of
// D 32 per item) 3 ahead was about 10% faster than 2 and a little faster
// than 4; prefetching into L2 further ahead (8 items, then into L1 2 ahead)
// was slower than 2 into L1: those prefetches hold the core's L1 miss
// buffers too, which are what the forward waits on.
constexpr int64_t kDiscreteAhead = 3;

template <typename scalar_t, typename loc_t>
void discrete_forward(const Layout& layout, const scalar_t* value, const loc_t* loc, const acc_type<scalar_t>* attn,
                      scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const Problem& p = layout.p;
  const int64_t points = p.L, row_stride = p.M * p.D;
  const DiscretePoints<loc_t> table(layout);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, points * p.D));
  const int64_t prefetch_bytes = std::min<int64_t>(p.D * sizeof(scalar_t), 128);
  at::parallel_for(0, p.N * p.Lq * p.M, grain, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(p.D, scalar_t(0));  // stands in for NaN points
    // A ring of kDiscreteAhead + 1 items' rows and weights.
    std::vector<const scalar_t*> rows((kDiscreteAhead + 1) * points);
    std::vector<acc_t> weight((kDiscreteAhead + 1) * points);
    std::vector<int64_t> item_rows(points);
    std::vector<int32_t> scratch(table.scratch_size());
    // The next item to compute, its head m and batch n, and its ring slot,
    // advanced by counting: 64-bit divisions per item cost as much as its gather.
    int64_t next = begin, next_m = begin % p.M, next_q = begin / p.M % p.Lq, next_n = begin / p.M / p.Lq;
    int64_t next_slot = 0;
    auto advance = [&]() {
      ++next;
      next_slot = next_slot == kDiscreteAhead ? 0 : next_slot + 1;
      if (++next_m == p.M) {
        next_m = 0;
        if (++next_q == p.Lq) {
          next_q = 0;
          ++next_n;
        }
      }
    };
    auto compute_next = [&]() {
      const int64_t slot = next_slot * points;
      const scalar_t* head = value + next_n * p.S * row_stride + next_m * p.D;
      const acc_t* item_attn = attn + next * points;
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<loc_t, float> && std::is_same_v<acc_t, float>) {
        if (table.item_vector) {
          table.item_pointers(loc + 2 * next * points, item_attn, reinterpret_cast<const char*>(head),
                              row_stride * static_cast<int64_t>(sizeof(scalar_t)), zeros.data(), rows.data() + slot,
                              weight.data() + slot);
          for (int64_t i = 0; i < points; ++i) prefetch_range(rows[slot + i], prefetch_bytes);
          advance();
          return;
        }
      }
#endif
      table.rows(loc + 2 * next * points, item_rows.data(), scratch.data());
      for (int64_t i = 0; i < points; ++i) {
        const int64_t r = item_rows[i];
        // A NaN point gets weight 0 and the zero row, so even a NaN or inf
        // attention weight contributes exactly zero.
        rows[slot + i] = r < 0 ? zeros.data() : head + r * row_stride;
        weight[slot + i] = r < 0 ? acc_t(0) : item_attn[i];
        prefetch_range(rows[slot + i], prefetch_bytes);
      }
      advance();
    };
    while (next < std::min(end, begin + kDiscreteAhead)) compute_next();
    int64_t slot = 0;
    for (int64_t item = begin; item < end; ++item) {
      if (next < end) compute_next();
      gather_item(weight.data() + slot * points, rows.data() + slot * points, points, p.D, out + item * p.D);
      slot = slot == kDiscreteAhead ? 0 : slot + 1;
    }
  });
}

// grad[c] += a * go[c] over `width` channels; returns sum_c go[c] * v[c].
template <typename scalar_t, typename acc_t>
inline acc_t scatter_and_dot_row(const scalar_t* v, acc_t* grad, const acc_t* go, acc_t a, int64_t width) {
  using Load = VecLoad<scalar_t>;
  using Vec = typename Load::Vec;
  const Vec av(a);
  Vec d(acc_t(0));
  int64_t c = 0;
  for (; c + Vec::size() <= width; c += Vec::size()) {
    const Vec gov = Vec::loadu(go + c);
    d = at::vec::fmadd(gov, Load::load(v + c), d);
    at::vec::fmadd(av, gov, Vec::loadu(grad + c)).store(grad + c);
  }
  acc_t dot = lane_sum<Vec, acc_t>(d);
  for (; c < width; ++c) {
    dot += go[c] * static_cast<acc_t>(v[c]);
    grad[c] += a * go[c];
  }
  return dot;
}

// grad_attn[idx] = the sum over channel blocks of their partial sums, in block order.
template <typename acc_t>
__attribute__((noinline)) void sum_block_partials(int64_t begin, int64_t end, const acc_t* partial, int64_t count,
                                                  int64_t all_points, acc_t* grad_attn) {
  for (int64_t idx = begin; idx < end; ++idx) {
    acc_t total = 0;
    for (int64_t b = 0; b < count; ++b) total += partial[b * all_points + idx];
    grad_attn[idx] = total;
  }
}

// Tasks [begin, end) of discrete_backward. A named function called from the
// parallel region, not inlined into it: the OpenMP outlined function then
// holds no vector code of this capability (tests/test_cpu_dispatch.py checks
// that AVX-512 code is reachable only from the AVX-512 path).
template <typename scalar_t, typename loc_t>
__attribute__((noinline)) void discrete_backward_tasks(
    int64_t begin, int64_t end, const Layout& layout, const DiscretePoints<loc_t>& table, const ChannelBlocks& blocks,
    const scalar_t* value, const loc_t* loc, const acc_type<scalar_t>* attn, const acc_type<scalar_t>* grad_out,
    acc_type<scalar_t>* grad_value, acc_type<scalar_t>* grad_attn, acc_type<scalar_t>* partial) {
  using acc_t = acc_type<scalar_t>;
  const Problem& p = layout.p;
  const int64_t points = p.L, row_stride = p.M * p.D;
  const int64_t all_points = p.N * p.Lq * p.M * points;
  std::vector<int64_t> item_rows(points);
  std::vector<int32_t> scratch(table.scratch_size());
  for (int64_t task = begin; task < end; ++task) {
    const int64_t block = task % blocks.count;
    const int64_t m = task / blocks.count % p.M, n = task / blocks.count / p.M;
    const int64_t c0 = block * blocks.width, width = std::min(blocks.width, p.D - c0);
    const int64_t head = n * p.S * row_stride + m * p.D + c0;
    acc_t* g_attn = blocks.count > 1 ? partial + block * all_points : grad_attn;
    for (int64_t q = 0; q < p.Lq; ++q) {
      const int64_t item = (n * p.Lq + q) * p.M + m;
      const acc_t* go = grad_out + item * p.D + c0;
      table.rows(loc + 2 * item * points, item_rows.data(), scratch.data());
      for (int64_t i = 0; i < points; ++i) {
        const int64_t idx = item * points + i;
        const int64_t r = item_rows[i];
        g_attn[idx] = r < 0 ? acc_t(0)
                            : scatter_and_dot_row(value + head + r * row_stride, grad_value + head + r * row_stride,
                                                  go, attn[idx], width);
      }
    }
  }
}

// grad_value must be zeroed by the caller; grad_attn is written whole.
template <typename scalar_t, typename loc_t>
void discrete_backward(const Layout& layout, const scalar_t* value, const loc_t* loc, const acc_type<scalar_t>* attn,
                       const acc_type<scalar_t>* grad_out, acc_type<scalar_t>* grad_value,
                       acc_type<scalar_t>* grad_attn) {
  using acc_t = acc_type<scalar_t>;
  const Problem& p = layout.p;
  const int64_t points = p.L;
  const int64_t all_points = p.N * p.Lq * p.M * points;
  const DiscretePoints<loc_t> table(layout);
  const ChannelBlocks blocks = channel_blocks(p.D, p.N * p.M);
  // With several channel blocks each writes its partial weight gradients.
  std::vector<acc_t> partial(blocks.count > 1 ? blocks.count * all_points : 0);
  at::parallel_for(0, p.N * p.M * blocks.count, 1, [&](int64_t begin, int64_t end) {
    discrete_backward_tasks<scalar_t, loc_t>(begin, end, layout, table, blocks, value, loc, attn, grad_out, grad_value,
                                             grad_attn, partial.data());
  });
  if (blocks.count > 1) {
    at::parallel_for(0, all_points, 4096, [&](int64_t begin, int64_t end) {
      sum_block_partials(begin, end, partial.data(), blocks.count, all_points, grad_attn);
    });
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu
