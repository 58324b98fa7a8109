// lalora_kernels._C: the C++ CPU kernels as plain Python functions. They are not operators of
// their own: each is the CPU kernel of the lalora:: operator of the same name, whose one schema,
// fake, autograd and input checks live in lalora_kernels/ops.py; that op's CPU kernel calls these.
#include <torch/extension.h>

#include "cpu_kernels.h"
#include "ops.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "lalora_kernels C++ CPU kernels (called by the lalora:: ops; see lalora_kernels/ops.py)";
  m.def("packed_cov_update_", &lalora::packed_cov_update_, "S += w X^T diag(m) X on a tile-packed S");
  m.def("grouped_gram", &lalora::grouped_gram, "Q_k = D_k S_k, G_k = Q_k D_k^T for every bundle");
  m.def("grouped_gram_quad", &lalora::grouped_gram_quad, "grouped_gram with the kfac/tri penalty epilogue");
  m.def("cpu_capability", [] { return std::string(lalora::cpu_kernels().name); },
        "instruction set of the tile products in use: avx512, avx2 or default");
}
