#include "backend/cpu/cpu_fp8.h"

#include <algorithm>
#include <vector>

#include "backend/cpu/cpu_ops.h"
#include "core/dtype.h"
#include "core/thread_pool.h"
#include "model/fp8.h"

namespace kiln {

void cpu_linear_fp8(const float* x, int64_t m, const Weight& w, const float* bias, float* y) {
  KILN_CHECK(w.format == WeightFormat::kF8E4M3 && w.act_quant != ActQuant::kNone);
  const int64_t N = w.rows, K = w.cols;
  // x_q as the exact f32 values of its FP8 codes; the scale is applied after the dot, as the
  // GPU applies alpha = s_x * s_w after the FP8 tensor-core accumulation.
  thread_local std::vector<float> xq, xs;
  xq.resize(size_t(m * K));
  xs.resize(size_t(m));
  fp8_activation_scales(x, m, K, w.act_quant, w.input_scale, xs.data());
  for (int64_t i = 0; i < m; ++i) fp8_round_trip(x + i * K, K, xs[size_t(i)], xq.data() + i * K);
  const float* lut = fp8_decode_table();
  const float* xqp = xq.data();
  const float* xsp = xs.data();
  constexpr int64_t kTile = 16;
  const int64_t tiles = (N + kTile - 1) / kTile;
  parallel_for(tiles, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> wbuf;
    wbuf.resize(size_t(kTile * K));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kTile, r1 = std::min(N, r0 + kTile);
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* src = w.row_ptr(r);
        float* dst = wbuf.data() + (r - r0) * K;
        for (int64_t k = 0; k < K; ++k) dst[k] = lut[src[k]];
      }
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = xqp + i * K;
        float* yi = y + i * N;
        for (int64_t r = r0; r < r1; ++r) {
          const float acc = cpu_dot(xi, wbuf.data() + (r - r0) * K, K) * (xsp[i] * w.row_scale(r));
          yi[r] = bias ? acc + bias[r] : acc;
        }
      }
    }
  });
}

}  // namespace kiln
