// The order in which the forward visits the queries when value's rows are
// sampled many times (encoders, where the queries are the pixels).
//
// Why: visiting queries in memory order sweeps whole rows of the widest map,
// so the rows the samples need (a band around the current row, on every
// level, all heads: 1 KB per pixel at M 8, D 32 in float32) outgrow the L2
// cache. Visiting them in vertical strips (by the x of their first sampling
// point) keeps the band a strip wide. Measured on the encoder shape (Intel
// Xeon, 2 threads, float32): forward about 1.25x faster with 4-16 strips.
// Each query's output depends on that query alone, so the order changes no
// result; it is a function of the inputs only, never of the thread count.
#pragma once

#include "cpu/per_capability.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/item_inputs.h"
#include "cpu/layout.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {

// Strips about kStripPixels wide on the widest level.
constexpr int64_t kStripPixels = 32;
constexpr int64_t kMaxStrips = 64;

inline int64_t strip_count(const Layout& layout) {
  int64_t widest = 1;
  for (const int64_t w : layout.W) widest = std::max(widest, w);
  return std::clamp<int64_t>(widest / kStripPixels, 1, kMaxStrips);
}

// The (n, q) pairs as n * Lq + q: by n, then by the strip of the x of the
// query's first point (head 0, level 0, point 0; outside [0, 1) or NaN: the
// nearest edge strip), then by q. A counting sort per n: O(Lq + strips).
template <typename acc_t>
std::vector<int64_t> queries_in_strips(const Layout& layout, const ItemInput<acc_t>& loc) {
  const Problem& p = layout.p;
  const int64_t strips = strip_count(layout);
  const int64_t query_values = 2 * p.M * p.L * p.P;  // locations per query
  std::vector<int64_t> order(p.N * p.Lq);
  std::vector<int32_t> strip_of(p.Lq);
  std::vector<int64_t> next(strips + 1);
  for (int64_t n = 0; n < p.N; ++n) {
    std::fill(next.begin(), next.end(), 0);
    for (int64_t q = 0; q < p.Lq; ++q) {
      acc_t x;
      x = *loc.at((n * p.Lq + q) * query_values, 1, &x);
      const acc_t scaled = x * static_cast<acc_t>(strips);
      int64_t s = 0;
      if (scaled >= static_cast<acc_t>(strips)) {
        s = strips - 1;
      } else if (scaled > acc_t(0)) {  // false for NaN
        s = static_cast<int64_t>(scaled);
      }
      strip_of[q] = static_cast<int32_t>(s);
      ++next[s + 1];
    }
    for (int64_t s = 0; s < strips; ++s) next[s + 1] += next[s];  // first slot of each strip
    int64_t* out = order.data() + n * p.Lq;
    for (int64_t q = 0; q < p.Lq; ++q) out[next[strip_of[q]]++] = n * p.Lq + q;
  }
  return order;
}

}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu
