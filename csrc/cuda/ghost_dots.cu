// ghost_dots on CUDA: per sample i, (⟨Ga_iᵀX_i, Gb_iᵀX_i⟩, ‖Ga_iᵀX_i‖², ‖Gb_iᵀX_i‖²) from X [B, T, Din] and
// Ga, Gb [B, T, Dout] without writing Ga_iᵀX_i to memory. Plain fp32 FMA tiles in shared memory (no tensor
// cores: correctness and fp32 accuracy first). Each block writes one partial triple to a [B, tiles, 3]
// workspace; reduce_partials sums them per sample in a fixed order (no atomics) and adds them into out.
//
// Instantiate form: block = (sample, [32 out x 32 in] tile of Ga_iᵀX_i and Gb_iᵀX_i), accumulated over T in
// 32-token steps from shared-memory tiles of X, Ga, Gb; then the tile's three dots.
// Gram form: block = (sample, token tiles t1 <= t2): the [32 x 32] tiles of K = X Xᵀ, Ga Gaᵀ, Gb Gbᵀ and
// Ga Gbᵀ + Gb Gaᵀ over (t1, t2), then Σ K∘M. K and the norm Grams are symmetric, so an off-diagonal tile pair
// stands for its mirror too (weight 2) and Σ K∘(Ga Gbᵀ) = ½ Σ K∘(Ga Gbᵀ + Gb Gaᵀ).
#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"

namespace harmony::cuda {
namespace {

constexpr int kTile = 32;                       // tile edge in tokens / features
constexpr int kGhostThreads = 256;              // 8 warps; each thread owns 4 entries of a 32 x 32 tile
constexpr int kRowsPerThread = kTile * kTile / kGhostThreads;
constexpr int64_t kMaxGridY = 65535;

// Loads the [32 rows x 32 cols] tile src[r0 + r, c0 + c] (row pitch `pitch`, bounds nr x nc, zeros outside)
// into dst[r][c] as fp32, the block's threads striding over the 1024 entries (consecutive c: coalesced).
template <typename T>
__device__ __forceinline__ void load_tile(float (*dst)[kTile + 1], const T* src, int64_t pitch, int64_t r0,
                                          int64_t nr, int64_t c0, int64_t nc) {
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += kGhostThreads) {
    const int r = idx / kTile, c = idx % kTile;
    const int64_t gr = r0 + r, gc = c0 + c;
    dst[r][c] = (gr < nr && gc < nc) ? to_f(src[gr * pitch + gc]) : 0.f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kGhostThreads)
    instantiate_kernel(const T* __restrict__ X, const T* __restrict__ Ga, const T* __restrict__ Gb, int64_t B,
                       int64_t Tn, int64_t Din, int64_t Dout, int64_t tiles_in, float* __restrict__ ws) {
  __shared__ float xs[kTile][kTile + 1];  // [t][d]
  __shared__ float as[kTile][kTile + 1];  // [t][o]
  __shared__ float bs[kTile][kTile + 1];
  const int64_t tile = blockIdx.x;
  const int64_t o0 = (tile / tiles_in) * kTile, d0 = (tile % tiles_in) * kTile;
  const int d = threadIdx.x % kTile, o_base = threadIdx.x / kTile;  // a warp shares o_base: broadcast reads
  for (int64_t i = blockIdx.y; i < B; i += gridDim.y) {
    const T* x = X + i * Tn * Din;
    const T* ga = Ga + i * Tn * Dout;
    const T* gb = Gb + i * Tn * Dout;
    float acc_a[kRowsPerThread] = {}, acc_b[kRowsPerThread] = {};
    for (int64_t t0 = 0; t0 < Tn; t0 += kTile) {
      load_tile(xs, x, Din, t0, Tn, d0, Din);
      load_tile(as, ga, Dout, t0, Tn, o0, Dout);
      load_tile(bs, gb, Dout, t0, Tn, o0, Dout);
      __syncthreads();
#pragma unroll 8
      for (int t = 0; t < kTile; ++t) {
        const float xv = xs[t][d];
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          const int o = o_base + r * (kGhostThreads / kTile);
          acc_a[r] = fmaf(as[t][o], xv, acc_a[r]);
          acc_b[r] = fmaf(bs[t][o], xv, acc_b[r]);
        }
      }
      __syncthreads();
    }
    float ab = 0.f, aa = 0.f, bb = 0.f;  // entries outside the matrix are exact zeros
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      ab = fmaf(acc_a[r], acc_b[r], ab);
      aa = fmaf(acc_a[r], acc_a[r], aa);
      bb = fmaf(acc_b[r], acc_b[r], bb);
    }
    block_sum3<kGhostThreads>(ab, aa, bb);
    if (threadIdx.x == 0) {
      float* w = ws + (i * gridDim.x + tile) * 3;
      w[0] = ab;
      w[1] = aa;
      w[2] = bb;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kGhostThreads)
    gram_form_kernel(const T* __restrict__ X, const T* __restrict__ Ga, const T* __restrict__ Gb, int64_t B,
                     int64_t Tn, int64_t Din, int64_t Dout, int64_t tiles_t, float* __restrict__ ws) {
  __shared__ float p[kTile][kTile + 1];  // rows of tile t1 ([t][k]); +1 column: no bank conflicts on q[s][k]
  __shared__ float q[kTile][kTile + 1];  // rows of tile t2 ([s][k])
  __shared__ float pb[kTile][kTile + 1];
  __shared__ float qb[kTile][kTile + 1];
  // blockIdx.x enumerates pairs t1 <= t2 row by row: find t1 with start(t1) <= pair < start(t1 + 1).
  const int64_t pair = blockIdx.x;
  int64_t t1 = 0, start = 0;
  while (start + (tiles_t - t1) <= pair) {
    start += tiles_t - t1;
    ++t1;
  }
  const int64_t t2 = t1 + (pair - start);
  const int64_t r0 = t1 * kTile, s0 = t2 * kTile;
  const int s = threadIdx.x % kTile, t_base = threadIdx.x / kTile;
  const float w = t1 == t2 ? 1.f : 2.f;
  for (int64_t i = blockIdx.y; i < B; i += gridDim.y) {
    const T* x = X + i * Tn * Din;
    const T* ga = Ga + i * Tn * Dout;
    const T* gb = Gb + i * Tn * Dout;
    float kx[kRowsPerThread] = {}, maa[kRowsPerThread] = {}, mbb[kRowsPerThread] = {}, mab[kRowsPerThread] = {};
    for (int64_t k0 = 0; k0 < Din; k0 += kTile) {  // K = X Xᵀ on the (t1, t2) tile
      load_tile(p, x, Din, r0, Tn, k0, Din);
      load_tile(q, x, Din, s0, Tn, k0, Din);
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kTile; ++k) {
        const float qs = q[s][k];
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) kx[r] = fmaf(p[t_base + r * (kGhostThreads / kTile)][k], qs, kx[r]);
      }
      __syncthreads();
    }
    for (int64_t k0 = 0; k0 < Dout; k0 += kTile) {  // Ga Gaᵀ, Gb Gbᵀ, Ga Gbᵀ + Gb Gaᵀ on the same tile
      load_tile(p, ga, Dout, r0, Tn, k0, Dout);
      load_tile(q, ga, Dout, s0, Tn, k0, Dout);
      load_tile(pb, gb, Dout, r0, Tn, k0, Dout);
      load_tile(qb, gb, Dout, s0, Tn, k0, Dout);
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < kTile; ++k) {
        const float qa_s = q[s][k], qb_s = qb[s][k];
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          const int t = t_base + r * (kGhostThreads / kTile);
          const float pa_t = p[t][k], pb_t = pb[t][k];
          maa[r] = fmaf(pa_t, qa_s, maa[r]);
          mbb[r] = fmaf(pb_t, qb_s, mbb[r]);
          mab[r] = fmaf(pa_t, qb_s, fmaf(pb_t, qa_s, mab[r]));
        }
      }
      __syncthreads();
    }
    float ab = 0.f, aa = 0.f, bb = 0.f;  // rows or columns outside T hold K = 0
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      ab = fmaf(kx[r], mab[r], ab);
      aa = fmaf(kx[r], maa[r], aa);
      bb = fmaf(kx[r], mbb[r], bb);
    }
    block_sum3<kGhostThreads>(ab, aa, bb);
    if (threadIdx.x == 0) {
      float* out = ws + (i * gridDim.x + pair) * 3;
      out[0] = 0.5f * w * ab;
      out[1] = w * aa;
      out[2] = w * bb;
    }
  }
}

}  // namespace

void ghost_dots(const at::Tensor& X_in, const at::Tensor& Ga_in, const at::Tensor& Gb_in, const at::Tensor& out,
                c10::string_view method) {
  const char* op = "harmony::ghost_dots";
  check_ghost(op, X_in, Ga_in, Gb_in, out, c10::DeviceType::CUDA);
  const bool gram_form = ghost_gram_form(op, method);
  const c10::cuda::CUDAGuard guard(X_in.device());
  const at::Tensor X = X_in.contiguous(), Ga = Ga_in.contiguous(), Gb = Gb_in.contiguous();
  const int64_t B = X.size(0), Tn = X.size(1), Din = X.size(2), Dout = Ga.size(2);
  const auto f32 = X.options().dtype(at::kFloat);
  if (B == 0 || Tn == 0 || Din == 0 || Dout == 0) return;  // nothing to add
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tiles_t = (Tn + kTile - 1) / kTile;
  const int64_t tiles_in = (Din + kTile - 1) / kTile, tiles_out = (Dout + kTile - 1) / kTile;
  const int64_t tiles = gram_form ? tiles_t * (tiles_t + 1) / 2 : tiles_out * tiles_in;
  TORCH_CHECK(tiles < (int64_t{1} << 31), op, ": ", tiles, " tiles exceed the grid limit");
  at::Tensor ws = at::empty({B, tiles, 3}, f32);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(B, kMaxGridY)));
  HARMONY_DISPATCH(X.scalar_type(), op, T, {
    const T* x = X.const_data_ptr<T>();
    const T* a = Ga.const_data_ptr<T>();
    const T* b = Gb.const_data_ptr<T>();
    if (gram_form)
      gram_form_kernel<T><<<grid, kGhostThreads, 0, stream>>>(x, a, b, B, Tn, Din, Dout, tiles_t,
                                                              ws.mutable_data_ptr<float>());
    else
      instantiate_kernel<T><<<grid, kGhostThreads, 0, stream>>>(x, a, b, B, Tn, Din, Dout, tiles_in,
                                                                ws.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  reduce_partials(ws, B, tiles, out, stream);
}

}  // namespace harmony::cuda

TORCH_LIBRARY_IMPL(harmony, CUDA, m) { m.impl("ghost_dots", &harmony::cuda::ghost_dots); }
