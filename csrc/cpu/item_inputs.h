// The per-item inputs of the kernels (sampling locations, attention weights,
// grad_output) read in the dtype the caller passed them in, and the 16-bit
// outputs written from float32 sums, a run of channels at a time.
//
// Why: with 16-bit value these inputs come in value's dtype or in float32
// (autocast gives float32 locations and bfloat16 weights). Converting the
// whole tensor to float32 before the kernel cost a full-size copy of each
// (time, and working memory); converting one item's few dozen values into a
// small buffer as the kernel reaches them costs neither.
#pragma once

#include "cpu/per_capability.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <type_traits>

#include "cpu/vec_ops.h"

namespace msda::cpu {
inline namespace CPU_CAPABILITY {

// dst[0, n) = src[0, n) widened to float (exact for both 16-bit types).
template <typename half_t>
inline void widen(const half_t* src, int64_t n, float* dst) {
  using Vec = typename VecLoad<half_t>::Vec;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) VecLoad<half_t>::load(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dst[0, n) = src[0, n) rounded to scalar_t (round to nearest even, as a
// static_cast; ATen's vector conversion for the 16-bit types).
template <typename scalar_t, typename acc_t>
inline void narrow(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  } else {
    at::vec::convert(src, dst, n);
  }
}

// A tensor of per-item values stored as acc_t, or (only when acc_t is float)
// as bfloat16 or float16: at(first, n, buffer) gives elements [first,
// first + n) as acc_t, in place when stored as acc_t, else widened into buffer.
template <typename acc_t>
struct ItemInput {
  const void* data;
  c10::ScalarType type;

  const acc_t* at(int64_t first, int64_t n, acc_t* buffer) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (type == c10::ScalarType::BFloat16) {
        widen(static_cast<const c10::BFloat16*>(data) + first, n, buffer);
        return buffer;
      }
      if (type == c10::ScalarType::Half) {
        widen(static_cast<const c10::Half*>(data) + first, n, buffer);
        return buffer;
      }
    }
    return static_cast<const acc_t*>(data) + first;
  }
  // Where element `first` is, for prefetching.
  const void* address(int64_t first) const {
    return static_cast<const char*>(data) + first * static_cast<int64_t>(c10::elementSize(type));
  }
};

// The same for an output: store(first, n, src) writes src[0, n) at elements
// [first, first + n), rounded to the stored type.
template <typename acc_t>
struct ItemOutput {
  void* data;
  c10::ScalarType type;

  void store(int64_t first, int64_t n, const acc_t* src) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (type == c10::ScalarType::BFloat16) return narrow(src, n, static_cast<c10::BFloat16*>(data) + first);
      if (type == c10::ScalarType::Half) return narrow(src, n, static_cast<c10::Half*>(data) + first);
    }
    acc_t* dst = static_cast<acc_t*>(data) + first;
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
  void* address(int64_t first) const {
    return static_cast<char*>(data) + first * static_cast<int64_t>(c10::elementSize(type));
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu
