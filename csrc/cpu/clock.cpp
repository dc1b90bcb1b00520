// The core clock, measured: a chain of dependent integer adds runs at one
// add per cycle on every current x86-64 and Arm core, so adds per second is
// the clock the kernels actually ran at (turbo included). The benchmarks use
// it for the derived FLOP/s peak; /proc/cpuinfo only knows the nominal clock,
// which in a virtual machine is often far from the real one.
#include <chrono>
#include <cstdint>

#include "cpu/clock.h"

namespace msda::cpu {

double measure_clock_hz() {
#if (defined(__x86_64__) || defined(__aarch64__)) && defined(__GNUC__)  // GCC-style inline assembly
  constexpr int64_t kAdds = 200'000'000;
  double best = 0;
  for (int repeat = 0; repeat < 3; ++repeat) {
    uint64_t x = 0;
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < kAdds; i += 4) {
#if defined(__x86_64__)
      asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
#else
      asm volatile("add %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1" : "+r"(x));
#endif
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (seconds > 0 && kAdds / seconds > best) best = kAdds / seconds;
  }
  return best;
#else
  return 0;  // unknown architecture or compiler: no measurement
#endif
}

}  // namespace msda::cpu
