// The pixel a discrete-mode point reads, shared by the CPU and CUDA kernels
// (and the CUDA emulation) so that all of them pick the same pixel.
//
// transformers' rule: index = trunc(loc * size + 0.5), clamped into the map.
// msda computes it in float32 (float64 for float64 locations) with the
// product rounded before the addition: a fused multiply-add would round
// once and move points near the .5 boundaries to the neighbouring pixel on
// one platform and not on another. NaN reads nothing; +-inf and huge values
// clamp to the border like any far point (transformers' int64 conversion
// sends them to pixel 0 on the CPU instead: undefined behaviour in C++).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace msda {

// a * b rounded to T: never contracted with a following addition.
MSDA_HOST_DEVICE float rounded_product(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float product = a * b;  // the store forces the rounding
  return product;
#endif
}
MSDA_HOST_DEVICE double rounded_product(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  volatile double product = a * b;
  return product;
#endif
}

// Pixel index along an axis of `size` pixels (size_f == size as T), or -1
// for a NaN location. The comparisons come before any conversion to an
// integer, so no conversion is out of range.
template <typename T>
MSDA_HOST_DEVICE int64_t discrete_index(T loc, T size_f, int64_t size) {
  const T v = rounded_product(loc, size_f) + T(0.5);
  if (!(v == v)) return -1;
  if (v < T(1)) return 0;  // trunc is 0 on [0, 1) and negative below: clamped to 0
  if (!(static_cast<double>(v) < static_cast<double>(size))) return size - 1;
  return static_cast<int64_t>(v);
}

}  // namespace msda
