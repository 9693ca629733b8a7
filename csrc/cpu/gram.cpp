// gram on the CPU: per-row (A·V, A·A, V·V) over a list of buckets in one parallel loop.
// Stage 1: every (bucket, row, chunk) work item reduces its chunk into its own slot of a partial table.
// Stage 2: each row sums its slots bucket by bucket, chunk by chunk (double), so the result is the
// same bits whatever the thread count, and adds the fp32-rounded sums into out.
#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "../ops.h"
#include "parallel.h"
#include "simd.h"

namespace harmony::cpu {
namespace {

using namespace harmony::simd;

// Row elements per work item: long enough to amortise the item's bookkeeping and horizontal sums,
// short enough that B * P / kGramChunk items balance across the threads.
constexpr int64_t kGramChunk = 16384;

// res[0..2] = (a·v, a·a, v·v) over n elements, fp32 lanes; two accumulator sets hide the FMA latency.
template <typename T>
void gram_chunk(const T* a, const T* v, int64_t n, float* res) {
  F8 ab0 = zero(), aa0 = zero(), vv0 = zero();
  F8 ab1 = zero(), aa1 = zero(), vv1 = zero();
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    const F8 x0 = load(a + j), y0 = load(v + j);
    const F8 x1 = load(a + j + kLanes), y1 = load(v + j + kLanes);
    ab0 = fma(x0, y0, ab0);
    aa0 = fma(x0, x0, aa0);
    vv0 = fma(y0, y0, vv0);
    ab1 = fma(x1, y1, ab1);
    aa1 = fma(x1, x1, aa1);
    vv1 = fma(y1, y1, vv1);
  }
  if (j + kLanes <= n) {
    const F8 x = load(a + j), y = load(v + j);
    ab0 = fma(x, y, ab0);
    aa0 = fma(x, x, aa0);
    vv0 = fma(y, y, vv0);
    j += kLanes;
  }
  if (j < n) {
    const F8 x = load_n(a + j, n - j), y = load_n(v + j, n - j);
    ab1 = fma(x, y, ab1);
    aa1 = fma(x, x, aa1);
    vv1 = fma(y, y, vv1);
  }
  res[0] = hsum(add(ab0, ab1));
  res[1] = hsum(add(aa0, aa1));
  res[2] = hsum(add(vv0, vv1));
}

}  // namespace

void gram(at::TensorList A_in, at::TensorList V_in, const at::Tensor& out) {
  const char* op = "harmony::gram";
  const int64_t B = check_buckets(op, A_in, V_in, c10::DeviceType::CPU);
  check_dots_out(op, out, B, A_in[0].device());
  const std::vector<at::Tensor> A = contiguous_all(A_in), V = contiguous_all(V_in);
  const int64_t K = static_cast<int64_t>(A.size());

  // Items numbered bucket-major: first[k] is bucket k's first item, then row-major over (row, chunk).
  std::vector<int64_t> first(K + 1, 0), chunks(K);
  for (int64_t k = 0; k < K; ++k) {
    chunks[k] = (A[k].size(1) + kGramChunk - 1) / kGramChunk;
    first[k + 1] = first[k] + B * chunks[k];
  }
  const int64_t W = first[K];
  std::vector<float> partial(static_cast<size_t>(W) * 3);

  HARMONY_DISPATCH(A[0].scalar_type(), op, T, {
    parallel_items(W, Schedule::kStatic, [&](int64_t w) {
      // The last bucket whose first item is <= w (empty buckets share a start and are skipped).
      const int64_t k = std::upper_bound(first.begin(), first.end(), w) - first.begin() - 1;
      const int64_t r = w - first[k], row = r / chunks[k], c = r % chunks[k];
      const int64_t P = A[k].size(1), begin = c * kGramChunk;
      const T* a = A[k].const_data_ptr<T>() + row * P + begin;
      const T* v = V[k].const_data_ptr<T>() + row * P + begin;
      gram_chunk(a, v, std::min(kGramChunk, P - begin), partial.data() + 3 * w);
    });
  });

  float* o = out.mutable_data_ptr<float>();
  const int64_t s0 = out.stride(0), s1 = out.stride(1);
  for (int64_t i = 0; i < B; ++i) {
    double s[3] = {0.0, 0.0, 0.0};
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < chunks[k]; ++c) {
        const float* p = partial.data() + 3 * (first[k] + i * chunks[k] + c);
        s[0] += p[0];
        s[1] += p[1];
        s[2] += p[2];
      }
    }
    for (int q = 0; q < 3; ++q) o[i * s0 + q * s1] += static_cast<float>(s[q]);
  }
}

}  // namespace harmony::cpu
