// FP8 linears on the CPU, emulating the GPU's FP8 GEMM exactly: activations are quantized to
// E4M3 with the weight's activation scale(s), then y = (x_q . w_q) * s_x * s_w accumulated in f32.
#pragma once
#include <cstdint>

#include "model/weights.h"

namespace kiln {

// w.format == kF8E4M3 and w.act_quant != kNone.          x: [m, w.cols], y: [m, w.rows]
void cpu_linear_fp8(const float* x, int64_t m, const Weight& w, const float* bias, float* y);

}  // namespace kiln
