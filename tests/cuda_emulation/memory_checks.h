// Deterministic memory checks of the CUDA emulation (included at the end of
// cuda_emulation.h). Without them an out-of-bounds access is caught only when
// the memory it reaches happens to hold something wrong; with them it fails
// every time:
//
//  * Global memory. The launch code passes every tensor to a kernel through
//    MSDA_IN / MSDA_OUT (csrc/cuda/ms_deform_attn_launch.h); here each one is
//    copied into a mapping of its own, placed against an unmapped 64 KiB guard
//    (as close as the tensor's alignment modulo 16 allows, which is kept so
//    that the launch code's vectorisation choice still holds), with poisoned
//    bytes (0xFF: NaN in every float type) filling the rest of the page(s)
//    before it and up to 15 bytes after it, and another unmapped guard before
//    those. A read of the poison gives NaN; a write to it is found after the
//    launch; an access to a guard faults, and the fault becomes an error
//    naming the tensor and the offset. Outputs are copied back after the
//    launch. Tensors over kMaxGuardedBytes (the tests with more than 2**31
//    elements) are passed as they are.
//  * Shared memory. __shared__ arrays are page-aligned statics, so each is
//    followed by a red zone up to the next page. The test harness tells the
//    emulator where the arrays are (set_shared_layout, read from the module's
//    symbol table: ASan does not see these statics); arrays and red zones are
//    poisoned before each block and the red zones checked after it.
#pragma once

#include <signal.h>

#include <exception>
#include <utility>

namespace msda_emu {

constexpr size_t kGuardBytes = 64 * 1024;
constexpr size_t kMaxGuardedBytes = size_t(256) << 20;
constexpr unsigned char kPoison = 0xff;

struct DeviceCopy {
  char* map = nullptr;  // guard, body, guard
  size_t map_bytes = 0;
  char* body = nullptr;  // the accessible pages: poison, data, poison
  size_t body_bytes = 0;
  char* data = nullptr;
  size_t bytes = 0;
  char* original = nullptr;
  bool writable = false;
  std::string name;
};

inline std::vector<DeviceCopy> g_copies;

inline size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

inline char* device_copy(const at::Tensor& t, bool writable, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "CUDA emulation: ", name, " must be a contiguous CPU tensor");
  char* original = static_cast<char*>(const_cast<void*>(t.const_data_ptr()));
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (bytes > kMaxGuardedBytes) return original;
  const size_t page = page_size();
  const size_t body_bytes = (bytes + 16 + page - 1) / page * page;  // at least 16 bytes of poison before
  DeviceCopy c;
  c.map_bytes = 2 * kGuardBytes + body_bytes;
  void* map = mmap(nullptr, c.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (map == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot map a device copy of " + std::string(name));
  c.map = static_cast<char*>(map);
  mprotect(c.map, kGuardBytes, PROT_NONE);
  mprotect(c.map + kGuardBytes + body_bytes, kGuardBytes, PROT_NONE);
  c.body = c.map + kGuardBytes;
  c.body_bytes = body_bytes;
  std::memset(c.body, kPoison, body_bytes);
  c.data = c.body + body_bytes - bytes;
  c.data -= (reinterpret_cast<uintptr_t>(c.data) - reinterpret_cast<uintptr_t>(original)) % 16;
  if (bytes) std::memcpy(c.data, original, bytes);
  c.bytes = bytes;
  c.original = original;
  c.writable = writable;
  c.name = name;
  g_copies.push_back(c);
  return c.data;
}

template <typename T>
const T* device_in(const at::Tensor& t, const char* name) {
  (void)t.const_data_ptr<T>();  // the dtype check
  return reinterpret_cast<const T*>(device_copy(t, false, name));
}

template <typename T>
T* device_out(at::Tensor& t, const char* name) {
  if (!t.defined()) return nullptr;
  (void)t.mutable_data_ptr<T>();
  return reinterpret_cast<T*>(device_copy(t, true, name));
}

inline std::string first_unpoisoned(const char* begin, const char* end) {
  for (const char* p = begin; p < end; ++p)
    if (static_cast<unsigned char>(*p) != kPoison) return std::to_string(p - begin);
  return "";
}

// After a launch: check the poison around each copy, copy outputs back, unmap.
inline void release_device_copies() {
  std::string error;
  for (DeviceCopy& c : g_copies) {
    if (error.empty()) {
      const char* end = c.data + c.bytes;
      const std::string before = first_unpoisoned(c.body, c.data);
      const std::string after = first_unpoisoned(end, c.body + c.body_bytes);
      if (!before.empty())
        error = "a kernel wrote before the start of " + c.name + " (byte offset -" +
                std::to_string(c.data - c.body - std::stoll(before)) + ")";
      else if (!after.empty())
        error = "a kernel wrote past the end of " + c.name + " (" + std::to_string(c.bytes) + " bytes; byte offset " +
                std::to_string(c.bytes + std::stoll(after)) + ")";
    }
    if (c.writable && c.bytes) std::memcpy(c.original, c.data, c.bytes);
    munmap(c.map, c.map_bytes);
  }
  g_copies.clear();
  if (!error.empty()) throw std::runtime_error("CUDA emulation: " + error);
}

// A fault in a guard page during a launch fails the thread that made it.
inline struct sigaction g_previous_segv;

inline void on_device_fault(int, siginfo_t* info, void*) {
  const char* a = static_cast<const char*>(info->si_addr);
  for (const DeviceCopy& c : g_copies) {
    if (a >= c.map && a < c.map + c.map_bytes && g.current) {
      fail("out-of-bounds access to " + c.name + " at byte offset " + std::to_string(a - c.data) + " (it has " +
           std::to_string(c.bytes) + " bytes)");
    }
  }
  sigaction(SIGSEGV, &g_previous_segv, nullptr);  // not ours: the access faults again, under the old handler
}

inline void guard_device_faults(bool on) {
  static bool installed = false;
  if (on && !installed) {
    struct sigaction sa {};
    sa.sa_sigaction = &on_device_fault;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;  // fail() leaves the handler by switching fibers, never returning
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_previous_segv);
    installed = true;
  } else if (!on && installed) {
    sigaction(SIGSEGV, &g_previous_segv, nullptr);
    installed = false;
  }
}

// ---- shared memory -----------------------------------------------------------
struct SharedArray {
  char* begin;
  size_t bytes;
  size_t red_zone;     // bytes after it, up to the next symbol
  std::string symbol;  // _ZZ<kernel's mangled name without _Z>E<array name>
};
inline std::vector<SharedArray> g_shared_arrays;

inline char* module_base() {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&module_base), &info) || !info.dli_fbase)
    throw std::runtime_error("CUDA emulation: cannot find the module's load address");
  return static_cast<char*>(info.dli_fbase);
}

// Called by the harness with (address in the module, bytes, red zone bytes,
// symbol) of every __shared__ array, read from the module's symbol table; each
// array needs at least 16 bytes of red zone.
inline void set_shared_layout(const std::vector<std::tuple<size_t, size_t, size_t, std::string>>& arrays) {
  std::vector<SharedArray> layout;
  char* base = module_base();
  for (const auto& [address, bytes, red_zone, symbol] : arrays) {
    if (red_zone < 16) throw std::runtime_error("CUDA emulation: shared array " + symbol + " has no red zone after it");
    layout.push_back({base + address, bytes, red_zone, symbol});
  }
  g_shared_arrays = layout;
}

// The static shared memory of `kernel`: its arrays are the statics whose
// mangled names nest in the kernel's. If the kernel's name cannot be found,
// every array of every kernel (an upper bound).
inline size_t shared_bytes_declared(void* kernel) {
  Dl_info info{};
  const char* name = dladdr(kernel, &info) && info.dli_sname && std::strncmp(info.dli_sname, "_Z", 2) == 0
                         ? info.dli_sname : nullptr;
  const std::string prefix = name ? "_ZZ" + std::string(name + 2) + "E" : "";
  size_t sum = 0;
  for (const SharedArray& a : g_shared_arrays)
    if (!name || a.symbol.compare(0, prefix.size(), prefix) == 0) sum += a.bytes;
  return sum;
}

inline void poison_shared() {
  for (const SharedArray& a : g_shared_arrays) {
    race::new_memory(a.begin, a.bytes + a.red_zone);  // each block has shared memory of its own
    std::memset(a.begin, kPoison, a.bytes + a.red_zone);
  }
}

inline void check_shared_red_zones() {
  for (const SharedArray& a : g_shared_arrays) {
    const std::string bad = first_unpoisoned(a.begin + a.bytes, a.begin + a.bytes + a.red_zone);
    if (!bad.empty()) {
      throw std::runtime_error("CUDA emulation: shared-memory write out of bounds in " + where(nullptr) + ": " +
                               std::to_string(a.bytes + std::stoull(bad)) + " bytes past the start of a " +
                               std::to_string(a.bytes) + "-byte __shared__ array");
    }
  }
}

// Runs `launch` (which evaluates the kernel arguments, making the device
// copies, then launches) with faults in the guards caught; then checks the
// poison, copies outputs back and releases the copies, on every exit.
template <typename F>
void with_device_copies(F&& launch) {
  struct Release {
    ~Release() noexcept(false) {
      guard_device_faults(false);
      if (std::uncaught_exceptions()) {
        try {
          release_device_copies();
        } catch (...) {  // the first error wins
        }
      } else {
        release_device_copies();
      }
    }
  } release;
  guard_device_faults(true);
  launch();
}

}  // namespace msda_emu

#define MSDA_IN(T, tensor) ::msda_emu::device_in<T>((tensor), #tensor)
#define MSDA_OUT(T, tensor) ::msda_emu::device_out<T>((tensor), #tensor)
