// The core clock, measured: a chain of dependent instructions of known
// latency runs at one link per that many cycles, so links per second is the
// clock the kernels actually ran at (turbo included). The benchmarks use it
// for derived peaks and cycles per sample; /proc/cpuinfo only knows the
// nominal clock, which in a virtual machine is often far from the real one.
//
// The chain must be one the core cannot shorten. `add $1, reg` is not: recent
// Intel cores (Golden Cove and later) fold chains of immediate adds while
// renaming and retire several a cycle, which read as 12-16 "GHz". An add of
// a register (`add %one, %x`, 1 cycle) is not folded. A chain of 64-bit
// multiplies (3 cycles on every x86-64 core of the last 15 years) is the
// independent cross-check (tests/test_clock.py).
#include <algorithm>
#include <chrono>
#include <cstdint>

#include "cpu/clock.h"

namespace msda::cpu {

namespace {

#if (defined(__x86_64__) || defined(__aarch64__)) && defined(__GNUC__)  // GCC-style inline assembly
#define MSDA_ADD_CHAIN 1
#if defined(__x86_64__)
#define MSDA_MULTIPLY_CHAIN 1
#endif

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Seconds that `links` dependent register adds take (one cycle each).
double add_chain_seconds(int64_t links) {
  uint64_t x = 0;
  const uint64_t one = 1;
  const auto start = Clock::now();
  for (int64_t i = 0; i < links; i += 4) {
#if defined(__x86_64__)
    asm volatile("add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0" : "+r"(x) : "r"(one));
#else
    asm volatile("add %0, %0, %1\n\tadd %0, %0, %1\n\tadd %0, %0, %1\n\tadd %0, %0, %1" : "+r"(x) : "r"(one));
#endif
  }
  return seconds_since(start);
}

#ifdef MSDA_MULTIPLY_CHAIN
// Seconds that `links` dependent 64-bit multiplies take (three cycles each).
double multiply_chain_seconds(int64_t links) {
  uint64_t x = 3;
  const auto start = Clock::now();
  for (int64_t i = 0; i < links; i += 4) {
    asm volatile("imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0" : "+r"(x));
  }
  return seconds_since(start);
}
#endif

// Cycles per second of a chain: the best of many short rounds (about 1 ms
// each), so that a round the scheduler interrupted is simply not the best one.
double best_hz(double (*chain_seconds)(int64_t), int cycles_per_link) {
  constexpr int64_t kCycles = 4'000'000;
  constexpr int kRounds = 48;
  const int64_t links = kCycles / cycles_per_link;
  double best = 0;
  for (int round = 0; round < kRounds; ++round) {
    const double seconds = chain_seconds(links);
    if (seconds > 0) best = std::max(best, static_cast<double>(links * cycles_per_link) / seconds);
  }
  return best;
}
#endif

}  // namespace

double measure_clock_hz() {
#ifdef MSDA_ADD_CHAIN
  return best_hz(add_chain_seconds, 1);
#else
  return 0;  // unknown architecture or compiler: no measurement
#endif
}

double measure_clock_hz_multiply() {
#ifdef MSDA_MULTIPLY_CHAIN
  return best_hz(multiply_chain_seconds, 3);
#else
  return 0;  // the multiply latency is known for x86-64 only
#endif
}

}  // namespace msda::cpu
