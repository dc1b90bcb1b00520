// The floor under the v2 discrete forward: nothing but fetching each sample's
// one row of value (D = 32 float32, 2 x 64-byte lines) and adding it, times
// its attention weight, into its query-head's output. No pixel arithmetic, no
// bounds checks, no per-call costs beyond one OpenMP region. Built as a
// shared library and called by benchmarks/v2_floor.py (ctypes) in turn with
// msda's discrete forward on the same value tensor, so that both meet the
// same machine from moment to moment:
//
//   g++ -O3 -march=native -fopenmp -shared -fPIC benchmarks/gather_floor.cpp -o /tmp/gather_floor.so
//
// rows: items x per_item row offsets in floats into value (the pixel each
// sample reads, in the kernels' item order (n, query, head)); weights: the
// same count of attention weights; out: items x 32 floats.
#include <omp.h>

#include <cstdint>
#include <cstring>

namespace {
constexpr int kD = 32;
// How many items ahead a sweep prefetches rows, as the kernel does (3): their
// misses then overlap the current item's work.
constexpr int64_t kAhead = 3;
}  // namespace

extern "C" void gather_sweep(const float* value, const int32_t* rows, const float* weights, int64_t items,
                             int64_t per_item, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    float acc[kD] = {};
    if (item + kAhead < items) {
      for (int64_t j = (item + kAhead) * per_item; j < (item + kAhead + 1) * per_item; ++j) {
        __builtin_prefetch(value + rows[j]);
        __builtin_prefetch(value + rows[j] + 16);
      }
    }
    for (int64_t j = item * per_item; j < (item + 1) * per_item; ++j) {
      const float* v = value + rows[j];
      const float w = weights[j];
#pragma omp simd
      for (int c = 0; c < kD; ++c) acc[c] += w * v[c];
    }
    std::memcpy(out + item * kD, acc, sizeof(acc));
  }
}
