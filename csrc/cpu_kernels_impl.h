// The tile products of the C++ CPU kernels, written once and compiled per instruction set: an
// isa_*.cpp file defines LALORA_ISA_NS (and LALORA_ISA_AVX512 for the AVX-512 intrinsics), switches
// the compiler's target with `#pragma GCC target`, then includes this file. Only this file's own
// functions are defined under that target: it includes no header and instantiates no template of
// the standard library, so no inline function compiled for a wider instruction set can be shared
// with (and picked by the linker for) code that runs on every CPU.
//
// Kernel shapes (row-major, explicit row strides):
//   micro / gemm_rows / gemm: C (M x N) += A (M x K) . B (K x N), register-blocked MR x 32 columns,
//     vectorised along N with GCC/Clang vector extensions (64-byte vectors: one AVX-512 register,
//     two AVX2 ones, four SSE ones), the fp32 block with AVX-512 intrinsics where available.
//   gram_dots: G = U V^T by dot products along rows, lanes summed once in a fixed tree order.
//   gram_task: one task of the packed product (see cpu_kernels.h).
// Every loop runs in a fixed order, so a kernel gives the same bits on every call; different
// instruction sets may round differently (FMA contraction), which tests allow for.

namespace LALORA_ISA_NS {

template <typename T> inline T lmin(T a, T b) { return a < b ? a : b; }
template <typename T> inline T lmax(T a, T b) { return a < b ? b : a; }

template <typename S, int BYTES> struct Vec;
template <> struct Vec<float, 64> { typedef float type __attribute__((vector_size(64), aligned(4))); };
template <> struct Vec<float, 32> { typedef float type __attribute__((vector_size(32), aligned(4))); };
template <> struct Vec<double, 64> { typedef double type __attribute__((vector_size(64), aligned(8))); };
template <> struct Vec<double, 32> { typedef double type __attribute__((vector_size(32), aligned(8))); };

// A block of MR rows x NV vectors keeps its part of C in registers across the whole k loop.
template <typename S, int BYTES, int MR, int NV>
inline void micro(int64_t K, const S* __restrict A, int64_t lda, const S* __restrict B, int64_t ldb,
                  S* __restrict C, int64_t ldc) {
  using V = typename Vec<S, BYTES>::type;
  constexpr int W = BYTES / sizeof(S);
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = *reinterpret_cast<const V*>(C + i * ldc + v * W);
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const V*>(B + k * ldb + v * W);
    for (int i = 0; i < MR; ++i) {
      const S a = A[i * lda + k];
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(C + i * ldc + v * W) = acc[i][v];
}

#if defined(LALORA_ISA_AVX512)
// The fp32 MR x 32 block with AVX-512 intrinsics: GCC's code for the vector-extension form copies
// accumulators between registers and through the stack around the k loop; with intrinsics the
// 2 MR accumulators stay in place and every step is 2 loads, MR broadcasts and 2 MR FMAs.
template <int MR>
inline void micro_f32(int64_t K, const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                      float* __restrict C, int64_t ldc) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) { c0[i] = _mm512_loadu_ps(C + i * ldc); c1[i] = _mm512_loadu_ps(C + i * ldc + 16); }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(B + k * ldb), b1 = _mm512_loadu_ps(B + k * ldb + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) { _mm512_storeu_ps(C + i * ldc, c0[i]); _mm512_storeu_ps(C + i * ldc + 16, c1[i]); }
}
#endif

template <typename S, int MR>
inline void gemm_rows(int64_t N, int64_t K, const S* A, int64_t lda, const S* B, int64_t ldb, S* C, int64_t ldc) {
  constexpr int W = 64 / sizeof(S), H = 32 / sizeof(S);
  int64_t j = 0;
#if defined(LALORA_ISA_AVX512)
  if constexpr (sizeof(S) == 4)
    for (; j + 32 <= N; j += 32) micro_f32<MR>(K, A, lda, B + j, ldb, C + j, ldc);
#endif
  for (; j + 2 * W <= N; j += 2 * W) micro<S, 64, MR, 2>(K, A, lda, B + j, ldb, C + j, ldc);
  for (; j + W <= N; j += W) micro<S, 64, MR, 1>(K, A, lda, B + j, ldb, C + j, ldc);
  for (; j + H <= N; j += H) micro<S, 32, MR, 1>(K, A, lda, B + j, ldb, C + j, ldc);
  for (; j < N; ++j)                       // columns left over when N is not a multiple of H
    for (int i = 0; i < MR; ++i) {
      S c = C[i * ldc + j];
      for (int64_t k = 0; k < K; ++k) c += A[i * lda + k] * B[k * ldb + j];
      C[i * ldc + j] = c;
    }
}

// C += A . B in row blocks of 8, then 4, then single rows.
template <typename S>
void gemm(int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* B, int64_t ldb, S* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 8 <= M; i += 8) gemm_rows<S, 8>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
  for (; i + 4 <= M; i += 4) gemm_rows<S, 4>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
  for (; i < M; ++i) gemm_rows<S, 1>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
}

// dst = src^T for one contiguous T x T tile (both row stride T), in 8 x 8 blocks so that both
// sides stay within a few cache lines.
template <typename S>
inline void transpose_blocked(const S* __restrict src, S* __restrict dst, int64_t T) {
  for (int64_t i0 = 0; i0 < T; i0 += 8)
    for (int64_t j0 = 0; j0 < T; j0 += 8)
      for (int64_t i = i0; i < lmin(T, i0 + 8); ++i)
        for (int64_t j = j0; j < lmin(T, j0 + 8); ++j) dst[j * T + i] = src[i * T + j];
}

#if defined(LALORA_ISA_AVX512)
// fp32 16 x 16 block transpose in registers: unpack pairs of rows, then 4-wide groups, then
// 128-bit lanes twice.
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[4g + k], lane l: column 4l + k of rows 4g .. 4g+3
#pragma GCC unroll 4
  for (int g = 0; g < 16; g += 4) {
    r[g] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
    r[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
    r[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    r[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);          // lanes 0, 2 of row groups 0, 1
    t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);      // lanes 1, 3
    t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);  // lanes 0, 2 of row groups 2, 3
    t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD); // lanes 1, 3
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    _mm512_storeu_ps(dst + k * ldd, _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88));             // column k
    _mm512_storeu_ps(dst + (8 + k) * ldd, _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD));       // column 8 + k
    _mm512_storeu_ps(dst + (4 + k) * ldd, _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0x88));  // column 4 + k
    _mm512_storeu_ps(dst + (12 + k) * ldd, _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0xDD)); // column 12 + k
  }
}
#endif

template <typename S>
inline void transpose_tile(const S* __restrict src, S* __restrict dst, int64_t T) {
#if defined(LALORA_ISA_AVX512)
  if constexpr (sizeof(S) == 4) {
    if (T % 16 == 0) {
      for (int64_t i0 = 0; i0 < T; i0 += 16)
        for (int64_t j0 = 0; j0 < T; j0 += 16) transpose16(src + i0 * T + j0, T, dst + j0 * T + i0, T);
      return;
    }
  }
#endif
  transpose_blocked(src, dst, T);
}

// Sum of one 64-byte vector's lanes, as a tree (the plain loop is a serial chain of W adds).
template <typename S>
inline S lane_sum(typename Vec<S, 64>::type v) {
#if defined(LALORA_ISA_AVX512)
  if constexpr (sizeof(S) == 4) return _mm512_reduce_add_ps((__m512)v);
#endif
  constexpr int W = 64 / sizeof(S);
  S l[W];
  for (int i = 0; i < W; ++i) l[i] = v[i];
  for (int h = W / 2; h > 0; h /= 2)
    for (int i = 0; i < h; ++i) l[i] += l[i + h];
  return l[0];
}

// G (R x R, row stride R) = U (R x K, ldu) . V^T (V: R x K, ldv), as dot products along the rows
// in blocks of 4 x 4, vector lanes summed once at the end.
template <typename S>
void gram_dots(int64_t R, int64_t K, const S* U, int64_t ldu, const S* V, int64_t ldv, S* G) {
  using Vv = typename Vec<S, 64>::type;
  constexpr int W = 64 / sizeof(S);
  const int64_t Kv = K / W * W;
  for (int64_t r0 = 0; r0 < R; r0 += 4)
    for (int64_t s0 = 0; s0 < R; s0 += 4) {
      const S *u[4], *v[4];
      for (int i = 0; i < 4; ++i) {        // rows past R repeat the last one; their sums are dropped
        u[i] = U + lmin(r0 + i, R - 1) * ldu;
        v[i] = V + lmin(s0 + i, R - 1) * ldv;
      }
      Vv acc[4][4] = {};
      for (int64_t k = 0; k < Kv; k += W) {
        Vv a[4], b[4];
        for (int i = 0; i < 4; ++i) {
          a[i] = *reinterpret_cast<const Vv*>(u[i] + k);
          b[i] = *reinterpret_cast<const Vv*>(v[i] + k);
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
      for (int i = 0; i < 4 && r0 + i < R; ++i)
        for (int j = 0; j < 4 && s0 + j < R; ++j) {
          S sum = lane_sum<S>(acc[i][j]);
          for (int64_t k = Kv; k < K; ++k) sum += u[i][k] * v[j][k];
          G[(r0 + i) * R + s0 + j] = sum;
        }
    }
}

// tt numbers of a tile in the compute type: the tile itself, or bf16 widened to fp32 (its bits
// are fp32's upper half) into buf.
inline const float* widen(const float* src, int64_t, float*) { return src; }
inline const double* widen(const double* src, int64_t, double*) { return src; }
inline const float* widen(const uint16_t* src, int64_t tt, float* buf) {
  uint32_t* out = reinterpret_cast<uint32_t*>(buf);
  for (int64_t e = 0; e < tt; ++e) out[e] = uint32_t(src[e]) << 16;
  return buf;
}

constexpr int64_t CB = 16;            // tiles per column block (512 columns at T = 32)
constexpr int64_t PREFETCH = 8;       // software prefetch distance, in tiles
constexpr int64_t L2_BYTES = int64_t(1) << 19;   // U + padded D up to this: tiles in storage order

// One task of the packed product (cpu_kernels.h). While the partial U and the padded D fit in L2
// the tiles are read in storage order, one stream that the software prefetch follows across row
// ends; for wider R * ld they are visited by column blocks, so the blocks of U being updated stay
// in cache.
template <typename S, typename Stored>
void gram_task(const Stored* sp, const S* dp, int64_t R, int64_t nt, int64_t T, int64_t ld, int64_t I0, int64_t I1,
               S* U) {
  alignas(64) S St[64 * 64];                 // the transposed tile (T <= 64)
  alignas(64) S Sw[64 * 64];                 // the tile widened from bf16
  const bool linear = 2 * R * ld * (int64_t)sizeof(S) <= L2_BYTES;
  const int64_t cb = linear ? nt : CB;
  const int64_t tt = T * T;
  auto row_start = [nt](int64_t I) { return I * nt - I * (I - 1) / 2; };
  const int64_t task_end = row_start(I1) * tt;   // in numbers from sp
  for (int64_t Jb = I0; Jb < nt; Jb += cb) {
    const int64_t Je = lmin(nt, Jb + cb);
    for (int64_t I = I0; I < lmin(I1, Je); ++I) {
      const int64_t row = row_start(I) * tt;
      for (int64_t J = lmax(I, Jb); J < Je; ++J) {
        // software prefetch, into L2, of the tile PREFETCH tiles ahead in the order of reading: one
        // core's demand misses alone do not keep enough lines in flight to stream at memory speed
        const int64_t ahead = row + (J + PREFETCH - I) * tt;
        if (linear ? ahead < task_end : J + PREFETCH < Je)
          for (int64_t o = 0; o < tt * (int64_t)sizeof(Stored); o += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(sp + ahead) + o, 0, 1);
        const S* tile = widen(sp + row + (J - I) * tt, tt, Sw);
        gemm<S>(R, T, T, dp + I * T, ld, tile, T, U + J * T, ld);         // U_J += D_I S_IJ
        if (J == I) continue;
        transpose_tile<S>(tile, St, T);
        gemm<S>(R, T, T, dp + J * T, ld, St, T, U + I * T, ld);           // U_I += D_J S_IJ^T
      }
    }
  }
}

// The non-template entry points that the kernel table points at.
void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc) { gemm<float>(M, N, K, A, lda, B, ldb, C, ldc); }
void gemm_f64(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
              double* C, int64_t ldc) { gemm<double>(M, N, K, A, lda, B, ldb, C, ldc); }
void gram_dots_f32(int64_t R, int64_t K, const float* U, int64_t ldu, const float* V, int64_t ldv, float* G) {
  gram_dots<float>(R, K, U, ldu, V, ldv, G);
}
void gram_dots_f64(int64_t R, int64_t K, const double* U, int64_t ldu, const double* V, int64_t ldv, double* G) {
  gram_dots<double>(R, K, U, ldu, V, ldv, G);
}
void gram_task_f32(const float* sp, const float* dp, int64_t R, int64_t nt, int64_t T, int64_t ld, int64_t I0,
                   int64_t I1, float* U) { gram_task<float, float>(sp, dp, R, nt, T, ld, I0, I1, U); }
void gram_task_bf16(const uint16_t* sp, const float* dp, int64_t R, int64_t nt, int64_t T, int64_t ld, int64_t I0,
                    int64_t I1, float* U) { gram_task<float, uint16_t>(sp, dp, R, nt, T, ld, I0, I1, U); }
void gram_task_f64(const double* sp, const double* dp, int64_t R, int64_t nt, int64_t T, int64_t ld, int64_t I0,
                   int64_t I1, double* U) { gram_task<double, double>(sp, dp, R, nt, T, ld, I0, I1, U); }

}  // namespace LALORA_ISA_NS
