// The CUDA op (csrc/cuda/ms_deform_attn_launch.h: argument preparation,
// kernel choice, launch configuration; ms_deform_attn_kernels.cuh: the
// kernels) compiled as host C++ and run on the CPU by the CUDA emulation
// (cuda_emulation.h). CPU tensors play the part of device memory.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <limits>

#include "cuda_emulation.h"

#define MSDA_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::msda_emu::launch(kernel, grid, block, shared_bytes, __VA_ARGS__)
#define MSDA_POISON_OUTPUT(tensor) (tensor).fill_(std::numeric_limits<double>::quiet_NaN())

#include "cuda/ms_deform_attn_launch.h"

namespace {

struct NoStream {};

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  return msda::cuda_launch::forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                    NoStream{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        const at::Tensor& grad_output) {
  return msda::cuda_launch::backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                     grad_output, NoStream{});
}

pybind11::dict stats() {
  pybind11::dict d;
  d["launches"] = msda_emu::g.stats.launches;
  d["blocks"] = msda_emu::g.stats.blocks;
  d["threads"] = msda_emu::g.stats.threads;
  d["switches"] = msda_emu::g.stats.switches;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msda's CUDA kernels run on the CPU by a CUDA emulation (tests only)";
  m.def("forward", &forward, "emulated msda::ms_deform_attn_forward (CUDA)");
  m.def("backward", &backward, "emulated msda::ms_deform_attn_backward (CUDA)");
  m.def("set_seed", [](uint64_t seed) { msda_emu::g.seed = seed; }, "seed of the block and thread order");
  m.def("div_floor", &msda::cuda_kernels::div_floor, "the kernels' 64-bit division helper, run on the host");
  m.def("stats", &stats, "launch, block, thread and context-switch counts so far");
}
