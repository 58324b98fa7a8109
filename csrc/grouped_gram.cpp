// lalora::grouped_gram and lalora::grouped_gram_quad on the CPU, for tile-packed factors:
//   per bundle k:  Q_k = D_k S_k,  G_k = Q_k D_k^T;   quad: v = 1/2 <C, G>,  dD_k = (W_k + W_k^T) Q_k
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

}  // namespace

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
  const CpuKernels& kern = cpu_kernels();
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
      gram_task(kern, arena, classes[c + 4] + task.bundle * nt * (nt + 1) / 2 * T * T, dpad.data(), R, nt, T, ld,
                task.I0, task.I1, U);
      if (task.parts > 1) return;
      crop(U, R, n, ld, q + classes[c + 3] + task.bundle * R * n, false);
      gram_dots(kern, R, n, U, ld, dpad.data(), ld, g + classes[c + 5] + task.bundle * R * R);  // G = Q D^T
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
        gram_dots(kern, R, n, dst, n, d + classes[c + 3] + task.bundle * R * n, n,
                  g + classes[c + 5] + task.bundle * R * R);
      }
    });
  });
  return {G, Q};
}

// The penalty epilogue behind the grouped product: v = 1/2 <C, G>, W = dv/dG = C / 2,
// dD_k = (W_k + W_k^T) Q_k. C (laid out like G) holds the kfac/tri weights. The sum runs in a
// fixed order, in double.
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
  const CpuKernels& kern = cpu_kernels();
  at::Tensor dD = at::empty_like(Q);                   // zeroed by its tasks, in parallel
  at::Tensor Wsym = at::empty_like(G);                 // W_k + W_k^T = (C_k + C_k^T) / 2 per bundle
  for (size_t c = 0; c < classes.size(); c += 6) {
    const int64_t R = classes[c + 1], m = classes[c + 2];
    const at::Tensor Cc = C.narrow(0, classes[c + 5], m * R * R).view({m, R, R});
    at::Tensor out = Wsym.narrow(0, classes[c + 5], m * R * R).view({m, R, R});
    at::add_out(out, Cc, Cc.transpose(1, 2)).mul_(0.5);
  }
  constexpr int64_t COLS = 512;                         // tasks of (bundle, 512 columns)
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
      gemm(kern, R, cols, R, w + classes[c + 5] + b * R * R, R, q + off, n, out + off, n);
    });
  });
  return {value, dD};
}

std::string cpu_capability() { return cpu_kernels().name; }

}  // namespace lalora
