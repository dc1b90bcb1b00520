// Per-head copies, in the backward: when every row of value is sampled many
// times (the encoder, where the queries are the pixels themselves), a task
// works on one head (n, m) and a block of its channels, copied first into a
// dense buffer, and accumulates into a private dense grad_value buffer that
// is copied out at the end. (The forward reads value in place, a query with
// all its heads at a time: forward_kernel.h.)
//
// Why: in value (N, S, M, D) one head's row slice is D of every M*D elements,
// so one head's rows use only 1/M of the cache sets (a 1 KB row stride at M 8,
// D 32 maps a head's 128 bytes of every row onto 8 of L1's 64 sets, and
// likewise in L2). Dense, the rows a task keeps reusing (those around the
// current queries, on every level) fit in L2. Measured on the encoder shape
// (2 cores, AMD EPYC): backward about 1.4x faster, copies included. When
// rows are sampled only a few times (decoders: 300-900 queries over 22k
// rows) the copies cost more than they save, so the kernel uses the tensors
// directly.
#pragma once

#include "cpu/per_capability.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "checks.h"
#include "cpu/layout.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {

// Samples that land per row of value (per head), on average.
inline double samples_per_row(const Problem& p) {
  return p.S > 0 ? static_cast<double>(p.Lq) * p.L * p.P / static_cast<double>(p.S) : 0.0;
}

// Threshold measured on the benchmark shapes: the encoder (16 samples per
// row) and the single-level encoder (4) gain; decoders (0.2-0.7) lose.
constexpr double kBackwardCopiesFrom = 2.0;

inline bool backward_uses_head_copies(const Problem& p) { return samples_per_row(p) >= kBackwardCopiesFrom; }

// Copies `width` channels of each of `rows` rows from src (row_stride apart)
// into dst (dense, width apart), or back.
template <typename T>
inline void copy_rows_in(const T* src, int64_t rows, int64_t row_stride, int64_t width, T* dst) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * width, src + r * row_stride, width * sizeof(T));
}
template <typename T>
inline void copy_rows_out(const T* src, int64_t rows, int64_t width, T* dst, int64_t row_stride) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * row_stride, src + r * width, width * sizeof(T));
}

}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu
