// The tile products compiled for AVX-512 (F, VL, BW, DQ; x86 only; chosen at run time,
// cpu_capability.cpp), with the fp32 block product, tile transpose and lane sum in intrinsics.
#include <cstdint>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define LALORA_ISA_NS lalora::isa_avx512::impl
#define LALORA_ISA_AVX512 1
#include "cpu_kernels_impl.h"
#pragma GCC pop_options

namespace lalora::isa_avx512 {
const CpuKernels* kernels() {
  using namespace impl;
  static const CpuKernels k = LALORA_KERNEL_TABLE("avx512");
  return &k;
}
}  // namespace lalora::isa_avx512
#else
namespace lalora::isa_avx512 { const CpuKernels* kernels() { return nullptr; } }
#endif
