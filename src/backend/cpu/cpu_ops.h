// The CPU backend: every op in plain C++ (AVX2 where it matters), f32 activations, weights read in
// place in their stored format (rows dequantized on the fly). It is the reference every other
// backend is tested against, so each (token, output) value is computed in an order that does not
// depend on the batch it is in: the same request gives bit-identical logits alone or batched.
#pragma once
#include <cstdint>
#include <vector>

#include "model/ops.h"

namespace kiln {

// Rotary inverse frequencies [head_dim / 2] in float32, as transformers computes them (incl.
// linear and llama3 scaling).
std::vector<float> rope_inv_freq(const ModelConfig& c);

// Paged KV cache in host memory, one K and one V array per layer.
// With fp8 set it emulates an FP8 E4M3 cache: every k/v value written is stored as
// fp8(x / scale) * scale (the layer's k or v scale), exactly what the GPU's 1-byte cache reads back.
struct CpuKvCache {
  int32_t num_blocks = 0, block_size = 16, num_kv_heads = 0, head_dim = 0;
  std::vector<std::vector<float>> k, v;  // [layers][num_blocks, block_size, n_kv_heads, head_dim]
  bool fp8 = false;
  std::vector<float> k_scale, v_scale;  // [layers], with fp8
  void init(const ModelConfig& c, int32_t blocks, int32_t block_size);
  // Per-layer scales (real = fp8 * scale); non-positive or non-finite scales become 1.
  void set_fp8(std::vector<float> k_scales, std::vector<float> v_scales);
  size_t bytes() const;
  static size_t bytes_per_block(const ModelConfig& c, int32_t block_size) {
    return size_t(2) * c.num_layers * block_size * c.kv_dim() * sizeof(float);
  }
};

class CpuOps final : public Ops {
 public:
  CpuOps(const ModelConfig& c, CpuKvCache* kv);
  void begin_step(const StepBatch& batch) override;
  Act buffer(Buf which) override;
  void embed(const Weight& table, Act out) override;
  void rms_norm(Act x, const Weight& w, int64_t n, int64_t dim, float eps, Act out) override;
  void add_rms_norm(Act residual, Act delta, const Weight& w, int64_t n, int64_t dim, float eps, Act out) override;
  void linear(Act x, int64_t n, const Weight& w, const Weight* bias, Act y) override;
  void head_rms_norm(Act x, int64_t n, int64_t heads, int64_t head_dim, const Weight& w, float eps) override;
  void rope(Act q, Act k, const ModelConfig& c) override;
  void attention(int32_t layer, Act q, Act k, Act v, const ModelConfig& c, Act out) override;
  void silu_mul(Act gate, Act up, int64_t n, int64_t dim, Act out) override;
  void gather_logit_rows(Act x, int64_t dim, Act out) override;

  const float* logits() const { return bufs_[size_t(Buf::kLogits)].data(); }

 private:
  const ModelConfig& c_;
  CpuKvCache* kv_;
  const StepBatch* batch_ = nullptr;
  std::vector<float> inv_freq_;
  std::vector<std::vector<float>> bufs_;
};

// Plain free functions, also used by tests as the reference for other backends.
// dst[i] = fp8_e4m3(src[i] / scale) * scale: one value of an FP8 KV cache, read back (in place ok).
void kv_fp8_store(const float* src, int64_t n, float scale, float* dst);
void cpu_linear(const float* x, int64_t m, const Weight& w, const float* bias, float* y);
float cpu_dot(const float* a, const float* b, int64_t n);

}  // namespace kiln
