#include "backend/cpu/quant_dot.h"

#include <cstring>

#include "core/dtype.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KILN_QDOT_AVX2 1
#endif

namespace kiln {

namespace {

constexpr int64_t kBlock = 32;

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

#ifdef KILN_QDOT_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// sum over the 32 unsigned nibbles of a Q4 block (low nibbles: elements 0..15, high: 16..31) times x
inline __m256 nibbles_dot(const uint8_t* qs, const float* x) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(raw, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  __m256 acc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(x));
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(x + 8), acc);
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(x + 16), acc);
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(x + 24), acc);
  return acc;
}
inline __m256 int8_dot(const uint8_t* qs, const float* x) {
  __m256 acc = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * j));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_loadu_ps(x + 8 * j), acc);
  }
  return acc;
}
#endif

// Block layouts (ggml): Q4_0 {f16 d; u8 qs[16]}, w = d (q - 8); Q4_1 {f16 d, m; u8 qs[16]},
// w = d q + m; Q8_0 {f16 d; i8 qs[32]}, w = d q.
float dot_q4_0(const uint8_t* b, const float* x, const float* xs, int64_t nb) {
#ifdef KILN_QDOT_AVX2
  __m256 acc = _mm256_setzero_ps();
  float off = 0.0f;
  for (int64_t i = 0; i < nb; ++i, b += 18) {
    const float d = f16_at(b);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), nibbles_dot(b + 2, x + i * kBlock), acc);
    off += d * xs[i];
  }
  return hsum(acc) - 8.0f * off;
#else
  float s = 0.0f;
  for (int64_t i = 0; i < nb; ++i, b += 18) {
    const float d = f16_at(b);
    float t = 0.0f;
    for (int j = 0; j < 16; ++j)
      t += float(b[2 + j] & 15) * x[i * kBlock + j] + float(b[2 + j] >> 4) * x[i * kBlock + j + 16];
    s += d * (t - 8.0f * xs[i]);
  }
  return s;
#endif
}

float dot_q4_1(const uint8_t* b, const float* x, const float* xs, int64_t nb) {
#ifdef KILN_QDOT_AVX2
  __m256 acc = _mm256_setzero_ps();
  float off = 0.0f;
  for (int64_t i = 0; i < nb; ++i, b += 20) {
    acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), nibbles_dot(b + 4, x + i * kBlock), acc);
    off += f16_at(b + 2) * xs[i];
  }
  return hsum(acc) + off;
#else
  float s = 0.0f;
  for (int64_t i = 0; i < nb; ++i, b += 20) {
    float t = 0.0f;
    for (int j = 0; j < 16; ++j)
      t += float(b[4 + j] & 15) * x[i * kBlock + j] + float(b[4 + j] >> 4) * x[i * kBlock + j + 16];
    s += f16_at(b) * t + f16_at(b + 2) * xs[i];
  }
  return s;
#endif
}

float dot_q8_0(const uint8_t* b, const float* x, int64_t nb) {
#ifdef KILN_QDOT_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < nb; ++i, b += 34)
    acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), int8_dot(b + 2, x + i * kBlock), acc);
  return hsum(acc);
#else
  float s = 0.0f;
  for (int64_t i = 0; i < nb; ++i, b += 34) {
    float t = 0.0f;
    for (int j = 0; j < 32; ++j) t += float(int8_t(b[2 + j])) * x[i * kBlock + j];
    s += f16_at(b) * t;
  }
  return s;
#endif
}

}  // namespace

bool quant_dot_supported(GgmlType t) {
  return t == GgmlType::kQ4_0 || t == GgmlType::kQ4_1 || t == GgmlType::kQ8_0;
}

void quant_block_sums(const float* x, int64_t n, float* sums) {
  for (int64_t i = 0; i < n / kBlock; ++i) {
    float s = 0.0f;
    for (int64_t j = 0; j < kBlock; ++j) s += x[i * kBlock + j];
    sums[i] = s;
  }
}

float quant_dot(GgmlType t, const uint8_t* row, const float* x, const float* xsums, int64_t n) {
  const int64_t nb = n / kBlock;
  switch (t) {
    case GgmlType::kQ4_0: return dot_q4_0(row, x, xsums, nb);
    case GgmlType::kQ4_1: return dot_q4_1(row, x, xsums, nb);
    case GgmlType::kQ8_0: return dot_q8_0(row, x, nb);
    default: break;  // callers check quant_dot_supported
  }
  return 0.0f;
}

}  // namespace kiln
