// 8-lane fp32 vectors for the CPU kernels: AVX2 + FMA + F16C intrinsics when the compiler targets them
// (setup.py passes -mavx2 -mfma -mf16c, never -march=native), a portable array otherwise.
// bf16/fp16 loads are widened to fp32 inside the vector registers; stores round to nearest even.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HARMONY_SIMD_AVX2 1
#include <immintrin.h>
#else
#define HARMONY_SIMD_AVX2 0
#endif

namespace harmony::simd {

constexpr int kLanes = 8;

#if HARMONY_SIMD_AVX2

struct F8 {
  __m256 v;
};

inline F8 zero() { return {_mm256_setzero_ps()}; }
inline F8 broadcast(float x) { return {_mm256_set1_ps(x)}; }
inline F8 add(F8 a, F8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline F8 mul(F8 a, F8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
// a * b + c with one rounding.
inline F8 fma(F8 a, F8 b, F8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }

inline F8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline F8 load(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: zero-extend to 32 bits and shift into place.
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
inline F8 load(const c10::Half* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}

inline void store(float* p, F8 x) { _mm256_storeu_ps(p, x.v); }
inline void store(c10::BFloat16* p, F8 x) {
  // Round to nearest even like c10::BFloat16: add 0x7FFF plus the lowest kept bit; NaN becomes 0x7FC0.
  __m256i u = _mm256_castps_si256(x.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // packus works per 128-bit half: pack, then gather the two useful 64-bit quarters.
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void store(c10::Half* p, F8 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Horizontal sum in a fixed order: (l0+l4)+(l2+l6) + (l1+l5)+(l3+l7).
inline float hsum(F8 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

#else  // portable fallback: plain arrays the compiler may vectorise with whatever ISA it targets

struct F8 {
  float v[kLanes];
};

inline F8 zero() { return F8{}; }
inline F8 broadcast(float x) {
  F8 r;
  for (int l = 0; l < kLanes; ++l) r.v[l] = x;
  return r;
}
inline F8 add(F8 a, F8 b) {
  for (int l = 0; l < kLanes; ++l) a.v[l] += b.v[l];
  return a;
}
inline F8 mul(F8 a, F8 b) {
  for (int l = 0; l < kLanes; ++l) a.v[l] *= b.v[l];
  return a;
}
inline F8 fma(F8 a, F8 b, F8 c) {
  for (int l = 0; l < kLanes; ++l) c.v[l] += a.v[l] * b.v[l];
  return c;
}
template <typename T>
inline F8 load(const T* p) {
  F8 r;
  for (int l = 0; l < kLanes; ++l) r.v[l] = static_cast<float>(p[l]);
  return r;
}
template <typename T>
inline void store(T* p, F8 x) {
  for (int l = 0; l < kLanes; ++l) p[l] = static_cast<T>(x.v[l]);
}
inline float hsum(F8 x) {
  float s0 = x.v[0] + x.v[4], s1 = x.v[1] + x.v[5], s2 = x.v[2] + x.v[6], s3 = x.v[3] + x.v[7];
  return (s0 + s2) + (s1 + s3);
}

#endif

// Tails: the first n < 8 elements, the other lanes zero (so they add nothing to dots and sums).
template <typename T>
inline F8 load_n(const T* p, int64_t n) {
  T tmp[kLanes];
  std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
  std::memcpy(static_cast<void*>(tmp), p, static_cast<size_t>(n) * sizeof(T));
  return load(static_cast<const T*>(tmp));
}
template <typename T>
inline void store_n(T* p, F8 x, int64_t n) {
  T tmp[kLanes];
  store(tmp, x);
  std::memcpy(static_cast<void*>(p), tmp, static_cast<size_t>(n) * sizeof(T));
}

// Scalar widening used for broadcast operands.
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

}  // namespace harmony::simd
