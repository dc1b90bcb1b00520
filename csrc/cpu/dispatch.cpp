// Which CPU kernels run: detection of the CPU's instruction sets and the
// MSDA_CPU_CAPABILITY override (see dispatch.h). Compiled with the baseline
// flags only, like everything outside csrc/cpu/capability/.
#include "cpu/dispatch.h"

#include <cctype>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace msda::cpu {
namespace {

constexpr const char* kVariable = "MSDA_CPU_CAPABILITY";

int& compiled_mask() {
  static int mask = 0;  // zero-initialised before any registration runs
  return mask;
}

#if defined(__x86_64__) && defined(__GNUC__)
// XCR0: which register states the operating system saves on a context
// switch. A CPU can have AVX-512 that the kernel does not enable (then using
// zmm registers faults), so both CPUID and XCR0 are checked.
uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

struct X86Features {
  bool avx2 = false, avx512 = false;
};

X86Features detect_x86() {
  X86Features f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  const uint64_t xcr = xcr0();
  const bool ymm_state = (xcr & 0x6) == 0x6;      // SSE and AVX state
  const bool zmm_state = (xcr & 0xe6) == 0xe6;    // plus opmask, ZMM0-15 upper halves, ZMM16-31
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  f.avx2 = ymm_state && avx2 && fma && f16c;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
  return f;
}
#endif

// Any case is accepted ("AVX2", "Avx512"); anything else, spaces included, is not.
bool parse(const std::string& text, Capability& out) {
  std::string lower(text);
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (int c = 0; c < kCapabilityCount; ++c) {
    if (lower == capability_name(static_cast<Capability>(c))) {
      out = static_cast<Capability>(c);
      return true;
    }
  }
  return false;
}

bool usable(Capability c) { return capability_compiled(c) && capability_supported(c); }

std::string usable_names() {
  std::string names;
  for (int c = kCapabilityCount - 1; c >= 0; --c) {
    if (!usable(static_cast<Capability>(c))) continue;
    if (!names.empty()) names += ", ";
    names += capability_name(static_cast<Capability>(c));
  }
  return names;
}

struct Choice {
  Capability capability = Capability::DEFAULT;
  std::string refusal;
};

Choice decide() {
  Choice choice;
  for (int c = kCapabilityCount - 1; c >= 0; --c) {
    if (usable(static_cast<Capability>(c))) {
      choice.capability = static_cast<Capability>(c);
      break;
    }
  }
  const char* env = std::getenv(kVariable);
  if (env == nullptr || *env == '\0') return choice;
  const std::string asked(env);
  Capability wanted;
  if (!parse(asked, wanted)) {
    choice.refusal = std::string(kVariable) + "=" + asked + " is not a known value; this CPU allows: " +
                     usable_names() + ". Using " + capability_name(choice.capability) + ".";
  } else if (!usable(wanted)) {
    choice.refusal = std::string(kVariable) + "=" + asked +
                     (capability_compiled(wanted) ? " is not supported by this CPU" : " was not compiled into this build") +
                     "; this CPU allows: " + usable_names() + ". Using " + capability_name(choice.capability) + ".";
  } else {
    choice.capability = wanted;
  }
  return choice;
}

const Choice& choice() {
  static const Choice c = decide();  // once, at the first use (import msda, or the first CPU kernel call)
  return c;
}

}  // namespace

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512:
      return "avx512";
    case Capability::AVX2:
      return "avx2";
    default:
      return "default";
  }
}

void mark_compiled(Capability c) { compiled_mask() |= 1 << static_cast<int>(c); }

bool capability_compiled(Capability c) { return compiled_mask() & (1 << static_cast<int>(c)); }

bool capability_supported(Capability c) {
  if (c == Capability::DEFAULT) return true;
#if defined(__x86_64__) && defined(__GNUC__)
  static const X86Features f = detect_x86();
  return c == Capability::AVX2 ? f.avx2 : f.avx512;
#else
  return false;
#endif
}

Capability chosen_capability() { return choice().capability; }

const std::string& refusal_message() { return choice().refusal; }

}  // namespace msda::cpu
