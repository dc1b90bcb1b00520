// Schemas of msda's ops. The kernels live in csrc/cpu (CPU) and csrc/cuda
// (CUDA), each registering itself with TORCH_LIBRARY_IMPL; the fake kernels
// and the autograd formula are registered from Python (src/msda/ops.py).
#include <Python.h>
#include <torch/library.h>

// An empty Python module, so that `import msda._C` loads this library and
// runs the static registrations below.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "msda's compiled kernels", -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(msda, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
}
