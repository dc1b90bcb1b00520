// The CUDA op (csrc/cuda/ms_deform_attn_launch.h: argument preparation,
// kernel choice, launch configuration; ms_deform_attn_kernels.cuh: the
// kernels) compiled as host C++ and run on the CPU by the CUDA emulation
// (cuda_emulation.h). CPU tensors play the part of device memory.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Flags.h>
#include <c10/util/Half.h>
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <limits>

#include "cuda_emulation.h"

#define MSDA_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::msda_emu::with_device_copies([&] { ::msda_emu::launch(kernel, grid, block, shared_bytes, __VA_ARGS__); })
#define MSDA_GRID_CAP (::msda_emu::g.grid_cap)
#define MSDA_POISON_OUTPUT(tensor) (tensor).fill_(std::numeric_limits<double>::quiet_NaN())

#include "cuda/ms_deform_attn_launch.h"
#include "selftest_kernels.h"

// Fill every CPU allocation with junk (NaN in float32) while an emulated op
// runs, so that an output the launch code forgets to zero (at::empty in place
// of at::zeros) is wrong every time, not only when the allocator hands back
// used memory. Only around the op: tensors made elsewhere (the tests' 9 GB
// untouched value) are not touched.
C10_DECLARE_bool(caffe2_cpu_allocator_do_junk_fill);

namespace {

struct NoStream {};

struct JunkFill {
  const bool previous = FLAGS_caffe2_cpu_allocator_do_junk_fill;
  JunkFill() { FLAGS_caffe2_cpu_allocator_do_junk_fill = true; }
  ~JunkFill() { FLAGS_caffe2_cpu_allocator_do_junk_fill = previous; }
};

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const JunkFill junk;
  return msda::cuda_launch::forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                    NoStream{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        const at::Tensor& grad_output) {
  const JunkFill junk;
  return msda::cuda_launch::backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                     grad_output, NoStream{});
}

// Runs one of selftest_kernels.h's kernels on `in`, writing to `out` (both
// float32), with `blocks` blocks of `threads` threads.
void selftest(const std::string& name, const at::Tensor& in, at::Tensor out, int threads, int blocks) {
  namespace st = msda::cuda_kernels::selftest;
  void (*kernel)(const float*, float*, int64_t) = nullptr;
  if (name == "read_past_end") kernel = st::read_past_end;
  if (name == "read_far_before") kernel = st::read_far_before;
  if (name == "write_past_end") kernel = st::write_past_end;
  if (name == "write_before_start") kernel = st::write_before_start;
  if (name == "shared_past_end") kernel = st::shared_past_end;
  if (name == "racy_add") kernel = st::racy_add;
  if (name == "atomic_add") kernel = st::atomic_add;
  if (name == "shared_read_before_barrier") kernel = st::shared_read_before_barrier;
  if (name == "shared_write_after_barrier") kernel = st::shared_write_after_barrier;
  if (name == "shared_with_barriers") kernel = st::shared_with_barriers;
  TORCH_CHECK(kernel, "no selftest kernel named ", name);
  MSDA_LAUNCH(kernel, dim3(blocks), dim3(threads), 0, NoStream{}, MSDA_IN(float, in), MSDA_OUT(float, out),
              in.numel());
}

pybind11::dict stats() {
  pybind11::dict d;
  d["launches"] = msda_emu::g.stats.launches;
  d["blocks"] = msda_emu::g.stats.blocks;
  d["threads"] = msda_emu::g.stats.threads;
  d["switches"] = msda_emu::g.stats.switches;
  d["atomics"] = msda_emu::g.stats.atomics;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msda's CUDA kernels run on the CPU by a CUDA emulation (tests only)";
  m.def("forward", &forward, "emulated msda::ms_deform_attn_forward (CUDA)");
  m.def("backward", &backward, "emulated msda::ms_deform_attn_backward (CUDA)");
  m.def("set_seed", [](uint64_t seed) { msda_emu::g.seed = seed; }, "seed of the block and thread order");
  m.def("div_floor", &msda::cuda_kernels::div_floor, "the kernels' 64-bit division helper, run on the host");
  m.def("stats", &stats, "launch, block, thread, context-switch and atomicAdd counts so far");
  m.def("selftest", &selftest, "run a selftest kernel (selftest_kernels.h)", pybind11::arg("name"),
        pybind11::arg("in"), pybind11::arg("out"), pybind11::arg("threads"), pybind11::arg("blocks") = 1);
  m.def("set_grid_cap", [](int64_t cap) { msda_emu::g.grid_cap = cap; },
        "largest grid.x the launch code may use (grid-stride loops do the rest)");
  m.def("set_shared_layout", &msda_emu::set_shared_layout,
        "(offset, bytes) of every __shared__ array in the section, for the red-zone checks");
}
