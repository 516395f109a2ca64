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

void quant_unpack_row(GgmlType t, const uint8_t* b, int64_t n, float* q, float* d, float* off) {
  const int64_t nb = n / kBlock;
  for (int64_t i = 0; i < nb; ++i) {
    float* qi = q + i * kBlock;
    switch (t) {
      case GgmlType::kQ4_0:
      case GgmlType::kQ4_1: {
        const int hdr = t == GgmlType::kQ4_0 ? 2 : 4;
        d[i] = f16_at(b);
        off[i] = t == GgmlType::kQ4_1 ? f16_at(b + 2) : 0.0f;
        for (int j = 0; j < 16; ++j) {
          qi[j] = float(b[hdr + j] & 15);
          qi[j + 16] = float(b[hdr + j] >> 4);
        }
        b += hdr + 16;
        break;
      }
      case GgmlType::kQ8_0:
        d[i] = f16_at(b);
        off[i] = 0.0f;
        for (int j = 0; j < 32; ++j) qi[j] = float(int8_t(b[2 + j]));
        b += 34;
        break;
      default: return;  // callers check quant_dot_supported
    }
  }
}

float quant_dot_unpacked(GgmlType t, const float* q, const float* d, const float* off, const float* x,
                         const float* xs, int64_t n) {
  const int64_t nb = n / kBlock;
#ifdef KILN_QDOT_AVX2
  // The same operations, in the same order, as nibbles_dot / int8_dot and dot_q* above.
  __m256 acc = _mm256_setzero_ps();
  float o = 0.0f;
  const bool q8 = t == GgmlType::kQ8_0;
  for (int64_t i = 0; i < nb; ++i) {
    const float* qi = q + i * kBlock;
    const float* xi = x + i * kBlock;
    __m256 v = q8 ? _mm256_fmadd_ps(_mm256_loadu_ps(qi), _mm256_loadu_ps(xi), _mm256_setzero_ps())
                  : _mm256_mul_ps(_mm256_loadu_ps(qi), _mm256_loadu_ps(xi));
    v = _mm256_fmadd_ps(_mm256_loadu_ps(qi + 8), _mm256_loadu_ps(xi + 8), v);
    v = _mm256_fmadd_ps(_mm256_loadu_ps(qi + 16), _mm256_loadu_ps(xi + 16), v);
    v = _mm256_fmadd_ps(_mm256_loadu_ps(qi + 24), _mm256_loadu_ps(xi + 24), v);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d[i]), v, acc);
    if (t == GgmlType::kQ4_0) o += d[i] * xs[i];
    else if (t == GgmlType::kQ4_1) o += off[i] * xs[i];
  }
  const float h = hsum(acc);
  return t == GgmlType::kQ4_0 ? h - 8.0f * o : t == GgmlType::kQ4_1 ? h + o : h;
#else
  float s = 0.0f;
  for (int64_t i = 0; i < nb; ++i) {
    float tt = 0.0f;
    for (int j = 0; j < 16; ++j) tt += q[i * kBlock + j] * x[i * kBlock + j] + q[i * kBlock + j + 16] * x[i * kBlock + j + 16];
    if (t == GgmlType::kQ4_0) s += d[i] * (tt - 8.0f * xs[i]);
    else if (t == GgmlType::kQ4_1) s += d[i] * tt + off[i] * xs[i];
    else s += d[i] * tt;
  }
  (void)off;
  return s;
#endif
}

void quant_dot4_tokens(GgmlType t, const float* q, const float* d, const float* off, const float* const x[4],
                       const float* const xs[4], int64_t n, float out[4]) {
#ifdef KILN_QDOT_AVX2
  const int64_t nb = n / kBlock;
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  float o[4] = {0, 0, 0, 0};
  const bool q8 = t == GgmlType::kQ8_0;
  for (int64_t i = 0; i < nb; ++i) {
    const float* qi = q + i * kBlock;
    const __m256 q0 = _mm256_loadu_ps(qi), q1 = _mm256_loadu_ps(qi + 8), q2 = _mm256_loadu_ps(qi + 16),
                 q3 = _mm256_loadu_ps(qi + 24), dv = _mm256_set1_ps(d[i]);
    for (int m = 0; m < 4; ++m) {
      const float* xi = x[m] + i * kBlock;
      __m256 v = q8 ? _mm256_fmadd_ps(q0, _mm256_loadu_ps(xi), _mm256_setzero_ps()) : _mm256_mul_ps(q0, _mm256_loadu_ps(xi));
      v = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xi + 8), v);
      v = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xi + 16), v);
      v = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xi + 24), v);
      acc[m] = _mm256_fmadd_ps(dv, v, acc[m]);
      if (t == GgmlType::kQ4_0) o[m] += d[i] * xs[m][i];
      else if (t == GgmlType::kQ4_1) o[m] += off[i] * xs[m][i];
    }
  }
  for (int m = 0; m < 4; ++m) {
    const float h = hsum(acc[m]);
    out[m] = t == GgmlType::kQ4_0 ? h - 8.0f * o[m] : t == GgmlType::kQ4_1 ? h + o[m] : h;
  }
#else
  for (int m = 0; m < 4; ++m) out[m] = quant_dot_unpacked(t, q, d, off, x[m], xs[m], n);
#endif
}

}  // namespace kiln
