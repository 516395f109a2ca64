// FP8 E4M3 quantization arithmetic shared by the converter (weights) and the CPU backend's FP8
// emulation (activations), so both round exactly alike. Scales follow ModelOpt's convention:
// real = fp8_value * scale, so quantizing divides by the scale.
#pragma once
#include <cstdint>

#include "model/weights.h"

namespace kiln {

constexpr float kFp8E4M3Max = 448.0f;

// The scale that maps amax onto the FP8 range; 1 for an all-zero (or non-finite) amax so that
// dequantization stays exact for zeros.
inline float fp8_scale_for_amax(float amax) {
  return (amax > 0.0f && amax < 3.0e38f) ? amax / kFp8E4M3Max : 1.0f;
}

// 256-entry decode table: fp8e4m3_to_f32 for every code (NaN codes decode to NaN).
const float* fp8_decode_table();

float fp8_amax(const float* x, int64_t n);
// dst[i] = fp8(src[i] / scale), saturating at +-448 as torch's float8_e4m3fn cast does.
void fp8_quantize(const float* src, int64_t n, float scale, uint8_t* dst);
// x -> fp8(x / scale) -> f32 (what the FP8 GEMM sees, times the scale). In place allowed.
void fp8_round_trip(const float* src, int64_t n, float scale, float* dst);

// The activation scales for m rows of k values, one per row (kDynamicToken) or one for all
// (kStaticTensor: input_scale; kDynamicTensor: amax of the whole [m, k]), written to scales[m].
void fp8_activation_scales(const float* x, int64_t m, int64_t k, ActQuant mode, float input_scale, float* scales);

}  // namespace kiln
