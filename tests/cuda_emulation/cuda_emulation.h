// A strict, single-threaded CUDA execution model on the CPU, enough to run
// msda's kernels (csrc/cuda/ms_deform_attn_kernels.cuh) unchanged as host C++.
//
// Every CUDA thread of a block is a fiber (its own stack, switched by a few
// instructions of assembly: creating an OS thread per CUDA thread costs about
// 14 ms per 256-thread block here, a barrier about 0.5 ms). A launch runs its
// real grid and block sizes, one block at a time, and is strict where a GPU
// would be wrong or undefined rather than forgiving:
//   * launch limits: 1024 threads per block, block (1024, 1024, 64), grid
//     x < 2^31, y and z <= 65535, no empty grid, 48 KB of shared memory;
//   * blocks and their threads run in a shuffled order (seeded, reproducible),
//     and threads switch only at __syncthreads and warp operations, so a
//     missing barrier lets one thread run far ahead of another;
//   * shared memory is poisoned (all bytes 0xFF: NaN) before each block
//     (memory_checks.h);
//   * every thread must reach each __syncthreads, at the same source line,
//     none having exited;
//   * warp shuffles: the caller must be in the mask, every named lane must
//     arrive at the same operation with the same mask, a lane may only read a
//     named lane, width is a power of two <= 32;
//   * vector loads/stores and atomics assert the alignment the GPU needs;
//   * shared memory has red zones between its arrays, checked after each
//     block, and every tensor the kernels touch is a copy fenced by poisoned
//     bytes and unmapped pages (memory_checks.h);
//   * atomics are counted (a plain `+=` in place of atomicAdd changes the count);
//   * the grid can be capped (set_grid_cap) so that grid-stride loops run
//     several rounds;
//   * built with ThreadSanitizer, conflicting accesses that no barrier or
//     atomic orders are reported (race_detection.h).
// An error stops the launch and throws std::runtime_error naming the block
// and thread.
//
// Include this after the torch headers and before the kernels, in exactly one
// translation unit (it defines the context-switch routine).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif

#define MSDA_EMULATION 1

#include "race_detection.h"

// ---- CUDA keywords -------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A __shared__ array is a static: blocks run one at a time, so a static is
// exactly a block's shared memory. Each one comes with a 4 KiB static of its
// own declared just before it, which the compiler places next to it: a red
// zone that memory_checks.h poisons before each block and checks after it.
// (A section attribute would be simpler, but GCC ignores it for statics of
// function templates.)
#define MSDA_EMU_CAT2(a, b) a##b
#define MSDA_EMU_CAT(a, b) MSDA_EMU_CAT2(a, b)
#define __shared__                                                                                        \
  __attribute__((used, aligned(4096))) static char MSDA_EMU_CAT(msda_emu_red_zone_, __LINE__)[4096]; \
  __attribute__((aligned(4096))) static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- fibers ----------------------------------------------------------------
// msda_emu_switch(save, to): push the callee-saved registers, store the stack
// pointer in *save, load `to` and pop the registers saved there.
extern "C" void msda_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl msda_emu_switch
.hidden msda_emu_switch
.type msda_emu_switch, @function
msda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size msda_emu_switch, .-msda_emu_switch
)");

namespace msda_emu {

constexpr int kWarp = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;
constexpr size_t kStackBytes = 128 * 1024;  // per fiber, plus a guard page

enum class State { Ready, Running, AtBarrier, AtWarpOp, Done };
enum class WarpOp { ShflIdx, ShflXor, ShflDown, ShflUp, SyncWarp };

inline const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::ShflIdx: return "__shfl_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::SyncWarp: return "__syncwarp";
  }
  return "?";
}

struct Fiber {
  void* sp = nullptr;
  uint3 thread_idx{0, 0, 0};
  int linear = 0, lane = 0, warp = 0;
  State state = State::Ready;
  int barrier_line = 0;
  // The pending warp operation.
  WarpOp op = WarpOp::SyncWarp;
  unsigned mask = 0;
  int src = 0;
  uint64_t payload = 0, result = 0;
};

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, switches = 0, atomics = 0;
};

struct Emulator {
  // Launch state.
  dim3 grid, block;
  uint3 block_idx{0, 0, 0}, block_dim{1, 1, 1}, grid_dim{1, 1, 1};
  std::function<void()> body;
  // Block state.
  std::vector<Fiber> fibers;
  std::vector<int> ready;
  std::vector<unsigned> warp_arrived;
  int threads = 0, at_barrier = 0, done = 0, barrier_line = 0;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  // Race detection's synchronisation objects of the running block: its
  // barrier, then one per warp (new for every block, so that blocks stay unordered).
  std::unique_ptr<char[]> sync_objects;
  // Which set of stacks (and race-detection fibers) the block runs on: with
  // race detection, consecutive blocks alternate between two, so that a
  // thread slot of one block and the same slot of the next are different
  // threads to TSan.
  int stack_set = 0;
  std::string error;
  std::mt19937_64 rng{0};
  uint64_t seed = 0x5eed;
  int64_t grid_cap = 0x7fffffff;  // largest grid.x the launch code may pick
  Stats stats;
  // Fiber stacks, allocated once for the largest block.
  char* stacks = nullptr;
  int stack_count = 0;
  size_t stack_stride = 0;

  ~Emulator() {
    if (stacks) munmap(stacks, stack_stride * stack_count);
  }
};

inline Emulator g;

[[noreturn]] inline void fail(const std::string& what);

inline std::string where(const Fiber* f) {
  std::ostringstream s;
  s << "block (" << g.block_idx.x << ", " << g.block_idx.y << ", " << g.block_idx.z << ")";
  if (f) s << ", thread (" << f->thread_idx.x << ", " << f->thread_idx.y << ", " << f->thread_idx.z << ")";
  return s.str();
}

// Called on a fiber: return to the scheduler; resumes when scheduled again.
inline void yield_to_scheduler() {
  race::harness_begin();
  ++g.stats.switches;
  Fiber* f = g.current;
  race::harness_end();
  race::to_scheduler();
  msda_emu_switch(&f->sp, g.scheduler_sp);
}

// Record the first error and leave the fiber for good: the scheduler throws.
[[noreturn]] inline void fail(const std::string& what) {
  race::harness_begin();  // this fiber never runs again (race::reset_fibers)
  if (g.error.empty()) g.error = "CUDA emulation: " + what + " (" + where(g.current) + ")";
  if (g.current) {
    g.current->state = State::Done;
    race::to_scheduler();
    msda_emu_switch(&g.current->sp, g.scheduler_sp);
  }
  race::harness_end();
  throw std::runtime_error(g.error);  // only reached outside a fiber
}

inline void make_ready(int i) {
  g.fibers[i].state = State::Ready;
  g.ready.push_back(i);
}

inline void finish_thread() {
  race::thread_end();
  race::harness_begin();
  Fiber* f = g.current;
  if (g.at_barrier > 0) fail("thread exited while other threads of its block wait at __syncthreads");
  const unsigned bit = 1u << f->lane;
  const unsigned arrived = g.warp_arrived[f->warp];
  for (int l = 0; l < kWarp; ++l) {
    if (arrived >> l & 1u) {
      const Fiber& other = g.fibers[f->warp * kWarp + l];
      if (other.mask & bit) fail(std::string("thread exited while lane ") + std::to_string(l) + " waits for it in " + op_name(other.op));
    }
  }
  f->state = State::Done;
  ++g.done;
  race::harness_end();
  race::to_scheduler();
  msda_emu_switch(&f->sp, g.scheduler_sp);
}

inline void fiber_entry() {
  race::thread_begin();
  g.body();
  finish_thread();
}

inline void ensure_stacks(int count) {
  if (count <= g.stack_count) return;
  if (g.stacks) munmap(g.stacks, g.stack_stride * g.stack_count);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  g.stack_stride = kStackBytes + page;
  void* mem = mmap(nullptr, g.stack_stride * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  if (mem == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot allocate fiber stacks");
  g.stacks = static_cast<char*>(mem);
  g.stack_count = count;
  for (int i = 0; i < count; ++i) mprotect(g.stacks + i * g.stack_stride, page, PROT_NONE);  // overflow guard
}

// A fresh stack whose first switch "returns" into fiber_entry with the
// alignment of a function entry (rsp % 16 == 8).
inline void* initial_stack(int i) {
  void** sp = reinterpret_cast<void**>(g.stacks + (i + 1) * g.stack_stride);
  *--sp = nullptr;  // fiber_entry's (never used) return address
  *--sp = reinterpret_cast<void*>(&fiber_entry);
  for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp, rbx, r12-r15
  return sp;
}

inline void poison_shared();
inline void check_shared_red_zones();
inline void release_device_copies();
inline void guard_device_faults(bool on);

inline void run_block(uint3 block_idx) {
  g.block_idx = block_idx;
  poison_shared();
  const int n = g.threads;
  for (int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    f = Fiber{};
    f.linear = i;
    f.thread_idx = {i % g.block.x, (i / g.block.x) % g.block.y, i / (g.block.x * g.block.y)};
    f.lane = i % kWarp;
    f.warp = i / kWarp;
    f.sp = initial_stack(g.stack_set * g.threads + i);
  }
  std::fill(g.warp_arrived.begin(), g.warp_arrived.end(), 0u);
  g.at_barrier = g.done = 0;
  g.ready.clear();
  g.sync_objects.reset(new char[1 + g.warp_arrived.size()]);
  for (int i = 0; i < n; ++i) g.ready.push_back(i);
  while (!g.ready.empty()) {
    const size_t j = g.rng() % g.ready.size();
    const int i = g.ready[j];
    g.ready[j] = g.ready.back();
    g.ready.pop_back();
    g.current = &g.fibers[i];
    g.current->state = State::Running;
    ++g.stats.switches;
    race::to_fiber(g.stack_set * g.threads + i);
    msda_emu_switch(&g.scheduler_sp, g.current->sp);
    g.current = nullptr;
    if (!g.error.empty()) {
      race::reset_fibers();
      throw std::runtime_error(g.error);
    }
  }
  g.sync_objects.reset();  // freed: TSan forgets their clocks
  if (g.done != n) {
    race::reset_fibers();
    std::ostringstream s;
    s << "CUDA emulation: deadlock in " << where(nullptr) << ": " << g.done << " of " << n << " threads finished, "
      << g.at_barrier << " wait at __syncthreads";
    for (const Fiber& f : g.fibers) {
      if (f.state == State::AtWarpOp) {
        s << "; lane " << f.lane << " of warp " << f.warp << " waits in " << op_name(f.op) << " with mask 0x"
          << std::hex << f.mask << std::dec;
        break;
      }
    }
    throw std::runtime_error(s.str());
  }
  check_shared_red_zones();
}

inline size_t shared_bytes_declared(void* kernel);

inline void check_launch(dim3 grid, dim3 block, size_t dynamic_shared, void* kernel) {
  std::ostringstream s;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0)
    s << "invalid configuration argument: empty grid (" << grid.x << ", " << grid.y << ", " << grid.z << ") or block";
  else if (threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64)
    s << "invalid configuration argument: block (" << block.x << ", " << block.y << ", " << block.z << ")";
  else if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    s << "invalid configuration argument: grid (" << grid.x << ", " << grid.y << ", " << grid.z << ")";
  const size_t shared = shared_bytes_declared(kernel) + dynamic_shared;
  if (s.str().empty() && shared > kMaxSharedBytes) s << "too much shared memory: " << shared << " bytes";
  if (!s.str().empty()) throw std::runtime_error("CUDA emulation: " + s.str());
}

// Runs kernel<<<grid, block, dynamic_shared>>>(args...) to completion.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dynamic_shared, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "wrong number of kernel arguments");
  check_launch(grid, block, dynamic_shared, reinterpret_cast<void*>(kernel));
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  struct Race {  // the threads see everything the host did before, and it sees all they did
    Race() { race::enter_launch(); }
    ~Race() { race::leave_launch(); }
  } race_scope;
  g.body = [&] { std::apply(kernel, params); };
  g.grid = grid;
  g.block = block;
  g.grid_dim = {grid.x, grid.y, grid.z};
  g.block_dim = {block.x, block.y, block.z};
  g.threads = static_cast<int>(block.x * block.y * block.z);
  constexpr int kStackSets = race::kEnabled ? 2 : 1;
  ensure_stacks(kStackSets * g.threads);
  race::ensure_fibers(kStackSets * g.threads);
  g.fibers.assign(g.threads, Fiber{});
  g.warp_arrived.assign((g.threads + kWarp - 1) / kWarp, 0u);
  g.rng.seed(g.seed + 0x9e3779b97f4a7c15ull * ++g.stats.launches);
  g.error.clear();
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), g.rng);
  for (uint64_t b : order) {
    g.stack_set = race::kEnabled ? (g.stack_set + 1) % 2 : 0;
    run_block({static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
               static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))});
  }
  g.stats.blocks += blocks;
  g.stats.threads += blocks * g.threads;
  g.body = nullptr;
}

// ---- synchronisation -------------------------------------------------------
inline void syncthreads(int line) {
  race::harness_begin();
  Fiber* f = g.current;
  if (g.done > 0) fail("__syncthreads reached after other threads of the block exited");
  if (g.at_barrier == 0) {
    g.barrier_line = line;
  } else if (g.barrier_line != line) {
    fail("threads wait at different __syncthreads (lines " + std::to_string(g.barrier_line) + " and " +
         std::to_string(line) + ")");
  }
  f->state = State::AtBarrier;
  if (++g.at_barrier == g.threads) {
    g.at_barrier = 0;
    for (int i = 0; i < g.threads; ++i) make_ready(i);
  }
  void* barrier = &g.sync_objects[0];
  race::harness_end();
  race::arrive(barrier);
  yield_to_scheduler();
  race::leave(barrier);
}

template <typename T>
T warp_op(WarpOp op, unsigned mask, T value, int arg, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "unsupported shuffle type");
  race::harness_begin();
  Fiber* f = g.current;
  const int lane = f->lane;
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0)
    fail(std::string(op_name(op)) + ": width " + std::to_string(width) + " is not a power of two <= 32");
  if (!(mask >> lane & 1u)) fail(std::string(op_name(op)) + ": the calling lane is not in the mask");
  const int lanes_here = std::min(kWarp, g.threads - f->warp * kWarp);
  const unsigned existing = lanes_here == kWarp ? 0xffffffffu : ((1u << lanes_here) - 1u);
  if (mask & ~existing) fail(std::string(op_name(op)) + ": the mask names lanes the block does not have");
  const int segment = lane & ~(width - 1);
  int src = lane;
  switch (op) {
    case WarpOp::ShflIdx: src = segment + (((arg % width) + width) % width); break;
    case WarpOp::ShflXor: src = lane ^ arg; if (src < 0 || src >= segment + width) src = lane; break;
    case WarpOp::ShflDown: src = (lane - segment) + arg < width ? lane + arg : lane; break;
    case WarpOp::ShflUp: src = lane - segment >= arg ? lane - arg : lane; break;
    case WarpOp::SyncWarp: break;
  }
  if (src != lane && !(mask >> src & 1u))
    fail(std::string(op_name(op)) + ": reads lane " + std::to_string(src) + ", which is not in the mask");
  unsigned& arrived = g.warp_arrived[f->warp];
  for (int l = 0; l < kWarp; ++l) {
    if (!(mask >> l & 1u) || l == lane) continue;
    const Fiber& other = g.fibers[f->warp * kWarp + l];
    if (other.state == State::Done) fail(std::string(op_name(op)) + ": lane " + std::to_string(l) + " has exited");
    if ((arrived >> l & 1u) && (other.mask != mask || other.op != op))
      fail(std::string(op_name(op)) + ": lane " + std::to_string(l) + " waits in " + op_name(other.op) +
           " with another mask");
  }
  f->op = op;
  f->mask = mask;
  f->src = src;
  f->payload = 0;
  std::memcpy(&f->payload, &value, sizeof(T));
  f->state = State::AtWarpOp;
  arrived |= 1u << lane;
  if ((arrived & mask) == mask) {  // everyone is here: exchange and release
    for (int l = 0; l < kWarp; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& member = g.fibers[f->warp * kWarp + l];
      member.result = g.fibers[f->warp * kWarp + member.src].payload;
      member.mask = 0;
      make_ready(member.linear);
    }
    arrived &= ~mask;
  }
  void* warp_sync = op == WarpOp::SyncWarp ? &g.sync_objects[1 + f->warp] : nullptr;  // shuffles order no memory
  race::harness_end();
  if (warp_sync) race::arrive(warp_sync);
  yield_to_scheduler();
  if (warp_sync) race::leave(warp_sync);
  race::harness_begin();
  T out;
  std::memcpy(&out, &f->result, sizeof(T));
  race::harness_end();
  return out;
}

template <typename T>
void check_aligned(const T* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    fail(std::string("misaligned ") + std::to_string(bytes) + "-byte access through " + what);
}

}  // namespace msda_emu

// ---- the CUDA names the kernels use ---------------------------------------
#define threadIdx (::msda_emu::g.current->thread_idx)
#define blockIdx (::msda_emu::g.block_idx)
#define blockDim (::msda_emu::g.block_dim)
#define gridDim (::msda_emu::g.grid_dim)
#define warpSize 32
#define __syncthreads() ::msda_emu::syncthreads(__LINE__)
#define MSDA_CHECK_ALIGNED(ptr, bytes) ::msda_emu::check_aligned((ptr), (bytes), #ptr)

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return msda_emu::warp_op(msda_emu::WarpOp::ShflIdx, mask, v, src_lane, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return msda_emu::warp_op(msda_emu::WarpOp::ShflXor, mask, v, lane_mask, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return msda_emu::warp_op(msda_emu::WarpOp::ShflDown, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return msda_emu::warp_op(msda_emu::WarpOp::ShflUp, mask, v, static_cast<int>(delta), width);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { msda_emu::warp_op(msda_emu::WarpOp::SyncWarp, mask, 0, 0, 32); }

// Atomics: real __atomic operations (relaxed, like CUDA's), so that race
// detection sees them as atomic; the alignment is checked as the GPU would,
// and the calls are counted.
template <typename T>
T emulated_atomic_add(T* address, T v) {
  msda_emu::check_aligned(address, sizeof(T), "atomicAdd");
  __atomic_fetch_add(&msda_emu::g.stats.atomics, 1, __ATOMIC_RELAXED);
  T old, sum;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  do {
    sum = old + v;
  } while (!__atomic_compare_exchange(address, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
inline float atomicAdd(float* address, float v) { return emulated_atomic_add(address, v); }
inline double atomicAdd(double* address, double v) { return emulated_atomic_add(address, v); }
inline int atomicAdd(int* address, int v) { return emulated_atomic_add(address, v); }
inline unsigned atomicAdd(unsigned* address, unsigned v) { return emulated_atomic_add(address, v); }

#include "memory_checks.h"
