// The tile products for every CPU: compiled with the build's base flags (setup.py: x86-64-v2 on
// x86, the compiler's default elsewhere), vectorised by the compiler from GCC/Clang vector types.
#include <cstdint>

#include "cpu_kernels.h"

#define LALORA_ISA_NS lalora::isa_default::impl
#include "cpu_kernels_impl.h"

namespace lalora::isa_default {
const CpuKernels& kernels() {
  using namespace impl;
  static const CpuKernels k = LALORA_KERNEL_TABLE("default");
  return k;
}
}  // namespace lalora::isa_default
