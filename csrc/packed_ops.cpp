// C++ CPU kernels of the tile-packed lalora:: ops (docs/SPEC.md, "Storage formats").
//
// A packed symmetric factor of size n with tile T stores the upper tiles (I <= J) of S, each a
// contiguous row-major T x T block, in row-major order of the upper triangle; padding is zero.
// Registered as ops of the private namespace ``lalora_cpp``; ``lalora_kernels.ops`` installs them
// as the CPU kernels of ``lalora::packed_cov_update_`` and ``lalora::grouped_gram``.
//
// Parallelism: ATen's OpenMP pool (the grouped product's tasks handed out costliest first from a
// shared counter, so bundles of mixed shapes balance). Every task owns its outputs and runs its
// loops in a fixed order, and the partial sums of the grouped product are added in chunk order,
// so results are bitwise identical run to run and for any thread count.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <vector>

namespace {

inline int64_t num_tiles(int64_t n, int64_t T) { return (n + T - 1) / T; }
inline int64_t row_start(int64_t I, int64_t nt) { return I * nt - I * (I - 1) / 2; }

// Register-blocked C (M x N, row stride ldc) += A (M x K, row stride lda) . B (K x N, row stride ldb),
// vectorised along N with GCC/Clang vector extensions: 64-byte vectors (one AVX-512 register, two
// AVX2 or four NEON ones), a 32-byte vector for a narrower rest, then scalars. A block of MR rows x
// NV vectors keeps its part of C in registers across the whole k loop.
template <typename scalar_t, int BYTES> struct Vec;
template <> struct Vec<float, 64> { typedef float type __attribute__((vector_size(64), aligned(4))); };
template <> struct Vec<float, 32> { typedef float type __attribute__((vector_size(32), aligned(4))); };
template <> struct Vec<double, 64> { typedef double type __attribute__((vector_size(64), aligned(8))); };
template <> struct Vec<double, 32> { typedef double type __attribute__((vector_size(32), aligned(8))); };

template <typename scalar_t, int BYTES, int MR, int NV>
inline void micro(int64_t K, const scalar_t* __restrict A, int64_t lda, const scalar_t* __restrict B,
                  int64_t ldb, scalar_t* __restrict C, int64_t ldc) {
  using V = typename Vec<scalar_t, BYTES>::type;
  constexpr int W = BYTES / sizeof(scalar_t);
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = *reinterpret_cast<const V*>(C + i * ldc + v * W);
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const V*>(B + k * ldb + v * W);
    for (int i = 0; i < MR; ++i) {
      const scalar_t a = A[i * lda + k];
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(C + i * ldc + v * W) = acc[i][v];
}

#if defined(__AVX512F__)
// The fp32 MR x 32 block with AVX-512 intrinsics. (GCC's code for the vector-extension form above
// copies accumulators between registers and through the stack around the k loop; with intrinsics
// the 2 MR accumulators stay in place and every step is 2 loads, MR broadcasts and 2 MR FMAs.)
template <int MR>
inline void micro_f32(int64_t K, const float* __restrict A, int64_t lda, const float* __restrict B,
                      int64_t ldb, float* __restrict C, int64_t ldc) {
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

template <typename scalar_t, int MR>
inline void gemm_rows(int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb,
                      scalar_t* C, int64_t ldc) {
  constexpr int W = 64 / sizeof(scalar_t), H = 32 / sizeof(scalar_t);
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>)
    for (; j + 32 <= N; j += 32) micro_f32<MR>(K, A, lda, B + j, ldb, C + j, ldc);
#endif
  for (; j + 2 * W <= N; j += 2 * W) micro<scalar_t, 64, MR, 2>(K, A, lda, B + j, ldb, C + j, ldc);
  for (; j + W <= N; j += W) micro<scalar_t, 64, MR, 1>(K, A, lda, B + j, ldb, C + j, ldc);
  for (; j + H <= N; j += H) micro<scalar_t, 32, MR, 1>(K, A, lda, B + j, ldb, C + j, ldc);
  for (; j < N; ++j)                       // columns left over when N is not a multiple of H
    for (int i = 0; i < MR; ++i) {
      scalar_t c = C[i * ldc + j];
      for (int64_t k = 0; k < K; ++k) c += A[i * lda + k] * B[k * ldb + j];
      C[i * ldc + j] = c;
    }
}

// C += A . B in row blocks of 8, then 4, then single rows.
template <typename scalar_t>
inline void gemm(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B,
                 int64_t ldb, scalar_t* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 8 <= M; i += 8) gemm_rows<scalar_t, 8>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
  for (; i + 4 <= M; i += 4) gemm_rows<scalar_t, 4>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
  for (; i < M; ++i) gemm_rows<scalar_t, 1>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
}

// dst = src^T for one contiguous T x T tile (both row stride T).
template <typename scalar_t>
inline void transpose_blocked(const scalar_t* __restrict src, scalar_t* __restrict dst, int64_t T) {
  constexpr int64_t B = 8;                 // 8 x 8 blocks: both sides stay within a few cache lines
  for (int64_t i0 = 0; i0 < T; i0 += B)
    for (int64_t j0 = 0; j0 < T; j0 += B)
      for (int64_t i = i0; i < std::min(T, i0 + B); ++i)
        for (int64_t j = j0; j < std::min(T, j0 + B); ++j) dst[j * T + i] = src[i * T + j];
}

template <typename scalar_t>
inline void transpose_tile(const scalar_t* __restrict src, scalar_t* __restrict dst, int64_t T) {
  transpose_blocked(src, dst, T);
}

#if defined(__AVX512F__)
// fp32 16 x 16 block transpose in registers: 4 rounds of 16 shuffles (unpack pairs of rows, then
// 4-wide groups, then 128-bit lanes twice).
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

template <>
inline void transpose_tile<float>(const float* __restrict src, float* __restrict dst, int64_t T) {
  if (T % 16) return transpose_blocked(src, dst, T);
  for (int64_t i0 = 0; i0 < T; i0 += 16)
    for (int64_t j0 = 0; j0 < T; j0 += 16) transpose16(src + i0 * T + j0, T, dst + j0 * T + i0, T);
}
#endif
// Sum of one 64-byte vector's lanes, as a tree (the plain loop is a serial chain of W adds).
template <typename scalar_t>
inline scalar_t lane_sum(typename Vec<scalar_t, 64>::type v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) return _mm512_reduce_add_ps((__m512)v);
#endif
  constexpr int W = 64 / sizeof(scalar_t);
  scalar_t l[W];
  std::copy_n(reinterpret_cast<const scalar_t*>(&v), W, l);
  for (int h = W / 2; h > 0; h /= 2)
    for (int i = 0; i < h; ++i) l[i] += l[i + h];
  return l[0];
}

// G (R x R, row stride R) = U (R x K, row stride ldu) . V^T (V: R x K, row stride ldv), as dot
// products along the rows in blocks of 4 x 4, vector lanes summed once at the end (fixed order).
template <typename scalar_t>
void gram_dots(int64_t R, int64_t K, const scalar_t* U, int64_t ldu, const scalar_t* V, int64_t ldv, scalar_t* G) {
  using Vv = typename Vec<scalar_t, 64>::type;
  constexpr int W = 64 / sizeof(scalar_t);
  const int64_t Kv = K / W * W;
  for (int64_t r0 = 0; r0 < R; r0 += 4)
    for (int64_t s0 = 0; s0 < R; s0 += 4) {
      const scalar_t *u[4], *v[4];
      for (int i = 0; i < 4; ++i) {        // rows past R repeat the last one; their sums are dropped
        u[i] = U + std::min(r0 + i, R - 1) * ldu;
        v[i] = V + std::min(s0 + i, R - 1) * ldv;
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
          scalar_t sum = lane_sum<scalar_t>(acc[i][j]);
          for (int64_t k = Kv; k < K; ++k) sum += u[i][k] * v[j][k];
          G[(r0 + i) * R + s0 + j] = sum;
        }
    }
}

// f(t) for every t in order, over ATen's threads: each thread takes the next task from a shared
// counter, so tasks of unequal size balance themselves (a static split of a list of bundles of
// mixed shapes leaves one thread waiting at the barrier). Every task owns its outputs, so results
// do not depend on which thread runs which task. ``order``: costliest tasks first. With a
// ``State`` (a thread's scratch), f(t, state) is called with the running thread's one.
template <typename State = void, typename F>
void run_dynamic(const std::vector<int64_t>& order, F f) {
  std::atomic<int64_t> next{0};
  const int64_t n = (int64_t)order.size();
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    if constexpr (std::is_void_v<State>) {
      for (int64_t k = next.fetch_add(1); k < n; k = next.fetch_add(1)) f(order[k]);
    } else {
      State state;
      for (int64_t k = next.fetch_add(1); k < n; k = next.fetch_add(1)) f(order[k], state);
    }
  });
}

// Task indices sorted by decreasing cost (ties in index order, so the order is fixed).
inline std::vector<int64_t> costliest_first(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  for (size_t i = 0; i < cost.size(); ++i) order[i] = (int64_t)i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

void check_tile(int64_t T) {
  TORCH_CHECK(T >= 1 && (T & (T - 1)) == 0, "tile=", T, " must be a power of two");
}

// ---- packed covariance update: S += w X^T diag(m) X -----------------------------------------------
// Tile rows are processed in panels about 256 columns wide: one ATen GEMM (MKL) forms the panel's
// rows against every column to its right, and a parallel scatter adds the panel's upper tiles into
// the packed buffer (diagonal tiles symmetrised from their upper half, so S stays exactly symmetric).
void packed_cov_update_(at::Tensor P, const at::Tensor& X_in, const c10::optional<at::Tensor>& mask,
                        double weight, int64_t tile) {
  check_tile(tile);
  TORCH_CHECK(P.device().is_cpu() && X_in.device().is_cpu(), "packed_cov_update_: CPU tensors only");
  TORCH_CHECK(P.dim() == 1 && P.is_contiguous(), "P must be a contiguous 1-D packed factor");
  TORCH_CHECK(P.scalar_type() == at::kFloat || P.scalar_type() == at::kDouble,
              "P must be float32 or float64, got ", P.scalar_type());
  const int64_t n = X_in.size(-1), T = tile, nt = num_tiles(n, T);
  TORCH_CHECK(P.numel() == nt * (nt + 1) / 2 * T * T, "P has ", P.numel(), " numbers; a packed factor of n=",
              n, ", tile=", T, " has ", nt * (nt + 1) / 2 * T * T);
  at::Tensor X = X_in.reshape({-1, n});
  if (mask.has_value() && mask->defined()) {
    at::Tensor m = mask->reshape({-1});
    TORCH_CHECK(m.numel() == X.size(0), "mask has ", m.numel(), " entries for ", X.size(0), " rows of X");
    X = X.index_select(0, m.ne(0).nonzero().reshape({-1}));
  }
  if (X.size(0) == 0) return;
  X = X.to(P.scalar_type()).contiguous();
  const int64_t panel_tiles = std::max<int64_t>(1, 256 / T);
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "packed_cov_update_", [&] {
    scalar_t* p = P.data_ptr<scalar_t>();
    const scalar_t w = static_cast<scalar_t>(weight);
    for (int64_t I0 = 0; I0 < nt; I0 += panel_tiles) {
      const int64_t I1 = std::min(nt, I0 + panel_tiles);
      const int64_t lo = I0 * T, hi = std::min(n, I1 * T), cols = n - lo;
      at::Tensor panel = at::mm(X.narrow(1, lo, hi - lo).t(), X.narrow(1, lo, cols)).contiguous();
      const scalar_t* q = panel.data_ptr<scalar_t>();
      // every upper tile (I, J) with I in [I0, I1): enumerate them as (I, J) pairs
      std::vector<std::pair<int64_t, int64_t>> tiles;
      for (int64_t I = I0; I < I1; ++I)
        for (int64_t J = I; J < nt; ++J) tiles.emplace_back(I, J);
      at::parallel_for(0, (int64_t)tiles.size(), 8, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          const int64_t I = tiles[t].first, J = tiles[t].second;
          scalar_t* dst = p + (row_start(I, nt) + (J - I)) * T * T;
          const int64_t ra = std::min(T, n - I * T), cb = std::min(T, n - J * T);
          for (int64_t a = 0; a < ra; ++a) {
            const scalar_t* src = q + (I * T + a - lo) * cols + (J * T - lo);
            if (I != J) {
              for (int64_t c = 0; c < cb; ++c) dst[a * T + c] += w * src[c];
            } else {     // diagonal tile: entries (a, c >= a) from the panel, mirrored exactly
              for (int64_t c = a; c < cb; ++c) {
                const scalar_t v = w * src[c];
                dst[a * T + c] += v;
                if (c != a) dst[c * T + a] += v;
              }
            }
          }
        }
      });
    }
  });
}

// ---- grouped packed product: Q_k = D_k S_k, G_k = Q_k D_k^T ----------------------------------------
// Each bundle's tile rows are cut into a few ranges of about equal tile counts; a task
// (bundle, range) reads each of its tiles once, into its partial U (R x n): tile (I, J) adds
// D_I S_IJ to block J of U and, for I < J, D_J S_IJ^T to block I, the second product from a
// transposed copy of the tile made in L1 (so both are the same register-blocked MR x 32 kernel).
// While its partial and D fit in L2 a task reads its tiles in storage order, one stream that the software
// prefetch follows across row ends; for wider R * n the tiles are visited by column blocks, so the
// blocks of U being updated stay in cache. Q = sum over ranges of U, in range order.
// The number of ranges depends on the shapes only (never on the thread count, so the summation order
// is fixed): enough tasks to spread over cores when there are few bundles, and partials (R n numbers
// per range) kept under 1/16 of the bundle's packed factor.
constexpr int64_t TARGET_TASKS = 16;
// Row stride of the padded D and of the partials: one cache line more than the tiles need, so that
// rows a power-of-two apart do not all fall into the same L1 set.
inline int64_t lead(int64_t cols) { return cols + 16; }
constexpr int64_t CB = 16;            // tiles per column block (512 columns at T = 32)
constexpr int64_t PREFETCH = 8;       // software prefetch distance, in tiles
constexpr int64_t L2_BYTES = int64_t(1) << 19;   // U + padded D up to this: tiles in storage order

int64_t num_chunks(int64_t n, int64_t R, int64_t m, int64_t nt) {
  const int64_t want = (TARGET_TASKS + m - 1) / m, cap = std::max<int64_t>(1, n / (32 * std::max<int64_t>(R, 1)));
  return std::max<int64_t>(1, std::min({want, cap, nt}));
}

std::vector<int64_t> chunk_bounds(int64_t nt, int64_t parts) {
  const int64_t total = nt * (nt + 1) / 2;
  std::vector<int64_t> bounds{0};
  int64_t acc = 0;
  for (int64_t I = 0; I < nt; ++I) {
    acc += nt - I;
    if ((int64_t)bounds.size() < parts && acc * parts >= total * (int64_t)bounds.size()) bounds.push_back(I + 1);
  }
  if (bounds.back() != nt) bounds.push_back(nt);
  return bounds;
}

// tt numbers of a tile in the compute type: bf16 widened to fp32 (its bits are fp32's upper half).
template <typename scalar_t, typename storage_t>
inline const scalar_t* widen(const storage_t* src, int64_t tt, scalar_t* buf) {
  if constexpr (std::is_same_v<storage_t, scalar_t>) {
    return src;
  } else {
    static_assert(std::is_same_v<scalar_t, float> && std::is_same_v<storage_t, at::BFloat16>);
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    uint32_t* out = reinterpret_cast<uint32_t*>(buf);
    for (int64_t e = 0; e < tt; ++e) out[e] = uint32_t(bits[e]) << 16;
    return buf;
  }
}

// One task: U (R x ld, zeroed) += the products of tile rows [I0, I1) of the packed factor sp
// (stored as storage_t: the compute type, or bf16 widened one tile at a time).
template <typename scalar_t, typename storage_t>
void gram_task(const storage_t* sp, const scalar_t* dp, int64_t R, int64_t nt, int64_t T, int64_t ld,
               int64_t I0, int64_t I1, scalar_t* U) {
  alignas(64) scalar_t St[64 * 64];                 // the transposed tile (T <= 64)
  alignas(64) scalar_t Sw[64 * 64];                 // the tile widened from bf16
  // the partial U and the padded D (R x ld each) small enough for L2: storage order
  const bool linear = 2 * R * ld * (int64_t)sizeof(scalar_t) <= L2_BYTES;
  const int64_t cb = linear ? nt : CB;
  const int64_t tt = T * T, task_end = row_start(I1, nt) * tt;   // in numbers from sp
  for (int64_t Jb = I0; Jb < nt; Jb += cb) {
    const int64_t Je = std::min(nt, Jb + cb);
    for (int64_t I = I0; I < std::min(I1, Je); ++I) {
      const int64_t row = row_start(I, nt) * tt;
      for (int64_t J = std::max(I, Jb); J < Je; ++J) {
        // software prefetch, into L2, of the tile PREFETCH tiles ahead in the order of reading: one
        // core's demand misses alone do not keep enough lines in flight to stream at memory speed
        const int64_t ahead = row + (J + PREFETCH - I) * tt;
        if (linear ? ahead < task_end : J + PREFETCH < Je)
          for (int64_t o = 0; o < tt * (int64_t)sizeof(storage_t); o += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(sp + ahead) + o, 0, 1);
        const scalar_t* tile = widen<scalar_t>(sp + row + (J - I) * tt, tt, Sw);
        gemm<scalar_t>(R, T, T, dp + I * T, ld, tile, T, U + J * T, ld);         // U_J += D_I S_IJ
        if (J == I) continue;
        transpose_tile<scalar_t>(tile, St, T);
        gemm<scalar_t>(R, T, T, dp + J * T, ld, St, T, U + I * T, ld);           // U_I += D_J S_IJ^T
      }
    }
  }
}

// gram_task on the factor at s_off of the arena, in its storage type (bf16 only with fp32 compute).
template <typename scalar_t>
void gram_task_on(const at::Tensor& arena, int64_t s_off, const scalar_t* dp, int64_t R, int64_t nt, int64_t T,
                  int64_t ld, int64_t I0, int64_t I1, scalar_t* U) {
  if constexpr (std::is_same_v<scalar_t, float>)
    if (arena.scalar_type() == at::kBFloat16)
      return gram_task<float, at::BFloat16>(arena.data_ptr<at::BFloat16>() + s_off, dp, R, nt, T, ld, I0, I1, U);
  gram_task<scalar_t, scalar_t>(arena.data_ptr<scalar_t>() + s_off, dp, R, nt, T, ld, I0, I1, U);
}

std::tuple<at::Tensor, at::Tensor> packed_gram(const at::Tensor& D_in, const at::Tensor& arena,
                                               at::IntArrayRef classes, int64_t tile) {
  check_tile(tile);
  TORCH_CHECK(tile <= 64, "packed_gram: tile=", tile, " is larger than the C++ kernels' 64");
  TORCH_CHECK(arena.device().is_cpu() && D_in.device().is_cpu(), "packed_gram: CPU tensors only");
  TORCH_CHECK(arena.dim() == 1 && arena.is_contiguous(), "arena must be a contiguous 1-D buffer");
  const bool bf16 = arena.scalar_type() == at::kBFloat16;
  TORCH_CHECK(arena.scalar_type() == at::kFloat || arena.scalar_type() == at::kDouble || bf16,
              "arena must be float32, float64 or bfloat16, got ", arena.scalar_type());
  TORCH_CHECK(classes.size() % 6 == 0, "classes must hold 6 numbers per class");
  // products run in fp64 for fp64 factors, else fp32 (bf16 factors are a storage format)
  const at::Tensor D = D_in.to(bf16 ? at::kFloat : arena.scalar_type()).contiguous();
  const int64_t T = tile;
  struct Task { int64_t cls, bundle, I0, I1, part, parts; };
  std::vector<Task> tasks;
  // A bundle done by one task keeps its partial task-local (cache-hot) and writes its Q directly;
  // the partials of bundles split over several tasks live in ``scratch`` and are summed afterwards
  // in chunk order.
  std::vector<int64_t> part_off{0}, cost;          // cost: multiply-adds, tiles read x rows of D
  int64_t g_size = 0;
  for (size_t c = 0; c < classes.size(); c += 6) {
    const int64_t n = classes[c], R = classes[c + 1], m = classes[c + 2];
    const int64_t nt = num_tiles(n, T);
    TORCH_CHECK(classes[c + 3] + m * R * n <= D.numel(), "D is too short for class ", c / 6);
    TORCH_CHECK(classes[c + 4] + m * nt * (nt + 1) / 2 * T * T <= arena.numel(),
                "arena is too short for class ", c / 6, " (packed n=", n, ", tile=", T, ")");
    g_size = std::max(g_size, classes[c + 5] + m * R * R);
    const auto bounds = chunk_bounds(nt, num_chunks(n, R, m, nt));
    const int64_t parts = (int64_t)bounds.size() - 1;
    for (int64_t b = 0; b < m; ++b)
      for (int64_t k = 0; k < parts; ++k) {
        tasks.push_back({(int64_t)c, b, bounds[k], bounds[k + 1], k, parts});
        cost.push_back((row_start(bounds[k + 1], nt) - row_start(bounds[k], nt)) * R);
        part_off.push_back(part_off.back() + (parts > 1 ? R * lead(nt * T) : 0));
      }
  }
  const std::vector<int64_t> order = costliest_first(cost);
  at::Tensor Q = at::empty({D.numel()}, D.options());
  at::Tensor G = at::empty({g_size}, D.options());
  at::Tensor scratch = at::zeros({part_off.back()}, D.options());
  AT_DISPATCH_FLOATING_TYPES(D.scalar_type(), "packed_gram", [&] {
    const scalar_t* d = D.data_ptr<scalar_t>();
    scalar_t* part = scratch.data_ptr<scalar_t>();
    scalar_t* q = Q.data_ptr<scalar_t>();
    scalar_t* g = G.data_ptr<scalar_t>();
    auto crop = [](const scalar_t* U, int64_t R, int64_t n, int64_t ld, scalar_t* dst, bool add) {
      for (int64_t r = 0; r < R; ++r)
        if (add) for (int64_t j = 0; j < n; ++j) dst[r * n + j] += U[r * ld + j];
        else std::copy_n(U + r * ld, n, dst + r * n);
    };
    using Scratch = std::array<std::vector<scalar_t>, 2>;   // a thread's partial and padded D
    run_dynamic<Scratch>(order, [&](int64_t t, Scratch& scratch) {
      auto& [local, dpad] = scratch;
      const Task& task = tasks[t];
      const int64_t c = task.cls, n = classes[c], R = classes[c + 1], nt = num_tiles(n, T);
      const int64_t ld = lead(nt * T);
      const scalar_t* db = d + classes[c + 3] + task.bundle * R * n;
      dpad.resize(R * ld);                          // the bundle's D, rows padded to ld with zeros
      for (int64_t r = 0; r < R; ++r) {
        std::copy_n(db + r * n, n, dpad.data() + r * ld);
        std::fill_n(dpad.data() + r * ld + n, ld - n, scalar_t(0));
      }
      scalar_t* U = part + part_off[t];
      if (task.parts == 1) {
        local.assign(R * ld, scalar_t(0));
        U = local.data();
      }
      gram_task_on<scalar_t>(arena, classes[c + 4] + task.bundle * nt * (nt + 1) / 2 * T * T, dpad.data(), R, nt,
                             T, ld, task.I0, task.I1, U);
      if (task.parts > 1) return;
      crop(U, R, n, ld, q + classes[c + 3] + task.bundle * R * n, false);
      gram_dots<scalar_t>(R, n, U, ld, dpad.data(), ld, g + classes[c + 5] + task.bundle * R * R);  // G = Q D^T
    });
    // bundles split over several tasks: Q = sum over chunks of U, in chunk order, cropped to n
    std::vector<int64_t> first;
    for (size_t t = 0; t < tasks.size(); ++t)
      if (tasks[t].part == 0 && tasks[t].parts > 1) first.push_back((int64_t)t);
    at::parallel_for(0, (int64_t)first.size(), 1, [&](int64_t bb, int64_t be) {
      for (int64_t f = bb; f < be; ++f) {
        const Task& task = tasks[first[f]];
        const int64_t c = task.cls, n = classes[c], R = classes[c + 1], ld = lead(num_tiles(n, T) * T);
        scalar_t* dst = q + classes[c + 3] + task.bundle * R * n;
        for (int64_t k = 0; k < task.parts; ++k) crop(part + part_off[first[f] + k], R, n, ld, dst, k > 0);
        gram_dots<scalar_t>(R, n, dst, n, d + classes[c + 3] + task.bundle * R * n, n,
                            g + classes[c + 5] + task.bundle * R * R);
      }
    });
  });
  return {G, Q};
}

// ---- the penalty epilogue behind the grouped product ----------------------------------------------
//   v = 1/2 <C, G>,   W = dv/dG = C / 2,   dD_k = (W_k + W_k^T) Q_k
// C (laid out like G) holds the kfac/tri weights. The sum runs in a fixed order, in double.
std::tuple<at::Tensor, at::Tensor> packed_gram_quad(const at::Tensor& D, const at::Tensor& arena,
                                                    at::IntArrayRef classes, int64_t tile, const at::Tensor& C_in,
                                                    bool grad) {
  auto [G, Q] = packed_gram(D, arena, classes, tile);
  const int64_t g = G.numel();
  TORCH_CHECK(C_in.numel() == g, "C has ", C_in.numel(), " numbers; it must hold ", g, " (one per entry of G)");
  const at::Tensor C = C_in.to(G.scalar_type()).contiguous();
  at::Tensor value = at::empty({}, G.options());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "packed_gram_quad", [&] {
    const scalar_t* gp = G.data_ptr<scalar_t>();
    const scalar_t* c = C.data_ptr<scalar_t>();
    double v = 0;
    for (int64_t j = 0; j < g; ++j) v += double(c[j]) * gp[j];
    value.fill_(0.5 * v);
  });
  if (!grad) return {value, at::empty({0}, G.options())};
  // dD_k = (W_k + W_k^T) Q_k, in tasks of (bundle, 512 columns)
  at::Tensor dD = at::empty_like(Q);                   // zeroed by its tasks, in parallel
  at::Tensor Wsym = at::empty_like(G);                 // W_k + W_k^T = (C_k + C_k^T) / 2 per bundle
  for (size_t c = 0; c < classes.size(); c += 6) {
    const int64_t R = classes[c + 1], m = classes[c + 2];
    const at::Tensor Cc = C.narrow(0, classes[c + 5], m * R * R).view({m, R, R});
    at::Tensor out = Wsym.narrow(0, classes[c + 5], m * R * R).view({m, R, R});
    at::add_out(out, Cc, Cc.transpose(1, 2)).mul_(0.5);
  }
  constexpr int64_t COLS = 512;
  std::vector<std::array<int64_t, 3>> work;             // (class offset, bundle, first column)
  std::vector<int64_t> cost;                            // multiply-adds: R x R times R x cols
  for (size_t c = 0; c < classes.size(); c += 6)
    for (int64_t b = 0; b < classes[c + 2]; ++b)
      for (int64_t j = 0; j < classes[c]; j += COLS) {
        work.push_back({(int64_t)c, b, j});
        cost.push_back(classes[c + 1] * classes[c + 1] * std::min(COLS, classes[c] - j));
      }
  const std::vector<int64_t> order = costliest_first(cost);
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "packed_gram_quad_grad", [&] {
    const scalar_t* w = Wsym.data_ptr<scalar_t>();
    const scalar_t* q = Q.data_ptr<scalar_t>();
    scalar_t* out = dD.data_ptr<scalar_t>();
    run_dynamic(order, [&](int64_t i) {
      const int64_t c = work[i][0], b = work[i][1], j = work[i][2];
      const int64_t n = classes[c], R = classes[c + 1], cols = std::min(COLS, n - j);
      const int64_t off = classes[c + 3] + b * R * n + j;
      for (int64_t r = 0; r < R; ++r) std::fill_n(out + off + r * n, cols, scalar_t(0));
      gemm<scalar_t>(R, cols, R, w + classes[c + 5] + b * R * R, R, q + off, n, out + off, n);
    });
  });
  return {value, dD};
}

}  // namespace

TORCH_LIBRARY(lalora_cpp, m) {
  m.def("packed_cov_update_(Tensor(a!) P, Tensor X, Tensor? mask, float weight, int tile) -> ()");
  m.def("packed_gram(Tensor D, Tensor arena, int[] classes, int tile) -> (Tensor, Tensor)");
  m.def("packed_gram_quad(Tensor D, Tensor arena, int[] classes, int tile, Tensor C, bool grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lalora_cpp, CPU, m) {
  m.impl("packed_cov_update_", &packed_cov_update_);
  m.impl("packed_gram", &packed_gram);
  m.impl("packed_gram_quad", &packed_gram_quad);
}

// A Python module with no functions: importing lalora_kernels._C loads this library, whose static
// initialisers above register the ops with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "lalora C++ CPU ops", -1, nullptr};
  return PyModule_Create(&def);
}
