// Fused elementwise ops of the decoder layers on CPU: each reads and writes the activations once, where the eager
// chain is 3-10 ATen ops (each a dispatch, an allocation and a pass over memory). At decode sizes (64 rows of 576)
// an ATen op costs more in dispatch than in arithmetic, so the saving is mostly the op count.
//
// Each computes what the eager chain computes in the same dtype, rounding where it rounds (a bf16 tensor op rounds
// its fp32 result to bf16, to nearest even), so bf16 outputs match the eager ones but for the order of the RMSNorm
// sum and exp's last bit; fp32 within a few ulp.
//
// Ops (float32 or bfloat16 tensors, contiguous in the last dim):
//   rms_norm(input [T,N], weight [N], eps, out [T,N])
//     out = weight * to_dtype(x * rsqrt(mean(x^2) + eps)), x = input in fp32 (transformers' LlamaRMSNorm)
//   add_rms_norm(input [T,N], residual [T,N] (updated), weight [N], eps, out [T,N])
//     residual = input + residual; out = rms_norm(residual)
//   silu_and_mul(gate_up [T,2I], out [T,I])        out = silu(gate) * up
//   rotary(query [T,H,D] (updated), key [T,KVH,D] (updated), cos [T,D], sin [T,D])
//     x = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]) (the GPT-NeoX/Llama layout)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_vec.h"

#ifndef PAGED_CPU_LIBRARY
#define PAGED_CPU_LIBRARY paged_cpu
#endif

namespace {

using at::BFloat16;

// Rows per parallel chunk: ~16K elements, so a decode step's rows stay on one thread (a parallel region costs
// more than the work) and a prefill's spread over all of them.
int64_t row_grain(int64_t row_elements) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elements)); }

// Scalar conversions: to BFloat16 rounds to nearest even (c10's), as ATen does.
template <typename T>
inline float round_as(float x) {
  return static_cast<float>(static_cast<T>(x));
}

#if defined(PAGED_CPU_SIMD)
// exp(x) for any x: vexp (written for x <= 0) with x capped where 2^127 still holds the result.
inline Vec vexp_any(Vec x) {
#if defined(__AVX512F__)
  return vexp(_mm512_min_ps(x, _mm512_set1_ps(88.0f)));
#else
  return vexp(_mm256_min_ps(x, _mm256_set1_ps(88.0f)));
#endif
}

// fp32 lanes rounded to bf16 (nearest even, NaN kept quiet), as 16-bit patterns in 32-bit lanes.
#if defined(__AVX512F__)
inline __m512i bf16_bits(Vec v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7FC0));
}
inline Vec vround(Vec v, BFloat16*) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }
inline void vstore(BFloat16* p, Vec v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
}
#else
inline __m256i bf16_bits(Vec v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}
inline Vec vround(Vec v, BFloat16*) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }
inline void vstore(BFloat16* p, Vec v) {
  // packus works per 128-bit half: [0..3, 0..3 | 4..7, 4..7]; 0xD8 brings the two wanted quarters together.
  const __m256i bits = bf16_bits(v);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#endif
inline Vec vround(Vec v, float*) { return v; }
// v rounded to T's precision (a no-op for float), kept in fp32 lanes.
template <typename T>
inline Vec vround_as(Vec v) {
  return vround(v, static_cast<T*>(nullptr));
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Row kernels: a SIMD body and a scalar tail (the whole row when kWidth == 0).
// ---------------------------------------------------------------------------------------------------------------

// sum(x^2) of a row, where x = input (+ residual, rounded to T, stored back into residual when given).
template <typename T>
float sum_squares(const T* input, T* residual, int n) {
  float total = 0.0f;
  int i = 0;
#if defined(PAGED_CPU_SIMD)
  Vec acc = vzero();
  for (; i + kWidth <= n; i += kWidth) {
    Vec x = vload(input + i);
    if (residual != nullptr) {
      x = vround_as<T>(vadd(x, vload(residual + i)));
      vstore(residual + i, x);
    }
    acc = vfma(x, x, acc);
  }
  total = vsum(acc);
#endif
  for (; i < n; ++i) {
    float x = static_cast<float>(input[i]);
    if (residual != nullptr) {
      x = round_as<T>(x + static_cast<float>(residual[i]));
      residual[i] = static_cast<T>(x);
    }
    total += x * x;
  }
  return total;
}

// out = weight * round(x * inv_rms)
template <typename T>
void scale_row(const T* x, const T* weight, float inv_rms, T* out, int n) {
  int i = 0;
#if defined(PAGED_CPU_SIMD)
  const Vec factor = vset1(inv_rms);
  for (; i + kWidth <= n; i += kWidth) {
    vstore(out + i, vmul(vload(weight + i), vround_as<T>(vmul(vload(x + i), factor))));
  }
#endif
  for (; i < n; ++i) {
    out[i] = static_cast<T>(static_cast<float>(weight[i]) * round_as<T>(static_cast<float>(x[i]) * inv_rms));
  }
}

template <typename T>
void silu_and_mul_row(const T* gate, const T* up, T* out, int n) {
  int i = 0;
#if defined(PAGED_CPU_SIMD)
  const Vec one = vset1(1.0f);
  for (; i + kWidth <= n; i += kWidth) {
    const Vec g = vload(gate + i);
    const Vec negated = vsub(vzero(), g);
#if defined(__AVX512F__)
    const Vec silu = _mm512_div_ps(g, vadd(one, vexp_any(negated)));
#else
    const Vec silu = _mm256_div_ps(g, vadd(one, vexp_any(negated)));
#endif
    vstore(out + i, vmul(vround_as<T>(silu), vload(up + i)));
  }
#endif
  for (; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    out[i] = static_cast<T>(round_as<T>(g / (1.0f + std::exp(-g))) * static_cast<float>(up[i]));
  }
}

// One head's row rotated in place: [x1, x2] -> [x1*c1 - x2*s1, x2*c2 + x1*s2], each product rounded to T.
template <typename T>
void rotate_row(T* x, const T* cos, const T* sin, int dim) {
  const int half = dim / 2;
  int i = 0;
#if defined(PAGED_CPU_SIMD)
  for (; i + kWidth <= half; i += kWidth) {
    const Vec x1 = vload(x + i), x2 = vload(x + half + i);
    const Vec first = vsub(vround_as<T>(vmul(x1, vload(cos + i))), vround_as<T>(vmul(x2, vload(sin + i))));
    const Vec second =
        vadd(vround_as<T>(vmul(x2, vload(cos + half + i))), vround_as<T>(vmul(x1, vload(sin + half + i))));
    vstore(x + i, first);
    vstore(x + half + i, second);
  }
#endif
  for (; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[half + i]);
    const float first = round_as<T>(x1 * static_cast<float>(cos[i])) - round_as<T>(x2 * static_cast<float>(sin[i]));
    const float second = round_as<T>(x2 * static_cast<float>(cos[half + i])) +
                         round_as<T>(x1 * static_cast<float>(sin[half + i]));
    x[i] = static_cast<T>(first);
    x[half + i] = static_cast<T>(second);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------------

void check_rows(const at::Tensor& tensor, const char* name, int dims) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.dim() == dims && tensor.stride(dims - 1) == 1, name,
              " must be a CPU tensor of ", dims, " dims, contiguous in the last");
  TORCH_CHECK(tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, not ", tensor.scalar_type());
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(static_cast<float*>(nullptr));
  } else {
    fn(static_cast<BFloat16*>(nullptr));
  }
}

void rms_norm_impl(const at::Tensor& input, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                   double eps, const at::Tensor& out) {
  check_rows(input, "input", 2);
  check_rows(out, "out", 2);
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == input.size(1), "weight must be [N]");
  TORCH_CHECK(out.sizes() == input.sizes(), "out must have the input's shape");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && out.scalar_type() == input.scalar_type(),
              "input, weight and out must share a dtype");
  if (residual.has_value()) {
    check_rows(*residual, "residual", 2);
    TORCH_CHECK(residual->sizes() == input.sizes() && residual->scalar_type() == input.scalar_type(),
                "residual must match the input");
  }
  const int64_t rows = input.size(0);
  const int n = static_cast<int>(input.size(1));
  dispatch_dtype(input.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* in = input.data_ptr<T>();
    const T* w = weight.data_ptr<T>();
    T* res = residual.has_value() ? residual->data_ptr<T>() : nullptr;
    T* o = out.data_ptr<T>();
    const int64_t in_stride = input.stride(0), out_stride = out.stride(0);
    const int64_t res_stride = residual.has_value() ? residual->stride(0) : 0;
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* row_res = res != nullptr ? res + r * res_stride : nullptr;
        const float total = sum_squares(in + r * in_stride, row_res, n);
        const float inv_rms = 1.0f / std::sqrt(total / static_cast<float>(n) + static_cast<float>(eps));
        // The normed row is the (rounded) sum when there is a residual.
        scale_row(row_res != nullptr ? row_res : in + r * in_stride, w, inv_rms, o + r * out_stride, n);
      }
    });
  });
}

void rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps, const at::Tensor& out) {
  rms_norm_impl(input, c10::nullopt, weight, eps, out);
}

void add_rms_norm(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& weight, double eps,
                  const at::Tensor& out) {
  rms_norm_impl(input, residual, weight, eps, out);
}

void silu_and_mul(const at::Tensor& gate_up, const at::Tensor& out) {
  check_rows(gate_up, "gate_up", 2);
  check_rows(out, "out", 2);
  TORCH_CHECK(gate_up.size(1) == 2 * out.size(1) && gate_up.size(0) == out.size(0), "gate_up is [T, 2I], out [T, I]");
  TORCH_CHECK(out.scalar_type() == gate_up.scalar_type(), "gate_up and out must share a dtype");
  const int64_t rows = out.size(0);
  const int n = static_cast<int>(out.size(1));
  dispatch_dtype(out.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* in = gate_up.data_ptr<T>();
    T* o = out.data_ptr<T>();
    const int64_t in_stride = gate_up.stride(0), out_stride = out.stride(0);
    at::parallel_for(0, rows, row_grain(2 * n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        silu_and_mul_row(in + r * in_stride, in + r * in_stride + n, o + r * out_stride, n);
      }
    });
  });
}

void rotary(const at::Tensor& query, const at::Tensor& key, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(query, "query", 3);
  check_rows(key, "key", 3);
  check_rows(cos, "cos", 2);
  check_rows(sin, "sin", 2);
  const int64_t tokens = query.size(0);
  const int dim = static_cast<int>(query.size(2));
  TORCH_CHECK(dim % 2 == 0 && key.size(2) == dim && cos.size(1) == dim && sin.sizes() == cos.sizes(),
              "head dims must match and be even");
  TORCH_CHECK(key.size(0) == tokens && cos.size(0) == tokens, "query, key, cos and sin must have a row per token");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && cos.scalar_type() == query.scalar_type() &&
                  sin.scalar_type() == query.scalar_type(), "query, key, cos and sin must share a dtype");
  TORCH_CHECK(query.stride(1) >= dim && key.stride(1) >= dim, "heads must not overlap");
  const int64_t num_heads = query.size(1), num_kv_heads = key.size(1);
  const int64_t q_token = query.stride(0), q_head = query.stride(1), k_token = key.stride(0), k_head = key.stride(1);
  const int64_t cos_token = cos.stride(0), sin_token = sin.stride(0);
  dispatch_dtype(query.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* q = query.data_ptr<T>();
    T* k = key.data_ptr<T>();
    const T* c = cos.data_ptr<T>();
    const T* s = sin.data_ptr<T>();
    at::parallel_for(0, tokens, row_grain((num_heads + num_kv_heads) * dim), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T* row_cos = c + t * cos_token;
        const T* row_sin = s + t * sin_token;
        for (int64_t h = 0; h < num_heads; ++h) rotate_row(q + t * q_token + h * q_head, row_cos, row_sin, dim);
        for (int64_t h = 0; h < num_kv_heads; ++h) rotate_row(k + t * k_token + h * k_head, row_cos, row_sin, dim);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(PAGED_CPU_LIBRARY, m) {
  m.def("rms_norm(Tensor input, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor input, Tensor(a!) residual, Tensor weight, float eps, Tensor(b!) out) -> ()");
  m.def("silu_and_mul(Tensor gate_up, Tensor(a!) out) -> ()");
  m.def("rotary(Tensor(a!) query, Tensor(b!) key, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(PAGED_CPU_LIBRARY, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
}
