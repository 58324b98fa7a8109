// The instruction-set-specific part of the C++ CPU kernels: the register-blocked tile products,
// compiled once per x86 instruction set (isa_*.cpp) and chosen at run time (cpu_capability.cpp).
// Everything else (scheduling, op entry points) is plain C++ and shared.
#pragma once

#include <cstdint>

namespace lalora {

// One set of kernels, compiled for one instruction set.
struct CpuKernels {
  const char* name;  // "avx512", "avx2" or "default" (ATen's names for the same levels)
  // C (M x N, row stride ldc) += A (M x K, lda) . B (K x N, ldb)
  void (*gemm_f32)(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                   float* C, int64_t ldc);
  void (*gemm_f64)(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                   double* C, int64_t ldc);
  // G (R x R) = U (R x K, ldu) . V^T (R x K, ldv), lanes summed in a fixed order
  void (*gram_dots_f32)(int64_t R, int64_t K, const float* U, int64_t ldu, const float* V, int64_t ldv, float* G);
  void (*gram_dots_f64)(int64_t R, int64_t K, const double* U, int64_t ldu, const double* V, int64_t ldv,
                        double* G);
  // U (R x ld) += the products of tile rows [I0, I1) of one packed factor with the padded rows dp
  // (R x ld): tile (I, J) adds D_I S_IJ to block J of U and, for I < J, D_J S_IJ^T to block I.
  // The factor is fp32, fp64, or bf16 bits widened to fp32 one tile at a time.
  void (*gram_task_f32)(const float* sp, const float* dp, int64_t R, int64_t nt, int64_t T, int64_t ld, int64_t I0,
                        int64_t I1, float* U);
  void (*gram_task_bf16)(const uint16_t* sp, const float* dp, int64_t R, int64_t nt, int64_t T, int64_t ld,
                         int64_t I0, int64_t I1, float* U);
  void (*gram_task_f64)(const double* sp, const double* dp, int64_t R, int64_t nt, int64_t T, int64_t ld,
                        int64_t I0, int64_t I1, double* U);
};

// An isa_*.cpp file's table, from the entry points its included cpu_kernels_impl.h defined.
#define LALORA_KERNEL_TABLE(NAME) \
  { NAME, gemm_f32, gemm_f64, gram_dots_f32, gram_dots_f64, gram_task_f32, gram_task_bf16, gram_task_f64 }

// The kernels of each instruction set this build carries (nullptr where it carries none).
namespace isa_default { const CpuKernels& kernels(); }
namespace isa_avx2 { const CpuKernels* kernels(); }
namespace isa_avx512 { const CpuKernels* kernels(); }

// The set in use: the best this CPU runs, capped by LALORA_CPU_CAPABILITY (or, when that is unset,
// ATEN_CPU_CAPABILITY): "default", "avx2" or "avx512". Read once, on first use.
const CpuKernels& cpu_kernels();

// Typed access for templated callers.
inline void gemm(const CpuKernels& k, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc) { k.gemm_f32(M, N, K, A, lda, B, ldb, C, ldc); }
inline void gemm(const CpuKernels& k, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                 const double* B, int64_t ldb, double* C, int64_t ldc) { k.gemm_f64(M, N, K, A, lda, B, ldb, C, ldc); }
inline void gram_dots(const CpuKernels& k, int64_t R, int64_t K, const float* U, int64_t ldu, const float* V,
                      int64_t ldv, float* G) { k.gram_dots_f32(R, K, U, ldu, V, ldv, G); }
inline void gram_dots(const CpuKernels& k, int64_t R, int64_t K, const double* U, int64_t ldu, const double* V,
                      int64_t ldv, double* G) { k.gram_dots_f64(R, K, U, ldu, V, ldv, G); }

}  // namespace lalora
