// lalora::grouped_gram_quad on the CPU: grouped_gram's products, then the kfac/tri penalty's
// epilogue on them (classes: gram_classes.h):
//   v = 1/2 <C, G>,  W = dv/dG = C / 2,  dD_k = (W_k + W_k^T) Q_k
// The value is summed in a fixed order, in double; the gradient runs in tasks of (bundle, 512
// columns) on the register-blocked kernel of cpu_kernels.h, costliest first.
#include <ATen/ATen.h>

#include <array>

#include "cpu_kernels.h"
#include "gram_classes.h"
#include "ops.h"
#include "tile.h"

namespace lalora {

std::tuple<at::Tensor, at::Tensor> grouped_gram_quad(const at::Tensor& D, const at::Tensor& arena,
                                                    at::IntArrayRef classes, int64_t tile, const at::Tensor& C_in,
                                                    bool grad) {
  auto [G, Q] = grouped_gram(D, arena, classes, tile);
  const int64_t g = G.numel();
  TORCH_CHECK(C_in.numel() == g, "C has ", C_in.numel(), " numbers; it must hold ", g, " (one per entry of G)");
  const at::Tensor C = C_in.to(G.scalar_type()).contiguous();
  at::Tensor value = at::empty({}, G.options());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "grouped_gram_quad", [&] {
    const scalar_t* gp = G.data_ptr<scalar_t>();
    const scalar_t* c = C.data_ptr<scalar_t>();
    double v = 0;
    for (int64_t j = 0; j < g; ++j) v += double(c[j]) * gp[j];
    value.fill_(0.5 * v);
  });
  if (!grad) return {value, at::empty({0}, G.options())};
  const CpuKernels& kern = cpu_kernels();
  at::Tensor dD = at::zeros_like(Q);                   // rows outside every class stay 0
  at::Tensor Wsym = at::empty_like(G);                 // W_k + W_k^T = (C_k + C_k^T) / 2 per bundle
  const int64_t num_classes = (int64_t)classes.size() / CLASS_FIELDS;
  for (int64_t c = 0; c < num_classes; ++c) {
    const GramClass k = GramClass::at(classes, c);
    const at::Tensor Cc = C.narrow(0, k.g_off, k.m * k.R * k.R).view({k.m, k.R, k.R});
    at::Tensor out = Wsym.narrow(0, k.g_off, k.m * k.R * k.R).view({k.m, k.R, k.R});
    at::add_out(out, Cc, Cc.transpose(1, 2)).mul_(0.5);
  }
  constexpr int64_t COLS = 512;                         // tasks of (bundle, 512 columns)
  std::vector<std::array<int64_t, 3>> work;             // (class, bundle, first column)
  std::vector<int64_t> cost;                            // multiply-adds: R x R times R x cols
  for (int64_t c = 0; c < num_classes; ++c) {
    const GramClass k = GramClass::at(classes, c);
    for (int64_t b = 0; b < k.m; ++b)
      for (int64_t j = 0; j < k.n; j += COLS) {
        work.push_back({c, b, j});
        cost.push_back(k.R * k.R * std::min(COLS, k.n - j));
      }
  }
  const std::vector<int64_t> order = costliest_first(cost);
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "grouped_gram_quad_grad", [&] {
    const scalar_t* w = Wsym.data_ptr<scalar_t>();
    const scalar_t* q = Q.data_ptr<scalar_t>();
    scalar_t* out = dD.data_ptr<scalar_t>();
    run_dynamic(order, [&](int64_t i) {
      const GramClass k = GramClass::at(classes, work[i][0]);
      const int64_t b = work[i][1], j = work[i][2], n = k.n, R = k.R, cols = std::min(COLS, n - j);
      const int64_t off = k.d_off + b * R * n + j;
      gemm(kern, R, cols, R, w + k.g_off + b * R * R, R, q + off, n, out + off, n);
    });
  });
  return {value, dD};
}

}  // namespace lalora
