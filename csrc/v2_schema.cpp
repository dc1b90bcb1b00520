// Schemas of the v2 op (RT-DETRv2, D-FINE, DEIM: points per level and
// discrete sampling), a fragment of the msda library defined in msda.cpp.
// Kernels: csrc/cpu/v2_ms_deform_attn_cpu.cpp, csrc/cuda/v2_ms_deform_attn_cuda.cu;
// fake kernels and autograd: src/msda/ops_v2.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(msda, m) {
  m.def(
      "ms_deform_attn_v2_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int[] points_per_level, str method) -> Tensor");
  m.def(
      "ms_deform_attn_v2_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int[] points_per_level, str method, "
      "Tensor grad_output) -> (Tensor, Tensor, Tensor)");
}
