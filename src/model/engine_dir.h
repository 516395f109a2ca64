// The kiln checkpoint / engine directory (docs/engine-format.md): config.json with
// "kiln_format": 1, one rank<R>.safetensors per tensor-parallel rank holding fused qkv and gate_up
// matrices (BF16/F16/F32, or FP8 E4M3 with per-tensor or per-channel scales), tokenizer files,
// and after `kiln build` a plan.json. Loading maps the files and hands the forward pass row-slice
// views of the fused matrices: no per-weight conversion, FP8 stays FP8.
#pragma once
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "core/status.h"
#include "model/config.h"
#include "model/weights.h"

namespace kiln {

constexpr int kKilnFormatVersion = 1;

// How the vocabulary-sized lm_head is stored across ranks.
enum class LmHeadMode { kTied, kReplicated, kVocabSplit };

struct KilnQuant {
  bool fp8_weights = false;
  bool per_channel = false;             // weight scales per output row, else per tensor
  ActQuant activations = ActQuant::kNone;  // for FP8 weights: static (input_scale) or dynamic
  bool fp8_kv_cache = false;
  std::string source;                   // "kiln" (quantized by kiln convert), "modelopt", "" (none)
};

struct KilnDirInfo {
  ModelConfig config;
  KilnQuant quant;
  int32_t tp_size = 1;
  LmHeadMode lm_head = LmHeadMode::kTied;
  std::string dtype;  // "bfloat16" | "float16" | "float32": non-FP8 matrices
  nlohmann::json json;  // the whole config.json
};

std::string_view act_quant_name(ActQuant a);          // "none", "static", "dynamic_per_tensor", ...
std::string_view lm_head_mode_name(LmHeadMode m);     // "tied", "replicated", "vocab_split"
std::string kiln_rank_file(int32_t rank);             // "rank0.safetensors"

// True if path is a directory whose config.json carries "kiln_format".
bool is_kiln_dir(const std::string& path);
Result<KilnDirInfo> read_kiln_config(const std::string& dir);

// ModelConfig -> config.json fields that config_from_hf_json reads back identically, plus kiln's
// own (rope_style, qk_norm) that HF configs imply by architecture.
nlohmann::json model_config_to_json(const ModelConfig& c);
Result<ModelConfig> model_config_from_kiln_json(const nlohmann::json& j, const std::string& where);

// A tp_size 1 directory as a Model (what load_model does for a kiln dir).
Result<std::shared_ptr<Model>> load_kiln_dir(const std::string& dir);
// One rank of a tensor-parallel directory. Its config has the rank-local sizes (num_heads,
// num_kv_heads, intermediate_size divided by tp_size); the vocab stays global and lm_head has
// vocab/tp rows when split.
Result<std::shared_ptr<Model>> load_kiln_rank(const std::string& dir, int32_t rank);

}  // namespace kiln
