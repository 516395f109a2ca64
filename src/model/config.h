// What a model is: architecture family and hyperparameters, from an HF config.json or GGUF keys.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/status.h"

namespace kiln {

class GgufFile;

enum class Arch { kLlama, kMistral, kQwen2, kQwen3 };
enum class RopeScaling { kNone, kLinear, kLlama3 };
// kHalf: rotate the two halves of each head (HF rotate_half, GGML NEOX).
// kInterleaved: rotate adjacent pairs (GGML NORM); llama.cpp's converter permutes Llama's q/k rows
// so that this equals kHalf on the original weights.
enum class RopeStyle { kHalf, kInterleaved };

struct ModelConfig {
  Arch arch = Arch::kLlama;
  std::string arch_name;  // as written in the source ("LlamaForCausalLM", "llama")
  int32_t vocab_size = 0;
  int32_t hidden_size = 0;
  int32_t intermediate_size = 0;
  int32_t num_layers = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeStyle rope_style = RopeStyle::kHalf;
  RopeScaling rope_scaling = RopeScaling::kNone;
  float rope_factor = 1.0f;             // linear and llama3
  float rope_low_freq_factor = 1.0f;    // llama3
  float rope_high_freq_factor = 4.0f;   // llama3
  int32_t rope_original_max_pos = 8192; // llama3
  int32_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v projections carry biases (Qwen2)
  bool qk_norm = false;         // RMSNorm over each q/k head (Qwen3)
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;
  std::string torch_dtype;      // "bfloat16", ... ("" if unknown)

  int32_t q_dim() const { return num_heads * head_dim; }
  int32_t kv_dim() const { return num_kv_heads * head_dim; }
};

std::string_view arch_name(Arch a);

// `where` names the source in messages ("model/config.json").
Result<ModelConfig> config_from_hf_json(const nlohmann::json& j, const std::string& where);
Result<ModelConfig> config_from_hf_file(const std::string& path);
Result<ModelConfig> config_from_gguf(const GgufFile& gguf);
// Consistency checks shared by every source (divisibility, positivity).
Status validate_config(const ModelConfig& c, const std::string& where);

}  // namespace kiln
