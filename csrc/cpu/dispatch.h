// Runtime CPU dispatch: one build carries the CPU kernels for several
// instruction sets and picks one when the library loads.
//
// The mechanism (generic: any kernel source can join it):
// * Every .cpp under csrc/cpu/capability/ is compiled once per capability
//   (setup.py, CPU_CAPABILITIES there), each time with that capability's
//   compiler flags and with -DCPU_CAPABILITY=<NAME> -DCPU_CAPABILITY_<NAME>,
//   as ATen does for its own kernels: AVX512 (-mavx512f/bw/vl/dq, FMA, F16C),
//   AVX2 (-mavx2 -mfma -mf16c) and DEFAULT (the compiler's baseline: x86-64,
//   or NEON on aarch64, where at::vec uses NEON in the default path).
// * Those sources put their own code in `namespace msda::cpu { inline
//   namespace CPU_CAPABILITY {` (at::vec does the same), so that their inline
//   functions and template instantiations are distinct symbols per
//   capability and the linker cannot merge an AVX-512 copy into a lower path.
//   Inline code from other libraries' headers (std::, c10::) cannot be
//   namespaced: setup.py links the objects lowest capability first, so the
//   linker, which keeps the first copy of a shared inline function, keeps the
//   one built for the lowest capability that uses it; tests/test_cpu_dispatch.py
//   checks the built library for AVX-512 instructions outside the AVX-512 path.
// * A capability source fills a KernelTable entry with
//   MSDA_REGISTER_CPU_KERNEL(table, fn); the common code (compiled once,
//   baseline flags) declares the table with MSDA_DECLARE_CPU_KERNEL, defines
//   it with MSDA_DEFINE_CPU_KERNEL and calls `table.get()(args...)`.
// * chosen_capability() is decided once, at its first call (import msda, or
//   a C++ program's first CPU kernel call; never in a static initialiser,
//   which could run before the registrations it reads): the best
//   capability that was compiled and that this CPU and its operating system
//   support, or a lower one asked for with MSDA_CPU_CAPABILITY
//   (avx512|avx2|default, in any case; a value that cannot be honoured is refused with a
//   warning at import, see refusal_message()).
#pragma once

#include <cstdint>
#include <string>

#include <c10/util/Exception.h>

namespace msda::cpu {

// Ordered: a higher capability runs only where the lower ones run too.
enum class Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
constexpr int kCapabilityCount = 3;

// "default", "avx2", "avx512": the values of MSDA_CPU_CAPABILITY.
const char* capability_name(Capability c);

// Capabilities registered by at least one kernel in this build.
bool capability_compiled(Capability c);
// What this CPU and its operating system can execute.
bool capability_supported(Capability c);
// The capability the kernels use (decided once; see the top of this file).
Capability chosen_capability();
// Empty, or why MSDA_CPU_CAPABILITY was not honoured (shown at import).
const std::string& refusal_message();

void mark_compiled(Capability c);

// One entry point of a kernel, one function pointer per capability. Its
// constructor is constexpr, so the table is filled with nulls before any
// static initialiser (the registrations) runs, whatever the link order.
template <typename Fn>
struct KernelTable {
  const char* name;
  Fn fns[kCapabilityCount] = {};

  constexpr explicit KernelTable(const char* n) : name(n) {}

  bool set(Capability c, Fn fn) {
    fns[static_cast<int>(c)] = fn;
    mark_compiled(c);
    return true;
  }

  // The chosen capability's kernel, or the nearest lower one this kernel was
  // compiled for.
  Fn get() const {
    for (int c = static_cast<int>(chosen_capability()); c >= 0; --c) {
      if (fns[c] != nullptr) return fns[c];
    }
    TORCH_CHECK(false, "msda: no CPU kernel was compiled for ", name);
  }
};

}  // namespace msda::cpu

#define MSDA_DECLARE_CPU_KERNEL(table, fn_type) extern ::msda::cpu::KernelTable<fn_type> table
#define MSDA_DEFINE_CPU_KERNEL(table, fn_type) ::msda::cpu::KernelTable<fn_type> table(#table)

// Only in sources under csrc/cpu/capability/ (CPU_CAPABILITY is defined there).
#define MSDA_CAPABILITY_CONCAT2(a, b) a##b
#define MSDA_CAPABILITY_CONCAT(a, b) MSDA_CAPABILITY_CONCAT2(a, b)
#define MSDA_REGISTER_CPU_KERNEL(table, fn)                                                       \
  static const bool MSDA_CAPABILITY_CONCAT(msda_registered_, __LINE__) [[maybe_unused]] = \
      (table).set(::msda::cpu::Capability::CPU_CAPABILITY, (fn))
