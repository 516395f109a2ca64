// Element types and their scalar conversions. Conversions round to nearest even, as PyTorch does.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace kiln {

enum class DType : uint8_t { kF32, kF16, kBF16, kF8E4M3, kI8, kU8, kI32, kI64, kBool };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kF8E4M3: return 1;
    case DType::kI8: return 1;
    case DType::kU8: return 1;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kBool: return 1;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kF8E4M3: return "F8_E4M3";
    case DType::kI8: return "I8";
    case DType::kU8: return "U8";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
    case DType::kBool: return "BOOL";
  }
  return "?";
}

inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }
inline uint16_t f32_to_bf16(float f) {
  uint32_t b = f32_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);  // quiet NaN
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_to_f32(sign);
    float v = std::ldexp(float(mant), -24);  // subnormal
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
  return bits_to_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

inline uint16_t f32_to_f16(float f) {
  uint32_t b = f32_to_bits(f);
  uint32_t sign = (b >> 16) & 0x8000u;
  uint32_t absb = b & 0x7fffffffu;
  if (absb > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (absb >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow -> inf (after rounding)
  if (absb < 0x38800000u) {                                  // subnormal or zero in f16
    float a = bits_to_f32(absb);
    uint32_t m = uint32_t(std::nearbyint(a * 16777216.0f));  // units of 2^-24, ties to even
    return uint16_t(sign | m);
  }
  uint32_t r = absb + 0xfffu + ((absb >> 13) & 1u);
  return uint16_t(sign | ((r - 0x38000000u) >> 13));
}

// FP8 E4M3 (OCP "fn" variant: no infinities, 0x7f/0xff are NaN, max 448).
inline float fp8e4m3_to_f32(uint8_t v) {
  uint32_t sign = v >> 7, exp = (v >> 3) & 0xfu, mant = v & 7u;
  float r;
  if (exp == 0xf && mant == 7) return NAN;
  if (exp == 0) r = std::ldexp(float(mant), -9);
  else r = std::ldexp(1.0f + float(mant) / 8.0f, int(exp) - 7);
  return sign ? -r : r;
}

inline uint8_t f32_to_fp8e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;  // saturate, as torch's float8_e4m3fn cast does for finite
  if (a < std::ldexp(1.0f, -6)) {      // subnormal: units of 2^-9
    int m = int(std::nearbyint(a * 512.0f));
    return uint8_t(sign | m);          // m == 8 rolls into the smallest normal, which is correct
  }
  int e;
  float frac = std::frexp(a, &e);  // a = frac * 2^e, frac in [0.5, 1)
  int exp = e - 1 + 7;
  int mant = int(std::nearbyint((frac * 2.0f - 1.0f) * 8.0f));
  if (mant == 8) { mant = 0; exp += 1; }
  return uint8_t(sign | (exp << 3) | mant);
}

// Read element i of a buffer of dtype t as float (F32/F16/BF16/F8 only).
inline float load_as_f32(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kF16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::kF8E4M3: return fp8e4m3_to_f32(static_cast<const uint8_t*>(p)[i]);
    case DType::kI8: return float(static_cast<const int8_t*>(p)[i]);
    case DType::kU8: return float(static_cast<const uint8_t*>(p)[i]);
    case DType::kI32: return float(static_cast<const int32_t*>(p)[i]);
    case DType::kI64: return float(static_cast<const int64_t*>(p)[i]);
    case DType::kBool: return float(static_cast<const uint8_t*>(p)[i]);
  }
  return 0.0f;
}

}  // namespace kiln
