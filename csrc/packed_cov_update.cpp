// lalora::packed_cov_update_ on the CPU: S += w X^T diag(m) X on a tile-packed S.
//
// Tile rows are processed in panels about 256 columns wide: one ATen GEMM (MKL) forms the panel's
// rows against every column to its right, and a parallel scatter adds the panel's upper tiles into
// the packed buffer. A diagonal tile takes the panel's upper triangle only (entries (a, c >= a))
// and writes each of them to both (a, c) and (c, a): S stays exactly symmetric whatever order the
// GEMM summed in.
#include <ATen/ATen.h>

#include "ops.h"
#include "tile.h"

namespace lalora {

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
      std::vector<std::pair<int64_t, int64_t>> tiles;   // every upper tile (I, J) with I in [I0, I1)
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
            } else {
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

}  // namespace lalora
