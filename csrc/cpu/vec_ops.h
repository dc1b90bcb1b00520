// Channel-vector helpers for the CPU kernels: load a run of value channels as
// accumulation-type vectors (float32 for float/half/bfloat16, float64 for
// double). Kept apart from the kernels so they read as plain arithmetic.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace msda::cpu {

template <typename scalar_t>
struct AccumulateTypeOf {
  using type = float;
};
template <>
struct AccumulateTypeOf<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccumulateTypeOf<scalar_t>::type;

// VecLoad<scalar_t>::load(p) reads Vec::size() channels starting at p and
// widens them to the accumulation type.
template <typename scalar_t>
struct VecLoad {
  using Vec = at::vec::Vectorized<float>;
  static inline Vec load(const scalar_t* p) {
    Vec out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  }
};
template <>
struct VecLoad<float> {
  using Vec = at::vec::Vectorized<float>;
  static inline Vec load(const float* p) { return Vec::loadu(p); }
};
template <>
struct VecLoad<double> {
  using Vec = at::vec::Vectorized<double>;
  static inline Vec load(const double* p) { return Vec::loadu(p); }
};

// Sum of a vector's lanes in a fixed order (bitwise reproducible).
template <typename Vec, typename acc_t>
inline acc_t lane_sum(const Vec& v) {
  alignas(64) acc_t lanes[Vec::size()];
  v.store(lanes);
  acc_t total = 0;
  for (int i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

}  // namespace msda::cpu
