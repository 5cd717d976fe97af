// Vector primitives shared by the CPU kernels (paged_attention_cpu.cpp, elementwise_cpu.cpp): AVX-512 (16 lanes),
// AVX2+FMA (8 lanes), or none (kWidth == 0), chosen at compile time.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

// PAGED_CPU_FORCE_SCALAR builds the portable path on any machine (the tests build it to check it).
#if !defined(PAGED_CPU_FORCE_SCALAR) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
#define PAGED_CPU_SIMD 1
#include <immintrin.h>
#endif


namespace {

// ---------------------------------------------------------------------------------------------------------------
// Vector primitives. kWidth == 0 means no SIMD: every loop below then runs its scalar tail only.
// ---------------------------------------------------------------------------------------------------------------
#if defined(PAGED_CPU_SIMD) && defined(__AVX512F__)
constexpr int kWidth = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float x) { return _mm512_set1_ps(x); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline Vec vload(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vmaxv(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline float vmax(Vec v) { return _mm512_reduce_max_ps(v); }

// exp(x) for x <= 0 (Cephes polynomial, ~1 ulp); results below FLT_MIN are flushed to 0 so no denormal is made.
inline Vec vexp(Vec x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  Vec fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
  fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  Vec y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i exponent = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  y = _mm512_mul_ps(y, _mm512_castsi512_ps(exponent));
  return _mm512_mask_blend_ps(tiny, y, _mm512_setzero_ps());
}

// The two 256-bit halves of v added (AVX512F only: no DQ extract).
inline __m256 fold256(Vec v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// The four sums of four accumulators, stored to out[0..3]: halves folded, then a transposing hadd tree (one
// _mm512_reduce_add_ps each costs 3x as many instructions, and a block's dot products do 12 per 4 keys).
inline void vsum4(const Vec* acc, float* out) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold256(acc[0]), fold256(acc[1])),
                                  _mm256_hadd_ps(fold256(acc[2]), fold256(acc[3])));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

// The eight sums of eight accumulators, stored to out[0..7].
inline void vsum8(const Vec* acc, float* out) {
  const __m256 h01 = _mm256_hadd_ps(fold256(acc[0]), fold256(acc[1]));
  const __m256 h23 = _mm256_hadd_ps(fold256(acc[2]), fold256(acc[3]));
  const __m256 h45 = _mm256_hadd_ps(fold256(acc[4]), fold256(acc[5]));
  const __m256 h67 = _mm256_hadd_ps(fold256(acc[6]), fold256(acc[7]));
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                      _mm256_permute2f128_ps(h0123, h4567, 0x31)));
}

// Masked loads of a row's last n < kWidth lanes: with 16 lanes, a block of 8 keys would otherwise go through the
// softmax's scalar tails (std::exp per key).
#define PAGED_CPU_MASKED_TAIL 1
inline __mmask16 tail_mask(int n) { return static_cast<__mmask16>((1u << n) - 1); }
inline Vec vload_tail(const float* p, int n, float fill) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), tail_mask(n), p);
}

#elif defined(PAGED_CPU_SIMD)
constexpr int kWidth = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline Vec vload(const at::Half* p) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(32) float lanes[8];
  for (int i = 0; i < 8; ++i) lanes[i] = static_cast<float>(p[i]);
  return _mm256_load_ps(lanes);
#endif
}
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vmaxv(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline float vsum(Vec v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_hadd_ps(half, half);
  return _mm_cvtss_f32(_mm_hadd_ps(half, half));
}
inline float vmax(Vec v) {
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_shuffle_ps(half, half, 1)));
}

// exp(x) for x <= 0 (Cephes polynomial, ~1 ulp); results below FLT_MIN are flushed to 0 so no denormal is made.
inline Vec vexp(Vec x) {
  const Vec tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  Vec fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  Vec y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
  return _mm256_andnot_ps(tiny, y);
}

// The four sums of four accumulators, stored to out[0..3].
inline void vsum4(const Vec* acc, float* out) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

// The eight sums of eight accumulators, stored to out[0..7] (a transposing hadd tree: 7 adds for 8 reductions).
inline void vsum8(const Vec* acc, float* out) {
  const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                    _mm256_permute2f128_ps(h0123, h4567, 0x31));
  _mm256_storeu_ps(out, sums);
}

#else
constexpr int kWidth = 0;
#endif

}  // namespace
