// Where the CPU ops' large outputs come from: a small cache of blocks that
// earlier outputs gave back, so that a model calling the op layer after layer
// reuses memory it already touched instead of faulting fresh pages in.
//
// Why: glibc hands an allocation of tens of MB out as a fresh mapping (always
// above 32 MB, and below that whenever other large allocations have moved its
// threshold, as a detector's backbone does), and the kernel then pays one page
// fault per 4 KiB on first write. Measured on the Deformable DETR encoder
// shape inside transformers' model (2-core Intel Xeon VM): 5556 faults on 4
// of 6 calls, about 8 ms of a 30 ms forward. CUDA has torch's caching
// allocator for this; the CPU has none.
//
// Blocks of at least 1 MiB are cached; smaller ones are allocated as before
// (outputs by at::empty). An idle block is reused for a request of its size
// or up to 1/8 smaller. Idle blocks are kept up to a limit
// (MSDA_CPU_CACHE_MB, default 256; 0 turns the cache off), the oldest
// released first. Python: msda.cpu_cache (stats, release, set_limit).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace msda::cpu {

// at::empty(sizes, options) for a contiguous CPU tensor, from the cache.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);
// at::zeros, the same way.
inline at::Tensor cached_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return cached_empty(sizes, options).zero_();
}

// A kernel's uninitialised working memory of `bytes`, from the cache; its
// block goes back to the cache when this dies. Defined in output_cache.cpp
// (baseline flags), so that the per-capability kernels that use it share one
// copy of its code.
class CachedBytes {
 public:
  explicit CachedBytes(int64_t bytes);
  ~CachedBytes();
  CachedBytes(const CachedBytes&) = delete;
  CachedBytes& operator=(const CachedBytes&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  at::Tensor* block_;  // null for 0 bytes
  void* data_;
};

// Frees every idle block; returns their bytes.
int64_t release_cached_blocks();
// Sets the idle limit in bytes (0: no caching), freeing the oldest idle
// blocks above it; returns the previous limit.
int64_t set_cache_limit(int64_t bytes);
// out = idle bytes, idle blocks, limit in bytes, reuses, fresh blocks.
void cache_stats(int64_t out[5]);

}  // namespace msda::cpu
