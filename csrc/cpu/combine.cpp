// combine on the CPU: out_k = Σ_i ca_i A_k[i] + cv_i V_k[i] (+ old out_k), one parallel loop over
// (bucket, column chunk) items. Each item streams its columns of all B rows of A and V once, sums in an
// fp32 accumulator that stays in cache, and rounds to the out dtype once. Every element's sum runs over
// the rows in the same order, so the bits do not depend on the thread count.
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

// Columns per item: each pass over a row pair streams 4 runs of 32-64 KiB, long enough for the hardware
// prefetchers, and the 64 KiB fp32 accumulator stays in L2. (Measured here: 1024-column items reached ~60-75%
// of copy bandwidth, 16384-column items with the prefetch below ~90-100%.)
constexpr int64_t kCombineCols = 16384;
static_assert(kCombineCols % kLanes == 0, "the accumulator is processed in whole vectors");

// acc[0..n) += wa * a[0..n) + wv * v[0..n), in that order; n <= kCombineCols.
template <typename T>
inline void axpy2(float* acc, const T* a, const T* v, float wa, float wv, int64_t n) {
  const F8 ba = broadcast(wa), bv = broadcast(wv);
  const int64_t nv = n / kLanes * kLanes;
  for (int64_t j = 0; j < nv; j += kLanes) store(acc + j, fma(bv, load(v + j), fma(ba, load(a + j), load(acc + j))));
  if (nv < n) store(acc + nv, fma(bv, load_n(v + nv, n - nv), fma(ba, load_n(a + nv, n - nv), load(acc + nv))));
}

// Two rows per pass over acc halve the accumulator traffic; the arithmetic order is that of one row at a time.
// With `ahead` (rows i+2, i+3 exist) the same columns of the next row pair are prefetched, one cache line per
// step, so the next pass finds its lines in cache instead of restarting the hardware prefetchers on every row.
template <typename T>
inline void axpy4(float* acc, const T* a0, const T* v0, const T* a1, const T* v1, float wa0, float wv0, float wa1,
                  float wv1, int64_t n, int64_t P, bool ahead) {
  const F8 ba0 = broadcast(wa0), bv0 = broadcast(wv0), ba1 = broadcast(wa1), bv1 = broadcast(wv1);
  const int64_t nv = n / kLanes * kLanes;
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  for (int64_t j = 0; j < nv; j += kLanes) {
    if (ahead && j % kLine == 0) {
      __builtin_prefetch(a0 + 2 * P + j, 0, 1);
      __builtin_prefetch(v0 + 2 * P + j, 0, 1);
      __builtin_prefetch(a1 + 2 * P + j, 0, 1);
      __builtin_prefetch(v1 + 2 * P + j, 0, 1);
    }
    F8 s = fma(ba0, load(a0 + j), load(acc + j));
    s = fma(bv0, load(v0 + j), s);
    s = fma(ba1, load(a1 + j), s);
    store(acc + j, fma(bv1, load(v1 + j), s));
  }
  if (nv < n) {
    const int64_t m = n - nv;
    F8 s = fma(ba0, load_n(a0 + nv, m), load(acc + nv));
    s = fma(bv0, load_n(v0 + nv, m), s);
    s = fma(ba1, load_n(a1 + nv, m), s);
    store(acc + nv, fma(bv1, load_n(v1 + nv, m), s));
  }
}

// One item: columns [0, n) of the [B, P] buckets A, V (already offset to the chunk) into out.
template <typename T, typename O>
void combine_cols(const T* A, const T* V, int64_t B, int64_t P, const float* ca, const float* cv, O* out, int64_t n,
                  bool accumulate) {
  alignas(64) float acc[kCombineCols];
  for (int64_t j = 0; j < n; j += kLanes) store(acc + j, zero());  // whole vectors: kCombineCols % 8 == 0
  int64_t i = 0;
  for (; i + 2 <= B; i += 2)
    axpy4(acc, A + i * P, V + i * P, A + (i + 1) * P, V + (i + 1) * P, ca[i], cv[i], ca[i + 1], cv[i + 1], n, P,
          i + 3 < B);
  if (i < B) axpy2(acc, A + i * P, V + i * P, ca[i], cv[i], n);

  const int64_t nv = n / kLanes * kLanes;
  for (int64_t j = 0; j < nv; j += kLanes) {
    F8 r = load(acc + j);
    if (accumulate) r = add(r, load(out + j));
    store(out + j, r);
  }
  if (nv < n) {
    F8 r = load(acc + nv);
    if (accumulate) r = add(r, load_n(out + nv, n - nv));
    store_n(out + nv, r, n - nv);
  }
}

}  // namespace

void combine(at::TensorList A_in, at::TensorList V_in, const at::Tensor& ca_in, const at::Tensor& cv_in,
             at::TensorList out, bool accumulate) {
  const char* op = "harmony::combine";
  const int64_t B = check_buckets(op, A_in, V_in, c10::DeviceType::CPU);
  check_combine_out(op, A_in, out);
  const at::Tensor ca = check_coeffs(op, "ca", ca_in, B, A_in[0].device());
  const at::Tensor cv = check_coeffs(op, "cv", cv_in, B, A_in[0].device());
  if (B == 0 && accumulate) return;  // nothing to add: out stays bit-for-bit as it was
  const std::vector<at::Tensor> A = contiguous_all(A_in), V = contiguous_all(V_in);
  const int64_t K = static_cast<int64_t>(A.size());

  std::vector<int64_t> first(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) first[k + 1] = first[k] + (A[k].size(1) + kCombineCols - 1) / kCombineCols;
  const float* pa = ca.const_data_ptr<float>();
  const float* pv = cv.const_data_ptr<float>();

  HARMONY_DISPATCH(A[0].scalar_type(), op, T, {
    HARMONY_DISPATCH(out[0].scalar_type(), op, O, {
      parallel_items(first[K], Schedule::kStatic, [&](int64_t w) {
        const int64_t k = std::upper_bound(first.begin(), first.end(), w) - first.begin() - 1;
        const int64_t P = A[k].size(1), c0 = (w - first[k]) * kCombineCols;
        combine_cols(A[k].const_data_ptr<T>() + c0, V[k].const_data_ptr<T>() + c0, B, P, pa, pv,
                     out[k].mutable_data_ptr<O>() + c0, std::min(kCombineCols, P - c0), accumulate);
      });
    });
  });
}

}  // namespace harmony::cpu
