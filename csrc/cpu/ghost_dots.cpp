// ghost_dots on the CPU: per sample i, (⟨Ga_iᵀX_i, Gb_iᵀX_i⟩, ‖Ga_iᵀX_i‖², ‖Gb_iᵀX_i‖²) from X [B, T, Din]
// and Ga, Gb [B, T, Dout], never writing Ga_iᵀX_i to memory. Own blocked loops (no BLAS call), so the
// summation order is fixed and the result does not depend on the thread count.
//
// Gram form (method "gram"), work item = (sample, block of 8 tokens t): with K = X Xᵀ symmetric,
//   Σ_{t,s} K_ts (Ga Gbᵀ)_ts = Σ_t K_tt Ga_t·Gb_t + Σ_{t<s} K_ts (Ga_t·Gb_s + Ga_s·Gb_t),
//   Σ_{t,s} K_ts (Ga Gaᵀ)_ts = Σ_t K_tt Ga_t·Ga_t + 2 Σ_{t<s} K_ts Ga_t·Ga_s   (likewise for Gb),
// so token t pairs with s = t..T-1 and needs one Din dot and four Dout dots per pair.
// Instantiate form (method "instantiate"), work item = (sample, tile of 16 output features): a register tile of
// [2 features x 16 inputs] of Ga_iᵀX_i and Gb_iᵀX_i accumulates over t, then its three dots are taken;
// X_i's 16-column strip (T x 64 B) stays in L1/L2 while the tile's 8 feature pairs sweep it.
// Both forms store per-item partials (double) and sum them per sample in item order.
// bf16/fp16 inputs are converted to fp32 copies first: both forms read every input element many times
// (once per token pair, or once per feature pair), and widening it each time costs more than one conversion.
#include <algorithm>
#include <vector>

#include <ATen/ops/empty.h>

#include "../checks.h"
#include "../ops.h"
#include "parallel.h"
#include "simd.h"

namespace harmony::cpu {
namespace {

using namespace harmony::simd;

constexpr int64_t kTokBlock = 8;   // tokens per Gram-form item (their rows stay in L1 while s sweeps)
constexpr int64_t kFeatTile = 16;  // output features per instantiate-form item (8 register-tile pairs)
constexpr int64_t kColTile = 16;   // input columns per register tile (two vectors)

template <typename T>
float dot(const T* x, const T* y, int64_t n) {
  F8 s0 = zero(), s1 = zero();
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    s0 = fma(load(x + j), load(y + j), s0);
    s1 = fma(load(x + j + kLanes), load(y + j + kLanes), s1);
  }
  if (j + kLanes <= n) {
    s0 = fma(load(x + j), load(y + j), s0);
    j += kLanes;
  }
  if (j < n) s1 = fma(load_n(x + j, n - j), load_n(y + j, n - j), s1);
  return hsum(add(s0, s1));
}

// r = (at·as, bt·bs, at·bs, as·bt) over n elements in one pass.
template <typename T>
void dots4(const T* at, const T* bt, const T* as, const T* bs, int64_t n, float* r) {
  F8 aa = zero(), bb = zero(), ab = zero(), ba = zero();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const F8 x = load(at + j), y = load(bt + j), u = load(as + j), w = load(bs + j);
    aa = fma(x, u, aa);
    bb = fma(y, w, bb);
    ab = fma(x, w, ab);
    ba = fma(u, y, ba);
  }
  if (j < n) {
    const int64_t m = n - j;
    const F8 x = load_n(at + j, m), y = load_n(bt + j, m), u = load_n(as + j, m), w = load_n(bs + j, m);
    aa = fma(x, u, aa);
    bb = fma(y, w, bb);
    ab = fma(x, w, ab);
    ba = fma(u, y, ba);
  }
  r[0] = hsum(aa);
  r[1] = hsum(bb);
  r[2] = hsum(ab);
  r[3] = hsum(ba);
}

// Gram-form item: tokens [t0, t0 + kTokBlock) of one sample against tokens s >= t. X [T, Din], Ga/Gb [T, Dout]
// of that sample. The s loop is outside, so each s row is read from memory once per item and then reused from
// L1 by the block's tokens.
template <typename T>
void gram_form_block(const T* X, const T* Ga, const T* Gb, int64_t Tn, int64_t Din, int64_t Dout, int64_t t0,
                     double* res) {
  const int64_t t1 = std::min(t0 + kTokBlock, Tn);
  double ab = 0.0, aa = 0.0, bb = 0.0;
  float d[4];
  for (int64_t s = t0; s < Tn; ++s) {
    const T* xs = X + s * Din;
    const T* as = Ga + s * Dout;
    const T* bs = Gb + s * Dout;
    for (int64_t t = t0; t < std::min(t1, s + 1); ++t) {
      const double k = dot(X + t * Din, xs, Din);
      dots4(Ga + t * Dout, Gb + t * Dout, as, bs, Dout, d);
      if (s == t) {
        ab += k * d[2];
        aa += k * d[0];
        bb += k * d[1];
      } else {
        ab += k * (static_cast<double>(d[2]) + d[3]);
        aa += 2.0 * k * d[0];
        bb += 2.0 * k * d[1];
      }
    }
  }
  res[0] = ab;
  res[1] = aa;
  res[2] = bb;
}

// Register tile: features o, o+1 (o+1 only when `two`) x input columns [0, nd) of the strip at X + d0.
// Accumulates Σ_t Ga[t,o] X[t,:] and Σ_t Gb[t,o] X[t,:] and adds the tile's three dots into res.
template <bool kFull, typename T>
void instantiate_tile(const T* X, const T* Ga, const T* Gb, int64_t Tn, int64_t Din, int64_t Dout, int64_t o,
                      bool two, int64_t nd, double* res) {
  F8 a00 = zero(), a01 = zero(), a10 = zero(), a11 = zero();
  F8 b00 = zero(), b01 = zero(), b10 = zero(), b11 = zero();
  for (int64_t t = 0; t < Tn; ++t) {
    const T* xr = X + t * Din;
    F8 x0, x1;
    if (kFull) {
      x0 = load(xr);
      x1 = load(xr + kLanes);
    } else {
      x0 = load_n(xr, std::min<int64_t>(nd, kLanes));
      x1 = nd > kLanes ? load_n(xr + kLanes, nd - kLanes) : zero();
    }
    const T* g = Ga + t * Dout + o;
    const T* h = Gb + t * Dout + o;
    const F8 ga0 = broadcast(to_float(g[0])), gb0 = broadcast(to_float(h[0]));
    const F8 ga1 = two ? broadcast(to_float(g[1])) : zero();
    const F8 gb1 = two ? broadcast(to_float(h[1])) : zero();
    a00 = fma(ga0, x0, a00);
    a01 = fma(ga0, x1, a01);
    a10 = fma(ga1, x0, a10);
    a11 = fma(ga1, x1, a11);
    b00 = fma(gb0, x0, b00);
    b01 = fma(gb0, x1, b01);
    b10 = fma(gb1, x0, b10);
    b11 = fma(gb1, x1, b11);
  }
  res[0] += hsum(fma(a11, b11, fma(a10, b10, fma(a01, b01, mul(a00, b00)))));
  res[1] += hsum(fma(a11, a11, fma(a10, a10, fma(a01, a01, mul(a00, a00)))));
  res[2] += hsum(fma(b11, b11, fma(b10, b10, fma(b01, b01, mul(b00, b00)))));
}

// Instantiate-form item: output features [o0, o0 + kFeatTile) of one sample, all input columns.
template <typename T>
void instantiate_item(const T* X, const T* Ga, const T* Gb, int64_t Tn, int64_t Din, int64_t Dout, int64_t o0,
                      double* res) {
  res[0] = res[1] = res[2] = 0.0;
  const int64_t o1 = std::min(o0 + kFeatTile, Dout);
  for (int64_t d0 = 0; d0 < Din; d0 += kColTile) {
    const int64_t nd = std::min(kColTile, Din - d0);
    for (int64_t o = o0; o < o1; o += 2) {
      if (nd == kColTile)
        instantiate_tile<true>(X + d0, Ga, Gb, Tn, Din, Dout, o, o + 1 < o1, nd, res);
      else
        instantiate_tile<false>(X + d0, Ga, Gb, Tn, Din, Dout, o, o + 1 < o1, nd, res);
    }
  }
}

}  // namespace

void ghost_dots(const at::Tensor& X_in, const at::Tensor& Ga_in, const at::Tensor& Gb_in, const at::Tensor& out,
                c10::string_view method) {
  const char* op = "harmony::ghost_dots";
  check_ghost(op, X_in, Ga_in, Gb_in, out, c10::DeviceType::CPU);
  const bool gram_form = ghost_gram_form(op, method);
  const at::Tensor X = X_in.to(at::kFloat).contiguous();
  const at::Tensor Ga = Ga_in.to(at::kFloat).contiguous();
  const at::Tensor Gb = Gb_in.to(at::kFloat).contiguous();
  const int64_t B = X.size(0), Tn = X.size(1), Din = X.size(2), Dout = Ga.size(2);
  const int64_t per_sample = gram_form ? (Tn + kTokBlock - 1) / kTokBlock : (Dout + kFeatTile - 1) / kFeatTile;
  std::vector<double> partial(static_cast<size_t>(B * per_sample) * 3, 0.0);

  const float* px = X.const_data_ptr<float>();
  const float* pa = Ga.const_data_ptr<float>();
  const float* pb = Gb.const_data_ptr<float>();
  // Dynamic schedule: Gram-form items shrink with t (triangle); results do not depend on who runs an item.
  parallel_items(B * per_sample, Schedule::kDynamic, [&](int64_t w) {
    const int64_t i = w / per_sample, j = w % per_sample;
    const float* x = px + i * Tn * Din;
    const float* a = pa + i * Tn * Dout;
    const float* b = pb + i * Tn * Dout;
    if (gram_form)
      gram_form_block(x, a, b, Tn, Din, Dout, j * kTokBlock, partial.data() + 3 * w);
    else
      instantiate_item(x, a, b, Tn, Din, Dout, j * kFeatTile, partial.data() + 3 * w);
  });

  float* o = out.mutable_data_ptr<float>();
  const int64_t s0 = out.stride(0), s1 = out.stride(1);
  for (int64_t i = 0; i < B; ++i) {
    double s[3] = {0.0, 0.0, 0.0};
    for (int64_t j = 0; j < per_sample; ++j)
      for (int q = 0; q < 3; ++q) s[q] += partial[3 * (i * per_sample + j) + q];
    for (int q = 0; q < 3; ++q) o[i * s0 + q * s1] += static_cast<float>(s[q]);
  }
}

}  // namespace harmony::cpu
