// A model's tensors, backend-neutral: each weight is a pointer plus its storage format. The CPU
// backend reads them in place (mapped files); the CUDA backend uploads copies.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "formats/gguf.h"
#include "model/config.h"

namespace kiln {

class SafetensorsCheckpoint;

enum class WeightFormat : uint8_t { kF32, kF16, kBF16, kF8E4M3, kGgml };

// How an FP8 weight's activations are quantized before the GEMM. The GPU's FP8 GEMM takes FP8
// inputs, so the CPU emulates the same: x_q = fp8(x / s_x), y = (x_q . w_q) * s_x * s_w.
// kNone: weight-only (the row is dequantized, activations stay f32).
enum class ActQuant : uint8_t { kNone, kStaticTensor, kDynamicTensor, kDynamicToken };

// A matrix [rows, cols] (out_features x in_features for linears; vocab x hidden for embeddings),
// rows contiguous, or a vector (rows == 1). Empty when data == nullptr.
struct Weight {
  WeightFormat format = WeightFormat::kF32;
  GgmlType ggml_type = GgmlType::kF32;  // with kGgml
  int64_t rows = 0, cols = 0;
  const void* data = nullptr;
  size_t row_bytes = 0;
  float scale = 1.0f;                   // per-tensor dequantization scale (FP8)
  // FP8 per-output-channel scales [rows]; when set they replace `scale`. An aliasing pointer, so
  // a row slice of the weight points at its own first scale and keeps the whole array alive.
  std::shared_ptr<const float> row_scales;
  ActQuant act_quant = ActQuant::kNone;  // FP8 only
  float input_scale = 1.0f;              // static activation scale (kStaticTensor)
  std::shared_ptr<const void> owner;    // keeps the mapping or an owned buffer alive
  std::string name;                     // source tensor name, for messages and dumps

  bool empty() const { return data == nullptr; }
  const uint8_t* row_ptr(int64_t r) const { return static_cast<const uint8_t*>(data) + size_t(r) * row_bytes; }
  size_t nbytes() const { return size_t(rows) * row_bytes; }
  float row_scale(int64_t r) const { return row_scales ? row_scales.get()[r] : scale; }
  // Rows [r0, r0 + n) as a Weight sharing this one's storage (fused qkv / gate_up on disk,
  // separate projections in memory: rows are contiguous, so a row range is a valid matrix).
  Weight row_slice(int64_t r0, int64_t n) const;
};

std::string_view weight_format_name(const Weight& w);
// Dequantize/convert row r to f32 (cols values). No allocation.
void weight_row_to_f32(const Weight& w, int64_t r, float* dst);
// A vector weight as f32 (norm weights, biases): owned copy.
Weight weight_f32_copy(const Weight& w);

struct LayerWeights {
  Weight attn_norm;             // [hidden]
  Weight wq, wk, wv, wo;        // [q_dim, hidden], [kv_dim, hidden] x2, [hidden, q_dim]
  Weight bq, bk, bv;            // biases (Qwen2), else empty
  Weight q_norm, k_norm;        // [head_dim] (Qwen3), else empty
  Weight ffn_norm;              // [hidden]
  Weight w_gate, w_up, w_down;  // [inter, hidden] x2, [hidden, inter]
  // Fused storage (kiln checkpoints): wq/wk/wv and w_gate/w_up are row slices of these. Empty
  // for HF and GGUF sources. A backend may use the fused matrix directly (one GEMM, not three).
  Weight wqkv;     // [q_dim + 2 * kv_dim, hidden]
  Weight w_gate_up;  // [2 * inter, hidden]
  float k_scale = 1.0f, v_scale = 1.0f;  // FP8 KV cache scales (real = fp8 * scale)
};

struct ModelWeights {
  Weight embed;       // [vocab, hidden]
  std::vector<LayerWeights> layers;
  Weight final_norm;  // [hidden]
  Weight lm_head;     // [vocab, hidden]; the embedding when tied
  bool fp8_kv_cache = false;  // the checkpoint asks for an FP8 KV cache (layers' k_scale/v_scale)
  size_t total_bytes() const;
};

// Norms and biases are converted to owned f32; matrices stay in place, in their stored format.
Result<ModelWeights> load_weights_hf(const SafetensorsCheckpoint& ckpt, const ModelConfig& c);
Result<ModelWeights> load_weights_gguf(const GgufFile& gguf, const ModelConfig& c);

// A loaded model: config + weights + what keeps them mapped.
struct Model {
  ModelConfig config;
  ModelWeights weights;
  std::string source;  // path it came from
  std::shared_ptr<const void> keep_alive;
};

// path: an HF directory (config.json + safetensors) or a .gguf file.
Result<std::shared_ptr<Model>> load_model(const std::string& path);
// Random weights for a config (benchmarks at scale without downloads): f32 or bf16 matrices.
std::shared_ptr<Model> make_dummy_model(const ModelConfig& c, WeightFormat format, uint64_t seed);

}  // namespace kiln
