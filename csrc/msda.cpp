// Schemas of msda's ops. The kernels live in csrc/cpu (CPU) and csrc/cuda
// (CUDA), each registering itself with TORCH_LIBRARY_IMPL; the fake kernels
// and the autograd formula are registered from Python (src/msda/ops.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu/clock.h"
#include "cpu/vector_path.h"

namespace {
PyObject* vector_path(PyObject*, PyObject*) { return PyUnicode_FromString(msda::cpu::vector_path()); }

PyObject* measure_clock_hz(PyObject*, PyObject*) { return PyFloat_FromDouble(msda::cpu::measure_clock_hz()); }

PyMethodDef methods[] = {
    {"vector_path", vector_path, METH_NOARGS, "The CPU kernels' vector instructions: AVX-512, AVX2 or portable."},
    {"measure_clock_hz", measure_clock_hz, METH_NOARGS,
     "The core clock in Hz, measured with a dependent add chain (0 if unknown); used by the benchmarks."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// `import msda._C` loads this library, which runs the static registrations
// below; the module itself only tells which CPU code path was compiled and
// measures the core clock for the benchmarks.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "msda's compiled kernels", -1, methods, nullptr, nullptr, nullptr, nullptr};
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
