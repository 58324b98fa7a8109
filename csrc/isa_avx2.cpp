// The tile products compiled for AVX2 + FMA (x86 only; chosen at run time, cpu_capability.cpp).
#include <cstdint>

#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define LALORA_ISA_NS lalora::isa_avx2::impl
#include "cpu_kernels_impl.h"
#pragma GCC pop_options

namespace lalora::isa_avx2 {
const CpuKernels* kernels() {
  using namespace impl;
  static const CpuKernels k = LALORA_KERNEL_TABLE("avx2");
  return &k;
}
}  // namespace lalora::isa_avx2
#else
namespace lalora::isa_avx2 { const CpuKernels* kernels() { return nullptr; } }
#endif
