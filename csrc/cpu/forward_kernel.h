// CPU forward of msda::ms_deform_attn_forward.
//
// Items are (n, q, m). When value's rows are sampled many times (encoders),
// one task per head works on a dense copy of the head's rows
// (forward_per_head, see head_copies.h); otherwise items run in memory order
// on value itself (forward_items). Either way the geometry of an item's L*P
// points is computed once (vectorised over points), then each block of
// channels accumulates all points and corners in registers, and a software
// pipeline computes the geometry of the item two ahead (forward_items also
// prefetches its corner rows) before sampling the current one.
#pragma once

#include "cpu/per_capability.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/geometry.h"
#include "cpu/head_copies.h"
#include "cpu/item_inputs.h"
#include "cpu/layout.h"
#include "cpu/tasks.h"
#include "cpu/vec_ops.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {

template <typename acc_t>
using ForwardGeometry = ItemGeometry<acc_t, 1>;  // one target: value

// Ask for the first `bytes` of every corner row, so that the rows of the next
// item load while this one is being computed.
template <typename acc_t>
inline void prefetch_corners(const ForwardGeometry<acc_t>& g, int64_t bytes) {
  for (int k = 0; k < 4; ++k) {
    for (int64_t i = 0; i < g.count; ++i) prefetch_range(reinterpret_cast<const void*>(g.address[0][k][i]), bytes);
  }
}

// out[c, c + kVecs * Vec::size()) = sum over points and corners of
// scaled weight * value. Each corner has its own accumulators (kSets of them,
// corners sharing them round-robin) so that the chains of dependent
// multiply-adds stay short; they are summed at the end in a fixed order.
template <int kVecs, typename scalar_t, typename acc_t>
inline void sample_channels(const ForwardGeometry<acc_t>& g, int64_t c, acc_t* out) {
  using Load = VecLoad<scalar_t>;
  using Vec = typename Load::Vec;
  // Four accumulator sets when the registers allow it (32 vector registers
  // with AVX-512), two otherwise.
  constexpr int kSets = (kVecs <= 2 || kRegisters >= 32) ? 4 : 2;
  Vec acc[kSets][kVecs];
  for (int s = 0; s < kSets; ++s)
    for (int j = 0; j < kVecs; ++j) acc[s][j] = Vec(acc_t(0));
  for (int64_t i = 0; i < g.count; ++i) {
    for (int k = 0; k < 4; ++k) {
      const scalar_t* v = reinterpret_cast<const scalar_t*>(g.address[0][k][i]) + c;
      const Vec w(g.scaled[k][i]);
      for (int j = 0; j < kVecs; ++j) acc[k % kSets][j] = at::vec::fmadd(w, Load::load(v + j * Vec::size()), acc[k % kSets][j]);
    }
  }
  for (int j = 0; j < kVecs; ++j) {
    Vec total = acc[0][j];
    for (int s = 1; s < kSets; ++s) total = total + acc[s][j];
    total.store(out + j * Vec::size());
  }
}

template <typename scalar_t, typename acc_t>
inline void sample_tail(const ForwardGeometry<acc_t>& g, int64_t c0, int64_t c1, acc_t* out) {
  for (int64_t c = c0; c < c1; ++c) out[c - c0] = acc_t(0);
  for (int64_t i = 0; i < g.count; ++i) {
    for (int k = 0; k < 4; ++k) {
      const scalar_t* v = reinterpret_cast<const scalar_t*>(g.address[0][k][i]);
      const acc_t w = g.scaled[k][i];
      for (int64_t c = c0; c < c1; ++c) out[c - c0] += w * static_cast<acc_t>(v[c]);
    }
  }
}

// One item's output channels [0, width): blocks of 4, 2 and 1 vectors, then
// the scalar remainder.
template <typename scalar_t, typename acc_t>
inline void sample_item(const ForwardGeometry<acc_t>& g, int64_t width, scalar_t* o) {
  using Vec = typename VecLoad<scalar_t>::Vec;
  constexpr int64_t kBlock = 4 * Vec::size();  // 32 floats with AVX2, 64 with AVX-512
  alignas(64) acc_t buffer[kBlock];
  int64_t c = 0;
  for (; c + kBlock <= width; c += kBlock) {
    sample_channels<4, scalar_t>(g, c, buffer);
    narrow(buffer, kBlock, o + c);
  }
  if (c + 2 * Vec::size() <= width) {
    sample_channels<2, scalar_t>(g, c, buffer);
    narrow(buffer, 2 * Vec::size(), o + c);
    c += 2 * Vec::size();
  }
  if (c + Vec::size() <= width) {
    sample_channels<1, scalar_t>(g, c, buffer);
    narrow(buffer, Vec::size(), o + c);
    c += Vec::size();
  }
  if (c < width) {
    sample_tail<scalar_t>(g, c, width, buffer);
    narrow(buffer, width - c, o + c);
  }
}

// Items computed kAhead ahead of the one being sampled: the geometry, and the
// prefetch of its corner rows, then have time to arrive. Measured: 2 beats
// 1 and 3 on the encoder shape.
constexpr int64_t kAhead = 2;

// A ring of kAhead + 1 geometries for the software pipeline.
template <typename acc_t>
struct GeometryRing {
  std::vector<ForwardGeometry<acc_t>> slots;
  std::vector<acc_t> loc_buffer, attn_buffer;  // one item's 16-bit inputs widened (item_inputs.h)
  int64_t points;
  explicit GeometryRing(int64_t points)
      : slots(kAhead + 1, ForwardGeometry<acc_t>(points)), loc_buffer(2 * points), attn_buffer(points),
        points(points) {}
  ForwardGeometry<acc_t>& operator[](int64_t step) { return slots[step % (kAhead + 1)]; }
  // The geometry of `item` into the slot of `step`.
  void compute(int64_t step, int64_t item, const PointLevels<acc_t>& levels, const ItemInput<acc_t>& loc,
               const ItemInput<acc_t>& attn, const CornerTarget (&targets)[1]) {
    (*this)[step].compute(levels, loc.at(2 * item * points, 2 * points, loc_buffer.data()),
                          attn.at(item * points, points, attn_buffer.data()), targets);
  }
};

// Every item (n, q, m) in memory order, reading value in place: locations,
// weights and outputs stream contiguously.
template <typename scalar_t>
void forward_items(const Layout& layout, const scalar_t* value, const ItemInput<acc_type<scalar_t>>& loc,
                   const ItemInput<acc_type<scalar_t>>& attn, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const Problem& p = layout.p;
  const int64_t row_stride = p.M * p.D;
  const int64_t points = p.L * p.P;
  const PointLevels<acc_t> levels(p, layout.H, layout.W, layout.start);
  // About 8k corner-channel products per grain keeps scheduling overhead small.
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, points * 4 * p.D));
  at::parallel_for(0, p.N * p.M * p.Lq, grain, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(p.D, scalar_t(0));  // stands in for corners outside the map
    GeometryRing<acc_t> ring(points);
    const int64_t prefetch_bytes = std::min<int64_t>(p.D * sizeof(scalar_t), 128);
    auto compute = [&](int64_t item) {
      const int64_t m = item % p.M;
      const int64_t n = item / p.M / p.Lq;
      const CornerTarget targets[1] = {corner_target(value + n * p.S * row_stride + m * p.D, row_stride, zeros.data())};
      ring.compute(item - begin, item, levels, loc, attn, targets);
      prefetch_corners(ring[item - begin], prefetch_bytes);
    };
    for (int64_t item = begin; item < std::min(end, begin + kAhead); ++item) compute(item);
    for (int64_t item = begin; item < end; ++item) {
      if (item + kAhead < end) compute(item + kAhead);
      sample_item(ring[item - begin], p.D, out + item * p.D);  // output rows are in (n, q, m) order too
    }
  });
}

// One task per (n, m, channel block) and range of queries, on a dense copy of
// that slice of value (head_copies.h). The ranges exist only to give every
// thread work when N*M*blocks is below the thread count (the forward's sums
// do not depend on how the work is cut); a thread that gets several ranges
// of one head copies it once. The task's locations, weights and outputs are
// 1/M-strided, so they are prefetched a few queries ahead.
template <typename scalar_t>
void forward_per_head(const Layout& layout, const scalar_t* value, const ItemInput<acc_type<scalar_t>>& loc,
                      const ItemInput<acc_type<scalar_t>>& attn, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kQueriesAhead = 8;
  const Problem& p = layout.p;
  const int64_t row_stride = p.M * p.D;
  const int64_t points = p.L * p.P;
  const PointLevels<acc_t> levels(p, layout.H, layout.W, layout.start);
  const HeadSplit split = head_split(p);
  const int64_t heads = split.tasks(p);  // (n, m, block) slices
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t ranges = std::min(std::max<int64_t>(1, p.Lq), (threads + heads - 1) / heads);
  at::parallel_for(0, heads * ranges, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(split.block_width, scalar_t(0));
    std::vector<scalar_t> rows(p.S * split.block_width);  // the task's dense slice of value
    int64_t rows_hold = -1;                                // which slice `rows` holds
    GeometryRing<acc_t> ring(points);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t slice = task / ranges, range = task % ranges;
      const int64_t block = slice % split.block_count;
      const int64_t m = slice / split.block_count % p.M;
      const int64_t n = slice / split.block_count / p.M;
      const int64_t c0 = block * split.block_width;
      const int64_t width = std::min(split.block_width, p.D - c0);
      const int64_t q_begin = p.Lq * range / ranges, q_end = p.Lq * (range + 1) / ranges;
      if (rows_hold != slice) {
        copy_rows_in(value + n * p.S * row_stride + m * p.D + c0, p.S, row_stride, width, rows.data());
        rows_hold = slice;
      }
      const CornerTarget targets[1] = {corner_target(static_cast<const scalar_t*>(rows.data()), width, zeros.data())};
      auto compute = [&](int64_t q) {
        const int64_t item = (n * p.Lq + q) * p.M + m;
        ring.compute(q, item, levels, loc, attn, targets);
        // No prefetch of the corner rows here (forward_items has one): they are
        // in the dense copy, which stays in L2, and on the encoder shape (Intel
        // Xeon, 2 cores) the 64 prefetches per item cost more than they saved:
        // without them the float32 forward took about 30% less CPU time.
        if (q + kQueriesAhead < q_end) {
          const int64_t ahead = item + kQueriesAhead * p.M;
          prefetch_range(loc.address(2 * ahead * points), 2 * points * c10::elementSize(loc.type));
          prefetch_range(attn.address(ahead * points), points * c10::elementSize(attn.type));
        }
      };
      for (int64_t q = q_begin; q < std::min(q_end, q_begin + kAhead); ++q) compute(q);
      for (int64_t q = q_begin; q < q_end; ++q) {
        if (q + kAhead < q_end) compute(q + kAhead);
        sample_item(ring[q], width, out + ((n * p.Lq + q) * p.M + m) * p.D + c0);
      }
    }
  });
}

template <typename scalar_t>
void forward_kernel(const Layout& layout, const scalar_t* value, const ItemInput<acc_type<scalar_t>>& loc,
                    const ItemInput<acc_type<scalar_t>>& attn, scalar_t* out) {
  if (forward_uses_head_copies(layout.p)) {
    forward_per_head(layout, value, loc, attn, out);
  } else {
    forward_items(layout, value, loc, attn, out);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu
