// FP8 linears on the CPU, emulating the GPU's FP8 GEMM exactly: activations are quantized to
// E4M3 with the weight's activation scale(s), then y = (x_q . w_q) * s_x * s_w accumulated in f32.
// Also the calibration pass that gives FP8 linears static activation scales.
#pragma once
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/weights.h"

namespace kiln {

// w.format == kF8E4M3 and w.act_quant != kNone.          x: [m, w.cols], y: [m, w.rows]
void cpu_linear_fp8(const float* x, int64_t m, const Weight& w, const float* bias, float* y);

// What one linear's input looked like over a calibration text.
struct Fp8CalibStats {
  float amax = 0.0f;    // max |x|: ModelOpt's "max" calibration; input_scale = amax / 448
  double sum_sq = 0.0;  // sum of x^2, for the RMS
  int64_t count = 0;    // values seen
  double rms() const { return count ? std::sqrt(sum_sq / double(count)) : 0.0; }
  // amax / rms: how far the largest value sits above the typical one (a per-tensor scale set by
  // the max leaves the typical value that many times closer to FP8's underflow).
  double outlier_ratio() const { return rms() > 0.0 ? double(amax) / rms() : 0.0; }
};

// Runs `model` as it is (its own weights, no FP8) over `ids` in independent windows of `ctx`
// tokens, recording the input of every decoder linear by HF module name
// ("model.layers.3.self_attn.q_proj", ..., "model.layers.3.mlp.down_proj"). q/k/v (and gate/up)
// read the same input, so they get the same stats.
Result<std::map<std::string, Fp8CalibStats>> fp8_calibrate(std::shared_ptr<const Model> model,
                                                           const std::vector<int32_t>& ids, int32_t ctx);

}  // namespace kiln
