// The tile products for every CPU: compiled with the build's base flags (setup.py: x86-64-v2 on
// x86, the compiler's default elsewhere), vectorised by the compiler from GCC/Clang vector types.
#include <cstdint>

#include "cpu_kernels.h"

#define LALORA_ISA_NS lalora::isa_default::impl
#include "cpu_kernels_impl.h"

namespace lalora::isa_default {
const CpuKernels& kernels() {
  using namespace impl;
  static const CpuKernels k{"default", gemm_f32, gemm_f64, gram_dots_f32, gram_dots_f64,
                            gram_task_f32, gram_task_bf16, gram_task_f64};
  return k;
}
}  // namespace lalora::isa_default
