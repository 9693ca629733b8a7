// Device helpers shared by the CUDA kernels: widening loads (16-byte vectors of fp32/bf16/fp16 to fp32),
// deterministic block reductions, bucket tables passed by value, and the fixed-order second stage that
// sums per-block partials [B, N, 3] into [B, 3].
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

namespace harmony::cuda {

constexpr int kWarp = 32;

// ---- element conversion -------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(c10::BFloat16 x) { return __uint_as_float(static_cast<uint32_t>(x.x) << 16); }
__device__ __forceinline__ float to_f(c10::Half x) { return __half2float(__ushort_as_half(x.x)); }

__device__ __forceinline__ void from_f(float* p, float x) { *p = x; }
__device__ __forceinline__ void from_f(c10::BFloat16* p, float x) {
  p->x = __bfloat16_as_ushort(__float2bfloat16_rn(x));  // round to nearest even, like c10
}
__device__ __forceinline__ void from_f(c10::Half* p, float x) { p->x = __half_as_ushort(__float2half_rn(x)); }

// ---- 16-byte vector loads -----------------------------------------------------------------------------------

template <typename T>
struct Vec16 {
  static constexpr int kN = 16 / sizeof(T);  // elements per 16-byte load: 4 fp32, 8 bf16/fp16
};

__device__ __forceinline__ void widen(const uint4& u, float* f, const float*) {
  f[0] = __uint_as_float(u.x);
  f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z);
  f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void widen(const uint4& u, float* f, const c10::BFloat16*) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void widen(const uint4& u, float* f, const c10::Half*) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xFFFFu)));
    f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}

// f[0..kN) = p[0..kN) as fp32; p must be 16-byte aligned. Read-only path, streamed once (no L1 allocation).
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* f) {
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  widen(u, f, static_cast<const T*>(nullptr));
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---- deterministic reductions -------------------------------------------------------------------------------

template <typename F>
__device__ __forceinline__ F warp_sum(F x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xFFFFFFFFu, x, off);
  return x;
}

// Sums three per-thread values over the block; the totals are valid in thread 0. Fixed shuffle tree, then
// warps in index order: the same inputs give the same bits. Ends with a barrier so it may be called in a loop.
template <int kThreads, typename F>
__device__ __forceinline__ void block_sum3(F& a, F& b, F& c) {
  static_assert(kThreads % kWarp == 0, "whole warps");
  constexpr int kWarps = kThreads / kWarp;
  __shared__ F sh[3][kWarps];
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    sh[0][warp] = a;
    sh[1][warp] = b;
    sh[2][warp] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = sh[0][0];
    b = sh[1][0];
    c = sh[2][0];
    for (int w = 1; w < kWarps; ++w) {
      a += sh[0][w];
      b += sh[1][w];
      c += sh[2][w];
    }
  }
  __syncthreads();
}

// Stage 2: out[row, q] += Σ_n ws[row, n, q] (n ascending per thread, then a fixed tree, in double; the sum is
// rounded to fp32 once and added to out).
constexpr int kReduceThreads = 128;

namespace {  // one private copy per translation unit that includes this header

__global__ void __launch_bounds__(kReduceThreads)
    reduce_partials_kernel(const float* __restrict__ ws, int64_t N, float* __restrict__ out, int64_t s0, int64_t s1) {
  const int64_t row = blockIdx.x;
  const float* p = ws + row * N * 3;
  double a = 0.0, b = 0.0, c = 0.0;
  for (int64_t n = threadIdx.x; n < N; n += kReduceThreads) {
    a += p[3 * n];
    b += p[3 * n + 1];
    c += p[3 * n + 2];
  }
  block_sum3<kReduceThreads>(a, b, c);
  if (threadIdx.x == 0) {
    float* o = out + row * s0;
    o[0] += static_cast<float>(a);
    o[s1] += static_cast<float>(b);
    o[2 * s1] += static_cast<float>(c);
  }
}

// out [B, 3] fp32 (any strides) += ws [B, N, 3] fp32 summed over N.
inline void reduce_partials(const at::Tensor& ws, int64_t B, int64_t N, const at::Tensor& out, cudaStream_t stream) {
  if (B == 0) return;
  reduce_partials_kernel<<<static_cast<unsigned>(B), kReduceThreads, 0, stream>>>(
      ws.const_data_ptr<float>(), N, out.mutable_data_ptr<float>(), out.stride(0), out.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// ---- bucket tables ------------------------------------------------------------------------------------------

// Up to kMaxBuckets buckets per launch, passed by value as a kernel parameter (like multi_tensor_apply):
// bucket k owns chunks [start[k], start[k+1]) of the launch's 1-D grid.
constexpr int kMaxBuckets = 40;

struct BucketTable {
  const void* a[kMaxBuckets];
  const void* v[kMaxBuckets];
  void* out[kMaxBuckets];  // combine only
  int64_t P[kMaxBuckets];
  int64_t start[kMaxBuckets + 1];
  int n;
};

// The bucket owning chunk c (binary search over start; buckets with no chunks are never in a table).
__device__ __forceinline__ int bucket_of(const BucketTable& t, int64_t c) {
  int lo = 0, hi = t.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (t.start[mid] <= c)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

}  // namespace harmony::cuda
