// The cache of output_cache.h: a pool of idle blocks, and two c10::Allocators
// over it (outputs, and kernels' working arrays) whose blocks go back to the
// pool when their tensor dies, instead of to the system.
#include "cpu/output_cache.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

// Under AddressSanitizer an idle block is poisoned: a tensor that outlived
// its storage would otherwise read a cached block without a report, where
// the plain allocator's freed memory gives one.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define MSDA_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define MSDA_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define MSDA_POISON(p, n) ((void)(p), (void)(n))
#define MSDA_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace msda::cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;  // smaller blocks are not cached
constexpr size_t kPage = 4096;
constexpr int64_t kDefaultLimitMiB = 256;

struct Block {
  void* ptr;
  size_t bytes;
  bool reported;  // handed out as an output: its life is reported to torch's memory profiler
};

// MSDA_CPU_CACHE_MB as bytes; the default where unset, 0 where it is not a
// non-negative number (a typo turns the cache off rather than growing it).
int64_t limit_from_environment() {
  const char* text = std::getenv("MSDA_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  const double mib = std::strtod(text, &end);
  if (end == text || *end != '\0' || !(mib >= 0) || mib > 1e9) return 0;
  return static_cast<int64_t>(mib * 1048576.0);
}

// The idle blocks, and the bytes in use, behind both allocators below.
class BlockPool {
 public:
  BlockPool() : limit_(limit_from_environment()) {}

  // A block of at least `n` bytes (n >= kMinBytes): an idle one of its size
  // or up to 1/8 larger, else fresh memory.
  Block* take(size_t n, bool reported) {
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    Block* block = take_idle(bytes);
    if (block == nullptr) {
      void* ptr = nullptr;
      try {
        ptr = c10::alloc_cpu(bytes);
      } catch (const c10::Error&) {  // out of memory: give the idle blocks back, then try once more
        release();
        ptr = c10::alloc_cpu(bytes);
      }
      block = new Block{ptr, bytes, false};
      std::lock_guard<std::mutex> lock(mutex_);
      ++fresh_;
    }
    block->reported = reported;
    if (reported) report(block, +1);
    return block;
  }

  void put(Block* block) {
    if (block->reported) report(block, -1);
    std::vector<Block*> gone;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      MSDA_POISON(block->ptr, block->bytes);
      idle_.push_back(block);  // newest last: eviction takes from the front
      idle_bytes_ += static_cast<int64_t>(block->bytes);
      trim_locked(gone);
    }
    free_blocks(gone);
  }

  int64_t release() {
    std::vector<Block*> gone;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      gone.swap(idle_);
      idle_bytes_ = 0;
    }
    return free_blocks(gone);
  }

  int64_t set_limit(int64_t bytes) {
    std::vector<Block*> gone;
    int64_t previous;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = limit_;
      limit_ = std::max<int64_t>(bytes, 0);
      trim_locked(gone);
    }
    free_blocks(gone);
    return previous;
  }

  void stats(int64_t out[5]) {
    std::lock_guard<std::mutex> lock(mutex_);
    out[0] = idle_bytes_;
    out[1] = static_cast<int64_t>(idle_.size());
    out[2] = limit_;
    out[3] = reuses_;
    out[4] = fresh_;
  }

  // fork(): the child gets the lock unheld (pthread_atfork, below).
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

 private:
  // As torch's CPU allocator does, so that torch.profiler(profile_memory=True)
  // still sees the ops' outputs.
  void report(Block* block, int sign) {
    if (!c10::memoryProfilingEnabled()) return;
    const int64_t delta = sign * static_cast<int64_t>(block->bytes);
    size_t in_use, reserved;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      reported_bytes_ += delta;
      in_use = static_cast<size_t>(reported_bytes_);
      reserved = in_use + static_cast<size_t>(idle_bytes_);
    }
    c10::reportMemoryUsageToProfiler(block->ptr, delta, in_use, reserved, c10::Device(c10::DeviceType::CPU));
  }

  Block* take_idle(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if ((*it)->bytes >= bytes && (*it)->bytes <= bytes + bytes / 8 &&
          (best == idle_.end() || (*it)->bytes < (*best)->bytes)) {
        best = it;
      }
    }
    if (best == idle_.end()) return nullptr;
    Block* block = *best;
    idle_.erase(best);
    idle_bytes_ -= static_cast<int64_t>(block->bytes);
    ++reuses_;
    MSDA_UNPOISON(block->ptr, block->bytes);
    return block;
  }

  void trim_locked(std::vector<Block*>& gone) {
    size_t first_kept = 0;
    while (idle_bytes_ > limit_ && first_kept < idle_.size()) {
      idle_bytes_ -= static_cast<int64_t>(idle_[first_kept]->bytes);
      gone.push_back(idle_[first_kept++]);
    }
    idle_.erase(idle_.begin(), idle_.begin() + static_cast<std::ptrdiff_t>(first_kept));
  }

  static int64_t free_blocks(const std::vector<Block*>& blocks) {
    int64_t bytes = 0;
    for (Block* block : blocks) {
      MSDA_UNPOISON(block->ptr, block->bytes);
      c10::free_cpu(block->ptr);
      bytes += static_cast<int64_t>(block->bytes);
      delete block;
    }
    return bytes;
  }

  std::mutex mutex_;
  std::vector<Block*> idle_;
  int64_t idle_bytes_ = 0;
  int64_t limit_;
  int64_t reuses_ = 0;
  int64_t fresh_ = 0;
  int64_t reported_bytes_ = 0;
};

// Never destroyed: a tensor may die after static destructors have run.
BlockPool& pool() {
  static BlockPool* instance = [] {
    auto* created = new BlockPool();
    pthread_atfork([] { pool().lock(); }, [] { pool().unlock(); }, [] { pool().unlock(); });
    return created;
  }();
  return *instance;
}

void give_back(void* context) { pool().put(static_cast<Block*>(context)); }

// Blocks from the pool, as a c10::Allocator. Only working arrays come here
// below kMinBytes (cached_empty gives small outputs to at::empty): plain
// memory, as the std::vectors they replaced. Outputs are reported to torch's
// memory profiler; working arrays, like those vectors, are not.
class PoolAllocator final : public c10::Allocator {
 public:
  explicit PoolAllocator(bool outputs) : outputs_(outputs) {}
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) {
      void* ptr = c10::alloc_cpu(n);
      return {ptr, ptr, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    Block* block = pool().take(n, /*reported=*/outputs_);
    return {block->ptr, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  const bool outputs_;
};

PoolAllocator output_allocator(/*outputs=*/true);
PoolAllocator working_allocator(/*outputs=*/false);

at::Tensor empty_from(c10::Allocator* allocator, at::IntArrayRef sizes, c10::ScalarType dtype) {
  return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::MemoryFormat::Contiguous);
}

}  // namespace

int64_t release_cached_blocks() { return pool().release(); }
int64_t set_cache_limit(int64_t bytes) { return pool().set_limit(bytes); }
void cache_stats(int64_t out[5]) { pool().stats(out); }

CachedBytes::CachedBytes(int64_t bytes)
    : block_(bytes > 0 ? new at::Tensor(empty_from(&working_allocator, {bytes}, at::kByte)) : nullptr),
      data_(block_ != nullptr ? block_->data_ptr() : nullptr) {}

CachedBytes::~CachedBytes() { delete block_; }

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "cached_empty: a CPU tensor, got ", options.device());
  // Small outputs: at::empty itself, as before the cache (the same allocator,
  // and the same aten::empty event in torch's profiler).
  // (The size is ATen's own computation, which reports an overflow.)
  if (at::detail::computeStorageNbytesContiguous(sizes, options.dtype().itemsize()) < kMinBytes) {
    return at::empty(sizes, options);
  }
  return empty_from(&output_allocator, sizes, c10::typeMetaToScalarType(options.dtype()));
}

}  // namespace msda::cpu
