// What both emulated ops (emulated_ops.cpp for v1, emulated_ops_v2.cpp for
// v2) put around csrc/cuda's launch code, defined once: the launch macro, the
// grid cap, output poisoning, junk-filled allocations, and the Python
// bindings every emulation module has. Include after cuda_emulation.h and
// before csrc/cuda's launch headers.
//
// MSDA_LAUNCH takes its arguments in the order of the real macro
// (csrc/cuda/launch_check.h: kernel<<<grid, block, shared_bytes, stream>>>);
// tests/test_cuda_emulation_launch.py checks that both stay in that order.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Flags.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>

#define MSDA_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::msda_emu::with_device_copies([&] { ::msda_emu::launch(kernel, grid, block, shared_bytes, __VA_ARGS__); })
#define MSDA_GRID_CAP (::msda_emu::g.grid_cap)
#define MSDA_POISON_OUTPUT(tensor) (tensor).fill_(std::numeric_limits<double>::quiet_NaN())

C10_DECLARE_bool(caffe2_cpu_allocator_do_junk_fill);

namespace msda_emu {

// The stream argument of the launch code; the emulation has none.
struct NoStream {};

// Fill every CPU allocation with junk (NaN in float32) while an emulated op
// runs, so that an output the launch code forgets to zero (at::empty in place
// of at::zeros) is wrong every time, not only when the allocator hands back
// used memory. Only around the op: tensors made elsewhere (the tests' 9 GB
// untouched value) are not touched.
struct JunkFill {
  const bool previous = FLAGS_caffe2_cpu_allocator_do_junk_fill;
  JunkFill() { FLAGS_caffe2_cpu_allocator_do_junk_fill = true; }
  ~JunkFill() { FLAGS_caffe2_cpu_allocator_do_junk_fill = previous; }
};

inline pybind11::dict stats_dict() {
  pybind11::dict d;
  d["launches"] = g.stats.launches;
  d["blocks"] = g.stats.blocks;
  d["threads"] = g.stats.threads;
  d["switches"] = g.stats.switches;
  d["atomics"] = g.stats.atomics;
  return d;
}

// The bindings tests/cuda_emulation/build.py and the tests expect of every emulation module.
inline void bind_common(pybind11::module_& m) {
  m.def("set_seed", [](uint64_t seed) { g.seed = seed; }, "seed of the block and thread order");
  m.def("stats", &stats_dict, "launch, block, thread, context-switch and atomicAdd counts so far");
  m.def("set_grid_cap", [](int64_t cap) { g.grid_cap = cap; },
        "largest grid.x the launch code may use (grid-stride loops do the rest)");
  m.def("set_shared_layout", &set_shared_layout,
        "(offset, bytes) of every __shared__ array in the section, for the red-zone checks");
}

}  // namespace msda_emu
