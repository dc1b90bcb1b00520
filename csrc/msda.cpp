// Schemas of msda's ops, and the C functions that report the CPU dispatch
// and control the CPU output cache.
// The kernels live in csrc/cpu (CPU) and csrc/cuda (CUDA), each registering
// itself with TORCH_LIBRARY_IMPL; the fake kernels and the autograd formula
// are registered from Python (src/msda/ops.py).
//
// This library has no Python in it (no Python.h, no libtorch_python): loading
// it (dlopen, or torch.ops.load_library) runs the static registrations, so a
// C++ program that runs an AOTInductor package and the Python package
// (src/msda/_C.py, through ctypes) load the very same file.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cpu/clock.h"
#include "cpu/dispatch.h"
#include "cpu/output_cache.h"

namespace {
using msda::cpu::Capability;

// Names of the capabilities, best first, for which `keep` holds, joined by
// commas (a C string is the simplest thing ctypes reads).
template <typename Pred>
std::string capability_names(Pred keep) {
  std::string names;
  for (int c = msda::cpu::kCapabilityCount - 1; c >= 0; --c) {
    if (!keep(static_cast<Capability>(c))) continue;
    if (!names.empty()) names += ",";
    names += msda::cpu::capability_name(static_cast<Capability>(c));
  }
  return names;
}
}  // namespace

// The returned strings live as long as the library. The CPU capability is
// decided at the first call of msda_cpu_capability() or of a CPU kernel (not
// in a static initialiser: the capability sources' registrations, which the
// decision reads, may run after it).
extern "C" {
__attribute__((visibility("default"))) const char* msda_cpu_capability() {
  return msda::cpu::capability_name(msda::cpu::chosen_capability());
}
__attribute__((visibility("default"))) const char* msda_cpu_capabilities_compiled() {
  static const std::string names = capability_names(msda::cpu::capability_compiled);
  return names.c_str();
}
__attribute__((visibility("default"))) const char* msda_cpu_capabilities_allowed() {
  static const std::string names = capability_names(
      [](Capability c) { return msda::cpu::capability_compiled(c) && msda::cpu::capability_supported(c); });
  return names.c_str();
}
__attribute__((visibility("default"))) const char* msda_cpu_capability_refusal() {
  return msda::cpu::refusal_message().c_str();
}
__attribute__((visibility("default"))) double msda_measure_clock_hz() { return msda::cpu::measure_clock_hz(); }
__attribute__((visibility("default"))) double msda_measure_clock_hz_multiply() {
  return msda::cpu::measure_clock_hz_multiply();
}
// The CPU output cache (cpu/output_cache.h), for msda.cpu_cache.
__attribute__((visibility("default"))) int64_t msda_cpu_cache_release() { return msda::cpu::release_cached_blocks(); }
__attribute__((visibility("default"))) int64_t msda_cpu_cache_set_limit(int64_t bytes) {
  return msda::cpu::set_cache_limit(bytes);
}
__attribute__((visibility("default"))) void msda_cpu_cache_stats(int64_t* out) { msda::cpu::cache_stats(out); }
}

namespace {
// msda.cpu_cache.empty: an uninitialised contiguous CPU tensor whose memory
// comes from the output cache, for Python callers that build a large
// temporary on every call (the transformers integration's query, the hidden
// states plus their position embeddings) and would otherwise fault fresh
// pages in each time.
at::Tensor cpu_cache_empty(at::IntArrayRef size, at::ScalarType dtype) {
  for (size_t i = 0; i < size.size(); ++i) {
    TORCH_CHECK(size[i] >= 0, "cpu_cache_empty: size[", i, "] must be >= 0, got ", size[i], " (size ", size, ")");
  }
  return msda::cpu::cached_empty(size, at::TensorOptions().dtype(dtype));
}
}  // namespace

TORCH_LIBRARY(msda, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
  // Not an attention op: the CPU output cache's allocation, for msda.cpu_cache.empty (eager Python only).
  m.def("cpu_cache_empty(int[] size, ScalarType dtype) -> Tensor", &cpu_cache_empty);
}
