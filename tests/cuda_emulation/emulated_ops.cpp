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
#include "emulated_launch.h"

#include "cuda/ms_deform_attn_launch.h"
#include "selftest_kernels.h"

namespace {

using msda_emu::JunkFill;
using msda_emu::NoStream;

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
  if (name == "launch_dims") kernel = st::launch_dims;
  TORCH_CHECK(kernel, "no selftest kernel named ", name);
  MSDA_LAUNCH(kernel, dim3(blocks), dim3(threads), 0, NoStream{}, MSDA_IN(float, in), MSDA_OUT(float, out),
              in.numel());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msda's CUDA kernels run on the CPU by a CUDA emulation (tests only)";
  m.def("forward", &forward, "emulated msda::ms_deform_attn_forward (CUDA)");
  m.def("backward", &backward, "emulated msda::ms_deform_attn_backward (CUDA)");
  m.def("div_floor", &msda::cuda_kernels::div_floor, "the kernels' 64-bit division helper, run on the host");
  m.def("selftest", &selftest, "run a selftest kernel (selftest_kernels.h)", pybind11::arg("name"),
        pybind11::arg("in"), pybind11::arg("out"), pybind11::arg("threads"), pybind11::arg("blocks") = 1);
  msda_emu::bind_common(m);
}
