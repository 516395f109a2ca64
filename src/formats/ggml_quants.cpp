// ggml block formats: sizes, names, and dequantization to f32. Layouts follow ggml-quants.c; the
// test tests/py/test_formats_gguf_quants.py checks every dequantizer against gguf-py's numpy one.
#include <cstring>

#include "core/dtype.h"
#include "formats/gguf.h"

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

// Keep `d * q - m` as two roundings, as ggml's reference code and gguf-py compute it, so the
// results match bit for bit (clang would otherwise fuse it into an FMA under -mfma; GCC's ISO
// modes never contract).
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#else
// GCC's -O2 "very cheap" vectorizer cost model leaves these block loops scalar; the dynamic model
// vectorizes them: 1.1 -> 7-9 Gelem/s for Q4_0/Q4_1/Q8_0/Q4_K on this machine's AVX2 (GCC 12).
#pragma GCC optimize("vect-cost-model=dynamic")
#endif

namespace kiln {
namespace {

struct TypeInfo {
  GgmlType type;
  std::string_view name;
  int64_t block_elems;
  size_t block_bytes;
  bool dequantizable;
};

constexpr TypeInfo kTypes[] = {
    {GgmlType::kF32, "F32", 1, 4, true},
    {GgmlType::kF16, "F16", 1, 2, true},
    {GgmlType::kQ4_0, "Q4_0", 32, 18, true},
    {GgmlType::kQ4_1, "Q4_1", 32, 20, true},
    {GgmlType::kQ5_0, "Q5_0", 32, 22, true},
    {GgmlType::kQ5_1, "Q5_1", 32, 24, true},
    {GgmlType::kQ8_0, "Q8_0", 32, 34, true},
    {GgmlType::kQ8_1, "Q8_1", 32, 36, false},
    {GgmlType::kQ2_K, "Q2_K", 256, 84, true},
    {GgmlType::kQ3_K, "Q3_K", 256, 110, true},
    {GgmlType::kQ4_K, "Q4_K", 256, 144, true},
    {GgmlType::kQ5_K, "Q5_K", 256, 176, true},
    {GgmlType::kQ6_K, "Q6_K", 256, 210, true},
    {GgmlType::kQ8_K, "Q8_K", 256, 292, true},
    {GgmlType::kIQ2_XXS, "IQ2_XXS", 256, 66, false},
    {GgmlType::kIQ2_XS, "IQ2_XS", 256, 74, false},
    {GgmlType::kIQ3_XXS, "IQ3_XXS", 256, 98, false},
    {GgmlType::kIQ1_S, "IQ1_S", 256, 50, false},
    {GgmlType::kIQ4_NL, "IQ4_NL", 32, 18, false},
    {GgmlType::kIQ3_S, "IQ3_S", 256, 110, false},
    {GgmlType::kIQ2_S, "IQ2_S", 256, 82, false},
    {GgmlType::kIQ4_XS, "IQ4_XS", 256, 136, false},
    {GgmlType::kI8, "I8", 1, 1, false},
    {GgmlType::kI16, "I16", 1, 2, false},
    {GgmlType::kI32, "I32", 1, 4, false},
    {GgmlType::kI64, "I64", 1, 8, false},
    {GgmlType::kF64, "F64", 1, 8, false},
    {GgmlType::kIQ1_M, "IQ1_M", 256, 56, false},
    {GgmlType::kBF16, "BF16", 1, 2, true},
    {GgmlType::kTQ1_0, "TQ1_0", 256, 54, false},
    {GgmlType::kTQ2_0, "TQ2_0", 256, 66, false},
    {GgmlType::kMXFP4, "MXFP4", 32, 17, false},
    {GgmlType::kNVFP4, "NVFP4", 64, 36, false},
    {GgmlType::kQ1_0, "Q1_0", 128, 18, false},
};

const TypeInfo* info(GgmlType t) {
  for (const auto& i : kTypes) {
    if (i.type == t) return &i;
  }
  return nullptr;
}

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// Each block is decoded by a plain fixed-trip loop: GCC/Clang vectorize these at -O2.
void deq_f16(const uint8_t* src, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    _mm256_storeu_ps(y + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) y[i] = h2f(src + 2 * i);
}

void deq_bf16(const uint8_t* src, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    uint32_t b = uint32_t(h) << 16;
    std::memcpy(y + i, &b, 4);
  }
}

void deq_q4_0(const uint8_t* b, float* y, int64_t nb) {  // {f16 d; u8 qs[16]}
  for (int64_t i = 0; i < nb; ++i, b += 18, y += 32) {
    const float d = h2f(b);
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
      y[j] = float(int(qs[j] & 0xF) - 8) * d;
      y[j + 16] = float(int(qs[j] >> 4) - 8) * d;
    }
  }
}

void deq_q4_1(const uint8_t* b, float* y, int64_t nb) {  // {f16 d; f16 m; u8 qs[16]}
  for (int64_t i = 0; i < nb; ++i, b += 20, y += 32) {
    const float d = h2f(b), m = h2f(b + 2);
    const uint8_t* qs = b + 4;
    for (int j = 0; j < 16; ++j) {
      y[j] = float(qs[j] & 0xF) * d + m;
      y[j + 16] = float(qs[j] >> 4) * d + m;
    }
  }
}

void deq_q5_0(const uint8_t* b, float* y, int64_t nb) {  // {f16 d; u8 qh[4]; u8 qs[16]}
  for (int64_t i = 0; i < nb; ++i, b += 22, y += 32) {
    const float d = h2f(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const uint8_t* qs = b + 6;
    for (int j = 0; j < 16; ++j) {
      const int x0 = int((qs[j] & 0xF) | (((qh >> j) << 4) & 0x10)) - 16;
      const int x1 = int((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
      y[j] = float(x0) * d;
      y[j + 16] = float(x1) * d;
    }
  }
}

void deq_q5_1(const uint8_t* b, float* y, int64_t nb) {  // {f16 d; f16 m; u8 qh[4]; u8 qs[16]}
  for (int64_t i = 0; i < nb; ++i, b += 24, y += 32) {
    const float d = h2f(b), m = h2f(b + 2);
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    const uint8_t* qs = b + 8;
    for (int j = 0; j < 16; ++j) {
      const uint32_t x0 = (qs[j] & 0xF) | (((qh >> j) << 4) & 0x10);
      const uint32_t x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
      y[j] = float(x0) * d + m;
      y[j + 16] = float(x1) * d + m;
    }
  }
}

void deq_q8_0(const uint8_t* b, float* y, int64_t nb) {  // {f16 d; i8 qs[32]}
  for (int64_t i = 0; i < nb; ++i, b += 34, y += 32) {
    const float d = h2f(b);
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) y[j] = float(qs[j]) * d;
  }
}

// The 12 packed 6-bit scales and mins of Q4_K/Q5_K.
inline void scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = uint8_t((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

void deq_q2_k(const uint8_t* b, float* y, int64_t nb) {  // {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}
  for (int64_t i = 0; i < nb; ++i, b += 84) {
    const uint8_t* scales = b;
    const uint8_t* q = b + 16;
    const float d = h2f(b + 80), dmin = h2f(b + 82);
    int is = 0;
    for (int n = 0; n < 256; n += 128) {
      for (int shift = 0; shift < 8; shift += 2) {
        for (int half = 0; half < 2; ++half) {
          const uint8_t sc = scales[is++];
          const float dl = d * float(sc & 0xF), ml = dmin * float(sc >> 4);
          const uint8_t* qq = q + 16 * half;
          for (int l = 0; l < 16; ++l) y[l] = dl * float((qq[l] >> shift) & 3) - ml;
          y += 16;
        }
      }
      q += 32;
    }
  }
}

void deq_q3_k(const uint8_t* b, float* y, int64_t nb) {  // {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}
  constexpr uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
  for (int64_t i = 0; i < nb; ++i, b += 110) {
    const uint8_t* hm = b;
    const uint8_t* q = b + 32;
    const float d_all = h2f(b + 108);
    uint32_t aux[4];
    std::memcpy(aux, b + 96, 12);
    const uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    int8_t scales[16];
    std::memcpy(scales, aux, 16);
    int is = 0;
    uint8_t m = 1;
    for (int n = 0; n < 256; n += 128) {
      for (int shift = 0; shift < 8; shift += 2, m = uint8_t(m << 1)) {
        for (int half = 0; half < 2; ++half) {
          const float dl = d_all * float(scales[is++] - 32);
          const uint8_t* qq = q + 16 * half;
          const uint8_t* hh = hm + 16 * half;
          for (int l = 0; l < 16; ++l) {
            y[l] = dl * float(int((qq[l] >> shift) & 3) - ((hh[l] & m) ? 0 : 4));
          }
          y += 16;
        }
      }
      q += 32;
    }
  }
}

void deq_q4_k(const uint8_t* b, float* y, int64_t nb) {  // {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}
  for (int64_t i = 0; i < nb; ++i, b += 144) {
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* q = b + 16;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
      uint8_t sc, m;
      scale_min_k4(is, scales, &sc, &m);
      const float d1 = d * float(sc), m1 = dmin * float(m);
      scale_min_k4(is + 1, scales, &sc, &m);
      const float d2 = d * float(sc), m2 = dmin * float(m);
      for (int l = 0; l < 32; ++l) y[l] = d1 * float(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) y[32 + l] = d2 * float(q[l] >> 4) - m2;
      y += 64;
    }
  }
}

void deq_q5_k(const uint8_t* b, float* y, int64_t nb) {  // {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}
  for (int64_t i = 0; i < nb; ++i, b += 176) {
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* ql = b + 48;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32) {
      uint8_t sc, m;
      scale_min_k4(is, scales, &sc, &m);
      const float d1 = d * float(sc), m1 = dmin * float(m);
      scale_min_k4(is + 1, scales, &sc, &m);
      const float d2 = d * float(sc), m2 = dmin * float(m);
      for (int l = 0; l < 32; ++l) y[l] = d1 * float((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) y[32 + l] = d2 * float((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
      y += 64;
      u1 = uint8_t(u1 << 2);
      u2 = uint8_t(u2 << 2);
    }
  }
}

void deq_q6_k(const uint8_t* b, float* y, int64_t nb) {  // {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}
  for (int64_t i = 0; i < nb; ++i, b += 210) {
    const float d = h2f(b + 208);
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8, y += 128) {
      // Halves of 16 share their scales; hoisting them (same products as ggml: (d * sc) * q)
      // lets the compiler vectorize the body: 0.7 -> 4.4 Gelem/s (AVX2, GCC 12).
      for (int h = 0; h < 2; ++h) {
        const float s1 = d * float(sc[h]), s2 = d * float(sc[h + 2]);
        const float s3 = d * float(sc[h + 4]), s4 = d * float(sc[h + 6]);
        for (int l = 16 * h; l < 16 * h + 16; ++l) {
          const int q1 = int((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
          const int q2 = int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
          const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
          const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
          y[l] = s1 * float(q1);
          y[l + 32] = s2 * float(q2);
          y[l + 64] = s3 * float(q3);
          y[l + 96] = s4 * float(q4);
        }
      }
    }
  }
}

void deq_q8_k(const uint8_t* b, float* y, int64_t nb) {  // {f32 d; i8 qs[256]; i16 bsums[16]}
  for (int64_t i = 0; i < nb; ++i, b += 292, y += 256) {
    float d;
    std::memcpy(&d, b, 4);
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 4);
    for (int j = 0; j < 256; ++j) y[j] = d * float(qs[j]);
  }
}

}  // namespace

bool ggml_type_known(uint32_t id) { return info(static_cast<GgmlType>(id)) != nullptr; }

std::string_view ggml_type_name(GgmlType t) {
  const TypeInfo* i = info(t);
  return i ? i->name : std::string_view("unknown");
}

bool ggml_type_dequantizable(GgmlType t) {
  const TypeInfo* i = info(t);
  return i && i->dequantizable;
}

int64_t ggml_block_elems(GgmlType t) {
  const TypeInfo* i = info(t);
  return i ? i->block_elems : 0;
}

size_t ggml_block_bytes(GgmlType t) {
  const TypeInfo* i = info(t);
  return i ? i->block_bytes : 0;
}

size_t ggml_row_bytes(GgmlType t, int64_t n_elems) {
  const TypeInfo* i = info(t);
  KILN_CHECK(i != nullptr && n_elems >= 0 && n_elems % i->block_elems == 0);
  return size_t(n_elems / i->block_elems) * i->block_bytes;
}

void ggml_dequantize_row(GgmlType t, const void* src_v, float* dst, int64_t n) {
  const auto* src = static_cast<const uint8_t*>(src_v);
  const TypeInfo* ti = info(t);
  KILN_CHECK_MSG(ti != nullptr && ti->dequantizable, std::string(ggml_type_name(t)) + " is not dequantizable");
  KILN_CHECK(n >= 0 && n % ti->block_elems == 0);
  const int64_t nb = n / ti->block_elems;
  switch (t) {
    case GgmlType::kF32: std::memcpy(dst, src, size_t(n) * 4); return;
    case GgmlType::kF16: deq_f16(src, dst, n); return;
    case GgmlType::kBF16: deq_bf16(src, dst, n); return;
    case GgmlType::kQ4_0: deq_q4_0(src, dst, nb); return;
    case GgmlType::kQ4_1: deq_q4_1(src, dst, nb); return;
    case GgmlType::kQ5_0: deq_q5_0(src, dst, nb); return;
    case GgmlType::kQ5_1: deq_q5_1(src, dst, nb); return;
    case GgmlType::kQ8_0: deq_q8_0(src, dst, nb); return;
    case GgmlType::kQ2_K: deq_q2_k(src, dst, nb); return;
    case GgmlType::kQ3_K: deq_q3_k(src, dst, nb); return;
    case GgmlType::kQ4_K: deq_q4_k(src, dst, nb); return;
    case GgmlType::kQ5_K: deq_q5_k(src, dst, nb); return;
    case GgmlType::kQ6_K: deq_q6_k(src, dst, nb); return;
    case GgmlType::kQ8_K: deq_q8_k(src, dst, nb); return;
    case GgmlType::kQ8_1:
    case GgmlType::kIQ2_XXS:
    case GgmlType::kIQ2_XS:
    case GgmlType::kIQ3_XXS:
    case GgmlType::kIQ1_S:
    case GgmlType::kIQ4_NL:
    case GgmlType::kIQ3_S:
    case GgmlType::kIQ2_S:
    case GgmlType::kIQ4_XS:
    case GgmlType::kI8:
    case GgmlType::kI16:
    case GgmlType::kI32:
    case GgmlType::kI64:
    case GgmlType::kF64:
    case GgmlType::kIQ1_M:
    case GgmlType::kTQ1_0:
    case GgmlType::kTQ2_0:
    case GgmlType::kMXFP4:
    case GgmlType::kNVFP4:
    case GgmlType::kQ1_0:
      break;
  }
  KILN_CHECK_MSG(false, "unreachable");
}

}  // namespace kiln
