// CPU forward of msda::ms_deform_attn_forward.
//
// The unit of work is a query (n, q) with all its heads, reading value in
// place: a pixel's heads are adjacent in value, so the rows a query's heads
// read share pages and cache sets. The geometry of the query's M*L*P points
// is computed in one pass (vectorised over points), then per head each block
// of channels accumulates all points and corners in registers; a software
// pipeline computes the geometry of the query two ahead before sampling the
// current one. When value's rows are sampled many times (encoders), the
// queries run in vertical strips (query_order.h), otherwise in memory order.
//
// (An earlier design worked per head on dense copies of its rows, as the
// backward still does, head_copies.h: on the encoder shape this one is about
// 1.6x faster, Intel Xeon, 2 threads, float32.)
#pragma once

#include "cpu/per_capability.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/geometry.h"
#include "cpu/head_copies.h"
#include "cpu/item_inputs.h"
#include "cpu/layout.h"
#include "cpu/query_order.h"
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
inline void sample_channels(const ForwardGeometry<acc_t>& g, int64_t first, int64_t last, int64_t c, acc_t* out) {
  using Load = VecLoad<scalar_t>;
  using Vec = typename Load::Vec;
  // Four accumulator sets when the registers allow it (32 vector registers
  // with AVX-512), two otherwise.
  constexpr int kSets = (kVecs <= 2 || kRegisters >= 32) ? 4 : 2;
  Vec acc[kSets][kVecs];
  for (int s = 0; s < kSets; ++s)
    for (int j = 0; j < kVecs; ++j) acc[s][j] = Vec(acc_t(0));
  // With PairLoad, acc[s][2h] and acc[s][2h + 1] hold the even and the odd
  // channels of channels [2h, 2h + 2) * Vec::size().
  constexpr bool kPairs = PairLoad<scalar_t>::kEnabled && kVecs % 2 == 0;
  for (int64_t i = first; i < last; ++i) {
    for (int k = 0; k < 4; ++k) {
      const scalar_t* v = reinterpret_cast<const scalar_t*>(g.address[0][k][i]) + c;
      const Vec w(g.scaled[k][i]);
      for (int j = 0; j < kVecs; ++j) {
        Vec x;
        if constexpr (kPairs) {
          if (j % 2 == 1) continue;
          Vec odd;
          PairLoad<scalar_t>::load(v + j * Vec::size(), x, odd);
          acc[k % kSets][j + 1] = at::vec::fmadd(w, odd, acc[k % kSets][j + 1]);
        } else {
          x = Load::load(v + j * Vec::size());
        }
        acc[k % kSets][j] = at::vec::fmadd(w, x, acc[k % kSets][j]);
      }
    }
  }
  Vec total[kVecs];
  for (int j = 0; j < kVecs; ++j) {
    total[j] = acc[0][j];
    for (int s = 1; s < kSets; ++s) total[j] = total[j] + acc[s][j];
  }
  for (int j = 0; j < kVecs; ++j) {
    if constexpr (kPairs) {
      if (j % 2 == 0) PairLoad<scalar_t>::interleave(total[j], total[j + 1], out + j * Vec::size());
    } else {
      total[j].store(out + j * Vec::size());
    }
  }
}

template <typename scalar_t, typename acc_t>
inline void sample_tail(const ForwardGeometry<acc_t>& g, int64_t first, int64_t last, int64_t c0, int64_t c1,
                        acc_t* out) {
  for (int64_t c = c0; c < c1; ++c) out[c - c0] = acc_t(0);
  for (int64_t i = first; i < last; ++i) {
    for (int k = 0; k < 4; ++k) {
      const scalar_t* v = reinterpret_cast<const scalar_t*>(g.address[0][k][i]);
      const acc_t w = g.scaled[k][i];
      for (int64_t c = c0; c < c1; ++c) out[c - c0] += w * static_cast<acc_t>(v[c]);
    }
  }
}

// One item's output channels [0, width) from points [first, last) of the
// geometry: blocks of 4, 2 and 1 vectors, then the scalar remainder.
template <typename scalar_t, typename acc_t>
inline void sample_item(const ForwardGeometry<acc_t>& g, int64_t first, int64_t last, int64_t width, scalar_t* o) {
  using Vec = typename VecLoad<scalar_t>::Vec;
  constexpr int64_t kBlock = 4 * Vec::size();  // 32 floats with AVX2, 64 with AVX-512
  alignas(64) acc_t buffer[kBlock];
  int64_t c = 0;
  for (; c + kBlock <= width; c += kBlock) {
    sample_channels<4, scalar_t>(g, first, last, c, buffer);
    narrow(buffer, kBlock, o + c);
  }
  if (c + 2 * Vec::size() <= width) {
    sample_channels<2, scalar_t>(g, first, last, c, buffer);
    narrow(buffer, 2 * Vec::size(), o + c);
    c += 2 * Vec::size();
  }
  if (c + Vec::size() <= width) {
    sample_channels<1, scalar_t>(g, first, last, c, buffer);
    narrow(buffer, Vec::size(), o + c);
    c += Vec::size();
  }
  if (c < width) {
    sample_tail<scalar_t>(g, first, last, c, width, buffer);
    narrow(buffer, width - c, o + c);
  }
}

// Queries computed kAhead ahead of the one being sampled: the geometry, and
// the prefetch of its corner rows, then have time to arrive.
constexpr int64_t kAhead = 2;

// A ring of kAhead + 1 geometries (of a query's M * L * P points each) for
// the software pipeline.
template <typename acc_t>
struct GeometryRing {
  std::vector<ForwardGeometry<acc_t>> slots;
  std::vector<acc_t> loc_buffer, attn_buffer;  // one query's 16-bit inputs widened (item_inputs.h)
  int64_t points;
  explicit GeometryRing(int64_t points)
      : slots(kAhead + 1, ForwardGeometry<acc_t>(points)), loc_buffer(2 * points), attn_buffer(points),
        points(points) {}
  ForwardGeometry<acc_t>& operator[](int64_t step) { return slots[step % (kAhead + 1)]; }
  // The geometry of query n * Lq + q (all heads) into the slot of `step`.
  void compute(int64_t step, int64_t query, const PointLevels<acc_t>& levels, const ItemInput<acc_t>& loc,
               const ItemInput<acc_t>& attn, const CornerTarget (&targets)[1]) {
    (*this)[step].compute(levels, loc.at(2 * query * points, 2 * points, loc_buffer.data()),
                          attn.at(query * points, points, attn_buffer.data()), targets);
  }
};

// When the queries run out of memory order (strips), the forward prefetches
// the locations and attention weights of the query kInputsAhead after the one
// whose geometry it computes: in strip order each query's inputs (1.5 KB in
// float32 at M 8, L 4, P 4) come from a new place, which the hardware
// prefetchers do not foresee, and the geometry then waits for them. Measured
// on the encoder shape (AMD EPYC, Zen 4, one process alternating calls, 1
// and 2 threads): forward 1.05-1.08x faster in bfloat16 and 1.03-1.08x in
// float16 with AVX-512, 1.04-1.07x with AVX2; AVX-512 float32 and the
// baseline kernel unchanged. Decoders (memory order) take no prefetch.
constexpr int64_t kInputsAhead = 4;

// Whether the forward prefetches the corner rows of the query kAhead ahead.
// With AVX-512 and float32 value it does not: on the encoder and decoder
// shapes (Intel Xeon, 2 threads) the prefetches cost more than they saved
// (encoder forward about 1.1x faster without; on an AMD EPYC, Zen 4, they
// neither cost nor saved). With 16-bit value they pay: a row is half the
// bytes (one prefetch per corner at D 32) and the loop that samples it is
// shorter, so less of the rows' latency hides behind other work (AMD EPYC,
// Zen 4, 2 threads, one process alternating calls: encoder forward 1.13x
// faster in bfloat16, 1.07x in float16; decoders within noise or faster).
// The AVX2 and baseline kernels spend more instructions per sample, and
// there the prefetches pay in every dtype.
template <typename scalar_t>
constexpr bool prefetches_corners() {
#if defined(CPU_CAPABILITY_AVX512)
  return !std::is_same_v<scalar_t, float>;
#else
  return true;
#endif
}

// Samples per row of value (per head, on average) from which the queries are
// visited in strips (query_order.h): the encoders (16 on the benchmark
// shape), not the decoders (0.2-0.7), whose few rows per query gain nothing.
constexpr double kStripsFrom = 8.0;

// Every query (n, q), reading value in place, in memory order or in the given
// order (n * Lq + q per entry). A query's M heads are one unit: their
// geometry is computed in one pass over M * L * P points (vectorised), and
// the rows they read lie side by side in value (a pixel's heads are adjacent).
template <typename scalar_t>
void forward_queries(const Layout& layout, const scalar_t* value, const ItemInput<acc_type<scalar_t>>& loc,
                     const ItemInput<acc_type<scalar_t>>& attn, const std::vector<int64_t>& query_order,
                     scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const Problem& p = layout.p;
  const int64_t row_stride = p.M * p.D;
  const int64_t points = p.L * p.P;  // per head
  const PointLevels<acc_t> levels(p, layout.H, layout.W, layout.start, p.M);
  const bool ordered = !query_order.empty();
  const auto query_at = [&](int64_t i) { return ordered ? query_order[i] : i; };
  const int64_t query_points = p.M * points;  // all heads' points of one query
  // About 8k corner-channel products per grain keeps scheduling overhead small.
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, query_points * 4 * p.D));
  at::parallel_for(0, p.N * p.Lq, grain, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(p.D, scalar_t(0));  // stands in for corners outside the map
    GeometryRing<acc_t> ring(query_points);
    const int64_t prefetch_bytes = std::min<int64_t>(p.D * sizeof(scalar_t), 128);
    auto compute = [&](int64_t i) {
      if (ordered && i + kInputsAhead < end) {
        const int64_t later = query_order[i + kInputsAhead];
        prefetch_range(loc.address(2 * later * query_points), 2 * query_points * c10::elementSize(loc.type));
        prefetch_range(attn.address(later * query_points), query_points * c10::elementSize(attn.type));
      }
      const int64_t query = query_at(i);
      const int64_t n = query / p.Lq;
      const CornerTarget targets[1] = {
          corner_target(value + n * p.S * row_stride, row_stride, zeros.data(), p.D)};
      ring.compute(i - begin, query, levels, loc, attn, targets);
      if constexpr (prefetches_corners<scalar_t>()) prefetch_corners(ring[i - begin], prefetch_bytes);
    };
    for (int64_t i = begin; i < std::min(end, begin + kAhead); ++i) compute(i);
    for (int64_t i = begin; i < end; ++i) {
      if (i + kAhead < end) compute(i + kAhead);
      scalar_t* o = out + query_at(i) * row_stride;  // output rows are (n, q) with M * D channels
      for (int64_t m = 0; m < p.M; ++m) sample_item(ring[i - begin], m * points, (m + 1) * points, p.D, o + m * p.D);
    }
  });
}

template <typename scalar_t>
void forward_kernel(const Layout& layout, const scalar_t* value, const ItemInput<acc_type<scalar_t>>& loc,
                    const ItemInput<acc_type<scalar_t>>& attn, scalar_t* out) {
  const bool strips = samples_per_row(layout.p) >= kStripsFrom;
  forward_queries(layout, value, loc, attn, strips ? queries_in_strips(layout, loc) : std::vector<int64_t>(), out);
}

}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu
