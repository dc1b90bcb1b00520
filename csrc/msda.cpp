// Schemas of msda's ops. The kernels live in csrc/cpu (CPU) and csrc/cuda
// (CUDA), each registering itself with TORCH_LIBRARY_IMPL; the fake kernels
// and the autograd formula are registered from Python (src/msda/ops.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu/clock.h"
#include "cpu/dispatch.h"

namespace {
using msda::cpu::Capability;

// Names of the capabilities, best first, for which `keep` holds.
template <typename Pred>
PyObject* capability_names(Pred keep) {
  PyObject* list = PyList_New(0);
  for (int c = msda::cpu::kCapabilityCount - 1; c >= 0 && list != nullptr; --c) {
    if (!keep(static_cast<Capability>(c))) continue;
    PyObject* name = PyUnicode_FromString(msda::cpu::capability_name(static_cast<Capability>(c)));
    if (name == nullptr || PyList_Append(list, name) != 0) Py_CLEAR(list);
    Py_XDECREF(name);
  }
  return list;
}

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(msda::cpu::capability_name(msda::cpu::chosen_capability()));
}
PyObject* cpu_capabilities_compiled(PyObject*, PyObject*) { return capability_names(msda::cpu::capability_compiled); }
PyObject* cpu_capabilities_allowed(PyObject*, PyObject*) {
  return capability_names(
      [](Capability c) { return msda::cpu::capability_compiled(c) && msda::cpu::capability_supported(c); });
}
PyObject* cpu_capability_refusal(PyObject*, PyObject*) {
  return PyUnicode_FromString(msda::cpu::refusal_message().c_str());
}

PyObject* measure_clock_hz(PyObject*, PyObject*) { return PyFloat_FromDouble(msda::cpu::measure_clock_hz()); }

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU kernels in use: 'avx512', 'avx2' or 'default' (chosen at import; MSDA_CPU_CAPABILITY)."},
    {"cpu_capabilities_compiled", cpu_capabilities_compiled, METH_NOARGS,
     "The CPU capabilities this build carries kernels for, best first."},
    {"cpu_capabilities_allowed", cpu_capabilities_allowed, METH_NOARGS,
     "The compiled CPU capabilities this CPU can run, best first (the values MSDA_CPU_CAPABILITY accepts)."},
    {"cpu_capability_refusal", cpu_capability_refusal, METH_NOARGS,
     "Why MSDA_CPU_CAPABILITY was not honoured, or '' (msda warns with it at import)."},
    {"measure_clock_hz", measure_clock_hz, METH_NOARGS,
     "The core clock in Hz, measured with a dependent add chain (0 if unknown); used by the benchmarks."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// `import msda._C` loads this library, which runs the static registrations
// (the schemas below, the kernels of every device and CPU capability); the
// module itself reports the CPU dispatch and measures the core clock for the
// benchmarks. The CPU capability is decided here, at import.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  msda::cpu::chosen_capability();
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
