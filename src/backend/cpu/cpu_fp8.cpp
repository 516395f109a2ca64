#include "backend/cpu/cpu_fp8.h"

#include <algorithm>
#include <cmath>
#include <memory>
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

namespace {

// CpuOps with the input of every decoder linear recorded before it runs.
class CalibOps final : public Ops {
 public:
  CalibOps(const ModelConfig& c, CpuKvCache* kv, std::map<const Weight*, Fp8CalibStats*> taps)
      : inner_(c, kv), taps_(std::move(taps)) {}
  void begin_step(const StepBatch& b) override { inner_.begin_step(b); }
  Act buffer(Buf which) override { return inner_.buffer(which); }
  void embed(const Weight& table, Act out) override { inner_.embed(table, out); }
  void rms_norm(Act x, const Weight& w, int64_t n, int64_t dim, float eps, Act out) override {
    inner_.rms_norm(x, w, n, dim, eps, out);
  }
  void add_rms_norm(Act r, Act d, const Weight& w, int64_t n, int64_t dim, float eps, Act out) override {
    inner_.add_rms_norm(r, d, w, n, dim, eps, out);
  }
  void linear(Act x, int64_t n, const Weight& w, const Weight* bias, Act y) override {
    tap(w, x, n);
    inner_.linear(x, n, w, bias, y);
  }
  void linear_gate_up_silu(Act x, int64_t n, const LayerWeights& l, Act gate, Act up) override {
    tap(l.w_gate, x, n);
    tap(l.w_up, x, n);
    inner_.linear_gate_up_silu(x, n, l, gate, up);
  }
  void head_rms_norm(Act x, int64_t n, int64_t heads, int64_t hd, const Weight& w, float eps) override {
    inner_.head_rms_norm(x, n, heads, hd, w, eps);
  }
  void rope(Act q, Act k, const ModelConfig& c) override { inner_.rope(q, k, c); }
  void attention(int32_t layer, Act q, Act k, Act v, const ModelConfig& c, Act out) override {
    inner_.attention(layer, q, k, v, c, out);
  }
  void silu_mul(Act g, Act u, int64_t n, int64_t dim, Act out) override { inner_.silu_mul(g, u, n, dim, out); }
  void gather_logit_rows(Act x, int64_t dim, Act out) override { inner_.gather_logit_rows(x, dim, out); }

 private:
  void tap(const Weight& w, Act x, int64_t n) {
    auto it = taps_.find(&w);
    if (it == taps_.end()) return;  // lm_head
    Fp8CalibStats& s = *it->second;
    const float* v = static_cast<const float*>(x);
    const int64_t len = n * w.cols;
    double sq = 0.0;
    for (int64_t i = 0; i < len; ++i) {
      s.amax = std::max(s.amax, std::fabs(v[i]));
      sq += double(v[i]) * double(v[i]);
    }
    s.sum_sq += sq;
    s.count += len;
  }

  CpuOps inner_;
  std::map<const Weight*, Fp8CalibStats*> taps_;
};

}  // namespace

Result<std::map<std::string, Fp8CalibStats>> fp8_calibrate(std::shared_ptr<const Model> model,
                                                           const std::vector<int32_t>& ids, int32_t ctx) {
  const ModelConfig& c = model->config;
  if (ids.size() < 2) return Status::error("calibration text: fewer than 2 tokens");
  ctx = std::max(2, std::min(ctx, c.max_position_embeddings));
  for (int32_t id : ids)
    if (id < 0 || id >= c.vocab_size)
      return Status::error("calibration text: token id " + std::to_string(id) + " is outside the vocabulary (" +
                           std::to_string(c.vocab_size) + ")");
  std::map<std::string, Fp8CalibStats> stats;
  std::map<const Weight*, Fp8CalibStats*> taps;
  for (int32_t i = 0; i < c.num_layers; ++i) {
    const LayerWeights& l = model->weights.layers[size_t(i)];
    const std::string a = "model.layers." + std::to_string(i) + ".self_attn.", m = "model.layers." + std::to_string(i) + ".mlp.";
    const std::pair<const Weight*, std::string> named[] = {{&l.wq, a + "q_proj"},    {&l.wk, a + "k_proj"},
                                                           {&l.wv, a + "v_proj"},    {&l.wo, a + "o_proj"},
                                                           {&l.w_gate, m + "gate_proj"}, {&l.w_up, m + "up_proj"},
                                                           {&l.w_down, m + "down_proj"}};
    for (const auto& [w, name] : named) taps[w] = &stats[name];
  }
  CpuKvCache kv;
  constexpr int32_t kBlock = 16;
  const int32_t blocks = (ctx + kBlock - 1) / kBlock;
  kv.init(c, blocks, kBlock);
  CalibOps ops(c, &kv, taps);
  StepBatch b;
  for (size_t w0 = 0; w0 < ids.size(); w0 += size_t(ctx)) {
    const int32_t n = int32_t(std::min<size_t>(size_t(ctx), ids.size() - w0));
    b.clear();
    for (int32_t i = 0; i < n; ++i) {
      b.token_ids.push_back(ids[w0 + size_t(i)]);
      b.positions.push_back(i);
    }
    b.logits_rows.push_back(n - 1);  // the logits are not needed; one row keeps lm_head cheap
    b.query_start.push_back(n);
    b.context_lens.push_back(n);
    b.max_blocks_per_seq = blocks;
    for (int32_t i = 0; i < blocks; ++i) b.block_tables.push_back(i);
    forward(c, model->weights, ops, b);
  }
  return stats;
}

}  // namespace kiln
