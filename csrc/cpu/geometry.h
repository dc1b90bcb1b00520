// Where the L*P sampling points of one (n, q, m) item fall and with which
// weights: the grid_sample(bilinear, zeros, align_corners=False) geometry of
// spec §1, shared by the CPU forward and backward kernels.
//
// Each loop runs over the item's points with no branches and no calls, so the
// compiler turns it into vector code: computing the geometry one point at a
// time, with its branches, used to cost more instructions than the sampling.
// Results are kept as a structure of arrays (one array per quantity).
#pragma once

#include "cpu/per_capability.h"

#include <cstdint>
#include <vector>

#include "checks.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {

// Per point of an item (point lp lies on level lp / P): its level's size and
// first row. The same for every item, so built once per call. With heads > 1
// the points are those of a whole query, head after head (the forward's
// unit of work), and each also records its head.
template <typename acc_t>
struct PointLevels {
  std::vector<acc_t> width, height;     // W and H as acc_t
  std::vector<int32_t> width_i, height_i;
  std::vector<int64_t> start;           // level_start_index
  std::vector<int64_t> head;            // the point's head, 0..heads-1
  int64_t count = 0;                    // heads * L * P

  PointLevels(const Problem& p, const std::vector<int64_t>& H, const std::vector<int64_t>& W,
              const std::vector<int64_t>& level_start, int64_t heads = 1)
      : count(heads * p.L * p.P) {
    for (int64_t m = 0; m < heads; ++m) {
      for (int64_t l = 0; l < p.L; ++l) {
        for (int64_t pt = 0; pt < p.P; ++pt) {
          width.push_back(static_cast<acc_t>(W[l]));
          height.push_back(static_cast<acc_t>(H[l]));
          width_i.push_back(static_cast<int32_t>(W[l]));
          height_i.push_back(static_cast<int32_t>(H[l]));
          start.push_back(level_start[l]);
          head.push_back(m);
        }
      }
    }
  }
};

// Where the corner rows live: the address of row 0 (of this item's (n, m)
// slice of value or grad_value, or of a dense per-head copy), the bytes from
// one row to the next, and the address that corners outside the map get
// instead (a zero row to read, a scratch row to write). With one target (the
// forward), head_bytes apart for each head of PointLevels::head.
struct CornerTarget {
  uintptr_t base, row_bytes, outside, head_bytes;
};

template <typename T>
inline CornerTarget corner_target(const T* base, int64_t row_stride, const T* outside, int64_t head_stride = 0) {
  return {reinterpret_cast<uintptr_t>(base), static_cast<uintptr_t>(row_stride) * sizeof(T),
          reinterpret_cast<uintptr_t>(outside), static_cast<uintptr_t>(head_stride) * sizeof(T)};
}

// The geometry of one item's points, for kTargets tensors (value, and in the
// backward grad_value). Corner k of point i is (y0, x0), (y0, x1), (y1, x0),
// (y1, x1) for k = 0..3. Addresses are integers rather than pointers, so that
// the selects vectorise and no out-of-range pointer is ever formed.
template <typename acc_t, int kTargets>
struct ItemGeometry {
  int64_t count;
  std::vector<uintptr_t> address[kTargets][4];  // corner row addresses in each target
  std::vector<acc_t> weight[4];    // bilinear weight of each corner (kTargets 2 only: the backward's)
  std::vector<acc_t> scaled[4];    // weight times the attention weight
  std::vector<acc_t> fx, fy;       // fractional position inside the cell (kTargets 2 only)
  std::vector<acc_t> attn;         // attention weight; 0 where the point takes no sample
  std::vector<int32_t> sampled;    // 1 where the point takes a sample

  explicit ItemGeometry(int64_t points) : count(points), fx(points), fy(points), attn(points), sampled(points) {
    for (int k = 0; k < 4; ++k) {
      for (int t = 0; t < kTargets; ++t) address[t][k].resize(points);
      weight[k].resize(points);
      scaled[k].resize(points);
    }
  }

  // loc: the item's 2 * count (x, y) locations; attention: its count weights.
  // A point takes a sample only when -1 < x < W and -1 < y < H (false for
  // NaN); one that does not gets attention 0 and all four corners outside,
  // which makes every contribution and every gradient of it exactly zero.
  void compute(const PointLevels<acc_t>& levels, const acc_t* __restrict loc, const acc_t* __restrict attention,
               const CornerTarget (&targets)[kTargets]) {
    const acc_t* __restrict W = levels.width.data();
    const acc_t* __restrict H = levels.height.data();
    const int32_t* __restrict Wi = levels.width_i.data();
    const int32_t* __restrict Hi = levels.height_i.data();
    const int64_t* __restrict start = levels.start.data();
    const int64_t* __restrict head = levels.head.data();
    acc_t* __restrict w0 = weight[0].data();
    acc_t* __restrict w1 = weight[1].data();
    acc_t* __restrict w2 = weight[2].data();
    acc_t* __restrict w3 = weight[3].data();
    acc_t* __restrict s0 = scaled[0].data();
    acc_t* __restrict s1 = scaled[1].data();
    acc_t* __restrict s2 = scaled[2].data();
    acc_t* __restrict s3 = scaled[3].data();
    acc_t* __restrict fxs = fx.data();
    acc_t* __restrict fys = fy.data();
    acc_t* __restrict as = attn.data();
    int32_t* __restrict taken = sampled.data();
    uintptr_t* out[kTargets][4];
    uintptr_t base[kTargets], row_bytes[kTargets], outside[kTargets];
    const uintptr_t head_bytes = targets[0].head_bytes;
    for (int t = 0; t < kTargets; ++t) {
      for (int k = 0; k < 4; ++k) out[t][k] = address[t][k].data();
      base[t] = targets[t].base;
      row_bytes[t] = targets[t].row_bytes;
      outside[t] = targets[t].outside;
    }
    const int64_t n = count;  // a local, so the stores below cannot change the trip count
    // Two loops, each of which GCC vectorises; as one loop it does not (a
    // select feeding a float-to-int conversion defeats its if-conversion).
    // ivdep: the arrays never overlap (GCC ignores __restrict on locals).
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      const acc_t x = loc[2 * i] * W[i] - acc_t(0.5);
      const acc_t y = loc[2 * i + 1] * H[i] - acc_t(0.5);
      // Bitwise & (not &&), so that there are no branches.
      const bool inside = (x > acc_t(-1)) & (y > acc_t(-1)) & (x < W[i]) & (y < H[i]);
      // Points that take no sample get position (0, 0), so that the integer
      // conversions below are always defined. fx and fy hold the positions
      // until the second loop replaces them with the fractions.
      fxs[i] = inside ? x : acc_t(0);
      fys[i] = inside ? y : acc_t(0);
      taken[i] = inside;
      const acc_t attention_i = attention[i];  // loaded unconditionally, or the loop does not vectorise
      as[i] = inside ? attention_i : acc_t(0);
    }
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      const acc_t x = fxs[i], y = fys[i];
      // floor() by truncation and a correction for -1 < x < 0 (std::floor
      // does not vectorise without -fno-trapping-math).
      int32_t x0 = static_cast<int32_t>(x), y0 = static_cast<int32_t>(y);
      x0 -= x < static_cast<acc_t>(x0);
      y0 -= y < static_cast<acc_t>(y0);
      const acc_t fxi = x - static_cast<acc_t>(x0), fyi = y - static_cast<acc_t>(y0);
      const acc_t gx = acc_t(1) - fxi, gy = acc_t(1) - fyi;
      const acc_t a = as[i];
      if constexpr (kTargets == 2) {  // the backward's; the forward reads only scaled and address
        fxs[i] = fxi;
        fys[i] = fyi;
        w0[i] = gy * gx;
        w1[i] = gy * fxi;
        w2[i] = fyi * gx;
        w3[i] = fyi * fxi;
      }
      s0[i] = a * (gy * gx);
      s1[i] = a * (gy * fxi);
      s2[i] = a * (fyi * gx);
      s3[i] = a * (fyi * fxi);
      const bool x0_in = x0 >= 0, x1_in = x0 + 1 < Wi[i];
      const bool y0_in = (taken[i] != 0) & (y0 >= 0), y1_in = (taken[i] != 0) & (y0 + 1 < Hi[i]);
      const int64_t r = start[i] + static_cast<int64_t>(y0) * Wi[i] + x0;
      const bool in[4] = {y0_in && x0_in, y0_in && x1_in, y1_in && x0_in, y1_in && x1_in};
      const uintptr_t rows[4] = {static_cast<uintptr_t>(r), static_cast<uintptr_t>(r + 1),
                                 static_cast<uintptr_t>(r + Wi[i]), static_cast<uintptr_t>(r + Wi[i] + 1)};
      // Per head only in the forward (one target); the backward's targets
      // are one head's slices.
      const uintptr_t head_base = kTargets == 1 ? base[0] + static_cast<uintptr_t>(head[i]) * head_bytes : 0;
      for (int t = 0; t < kTargets; ++t) {
        const uintptr_t b = kTargets == 1 ? head_base : base[t];
        for (int k = 0; k < 4; ++k) out[t][k][i] = in[k] ? b + rows[k] * row_bytes[t] : outside[t];
      }
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu
