#include "model/engine_dir.h"

#include <cstring>

#include "core/file.h"
#include "formats/safetensors.h"

namespace kiln {

using nlohmann::json;

std::string_view act_quant_name(ActQuant a) {
  switch (a) {
    case ActQuant::kNone: return "none";
    case ActQuant::kStaticTensor: return "static";
    case ActQuant::kDynamicTensor: return "dynamic_per_tensor";
    case ActQuant::kDynamicToken: return "dynamic_per_token";
  }
  return "?";
}

std::string_view lm_head_mode_name(LmHeadMode m) {
  switch (m) {
    case LmHeadMode::kTied: return "tied";
    case LmHeadMode::kReplicated: return "replicated";
    case LmHeadMode::kVocabSplit: return "vocab_split";
  }
  return "?";
}

std::string kiln_rank_file(int32_t rank) { return "rank" + std::to_string(rank) + ".safetensors"; }

namespace {

std::string hf_arch_class(Arch a) {
  switch (a) {
    case Arch::kLlama: return "LlamaForCausalLM";
    case Arch::kMistral: return "MistralForCausalLM";
    case Arch::kQwen2: return "Qwen2ForCausalLM";
    case Arch::kQwen3: return "Qwen3ForCausalLM";
  }
  return "?";
}

Result<json> read_json(const std::string& path) {
  KILN_ASSIGN_OR_RETURN(std::string text, read_file(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::error(path + ": not valid JSON");
  return j;
}

}  // namespace

json model_config_to_json(const ModelConfig& c) {
  json j = {
      {"architectures", {hf_arch_class(c.arch)}},
      {"model_type", std::string(arch_name(c.arch))},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_layers},
      {"num_attention_heads", c.num_heads},
      {"num_key_value_heads", c.num_kv_heads},
      {"head_dim", c.head_dim},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"max_position_embeddings", c.max_position_embeddings},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"attention_bias", c.attention_bias},
      {"qk_norm", c.qk_norm},
      {"rope_style", c.rope_style == RopeStyle::kHalf ? "half" : "interleaved"},
  };
  switch (c.rope_scaling) {
    case RopeScaling::kNone: break;
    case RopeScaling::kLinear: j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope_factor}}; break;
    case RopeScaling::kLlama3:
      j["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", c.rope_factor},
                           {"low_freq_factor", c.rope_low_freq_factor},
                           {"high_freq_factor", c.rope_high_freq_factor},
                           {"original_max_position_embeddings", c.rope_original_max_pos}};
      break;
  }
  if (c.bos_token_id) j["bos_token_id"] = *c.bos_token_id;
  if (c.eos_token_ids.size() == 1) j["eos_token_id"] = c.eos_token_ids[0];
  else if (!c.eos_token_ids.empty()) j["eos_token_id"] = c.eos_token_ids;
  if (!c.torch_dtype.empty()) j["torch_dtype"] = c.torch_dtype;
  return j;
}

Result<ModelConfig> model_config_from_kiln_json(const json& j, const std::string& where) {
  KILN_ASSIGN_OR_RETURN(ModelConfig c, config_from_hf_json(j, where));
  if (auto it = j.find("rope_style"); it != j.end()) {
    if (*it == "half") c.rope_style = RopeStyle::kHalf;
    else if (*it == "interleaved") c.rope_style = RopeStyle::kInterleaved;
    else return Status::error(where + ": rope_style must be \"half\" or \"interleaved\"");
  }
  if (auto it = j.find("qk_norm"); it != j.end() && it->is_boolean()) c.qk_norm = it->get<bool>();
  // torch_dtype describes the source; "dtype" in a kiln config is the stored matrices' dtype.
  if (auto it = j.find("torch_dtype"); it != j.end() && it->is_string()) c.torch_dtype = it->get<std::string>();
  return c;
}

bool is_kiln_dir(const std::string& path) {
  if (!is_directory(path)) return false;
  auto j = read_json(path + "/config.json");
  return j.is_ok() && j->is_object() && j->contains("kiln_format");
}

Result<KilnDirInfo> read_kiln_config(const std::string& dir) {
  const std::string where = dir + "/config.json";
  KILN_ASSIGN_OR_RETURN(json j, read_json(where));
  if (!j.is_object() || !j.contains("kiln_format")) return Status::error(where + ": not a kiln checkpoint (no kiln_format)");
  if (!j["kiln_format"].is_number_integer() || j["kiln_format"].get<int>() != kKilnFormatVersion)
    return Status::error(where + ": kiln_format " + j["kiln_format"].dump() + " is not supported (this kiln reads " +
                         std::to_string(kKilnFormatVersion) + ")");
  KilnDirInfo info;
  KILN_ASSIGN_OR_RETURN(info.config, model_config_from_kiln_json(j, where));
  info.dtype = j.value("dtype", std::string("bfloat16"));
  if (info.dtype != "bfloat16" && info.dtype != "float16" && info.dtype != "float32")
    return Status::error(where + ": dtype '" + info.dtype + "' is not one of bfloat16, float16, float32");
  if (auto q = j.find("quantization"); q != j.end() && q->is_object()) {
    const json& qj = *q;
    if (qj.contains("quant_algo") && qj["quant_algo"].is_string()) {
      if (qj["quant_algo"] != "FP8")
        return Status::error(where + ": quantization.quant_algo '" + qj["quant_algo"].get<std::string>() +
                             "' is not supported (FP8 or null)");
      info.quant.fp8_weights = true;
    }
    const std::string ws = qj.value("weight_scaling", std::string("per_tensor"));
    if (ws != "per_tensor" && ws != "per_channel")
      return Status::error(where + ": quantization.weight_scaling must be per_tensor or per_channel, not '" + ws + "'");
    info.quant.per_channel = ws == "per_channel";
    const std::string as = qj.value("activation_scaling", std::string(info.quant.fp8_weights ? "dynamic_per_token" : "none"));
    if (as == "none") info.quant.activations = ActQuant::kNone;
    else if (as == "static") info.quant.activations = ActQuant::kStaticTensor;
    else if (as == "dynamic_per_tensor") info.quant.activations = ActQuant::kDynamicTensor;
    else if (as == "dynamic_per_token") info.quant.activations = ActQuant::kDynamicToken;
    else
      return Status::error(where + ": quantization.activation_scaling '" + as +
                           "' is not one of none, static, dynamic_per_tensor, dynamic_per_token");
    info.quant.fp8_kv_cache = qj.contains("kv_cache_quant_algo") && qj["kv_cache_quant_algo"] == "FP8";
    info.quant.source = qj.value("source", std::string());
  }
  if (auto m = j.find("mapping"); m != j.end() && m->is_object()) {
    info.tp_size = m->value("tp_size", 1);
    const std::string lm = m->value("lm_head", std::string(info.config.tie_word_embeddings ? "tied" : "replicated"));
    if (lm == "tied") info.lm_head = LmHeadMode::kTied;
    else if (lm == "replicated") info.lm_head = LmHeadMode::kReplicated;
    else if (lm == "vocab_split") info.lm_head = LmHeadMode::kVocabSplit;
    else return Status::error(where + ": mapping.lm_head '" + lm + "' is not one of tied, replicated, vocab_split");
  } else {
    info.lm_head = info.config.tie_word_embeddings ? LmHeadMode::kTied : LmHeadMode::kReplicated;
  }
  if (info.tp_size < 1) return Status::error(where + ": mapping.tp_size must be at least 1");
  info.json = std::move(j);
  return info;
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

struct RankLoader {
  const SafetensorsCheckpoint& ck;
  const KilnQuant& quant;
  std::string file;

  Result<const SafeTensor*> get(const std::string& name, std::vector<int64_t> shape) const {
    const SafeTensor* t = ck.find(name);
    if (!t) return Status::error(file + ": missing tensor '" + name + "'");
    if (t->shape != shape)
      return Status::error(file + ": tensor '" + name + "' has shape " + shape_str(t->shape) + " but config.json implies " +
                           shape_str(shape));
    return t;
  }

  // A float vector (norm, bias), owned f32.
  Result<Weight> vec(const std::string& name, int64_t n) const {
    KILN_ASSIGN_OR_RETURN(const SafeTensor* t, get(name, {n}));
    if (t->dtype != DType::kF32 && t->dtype != DType::kF16 && t->dtype != DType::kBF16)
      return Status::error(file + ": tensor '" + name + "' has dtype " + std::string(dtype_name(t->dtype)) +
                           " (expected F32, F16 or BF16)");
    auto buf = std::make_shared<std::vector<float>>(size_t(n));
    for (int64_t i = 0; i < n; ++i) (*buf)[size_t(i)] = load_as_f32(t->data, t->dtype, size_t(i));
    Weight w;
    w.rows = 1;
    w.cols = n;
    w.row_bytes = size_t(n) * 4;
    w.data = buf->data();
    w.owner = buf;
    w.name = name;
    return w;
  }

  Result<float> scalar(const std::string& name) const {
    const SafeTensor* t = ck.find(name);
    if (!t) return Status::error(file + ": missing tensor '" + name + "'");
    if (t->numel() != 1) return Status::error(file + ": tensor '" + name + "' must be a scalar, has shape " + shape_str(t->shape));
    return load_as_f32(t->data, t->dtype, 0);
  }

  // A matrix in place (mapped). FP8: its scale(s) and activation mode from the quant config.
  Result<Weight> mat(const std::string& prefix, int64_t rows, int64_t cols) const {
    const std::string name = prefix + ".weight";
    KILN_ASSIGN_OR_RETURN(const SafeTensor* t, get(name, {rows, cols}));
    Weight w;
    w.name = name;
    w.rows = rows;
    w.cols = cols;
    w.data = t->data;
    w.row_bytes = size_t(cols) * dtype_size(t->dtype);
    switch (t->dtype) {
      case DType::kF32: w.format = WeightFormat::kF32; break;
      case DType::kF16: w.format = WeightFormat::kF16; break;
      case DType::kBF16: w.format = WeightFormat::kBF16; break;
      case DType::kF8E4M3: w.format = WeightFormat::kF8E4M3; break;
      default:
        return Status::error(file + ": tensor '" + name + "' has dtype " + std::string(dtype_name(t->dtype)) +
                             " (expected F32, F16, BF16 or F8_E4M3)");
    }
    if (w.format != WeightFormat::kF8E4M3) return w;
    const SafeTensor* s = ck.find(prefix + ".weight_scale");
    if (!s) return Status::error(file + ": FP8 tensor '" + name + "' has no '" + prefix + ".weight_scale'");
    if (s->numel() == 1) {
      w.scale = load_as_f32(s->data, s->dtype, 0);
    } else if (s->numel() == rows) {
      // Copied (rows floats): the mapped data need not be 4-byte aligned.
      std::shared_ptr<float[]> sc(new float[size_t(rows)]);
      for (int64_t r = 0; r < rows; ++r) sc[size_t(r)] = load_as_f32(s->data, s->dtype, size_t(r));
      w.row_scales = std::shared_ptr<const float>(sc, sc.get());
    } else {
      return Status::error(file + ": '" + prefix + ".weight_scale' has " + std::to_string(s->numel()) +
                           " values; expected 1 (per tensor) or " + std::to_string(rows) + " (per channel)");
    }
    w.act_quant = quant.activations;
    if (const SafeTensor* is = ck.find(prefix + ".input_scale")) {
      if (is->numel() != 1) return Status::error(file + ": '" + prefix + ".input_scale' must be a scalar");
      w.input_scale = load_as_f32(is->data, is->dtype, 0);
      if (quant.activations == ActQuant::kStaticTensor || quant.activations == ActQuant::kNone)
        w.act_quant = ActQuant::kStaticTensor;
      if (!(w.input_scale > 0.0f))
        return Status::error(file + ": '" + prefix + ".input_scale' must be positive");
    } else if (w.act_quant == ActQuant::kStaticTensor) {
      return Status::error(file + ": activation_scaling is static but '" + prefix + ".input_scale' is missing");
    }
    return w;
  }
};

Result<std::shared_ptr<Model>> load_rank(const std::string& dir, const KilnDirInfo& info, int32_t rank) {
  const int32_t tp = info.tp_size;
  if (rank < 0 || rank >= tp)
    return Status::error(dir + ": rank " + std::to_string(rank) + " is outside tp_size " + std::to_string(tp));
  const std::string path = dir + "/" + kiln_rank_file(rank);
  KILN_ASSIGN_OR_RETURN(auto ck0, SafetensorsCheckpoint::open(path));
  auto ck = std::make_shared<SafetensorsCheckpoint>(std::move(ck0));
  auto model = std::make_shared<Model>();
  model->source = dir;
  model->keep_alive = ck;
  ModelConfig c = info.config;
  c.num_heads /= tp;
  c.num_kv_heads /= tp;
  c.intermediate_size /= tp;
  model->config = c;
  RankLoader ld{*ck, info.quant, path};
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, Q = c.q_dim(), KV = c.kv_dim();
  ModelWeights& mw = model->weights;
  mw.fp8_kv_cache = info.quant.fp8_kv_cache;
  KILN_ASSIGN_OR_RETURN(mw.embed, ld.mat("model.embed_tokens", V, H));
  KILN_ASSIGN_OR_RETURN(mw.final_norm, ld.vec("model.norm.weight", H));
  switch (info.lm_head) {
    case LmHeadMode::kTied: mw.lm_head = mw.embed; break;
    case LmHeadMode::kReplicated: {
      KILN_ASSIGN_OR_RETURN(mw.lm_head, ld.mat("lm_head", V, H));
      break;
    }
    case LmHeadMode::kVocabSplit: {
      KILN_ASSIGN_OR_RETURN(mw.lm_head, ld.mat("lm_head", V / tp, H));
      break;
    }
  }
  mw.layers.resize(size_t(c.num_layers));
  for (int32_t i = 0; i < c.num_layers; ++i) {
    LayerWeights& l = mw.layers[size_t(i)];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    KILN_ASSIGN_OR_RETURN(l.attn_norm, ld.vec(p + "input_layernorm.weight", H));
    KILN_ASSIGN_OR_RETURN(l.wqkv, ld.mat(p + "self_attn.qkv_proj", Q + 2 * KV, H));
    l.wq = l.wqkv.row_slice(0, Q);
    l.wk = l.wqkv.row_slice(Q, KV);
    l.wv = l.wqkv.row_slice(Q + KV, KV);
    if (c.attention_bias) {
      KILN_ASSIGN_OR_RETURN(Weight b, ld.vec(p + "self_attn.qkv_proj.bias", Q + 2 * KV));
      b.cols = Q;
      l.bq = b;
      l.bk = b;
      l.bk.cols = KV;
      l.bk.data = static_cast<const float*>(b.data) + Q;
      l.bv = l.bk;
      l.bv.data = static_cast<const float*>(b.data) + Q + KV;
      l.bq.row_bytes = size_t(Q) * 4;
      l.bk.row_bytes = l.bv.row_bytes = size_t(KV) * 4;
    }
    KILN_ASSIGN_OR_RETURN(l.wo, ld.mat(p + "self_attn.o_proj", H, Q));
    if (c.qk_norm) {
      KILN_ASSIGN_OR_RETURN(l.q_norm, ld.vec(p + "self_attn.q_norm.weight", c.head_dim));
      KILN_ASSIGN_OR_RETURN(l.k_norm, ld.vec(p + "self_attn.k_norm.weight", c.head_dim));
    }
    if (info.quant.fp8_kv_cache) {
      KILN_ASSIGN_OR_RETURN(l.k_scale, ld.scalar(p + "self_attn.k_scale"));
      KILN_ASSIGN_OR_RETURN(l.v_scale, ld.scalar(p + "self_attn.v_scale"));
    }
    KILN_ASSIGN_OR_RETURN(l.ffn_norm, ld.vec(p + "post_attention_layernorm.weight", H));
    KILN_ASSIGN_OR_RETURN(l.w_gate_up, ld.mat(p + "mlp.gate_up_proj", 2 * I, H));
    l.w_gate = l.w_gate_up.row_slice(0, I);
    l.w_up = l.w_gate_up.row_slice(I, I);
    KILN_ASSIGN_OR_RETURN(l.w_down, ld.mat(p + "mlp.down_proj", H, I));
  }
  return model;
}

}  // namespace

Result<std::shared_ptr<Model>> load_kiln_rank(const std::string& dir, int32_t rank) {
  KILN_ASSIGN_OR_RETURN(KilnDirInfo info, read_kiln_config(dir));
  return load_rank(dir, info, rank);
}

Result<std::shared_ptr<Model>> load_kiln_dir(const std::string& dir) {
  KILN_ASSIGN_OR_RETURN(KilnDirInfo info, read_kiln_config(dir));
  if (info.tp_size != 1)
    return Status::error(dir + ": a tensor-parallel checkpoint (tp_size " + std::to_string(info.tp_size) +
                         ") runs one rank per GPU, which this build cannot do; convert with --tp_size 1 to serve it here");
  return load_rank(dir, info, 0);
}

}  // namespace kiln
