// The v2 op's CUDA host code (csrc/cuda/v2_launch.h) and kernels
// (v2_discrete_kernels.cuh, and v1's for method="default") compiled as host
// C++ and run on the CPU by the CUDA emulation (cuda_emulation.h), through
// the same launch macro, checked device copies and junk-filled allocations
// as emulated_ops.cpp does for v1 (emulated_launch.h).
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cuda_emulation.h"
#include "emulated_launch.h"

#include "cuda/v2_launch.h"

namespace {

using msda_emu::JunkFill;
using msda_emu::NoStream;

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   const std::vector<int64_t>& points_per_level, const std::string& method) {
  const JunkFill junk;
  return msda::cuda_v2_launch::forward(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights, points_per_level, method, NoStream{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights,
                                                        const std::vector<int64_t>& points_per_level,
                                                        const std::string& method, const at::Tensor& grad_output) {
  const JunkFill junk;
  return msda::cuda_v2_launch::backward(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, points_per_level, method, grad_output, NoStream{});
}

// The discrete pixel index of csrc/v2_discrete_index.h as this build compiles
// it (float32), for the boundary tests of the FMA-contracting build.
int64_t discrete_index(float loc, int64_t size) {
  return msda::discrete_index(loc, static_cast<float>(size), size);
}

// a * b + c in float32 as this build compiles it: one rounding where the
// compiler contracts it into a fused multiply-add (the ubsan-fma build), two
// otherwise. Shows that the contracting build really contracts.
float multiply_add(float a, float b, float c) { return a * b + c; }

#ifdef MSDA_EMU_UBSAN_FMA
constexpr bool kContractingBuild = true;
#else
constexpr bool kContractingBuild = false;
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msda's v2 CUDA kernels run on the CPU by a CUDA emulation (tests only)";
  m.def("forward", &forward, "emulated msda::ms_deform_attn_v2_forward (CUDA)");
  m.def("backward", &backward, "emulated msda::ms_deform_attn_v2_backward (CUDA)");
  m.def("discrete_index", &discrete_index, "msda::discrete_index<float> as compiled here");
  m.def("multiply_add", &multiply_add, "a * b + c in float32, as this build compiles it");
  m.attr("contracting_build") = kContractingBuild;
  msda_emu::bind_common(m);
}
