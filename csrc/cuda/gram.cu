// gram on CUDA: per-row (A·V, A·A, V·V) over a list of buckets.
// Stage 1: a grid over (chunk, row); chunks of every bucket are numbered bucket-major and a bucket table passed
// by value maps a block's chunk to its bucket (one launch per kMaxBuckets buckets). Each block reduces its
// kGramChunk elements with 16-byte loads (when the row is 16-byte aligned) into its own slot of a [B, N, 3]
// workspace. Stage 2 (reduce_partials) sums every row's N slots in a fixed order and adds them into out.
// No atomics: same inputs, same bits.
#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"

namespace harmony::cuda {
namespace {

constexpr int kGramThreads = 256;
constexpr int64_t kGramChunk = 8192;  // elements per block: 8 (fp32) or 4 (16-bit) vector loads per thread
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__global__ void __launch_bounds__(kGramThreads)
    gram_partials_kernel(BucketTable tab, int64_t B, int64_t ws_chunks, int64_t first_chunk, float* __restrict__ ws) {
  constexpr int kN = Vec16<T>::kN;
  const int64_t c = blockIdx.x;
  const int k = bucket_of(tab, c);
  const int64_t P = tab.P[k];
  const int64_t begin = (c - tab.start[k]) * kGramChunk;
  const int64_t len = P - begin < kGramChunk ? P - begin : kGramChunk;
  for (int64_t row = blockIdx.y; row < B; row += gridDim.y) {
    const T* a = static_cast<const T*>(tab.a[k]) + row * P + begin;
    const T* v = static_cast<const T*>(tab.v[k]) + row * P + begin;
    float ab = 0.f, aa = 0.f, vv = 0.f;
    int64_t scalar_from = 0;
    if (aligned16(a) && aligned16(v)) {  // the same for the whole block: no divergence
      const int64_t nvec = len / kN;
#pragma unroll 4
      for (int64_t i = threadIdx.x; i < nvec; i += kGramThreads) {
        float x[kN], y[kN];
        load_vec(a + i * kN, x);
        load_vec(v + i * kN, y);
#pragma unroll
        for (int e = 0; e < kN; ++e) {
          ab = fmaf(x[e], y[e], ab);
          aa = fmaf(x[e], x[e], aa);
          vv = fmaf(y[e], y[e], vv);
        }
      }
      scalar_from = nvec * kN;
    }
    for (int64_t j = scalar_from + threadIdx.x; j < len; j += kGramThreads) {  // tail, or unaligned rows
      const float x = to_f(a[j]), y = to_f(v[j]);
      ab = fmaf(x, y, ab);
      aa = fmaf(x, x, aa);
      vv = fmaf(y, y, vv);
    }
    block_sum3<kGramThreads>(ab, aa, vv);
    if (threadIdx.x == 0) {
      float* w = ws + (row * ws_chunks + first_chunk + c) * 3;
      w[0] = ab;
      w[1] = aa;
      w[2] = vv;
    }
  }
}

}  // namespace

void gram(at::TensorList A_in, at::TensorList V_in, const at::Tensor& out) {
  const char* op = "harmony::gram";
  const int64_t B = check_buckets(op, A_in, V_in, c10::DeviceType::CUDA);
  check_dots_out(op, out, B, A_in[0].device());
  const std::vector<at::Tensor> A = contiguous_all(A_in), V = contiguous_all(V_in);
  const c10::cuda::CUDAGuard guard(A[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Global chunk numbering, bucket-major; empty buckets own no chunks and never enter a table.
  std::vector<int64_t> live;
  int64_t total = 0;
  for (size_t k = 0; k < A.size(); ++k)
    if (A[k].size(1) > 0) live.push_back(static_cast<int64_t>(k));
  for (int64_t k : live) total += (A[k].size(1) + kGramChunk - 1) / kGramChunk;
  if (B == 0 || total == 0) return;  // nothing to add
  at::Tensor ws = at::empty({B, total, 3}, A[0].options().dtype(at::kFloat));

  HARMONY_DISPATCH(A[0].scalar_type(), op, T, {
    int64_t first_chunk = 0;
    for (size_t g = 0; g < live.size(); g += kMaxBuckets) {
      BucketTable tab{};
      tab.n = static_cast<int>(std::min<size_t>(kMaxBuckets, live.size() - g));
      tab.start[0] = 0;
      for (int j = 0; j < tab.n; ++j) {
        const int64_t k = live[g + j];
        tab.a[j] = A[k].const_data_ptr<T>();
        tab.v[j] = V[k].const_data_ptr<T>();
        tab.P[j] = A[k].size(1);
        tab.start[j + 1] = tab.start[j] + (tab.P[j] + kGramChunk - 1) / kGramChunk;
      }
      const int64_t chunks = tab.start[tab.n];
      TORCH_CHECK(chunks < (int64_t{1} << 31), op, ": ", chunks, " chunks exceed the grid limit");
      const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min(B, kMaxGridY)));
      gram_partials_kernel<T><<<grid, kGramThreads, 0, stream>>>(tab, B, total, first_chunk,
                                                                 ws.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      first_chunk += chunks;
    }
  });
  reduce_partials(ws, B, total, out, stream);
}

}  // namespace harmony::cuda

TORCH_LIBRARY_IMPL(harmony, CUDA, m) { m.impl("gram", &harmony::cuda::gram); }
