// One OpenMP loop over independent work items, sized by torch's thread setting (torch.set_num_threads).
// Items write only their own partial results, so the output never depends on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace harmony::cpu {

enum class Schedule { kStatic, kDynamic };

template <typename F>
inline void parallel_items(int64_t n, Schedule schedule, const F& fn) {
  if (n <= 0) return;
  // Inside another parallel region (e.g. a caller's at::parallel_for) run inline instead of nesting.
  int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads > n) threads = n;
#ifdef _OPENMP
  if (threads > 1) {
    if (schedule == Schedule::kStatic) {
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(threads))
      for (int64_t w = 0; w < n; ++w) fn(w);
    } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(threads))
      for (int64_t w = 0; w < n; ++w) fn(w);
    }
    return;
  }
#endif
  for (int64_t w = 0; w < n; ++w) fn(w);
}

}  // namespace harmony::cpu
