#include "model/config.h"

#include <nlohmann/json.hpp>

#include "core/file.h"
#include "formats/gguf.h"

namespace kiln {

using nlohmann::json;

std::string_view arch_name(Arch a) {
  switch (a) {
    case Arch::kLlama: return "llama";
    case Arch::kMistral: return "mistral";
    case Arch::kQwen2: return "qwen2";
    case Arch::kQwen3: return "qwen3";
  }
  return "?";
}

namespace {

constexpr const char* kSupportedHf =
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM";

// Reads an integer field; absent -> fallback (or an error if required).
Status get_int(const json& j, const char* key, int32_t* out, const std::string& where, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return Status::error(where + ": missing required field '" + key + "'");
    return Status::ok();
  }
  if (!it->is_number_integer()) return Status::error(where + ": field '" + key + "' must be an integer");
  int64_t v = it->get<int64_t>();
  if (v < 0 || v > (int64_t(1) << 31) - 1) return Status::error(where + ": field '" + key + "' out of range");
  *out = int32_t(v);
  return Status::ok();
}

Status get_float(const json& j, const char* key, float* out, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::ok();
  if (!it->is_number()) return Status::error(where + ": field '" + key + "' must be a number");
  *out = it->get<float>();
  return Status::ok();
}

}  // namespace

Status validate_config(const ModelConfig& c, const std::string& where) {
  auto pos = [&](const char* name, int64_t v) -> Status {
    if (v <= 0) return Status::error(where + ": " + name + " (" + std::to_string(v) + ") must be positive");
    return Status::ok();
  };
  KILN_RETURN_IF_ERROR(pos("vocab_size", c.vocab_size));
  KILN_RETURN_IF_ERROR(pos("hidden_size", c.hidden_size));
  KILN_RETURN_IF_ERROR(pos("intermediate_size", c.intermediate_size));
  KILN_RETURN_IF_ERROR(pos("num_hidden_layers", c.num_layers));
  KILN_RETURN_IF_ERROR(pos("num_attention_heads", c.num_heads));
  KILN_RETURN_IF_ERROR(pos("num_key_value_heads", c.num_kv_heads));
  KILN_RETURN_IF_ERROR(pos("head_dim", c.head_dim));
  if (c.num_heads % c.num_kv_heads != 0)
    return Status::error(where + ": num_key_value_heads (" + std::to_string(c.num_kv_heads) +
                         ") must divide num_attention_heads (" + std::to_string(c.num_heads) + ")");
  if (c.head_dim % 2 != 0) return Status::error(where + ": head_dim (" + std::to_string(c.head_dim) + ") must be even");
  if (c.head_dim > 512) return Status::error(where + ": head_dim (" + std::to_string(c.head_dim) + ") above 512 is not supported");
  if (!(c.rms_norm_eps > 0)) return Status::error(where + ": rms_norm_eps must be positive");
  if (!(c.rope_theta > 0)) return Status::error(where + ": rope_theta must be positive");
  if (c.rope_factor <= 0) return Status::error(where + ": rope_scaling.factor must be positive");
  for (int32_t e : c.eos_token_ids)
    if (e < 0 || e >= c.vocab_size)
      return Status::error(where + ": eos_token_id " + std::to_string(e) + " is outside the vocabulary (" +
                           std::to_string(c.vocab_size) + ")");
  return Status::ok();
}

Result<ModelConfig> config_from_hf_json(const json& j, const std::string& where) {
  if (!j.is_object()) return Status::error(where + ": expected a JSON object");
  ModelConfig c;
  std::string arch;
  if (auto it = j.find("architectures"); it != j.end() && it->is_array() && !it->empty() && (*it)[0].is_string())
    arch = (*it)[0].get<std::string>();
  else if (auto mt = j.find("model_type"); mt != j.end() && mt->is_string())
    arch = mt->get<std::string>();
  c.arch_name = arch;
  if (arch == "LlamaForCausalLM" || arch == "llama") c.arch = Arch::kLlama;
  else if (arch == "MistralForCausalLM" || arch == "mistral") c.arch = Arch::kMistral;
  else if (arch == "Qwen2ForCausalLM" || arch == "qwen2") c.arch = Arch::kQwen2;
  else if (arch == "Qwen3ForCausalLM" || arch == "qwen3") c.arch = Arch::kQwen3;
  else
    return Status::error(where + ": architecture '" + (arch.empty() ? std::string("(none)") : arch) +
                         "' is not supported (supported: " + kSupportedHf + ")");

  KILN_RETURN_IF_ERROR(get_int(j, "vocab_size", &c.vocab_size, where, true));
  KILN_RETURN_IF_ERROR(get_int(j, "hidden_size", &c.hidden_size, where, true));
  KILN_RETURN_IF_ERROR(get_int(j, "intermediate_size", &c.intermediate_size, where, true));
  KILN_RETURN_IF_ERROR(get_int(j, "num_hidden_layers", &c.num_layers, where, true));
  KILN_RETURN_IF_ERROR(get_int(j, "num_attention_heads", &c.num_heads, where, true));
  c.num_kv_heads = c.num_heads;
  KILN_RETURN_IF_ERROR(get_int(j, "num_key_value_heads", &c.num_kv_heads, where, false));
  c.head_dim = c.num_heads > 0 ? c.hidden_size / c.num_heads : 0;
  KILN_RETURN_IF_ERROR(get_int(j, "head_dim", &c.head_dim, where, false));
  c.max_position_embeddings = 4096;
  KILN_RETURN_IF_ERROR(get_int(j, "max_position_embeddings", &c.max_position_embeddings, where, false));
  KILN_RETURN_IF_ERROR(get_float(j, "rms_norm_eps", &c.rms_norm_eps, where));
  KILN_RETURN_IF_ERROR(get_float(j, "rope_theta", &c.rope_theta, where));
  // transformers 5 nests rope settings under rope_parameters; 4.x uses rope_theta + rope_scaling.
  const json* rope = nullptr;
  if (auto it = j.find("rope_scaling"); it != j.end() && it->is_object()) rope = &*it;
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) {
    KILN_RETURN_IF_ERROR(get_float(*it, "rope_theta", &c.rope_theta, where + ": rope_parameters"));
    if (!rope) rope = &*it;
  }
  if (rope) {
    std::string type;
    for (const char* key : {"rope_type", "type"})
      if (auto t = rope->find(key); t != rope->end() && t->is_string()) {
        type = t->get<std::string>();
        break;
      }
    if (type == "llama3") {
      c.rope_scaling = RopeScaling::kLlama3;
      KILN_RETURN_IF_ERROR(get_float(*rope, "factor", &c.rope_factor, where + ": rope_scaling"));
      KILN_RETURN_IF_ERROR(get_float(*rope, "low_freq_factor", &c.rope_low_freq_factor, where + ": rope_scaling"));
      KILN_RETURN_IF_ERROR(get_float(*rope, "high_freq_factor", &c.rope_high_freq_factor, where + ": rope_scaling"));
      KILN_RETURN_IF_ERROR(get_int(*rope, "original_max_position_embeddings", &c.rope_original_max_pos,
                                   where + ": rope_scaling", false));
    } else if (type == "linear") {
      c.rope_scaling = RopeScaling::kLinear;
      KILN_RETURN_IF_ERROR(get_float(*rope, "factor", &c.rope_factor, where + ": rope_scaling"));
    } else if (!type.empty() && type != "default") {
      return Status::error(where + ": rope_scaling type '" + type + "' is not supported (supported: llama3, linear)");
    }
  }
  if (auto it = j.find("tie_word_embeddings"); it != j.end() && it->is_boolean()) c.tie_word_embeddings = it->get<bool>();
  c.attention_bias = c.arch == Arch::kQwen2;
  if (auto it = j.find("attention_bias"); it != j.end() && it->is_boolean()) c.attention_bias = it->get<bool>();
  c.qk_norm = c.arch == Arch::kQwen3;
  if (auto it = j.find("bos_token_id"); it != j.end() && it->is_number_integer()) c.bos_token_id = it->get<int32_t>();
  if (auto it = j.find("eos_token_id"); it != j.end()) {
    if (it->is_number_integer()) c.eos_token_ids.push_back(it->get<int32_t>());
    else if (it->is_array())
      for (auto& e : *it) {
        if (!e.is_number_integer()) return Status::error(where + ": eos_token_id list must hold integers");
        c.eos_token_ids.push_back(e.get<int32_t>());
      }
    else if (!it->is_null()) return Status::error(where + ": eos_token_id must be an integer or a list of integers");
  }
  if (auto it = j.find("torch_dtype"); it != j.end() && it->is_string()) c.torch_dtype = it->get<std::string>();
  if (auto it = j.find("dtype"); it != j.end() && it->is_string()) c.torch_dtype = it->get<std::string>();
  KILN_RETURN_IF_ERROR(validate_config(c, where));
  return c;
}

Result<ModelConfig> config_from_hf_file(const std::string& path) {
  KILN_ASSIGN_OR_RETURN(std::string text, read_file(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::error(path + ": not valid JSON");
  return config_from_hf_json(j, path);
}

Result<ModelConfig> config_from_gguf(const GgufFile& g) {
  const std::string where = g.path();
  auto arch = g.get_string("general.architecture");
  if (!arch) return Status::error(where + ": missing general.architecture");
  ModelConfig c;
  c.arch_name = *arch;
  if (*arch == "llama") {
    c.arch = Arch::kLlama;
    c.rope_style = RopeStyle::kInterleaved;  // llama.cpp permuted q/k for GGML's NORM rope
  } else if (*arch == "qwen2") {
    c.arch = Arch::kQwen2;
    c.attention_bias = true;
  } else if (*arch == "qwen3") {
    c.arch = Arch::kQwen3;
    c.qk_norm = true;
  } else {
    return Status::error(where + ": GGUF architecture '" + *arch + "' is not supported (supported: llama, qwen2, qwen3)");
  }
  const std::string p = *arch + ".";
  auto req = [&](const std::string& key, int32_t* out) -> Status {
    auto v = g.get_int(key);
    if (!v) return Status::error(where + ": missing " + key);
    if (*v <= 0 || *v > (int64_t(1) << 31) - 1) return Status::error(where + ": " + key + " out of range");
    *out = int32_t(*v);
    return Status::ok();
  };
  KILN_RETURN_IF_ERROR(req(p + "embedding_length", &c.hidden_size));
  KILN_RETURN_IF_ERROR(req(p + "feed_forward_length", &c.intermediate_size));
  KILN_RETURN_IF_ERROR(req(p + "block_count", &c.num_layers));
  KILN_RETURN_IF_ERROR(req(p + "attention.head_count", &c.num_heads));
  c.num_kv_heads = c.num_heads;
  if (g.get_int(p + "attention.head_count_kv")) KILN_RETURN_IF_ERROR(req(p + "attention.head_count_kv", &c.num_kv_heads));
  c.head_dim = c.hidden_size / c.num_heads;
  if (g.get_int(p + "attention.key_length")) KILN_RETURN_IF_ERROR(req(p + "attention.key_length", &c.head_dim));
  c.max_position_embeddings = 4096;
  if (g.get_int(p + "context_length")) KILN_RETURN_IF_ERROR(req(p + "context_length", &c.max_position_embeddings));
  if (auto v = g.get_float(p + "attention.layer_norm_rms_epsilon")) c.rms_norm_eps = float(*v);
  if (auto v = g.get_float(p + "rope.freq_base")) c.rope_theta = float(*v);
  if (auto t = g.get_string(p + "rope.scaling.type"); t && *t == "linear") {
    c.rope_scaling = RopeScaling::kLinear;
    if (auto f = g.get_float(p + "rope.scaling.factor")) c.rope_factor = float(*f);
  }
  if (auto v = g.get_int(p + "vocab_size")) c.vocab_size = int32_t(*v);
  else if (auto* toks = g.get("tokenizer.ggml.tokens")) c.vocab_size = int32_t(toks->size());
  c.tie_word_embeddings = g.find("output.weight") == nullptr;
  if (auto v = g.get_int("tokenizer.ggml.bos_token_id")) c.bos_token_id = int32_t(*v);
  if (auto v = g.get_int("tokenizer.ggml.eos_token_id")) c.eos_token_ids.push_back(int32_t(*v));
  if (auto v = g.get_int("tokenizer.ggml.eot_token_id"))
    if (c.eos_token_ids.empty() || c.eos_token_ids[0] != *v) c.eos_token_ids.push_back(int32_t(*v));
  KILN_RETURN_IF_ERROR(validate_config(c, where));
  return c;
}

}  // namespace kiln
