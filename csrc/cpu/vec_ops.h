// Channel-vector helpers for the CPU kernels: load a run of value channels as
// accumulation-type vectors (float32 for float/half/bfloat16, float64 for
// double). Kept apart from the kernels so they read as plain arithmetic.
#pragma once

#include "cpu/per_capability.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace msda::cpu {
inline namespace CPU_CAPABILITY {

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

// PairLoad<scalar_t>: bfloat16 channels read two vectors at a time, as
// (even channels, odd channels). A bfloat16 is the top half of a float32, so
// one full-width load gives both with a shift and a mask: two cheap
// instructions per 2 * Vec::size() channels, where VecLoad widens each half
// with a shuffle (on the same port as the multiply-adds) and a shift. Sums
// kept in this order are interleaved back once per output (interleave); a
// float32 operand that meets such rows is split once (split).
// In the forward the products and sums are the same as with VecLoad, so results
// are identical; the backward's dot products over the channels (a sum across
// lanes) add them in another order.
template <typename scalar_t>
struct PairLoad {
  static constexpr bool kEnabled = false;
};
#if defined(CPU_CAPABILITY_AVX512)
template <>
struct PairLoad<c10::BFloat16> {
  static constexpr bool kEnabled = true;
  using Vec = at::vec::Vectorized<float>;
  static inline void load(const c10::BFloat16* p, Vec& even, Vec& odd) {
    const __m512i x = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // The inverse of interleave: in[0, 2 * Vec::size()) split into its even and odd elements.
  static inline void split(const float* in, Vec& even, Vec& odd) {
    const __m512 a = _mm512_loadu_ps(in), b = _mm512_loadu_ps(in + 16);
    const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odds = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    even = _mm512_permutex2var_ps(a, evens, b);
    odd = _mm512_permutex2var_ps(a, odds, b);
  }
  // out[0, 2 * Vec::size()) = even[0], odd[0], even[1], odd[1], ...
  static inline void interleave(const Vec& even, const Vec& odd, float* out) {
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    _mm512_storeu_ps(out, _mm512_permutex2var_ps(even, first, odd));
    _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(even, second, odd));
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
template <>
struct PairLoad<c10::BFloat16> {
  static constexpr bool kEnabled = true;
  using Vec = at::vec::Vectorized<float>;
  static inline void load(const c10::BFloat16* p, Vec& even, Vec& odd) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static inline void split(const float* in, Vec& even, Vec& odd) {
    const __m256 a = _mm256_loadu_ps(in), b = _mm256_loadu_ps(in + 8);
    // Within each 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6; then the 64-bit pairs back in order.
    const __m256 e = _mm256_shuffle_ps(a, b, 0x88), o = _mm256_shuffle_ps(a, b, 0xDD);
    even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8));
    odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8));
  }
  static inline void interleave(const Vec& even, const Vec& odd, float* out) {
    const __m256 low = _mm256_unpacklo_ps(even, odd);   // e0 o0 e1 o1 | e4 o4 e5 o5
    const __m256 high = _mm256_unpackhi_ps(even, odd);  // e2 o2 e3 o3 | e6 o6 e7 o7
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(low, high, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(low, high, 0x31));
  }
};
#endif

// Vector registers the compiler can allocate: how many accumulators fit.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif

// Sum of a vector's lanes in a fixed order (bitwise reproducible).
template <typename Vec, typename acc_t>
inline acc_t lane_sum(const Vec& v) {
  alignas(64) acc_t lanes[Vec::size()];
  v.store(lanes);
  acc_t total = 0;
  for (int i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

// The four lane sums of d[0..3], each in a fixed order (bitwise reproducible).
template <typename Vec, typename acc_t>
inline void lane_sums4(const Vec d[4], acc_t out[4]) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    // Fold each 16-lane vector to 8 lanes first.
    __m256 h[4];
    for (int k = 0; k < 4; ++k) {
      const __m512 v = d[k];
      h[k] = _mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1));
    }
#else
    const __m256 h[4] = {d[0], d[1], d[2], d[3]};
#endif
    const __m256 h01 = _mm256_hadd_ps(h[0], h[1]);  // pairs of d0 and d1 lanes
    const __m256 h23 = _mm256_hadd_ps(h[2], h[3]);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23);  // [d0 d1 d2 d3] of each 128-bit half
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h0123), _mm256_extractf128_ps(h0123, 1)));
    return;
  }
#endif
  for (int k = 0; k < 4; ++k) out[k] = lane_sum<Vec, acc_t>(d[k]);
}

}  // namespace CPU_CAPABILITY
}  // namespace msda::cpu
