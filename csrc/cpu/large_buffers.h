// Large output buffers backed by transparent huge pages where the system
// allows it (Linux, /sys/kernel/mm/transparent_hugepage/enabled "madvise" or
// "always").
//
// Why: a fresh multi-megabyte tensor is memory the kernel maps in on first
// touch, one 4 KiB page at a time. Measured on the decoder shape (2 cores,
// Intel Xeon): the page faults of the zeroed 45 MB float32 grad_value cost
// more than the backward kernel itself. With 2 MiB pages the same memory
// takes 1/512 of the faults. The pages are touched in full by the kernels
// (every element of these outputs is written), so resident memory is the same.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace msda::cpu {

// Below this the faults are few and a huge page could hold memory that is
// never touched.
constexpr int64_t kHugePageMinBytes = int64_t{8} << 20;

// Asks for huge pages over the 2 MiB-aligned interior of t's storage; a no-op
// where the request is refused or unsupported (it is advice only).
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (bytes < kHugePageMinBytes) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (start + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty, advised onto huge pages when large.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace msda::cpu
