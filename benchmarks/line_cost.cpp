// What one cache line of corner rows costs the CPU backward, outside the
// kernel: a loop that replays the backward's per-sample work (read 4 corner
// rows of value for the dot products, add a scaled grad_output into the same
// 4 rows of grad_value) on rows laid out like value (N 1, M 8, D 32 float32,
// a 100x167 map, queries in memory order, two heads interleaved), with the
// points spread around each query by a Gaussian of SPREAD pixels; and, for
// comparison, the same instructions on a small L1-resident ring of rows.
// benchmarks/README.md ("What limits the CPU kernel") quotes its results.
//
//   g++ -O3 -march=native benchmarks/line_cost.cpp -o /tmp/line_cost && /tmp/line_cost
//
// Needs AVX-512 (like the kernels' fastest path). Prints ns and core cycles
// per sample and per 64-byte line, the clock measured with a dependent add
// chain (as msda._C.measure_clock_hz does).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

double clock_hz() {
  constexpr int64_t kAdds = 200'000'000;
  uint64_t x = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < kAdds; i += 4) asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  return kAdds / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

constexpr int kH = 100, kW = 167, kM = 8, kD = 32, kPoints = 16;
constexpr int64_t kRows = int64_t(kH) * kW, kRowStride = kM * kD;

struct Samples {
  std::vector<float*> value, grad;  // 4 corner rows per sample
};

// Corner rows of every sample; ring: a 16-slot ring of rows instead of the map.
Samples make_samples(float* value, float* grad, double spread, bool ring) {
  Samples s;
  std::mt19937 rng(1);
  std::normal_distribution<double> offset(0, spread);
  for (int64_t item = 0; item < kRows * 2; ++item) {
    const int64_t q = item / 2, m = item % 2, y = q / kW, x = q % kW;
    for (int p = 0; p < kPoints; ++p) {
      const int x0 = std::clamp(static_cast<int>(std::floor(x + offset(rng))), 0, kW - 2);
      const int y0 = std::clamp(static_cast<int>(std::floor(y + offset(rng))), 0, kH - 2);
      const int64_t r = int64_t(y0) * kW + x0, rows[4] = {r, r + 1, r + kW, r + kW + 1};
      const int64_t sample = item * kPoints + p;
      for (int k = 0; k < 4; ++k) {
        const int64_t at = ring ? ((sample % 16) * 4 + k) * kD : rows[k] * kRowStride + m * kD;
        s.value.push_back(value + at);
        s.grad.push_back(grad + at);
      }
    }
  }
  return s;
}

// Seconds per sample of the backward's per-sample work (best of 5 sweeps).
double time_backward(const Samples& s, std::vector<float>& dots) {
  const __m512 go0 = _mm512_set1_ps(0.5f), go1 = _mm512_set1_ps(0.25f), scale = _mm512_set1_ps(0.01f);
  const int64_t samples = static_cast<int64_t>(s.value.size()) / 4;
  double best = 1e30;
  for (int sweep = 0; sweep < 5; ++sweep) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < samples; ++i) {
      __m512 d[4];
      for (int k = 0; k < 4; ++k) {
        const float* v = s.value[4 * i + k];
        float* g = s.grad[4 * i + k];
        d[k] = _mm512_fmadd_ps(go1, _mm512_loadu_ps(v + 16), _mm512_mul_ps(go0, _mm512_loadu_ps(v)));
        _mm512_storeu_ps(g, _mm512_fmadd_ps(scale, go0, _mm512_loadu_ps(g)));
        _mm512_storeu_ps(g + 16, _mm512_fmadd_ps(scale, go1, _mm512_loadu_ps(g + 16)));
      }
      for (int k = 0; k < 4; ++k) dots[(i % 1024) * 4 + k] = _mm512_reduce_add_ps(d[k]);
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best / samples;
}

}  // namespace

int main() {
  std::vector<float> value(kRows * kRowStride, 0.001f), grad(kRows * kRowStride, 0.0f), dots(4096);
  const double hz = clock_hz();
  constexpr int kLines = 16;  // 4 corners x 2 lines of value + the same of grad_value
  std::printf("core clock %.2f GHz; per sample: 8 lines of value read, 8 lines of grad_value updated\n", hz / 1e9);
  std::printf("%-34s %12s %16s %16s\n", "rows", "ns/sample", "cycles/sample", "cycles/line");
  struct Row {
    const char* name;
    double spread;
    bool ring;
  } rows[] = {{"L1-resident ring of 16 slots", 2, true},
              {"encoder rows, spread 0 px", 0, false},
              {"encoder rows, spread 2 px", 2, false},
              {"encoder rows, spread 4 px", 4, false}};
  for (const Row& r : rows) {
    const Samples s = make_samples(value.data(), grad.data(), r.spread, r.ring);
    const double seconds = time_backward(s, dots);
    std::printf("%-34s %12.2f %16.1f %16.2f\n", r.name, seconds * 1e9, seconds * hz, seconds * hz / kLines);
  }
  return 0;
}
