// Registration of the C++ CPU ops and the Python module ``lalora_kernels._C``.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(lalora_cpp, m) {
  m.def("packed_cov_update_(Tensor(a!) P, Tensor X, Tensor? mask, float weight, int tile) -> ()");
  m.def("packed_gram(Tensor D, Tensor arena, int[] classes, int tile) -> (Tensor, Tensor)");
  m.def("packed_gram_quad(Tensor D, Tensor arena, int[] classes, int tile, Tensor C, bool grad) -> (Tensor, Tensor)");
  m.def("cpu_capability() -> str", &lalora::cpu_capability);
}

TORCH_LIBRARY_IMPL(lalora_cpp, CPU, m) {
  m.impl("packed_cov_update_", &lalora::packed_cov_update_);
  m.impl("packed_gram", &lalora::packed_gram);
  m.impl("packed_gram_quad", &lalora::packed_gram_quad);
}

// A Python module with no functions: importing lalora_kernels._C loads this library, whose static
// initialisers above register the ops with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "lalora C++ CPU ops", -1, nullptr};
  return PyModule_Create(&def);
}
