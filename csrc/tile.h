// Shared by the C++ CPU ops: the packed layout's geometry (docs/SPEC.md section 8) and the task
// scheduler.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace lalora {

inline int64_t num_tiles(int64_t n, int64_t T) { return (n + T - 1) / T; }
// index of tile (I, I), the first stored tile of tile row I
inline int64_t row_start(int64_t I, int64_t nt) { return I * nt - I * (I - 1) / 2; }

inline void check_tile(int64_t T) {
  TORCH_CHECK(T >= 1 && (T & (T - 1)) == 0, "tile=", T, " must be a power of two");
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

}  // namespace lalora
