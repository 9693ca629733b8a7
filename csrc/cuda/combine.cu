// combine on CUDA: out_k = Σ_i ca_i A_k[i] + cv_i V_k[i] (+ old out_k), fp32 accumulation, one rounding.
// A 1-D grid over column chunks of all buckets (a bucket table passed by value maps a block to its bucket, one
// launch per kMaxBuckets buckets and out dtype). Each thread owns one 16-byte vector of columns, walks the B rows
// in order accumulating in registers, and writes its columns once: no workspace, no atomics, fixed order.
#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"

namespace harmony::cuda {
namespace {

constexpr int kCombineThreads = 256;

// Columns per block: one 16-byte vector per thread (1024 fp32 or 2048 bf16/fp16 columns).
template <typename T>
constexpr int64_t combine_chunk() {
  return int64_t{kCombineThreads} * Vec16<T>::kN;
}

template <typename T, typename O>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(BucketTable tab, int64_t B, const float* __restrict__ ca, const float* __restrict__ cv,
                   bool accumulate) {
  constexpr int kN = Vec16<T>::kN;
  const int64_t c = blockIdx.x;
  const int k = bucket_of(tab, c);
  const int64_t P = tab.P[k];
  const int64_t col0 = (c - tab.start[k]) * combine_chunk<T>() + int64_t{threadIdx.x} * kN;
  if (col0 >= P) return;
  const T* A = static_cast<const T*>(tab.a[k]) + col0;
  const T* V = static_cast<const T*>(tab.v[k]) + col0;
  O* out = static_cast<O*>(tab.out[k]) + col0;
  float acc[kN];
#pragma unroll
  for (int e = 0; e < kN; ++e) acc[e] = 0.f;
  // Vector loads need every row start aligned: the base pointers and the row pitch P * sizeof(T).
  const bool vec = col0 + kN <= P && aligned16(tab.a[k]) && aligned16(tab.v[k]) && (P * sizeof(T)) % 16 == 0;
  if (vec) {
#pragma unroll 4
    for (int64_t i = 0; i < B; ++i) {
      const float wa = __ldg(ca + i), wv = __ldg(cv + i);
      float x[kN], y[kN];
      load_vec(A + i * P, x);
      load_vec(V + i * P, y);
#pragma unroll
      for (int e = 0; e < kN; ++e) acc[e] = fmaf(wv, y[e], fmaf(wa, x[e], acc[e]));
    }
  } else {
    const int n = P - col0 < kN ? static_cast<int>(P - col0) : kN;
    for (int64_t i = 0; i < B; ++i) {
      const float wa = __ldg(ca + i), wv = __ldg(cv + i);
      for (int e = 0; e < n; ++e) acc[e] = fmaf(wv, to_f(V[i * P + e]), fmaf(wa, to_f(A[i * P + e]), acc[e]));
    }
  }
  const int n = P - col0 < kN ? static_cast<int>(P - col0) : kN;
  for (int e = 0; e < n; ++e) {
    const float r = accumulate ? acc[e] + to_f(out[e]) : acc[e];
    from_f(out + e, r);
  }
}

// One out dtype: launches over the given bucket indices.
template <typename T, typename O>
void launch_combine(const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& V, at::TensorList out,
                    const std::vector<int64_t>& live, int64_t B, const float* ca, const float* cv, bool accumulate,
                    cudaStream_t stream) {
  constexpr int64_t chunk = combine_chunk<T>();
  for (size_t g = 0; g < live.size(); g += kMaxBuckets) {
    BucketTable tab{};
    tab.n = static_cast<int>(std::min<size_t>(kMaxBuckets, live.size() - g));
    tab.start[0] = 0;
    for (int j = 0; j < tab.n; ++j) {
      const int64_t k = live[g + j];
      tab.a[j] = A[k].const_data_ptr<T>();
      tab.v[j] = V[k].const_data_ptr<T>();
      tab.out[j] = out[k].mutable_data_ptr<O>();
      tab.P[j] = A[k].size(1);
      tab.start[j + 1] = tab.start[j] + (tab.P[j] + chunk - 1) / chunk;
    }
    const int64_t chunks = tab.start[tab.n];
    TORCH_CHECK(chunks < (int64_t{1} << 31), "harmony::combine: ", chunks, " chunks exceed the grid limit");
    combine_kernel<T, O><<<static_cast<unsigned>(chunks), kCombineThreads, 0, stream>>>(tab, B, ca, cv, accumulate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void combine(at::TensorList A_in, at::TensorList V_in, const at::Tensor& ca_in, const at::Tensor& cv_in,
             at::TensorList out, bool accumulate) {
  const char* op = "harmony::combine";
  const int64_t B = check_buckets(op, A_in, V_in, c10::DeviceType::CUDA);
  check_combine_out(op, A_in, out);
  const c10::cuda::CUDAGuard guard(A_in[0].device());
  const at::Tensor ca = check_coeffs(op, "ca", ca_in, B, A_in[0].device());
  const at::Tensor cv = check_coeffs(op, "cv", cv_in, B, A_in[0].device());
  if (B == 0 && accumulate) return;  // nothing to add: out stays bit-for-bit as it was
  const std::vector<at::Tensor> A = contiguous_all(A_in), V = contiguous_all(V_in);
  std::vector<int64_t> live;
  for (size_t k = 0; k < A.size(); ++k)
    if (A[k].size(1) > 0) live.push_back(static_cast<int64_t>(k));
  if (live.empty()) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  HARMONY_DISPATCH(A[0].scalar_type(), op, T, {
    HARMONY_DISPATCH(out[0].scalar_type(), op, O, {
      launch_combine<T, O>(A, V, out, live, B, ca.const_data_ptr<float>(), cv.const_data_ptr<float>(), accumulate,
                           stream);
    });
  });
}

}  // namespace harmony::cuda

TORCH_LIBRARY_IMPL(harmony, CUDA, m) { m.impl("combine", &harmony::cuda::combine); }
