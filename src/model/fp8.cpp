#include "model/fp8.h"

#include <algorithm>
#include <cmath>

#include "core/dtype.h"

namespace kiln {

const float* fp8_decode_table() {
  static const auto table = [] {
    struct T {
      float v[256];
    } t;
    for (int i = 0; i < 256; ++i) t.v[i] = fp8e4m3_to_f32(uint8_t(i));
    return t;
  }();
  return table.v;
}

float fp8_amax(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

void fp8_quantize(const float* src, int64_t n, float scale, uint8_t* dst) {
  // Division, not multiplication by 1/scale: torch's reference (x / scale).to(float8) divides.
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_fp8e4m3(src[i] / scale);
}

void fp8_round_trip(const float* src, int64_t n, float scale, float* dst) {
  const float* lut = fp8_decode_table();
  for (int64_t i = 0; i < n; ++i) dst[i] = lut[f32_to_fp8e4m3(src[i] / scale)];
}

void fp8_activation_scales(const float* x, int64_t m, int64_t k, ActQuant mode, float input_scale, float* scales) {
  switch (mode) {
    case ActQuant::kNone:
    case ActQuant::kStaticTensor: {
      const float s = mode == ActQuant::kNone ? 1.0f : input_scale;
      std::fill(scales, scales + m, s);
      return;
    }
    case ActQuant::kDynamicTensor: {
      const float s = fp8_scale_for_amax(fp8_amax(x, m * k));
      std::fill(scales, scales + m, s);
      return;
    }
    case ActQuant::kDynamicToken:
      for (int64_t i = 0; i < m; ++i) scales[i] = fp8_scale_for_amax(fp8_amax(x + i * k, k));
      return;
  }
}

}  // namespace kiln
