// The v2 op's CUDA host code (csrc/cuda/v2_launch.h) and kernels
// (v2_discrete_kernels.cuh, and v1's for method="default") compiled as host
// C++ and run on the CPU by the CUDA emulation (cuda_emulation.h), as
// emulated_ops.cpp does for v1.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <limits>
#include <string>
#include <vector>

#include "cuda_emulation.h"

#define MSDA_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::msda_emu::with_device_copies([&] { ::msda_emu::launch(kernel, grid, block, shared_bytes, __VA_ARGS__); })
#define MSDA_GRID_CAP (::msda_emu::g.grid_cap)
#define MSDA_POISON_OUTPUT(tensor) (tensor).fill_(std::numeric_limits<double>::quiet_NaN())

#include "cuda/v2_launch.h"

namespace {

struct NoStream {};

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   const std::vector<int64_t>& points_per_level, const std::string& method) {
  return msda::cuda_v2_launch::forward(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights, points_per_level, method, NoStream{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        const std::vector<int64_t>& points_per_level,
                                                        const std::string& method, const at::Tensor& grad_output) {
  return msda::cuda_v2_launch::backward(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, points_per_level, method, grad_output, NoStream{});
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msda's v2 CUDA kernels run on the CPU by a CUDA emulation (tests only)";
  m.def("forward", &forward, "emulated msda::ms_deform_attn_v2_forward (CUDA)");
  m.def("backward", &backward, "emulated msda::ms_deform_attn_v2_backward (CUDA)");
  m.def("set_seed", [](uint64_t seed) { msda_emu::g.seed = seed; }, "seed of the block and thread order");
  // What tests/cuda_emulation/build.py and the memory checks expect of every emulation module.
  m.def("set_grid_cap", [](int64_t cap) { msda_emu::g.grid_cap = cap; },
        "largest grid.x the launch code may use (grid-stride loops do the rest)");
  m.def("set_shared_layout", &msda_emu::set_shared_layout,
        "(offset, bytes) of every __shared__ array in the section, for the red-zone checks");
}
