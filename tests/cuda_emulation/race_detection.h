// Race detection for the CUDA emulation: ThreadSanitizer annotations, active
// when the harness is built with -fsanitize=thread -DMSDA_EMU_TSAN
// (tests/cuda_emulation/tsan_check.py), no-ops otherwise.
//
// Fibers run one at a time, so without annotations TSan sees one thread and
// nothing races. With them:
//  * every CUDA thread of a stack slot is a TSan fiber, and every switch, to a
//    fiber and back to the scheduler, is __tsan_switch_to_fiber(...,
//    no_sync): switching orders nothing, as on a GPU;
//  * what does order threads is annotated: the start of a launch (the
//    scheduler's release, each thread's acquire), its end (the reverse),
//    __syncthreads (release on arrival, acquire on leaving; one object per
//    block) and __syncwarp (one per warp); warp shuffles exchange values but
//    order no memory;
//  * atomics are real __atomic operations (cuda_emulation.h);
//  * the harness's own bookkeeping (the scheduler, barrier and shuffle
//    state) runs with the thread's accesses ignored;
//  * a block's shared arrays are new memory to TSan at the start of each
//    block (on a GPU each block has its own): their pages are mapped afresh,
//    which TSan records as a write by the scheduler, released to the block's
//    threads. (AnnotateNewMemory is a no-op in this libtsan.)
// A slot's fiber runs that slot's thread in every block, so two blocks'
// threads of the same slot are ordered; any other pair is not.
#pragma once

#include <cstddef>
#include <vector>

#ifdef MSDA_EMU_TSAN
#include <sanitizer/tsan_interface.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <stdexcept>
// Exported by libtsan but not declared in its public header.
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

namespace msda_emu {
namespace race {

#ifdef MSDA_EMU_TSAN
constexpr bool kEnabled = true;
inline void* scheduler = nullptr;
inline std::vector<void*> fibers;  // one per stack slot
inline char launch_begin, launch_end;

inline void ensure_fibers(size_t n) {
  while (fibers.size() < n) fibers.push_back(__tsan_create_fiber(0));
}
// After an error a fiber may have been left inside the harness (accesses
// ignored) or mid-kernel: start over with new ones.
inline void reset_fibers() {
  for (void* f : fibers) __tsan_destroy_fiber(f);
  fibers.clear();
}
inline void enter_launch() {
  __atomic_store_n(&scheduler, __tsan_get_current_fiber(), __ATOMIC_RELAXED);  // read by the threads at any time
  __tsan_release(&launch_begin);
  __tsan_ignore_thread_begin();
}
inline void leave_launch() {
  __tsan_ignore_thread_end();
  __tsan_acquire(&launch_end);
}
inline void to_fiber(int i) { __tsan_switch_to_fiber(fibers[i], __tsan_switch_to_fiber_no_sync); }
inline void to_scheduler() {
  __tsan_switch_to_fiber(__atomic_load_n(&scheduler, __ATOMIC_RELAXED), __tsan_switch_to_fiber_no_sync);
}
inline void harness_begin() { __tsan_ignore_thread_begin(); }
inline void harness_end() { __tsan_ignore_thread_end(); }
inline void thread_begin() { __tsan_acquire(&launch_begin); }
inline void thread_end() { __tsan_release(&launch_end); }
inline void arrive(void* sync) { __tsan_release(sync); }
inline void leave(void* sync) { __tsan_acquire(sync); }
// The whole pages of [p, p + n): mapped afresh (zeros), then released to the
// threads of the block about to run. Called by the scheduler before the block.
inline void new_memory(void* p, size_t n) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
  if (end > begin && mmap(reinterpret_cast<void*>(begin), end - begin, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
    throw std::runtime_error("CUDA emulation: cannot map shared memory afresh");
  __tsan_release(&launch_begin);
}
#else
constexpr bool kEnabled = false;
inline void ensure_fibers(size_t) {}
inline void reset_fibers() {}
inline void enter_launch() {}
inline void leave_launch() {}
inline void to_fiber(int) {}
inline void to_scheduler() {}
inline void harness_begin() {}
inline void harness_end() {}
inline void thread_begin() {}
inline void thread_end() {}
inline void arrive(void*) {}
inline void leave(void*) {}
inline void new_memory(void*, size_t) {}
#endif

}  // namespace race
}  // namespace msda_emu
