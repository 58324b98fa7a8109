// lalora::grouped_gram on the CPU:  per bundle k:  Q_k = D_k S_k,  G_k = Q_k D_k^T
// (classes: gram_classes.h). Dense factors (tile 0): one batched ATen GEMM per class. Tile-packed
// factors:
//
// Each bundle's tile rows are cut into a few ranges of about equal tile counts; a task (bundle,
// range) reads each of its tiles once, into its partial U (R x n): tile (I, J) adds D_I S_IJ to
// block J of U and, for I < J, D_J S_IJ^T to block I, the second product from a transposed copy of
// the tile made in L1 (so both are the same register-blocked kernel, cpu_kernels.h). Q = sum over
// ranges of U, in range order. The number of ranges depends on the shapes only (never on the
// thread count, so the summation order is fixed): enough tasks to spread over cores when there are
// few bundles, and partials (R n numbers per range) kept under 1/16 of the bundle's packed factor.
// Tasks run on ATen's OpenMP pool, costliest first (tile.h): results are bitwise identical run to
// run and for any thread count.
#include <ATen/ATen.h>

#include <array>

#include "cpu_kernels.h"
#include "gram_classes.h"
#include "ops.h"
#include "tile.h"

namespace lalora {
namespace {

constexpr int64_t TARGET_TASKS = 16;
// Row stride of the padded D and of the partials: one cache line more than the tiles need, so that
// rows a power-of-two apart do not all fall into the same L1 set.
inline int64_t lead(int64_t cols) { return cols + 16; }

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

// One task's tiles, from the factor at s_off of the arena in its storage type.
void gram_task(const CpuKernels& k, const at::Tensor& arena, int64_t s_off, const float* dp, int64_t R, int64_t nt,
               int64_t T, int64_t ld, int64_t I0, int64_t I1, float* U) {
  if (arena.scalar_type() == at::kBFloat16)
    return k.gram_task_bf16(reinterpret_cast<const uint16_t*>(arena.data_ptr<at::BFloat16>()) + s_off, dp, R, nt,
                            T, ld, I0, I1, U);
  k.gram_task_f32(arena.data_ptr<float>() + s_off, dp, R, nt, T, ld, I0, I1, U);
}

void gram_task(const CpuKernels& k, const at::Tensor& arena, int64_t s_off, const double* dp, int64_t R, int64_t nt,
               int64_t T, int64_t ld, int64_t I0, int64_t I1, double* U) {
  k.gram_task_f64(arena.data_ptr<double>() + s_off, dp, R, nt, T, ld, I0, I1, U);
}

// Q and G for dense factors: per class, Q = D S and G = Q D^T as batched GEMMs.
std::tuple<at::Tensor, at::Tensor> dense_gram(const at::Tensor& D, const at::Tensor& arena,
                                              at::IntArrayRef classes, int64_t g_size) {
  // zeros: entries no class covers (gaps a hand-made table may leave, empty classes) read as 0
  at::Tensor Q = at::zeros({D.numel()}, D.options());
  at::Tensor G = at::zeros({g_size}, D.options());
  for (int64_t c = 0; c < (int64_t)classes.size() / CLASS_FIELDS; ++c) {
    const GramClass k = GramClass::at(classes, c);
    if (k.m == 0) continue;
    const at::Tensor Dc = D.narrow(0, k.d_off, k.m * k.R * k.n).view({k.m, k.R, k.n});
    const at::Tensor Sc = arena.narrow(0, k.s_off, k.m * k.n * k.n).view({k.m, k.n, k.n}).to(D.scalar_type());
    at::Tensor Qc = Q.narrow(0, k.d_off, k.m * k.R * k.n).view({k.m, k.R, k.n});
    at::bmm_out(Qc, Dc, Sc);
    at::Tensor Gc = G.narrow(0, k.g_off, k.m * k.R * k.R).view({k.m, k.R, k.R});
    at::bmm_out(Gc, Qc, Dc.transpose(1, 2));
  }
  return {G, Q};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> grouped_gram(const at::Tensor& D_in, const at::Tensor& arena,
                                                at::IntArrayRef classes, int64_t tile) {
  TORCH_CHECK(tile >= 0 && tile <= 64, "grouped_gram: tile=", tile, " must be 0 (dense) or at most 64");
  if (tile) check_tile(tile);
  TORCH_CHECK(arena.device().is_cpu() && D_in.device().is_cpu(), "grouped_gram: CPU tensors only");
  TORCH_CHECK(arena.dim() == 1 && arena.is_contiguous(), "arena must be a contiguous 1-D buffer");
  const bool bf16 = arena.scalar_type() == at::kBFloat16;
  TORCH_CHECK(arena.scalar_type() == at::kFloat || arena.scalar_type() == at::kDouble || bf16,
              "arena must be float32, float64 or bfloat16, got ", arena.scalar_type());
  TORCH_CHECK(classes.size() % CLASS_FIELDS == 0, "classes must hold ", CLASS_FIELDS, " numbers per class");
  // products run in fp64 for fp64 factors, else fp32 (bf16 factors are a storage format)
  const at::Tensor D = D_in.to(bf16 ? at::kFloat : arena.scalar_type()).contiguous();
  int64_t g_size = 0;
  for (int64_t c = 0; c < (int64_t)classes.size() / CLASS_FIELDS; ++c) {
    const GramClass k = GramClass::at(classes, c);
    const int64_t factor = tile ? num_tiles(k.n, tile) * (num_tiles(k.n, tile) + 1) / 2 * tile * tile : k.n * k.n;
    TORCH_CHECK(k.d_off + k.m * k.R * k.n <= D.numel(), "D is too short for class ", c);
    TORCH_CHECK(k.s_off + k.m * factor <= arena.numel(), "arena is too short for class ", c, " (n=", k.n,
                ", tile=", tile, ")");
    g_size = std::max(g_size, k.g_off + k.m * k.R * k.R);
  }
  if (tile == 0) return dense_gram(D, arena, classes, g_size);
  const CpuKernels& kern = cpu_kernels();
  const int64_t T = tile;
  struct Task { int64_t cls, bundle, I0, I1, part, parts; };
  std::vector<Task> tasks;
  // A bundle done by one task keeps its partial task-local (cache-hot) and writes its Q directly;
  // the partials of bundles split over several tasks live in ``scratch`` and are summed afterwards
  // in chunk order.
  std::vector<int64_t> part_off{0}, cost;          // cost: multiply-adds, tiles read x rows of D
  for (int64_t c = 0; c < (int64_t)classes.size() / CLASS_FIELDS; ++c) {
    const GramClass k = GramClass::at(classes, c);
    if (k.m == 0) continue;                      // an empty class: nothing to read or write
    const int64_t nt = num_tiles(k.n, T);
    const auto bounds = chunk_bounds(nt, num_chunks(k.n, k.R, k.m, nt));
    const int64_t parts = (int64_t)bounds.size() - 1;
    for (int64_t b = 0; b < k.m; ++b)
      for (int64_t p = 0; p < parts; ++p) {
        tasks.push_back({c, b, bounds[p], bounds[p + 1], p, parts});
        cost.push_back((row_start(bounds[p + 1], nt) - row_start(bounds[p], nt)) * k.R);
        part_off.push_back(part_off.back() + (parts > 1 ? k.R * lead(nt * T) : 0));
      }
  }
  const std::vector<int64_t> order = costliest_first(cost);
  // zeros: entries no class covers (gaps a hand-made table may leave, empty classes) read as 0
  at::Tensor Q = at::zeros({D.numel()}, D.options());
  at::Tensor G = at::zeros({g_size}, D.options());
  at::Tensor scratch = at::zeros({part_off.back()}, D.options());
  AT_DISPATCH_FLOATING_TYPES(D.scalar_type(), "grouped_gram", [&] {
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
      const GramClass k = GramClass::at(classes, task.cls);
      const int64_t nt = num_tiles(k.n, T), ld = lead(nt * T), R = k.R, n = k.n;
      const scalar_t* db = d + k.d_off + task.bundle * R * n;
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
      gram_task(kern, arena, k.s_off + task.bundle * nt * (nt + 1) / 2 * T * T, dpad.data(), R, nt, T, ld,
                task.I0, task.I1, U);
      if (task.parts > 1) return;
      crop(U, R, n, ld, q + k.d_off + task.bundle * R * n, false);
      gram_dots(kern, R, n, U, ld, dpad.data(), ld, g + k.g_off + task.bundle * R * R);  // G = Q D^T
    });
    // bundles split over several tasks: Q = sum over chunks of U, in chunk order, cropped to n
    std::vector<int64_t> first;
    for (size_t t = 0; t < tasks.size(); ++t)
      if (tasks[t].part == 0 && tasks[t].parts > 1) first.push_back((int64_t)t);
    at::parallel_for(0, (int64_t)first.size(), 1, [&](int64_t bb, int64_t be) {
      for (int64_t f = bb; f < be; ++f) {
        const Task& task = tasks[first[f]];
        const GramClass k = GramClass::at(classes, task.cls);
        const int64_t ld = lead(num_tiles(k.n, T) * T);
        scalar_t* dst = q + k.d_off + task.bundle * k.R * k.n;
        for (int64_t p = 0; p < task.parts; ++p) crop(part + part_off[first[f] + p], k.R, k.n, ld, dst, p > 0);
        gram_dots(kern, k.R, k.n, dst, k.n, d + k.d_off + task.bundle * k.R * k.n, k.n,
                  g + k.g_off + task.bundle * k.R * k.R);
      }
    });
  });
  return {G, Q};
}

}  // namespace lalora
