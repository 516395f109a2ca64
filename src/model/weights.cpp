#include "model/weights.h"

#include <cstring>
#include <functional>
#include <random>

#include "core/dtype.h"
#include "core/file.h"
#include "formats/safetensors.h"
#include "model/engine_dir.h"

namespace kiln {

std::string_view weight_format_name(const Weight& w) {
  switch (w.format) {
    case WeightFormat::kF32: return "F32";
    case WeightFormat::kF16: return "F16";
    case WeightFormat::kBF16: return "BF16";
    case WeightFormat::kF8E4M3: return "F8_E4M3";
    case WeightFormat::kGgml: return ggml_type_name(w.ggml_type);
  }
  return "?";
}

void weight_row_to_f32(const Weight& w, int64_t r, float* dst) {
  const uint8_t* src = w.row_ptr(r);
  const int64_t n = w.cols;
  switch (w.format) {
    case WeightFormat::kF32: std::memcpy(dst, src, size_t(n) * 4); return;
    case WeightFormat::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = f16_to_f32(h);
      }
      return;
    case WeightFormat::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = bf16_to_f32(h);
      }
      return;
    case WeightFormat::kF8E4M3:
    {
      const float s = w.row_scale(r);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp8e4m3_to_f32(src[i]) * s;
      return;
    }
    case WeightFormat::kGgml: ggml_dequantize_row(w.ggml_type, src, dst, n); return;
  }
}

Weight weight_f32_copy(const Weight& w) {
  auto buf = std::make_shared<std::vector<float>>(size_t(w.rows * w.cols));
  for (int64_t r = 0; r < w.rows; ++r) weight_row_to_f32(w, r, buf->data() + r * w.cols);
  Weight out;
  out.format = WeightFormat::kF32;
  out.rows = w.rows;
  out.cols = w.cols;
  out.row_bytes = size_t(w.cols) * 4;
  out.data = buf->data();
  out.owner = buf;
  out.name = w.name;
  return out;
}

Weight Weight::row_slice(int64_t r0, int64_t n) const {
  KILN_CHECK(r0 >= 0 && n >= 0 && r0 + n <= rows);
  Weight out = *this;
  out.rows = n;
  out.data = row_ptr(r0);
  if (row_scales) out.row_scales = std::shared_ptr<const float>(row_scales, row_scales.get() + r0);
  return out;
}

size_t ModelWeights::total_bytes() const {
  size_t n = embed.nbytes() + final_norm.nbytes();
  if (lm_head.data != embed.data) n += lm_head.nbytes();
  for (const auto& l : layers)
    for (const Weight* w : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv, &l.q_norm, &l.k_norm,
                            &l.ffn_norm, &l.w_gate, &l.w_up, &l.w_down})
      n += w->nbytes();
  return n;
}

namespace {

std::string shape_str(int64_t rows, int64_t cols) {
  return "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

// A weight from an HF safetensors tensor; expected shape [rows, cols] (rows == 0: a vector of cols).
Result<Weight> hf_weight(const SafetensorsCheckpoint& ck, const std::string& name, int64_t rows, int64_t cols,
                         bool vector) {
  const SafeTensor* t = ck.find(name);
  if (!t) {
    std::string where = ck.files().empty() ? std::string("checkpoint") : ck.files().front();
    return Status::error(where + ": missing tensor '" + name + "'");
  }
  Weight w;
  w.name = name;
  bool ok_shape = vector ? (t->shape.size() == 1 && t->shape[0] == cols)
                         : (t->shape.size() == 2 && t->shape[0] == rows && t->shape[1] == cols);
  if (!ok_shape) {
    std::string got = "[";
    for (size_t i = 0; i < t->shape.size(); ++i) got += (i ? ", " : "") + std::to_string(t->shape[i]);
    got += "]";
    return Status::error(t->file + ": tensor '" + name + "' has shape " + got + " but config.json implies " +
                         (vector ? "[" + std::to_string(cols) + "]" : shape_str(rows, cols)));
  }
  switch (t->dtype) {
    case DType::kF32: w.format = WeightFormat::kF32; break;
    case DType::kF16: w.format = WeightFormat::kF16; break;
    case DType::kBF16: w.format = WeightFormat::kBF16; break;
    case DType::kF8E4M3: w.format = WeightFormat::kF8E4M3; break;
    default:
      return Status::error(t->file + ": tensor '" + name + "' has dtype " + std::string(dtype_name(t->dtype)) +
                           ", which is not a weight dtype kiln supports (F32, F16, BF16, F8_E4M3)");
  }
  w.rows = vector ? 1 : rows;
  w.cols = cols;
  w.row_bytes = size_t(cols) * dtype_size(t->dtype);
  w.data = t->data;
  if (w.format == WeightFormat::kF8E4M3) {
    // ModelOpt: a scalar "<prefix>.weight_scale" beside "<prefix>.weight".
    std::string scale_name = name.substr(0, name.size() - std::string("weight").size()) + "weight_scale";
    const SafeTensor* s = ck.find(scale_name);
    if (!s || s->numel() != 1)
      return Status::error(t->file + ": FP8 tensor '" + name + "' needs a scalar '" + scale_name + "'");
    w.scale = load_as_f32(s->data, s->dtype, 0);
  }
  if (vector) return weight_f32_copy(w);
  return w;
}

Result<Weight> gguf_weight(const GgufFile& g, const std::string& name, int64_t rows, int64_t cols, bool vector,
                           bool optional = false) {
  const GgufFile::Tensor* t = g.find(name);
  if (!t) {
    if (optional) return Weight{};
    return Status::error(g.path() + ": missing tensor '" + name + "'");
  }
  bool ok_shape = vector ? (t->ne.size() == 1 && t->ne[0] == cols)
                         : (t->ne.size() == 2 && t->ne[0] == cols && t->ne[1] == rows);
  if (!ok_shape) {
    std::string got = "[";
    for (size_t i = 0; i < t->ne.size(); ++i) got += (i ? ", " : "") + std::to_string(t->ne[i]);
    got += "]";
    return Status::error(g.path() + ": tensor '" + name + "' has ne " + got + " but the model's hyperparameters imply " +
                         (vector ? "[" + std::to_string(cols) + "]" : shape_str(cols, rows)));
  }
  if (!ggml_type_dequantizable(t->type))
    return Status::error(g.path() + ": tensor '" + name + "' has type " + std::string(ggml_type_name(t->type)) +
                         ", which kiln cannot dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K)");
  if (cols % ggml_block_elems(t->type) != 0)
    return Status::error(g.path() + ": tensor '" + name + "' row length " + std::to_string(cols) +
                         " is not a multiple of its block size");
  Weight w;
  w.name = name;
  w.format = WeightFormat::kGgml;
  w.ggml_type = t->type;
  if (t->type == GgmlType::kF32) w.format = WeightFormat::kF32;
  w.rows = vector ? 1 : rows;
  w.cols = cols;
  w.row_bytes = ggml_row_bytes(t->type, cols);
  w.data = t->data;
  if (vector) return weight_f32_copy(w);
  return w;
}

}  // namespace

namespace {

// Where each tensor of a layer lives in one source format; the shapes and which tensors an
// architecture has are decided once, in load_layers, for every format.
struct LayerNames {
  std::string (*prefix)(int32_t layer);
  const char *attn_norm, *q, *k, *v, *o, *q_bias, *k_bias, *v_bias, *q_norm, *k_norm, *ffn_norm, *gate, *up, *down;
};

using GetWeight = std::function<Result<Weight>(const std::string& name, int64_t rows, int64_t cols, bool vector)>;

Status load_layers(const ModelConfig& c, const LayerNames& n, const GetWeight& get, ModelWeights* mw) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), KV = c.kv_dim();
  mw->layers.resize(size_t(c.num_layers));
  for (int32_t i = 0; i < c.num_layers; ++i) {
    LayerWeights& l = mw->layers[size_t(i)];
    const std::string p = n.prefix(i);
    KILN_ASSIGN_OR_RETURN(l.attn_norm, get(p + n.attn_norm, 1, H, true));
    KILN_ASSIGN_OR_RETURN(l.wq, get(p + n.q, Q, H, false));
    KILN_ASSIGN_OR_RETURN(l.wk, get(p + n.k, KV, H, false));
    KILN_ASSIGN_OR_RETURN(l.wv, get(p + n.v, KV, H, false));
    KILN_ASSIGN_OR_RETURN(l.wo, get(p + n.o, H, Q, false));
    if (c.attention_bias) {
      KILN_ASSIGN_OR_RETURN(l.bq, get(p + n.q_bias, 1, Q, true));
      KILN_ASSIGN_OR_RETURN(l.bk, get(p + n.k_bias, 1, KV, true));
      KILN_ASSIGN_OR_RETURN(l.bv, get(p + n.v_bias, 1, KV, true));
    }
    if (c.qk_norm) {
      KILN_ASSIGN_OR_RETURN(l.q_norm, get(p + n.q_norm, 1, c.head_dim, true));
      KILN_ASSIGN_OR_RETURN(l.k_norm, get(p + n.k_norm, 1, c.head_dim, true));
    }
    KILN_ASSIGN_OR_RETURN(l.ffn_norm, get(p + n.ffn_norm, 1, H, true));
    KILN_ASSIGN_OR_RETURN(l.w_gate, get(p + n.gate, I, H, false));
    KILN_ASSIGN_OR_RETURN(l.w_up, get(p + n.up, I, H, false));
    KILN_ASSIGN_OR_RETURN(l.w_down, get(p + n.down, H, I, false));
  }
  return Status::ok();
}

const LayerNames kHfNames = {
    [](int32_t i) { return "model.layers." + std::to_string(i) + "."; },
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"};

const LayerNames kGgufNames = {
    [](int32_t i) { return "blk." + std::to_string(i) + "."; },
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_q.bias",
    "attn_k.bias", "attn_v.bias", "attn_q_norm.weight", "attn_k_norm.weight", "ffn_norm.weight",
    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"};

}  // namespace

Result<ModelWeights> load_weights_hf(const SafetensorsCheckpoint& ck, const ModelConfig& c) {
  ModelWeights mw;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  GetWeight get = [&](const std::string& name, int64_t rows, int64_t cols, bool vector) {
    return hf_weight(ck, name, rows, cols, vector);
  };
  KILN_ASSIGN_OR_RETURN(mw.embed, get("model.embed_tokens.weight", V, H, false));
  KILN_ASSIGN_OR_RETURN(mw.final_norm, get("model.norm.weight", 1, H, true));
  if (c.tie_word_embeddings || !ck.find("lm_head.weight")) {
    if (!c.tie_word_embeddings && !ck.find("lm_head.weight"))
      return Status::error((ck.files().empty() ? std::string("checkpoint") : ck.files().front()) +
                           ": missing tensor 'lm_head.weight' (config.json says tie_word_embeddings is false)");
    mw.lm_head = mw.embed;
  } else {
    KILN_ASSIGN_OR_RETURN(mw.lm_head, get("lm_head.weight", V, H, false));
  }
  KILN_RETURN_IF_ERROR(load_layers(c, kHfNames, get, &mw));
  return mw;
}

Result<ModelWeights> load_weights_gguf(const GgufFile& g, const ModelConfig& c) {
  ModelWeights mw;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  GetWeight get = [&](const std::string& name, int64_t rows, int64_t cols, bool vector) {
    return gguf_weight(g, name, rows, cols, vector);
  };
  KILN_ASSIGN_OR_RETURN(mw.embed, get("token_embd.weight", V, H, false));
  KILN_ASSIGN_OR_RETURN(mw.final_norm, get("output_norm.weight", 1, H, true));
  if (g.find("output.weight")) {
    KILN_ASSIGN_OR_RETURN(mw.lm_head, get("output.weight", V, H, false));
  } else {
    mw.lm_head = mw.embed;
  }
  KILN_RETURN_IF_ERROR(load_layers(c, kGgufNames, get, &mw));
  return mw;
}

Result<std::shared_ptr<Model>> load_model(const std::string& path) {
  auto model = std::make_shared<Model>();
  model->source = path;
  // A kiln checkpoint or engine (config.json "kiln_format"): fused matrices, see engine_dir.h.
  if (is_kiln_dir(path)) return load_kiln_dir(path);
  if (is_directory(path)) {
    KILN_ASSIGN_OR_RETURN(model->config, config_from_hf_file(path + "/config.json"));
    KILN_ASSIGN_OR_RETURN(auto ck, SafetensorsCheckpoint::open(path));
    auto shared = std::make_shared<SafetensorsCheckpoint>(std::move(ck));
    KILN_ASSIGN_OR_RETURN(model->weights, load_weights_hf(*shared, model->config));
    model->keep_alive = shared;
    return model;
  }
  if (path.size() > 5 && path.substr(path.size() - 5) == ".gguf") {
    KILN_ASSIGN_OR_RETURN(auto g, GgufFile::open(path));
    auto shared = std::make_shared<GgufFile>(std::move(g));
    KILN_ASSIGN_OR_RETURN(model->config, config_from_gguf(*shared));
    KILN_ASSIGN_OR_RETURN(model->weights, load_weights_gguf(*shared, model->config));
    model->keep_alive = shared;
    return model;
  }
  if (!file_exists(path)) return Status::error(path + ": no such file or directory");
  return Status::error(path + ": expected a Hugging Face model directory (config.json + *.safetensors) or a .gguf file");
}

std::shared_ptr<Model> make_dummy_model(const ModelConfig& c, WeightFormat format, uint64_t seed) {
  KILN_CHECK(format == WeightFormat::kF32 || format == WeightFormat::kBF16);
  auto model = std::make_shared<Model>();
  model->config = c;
  model->source = "dummy";
  std::mt19937_64 rng(seed);
  auto matrix = [&](int64_t rows, int64_t cols, float stddev, const std::string& name) {
    Weight w;
    w.format = format;
    w.rows = rows;
    w.cols = cols;
    w.name = name;
    std::normal_distribution<float> dist(0.0f, stddev);
    if (format == WeightFormat::kF32) {
      auto buf = std::make_shared<std::vector<float>>(size_t(rows * cols));
      for (auto& v : *buf) v = dist(rng);
      w.row_bytes = size_t(cols) * 4;
      w.data = buf->data();
      w.owner = buf;
    } else {
      auto buf = std::make_shared<std::vector<uint16_t>>(size_t(rows * cols));
      for (auto& v : *buf) v = f32_to_bf16(dist(rng));
      w.row_bytes = size_t(cols) * 2;
      w.data = buf->data();
      w.owner = buf;
    }
    return w;
  };
  auto ones = [&](int64_t n, const std::string& name) {
    auto buf = std::make_shared<std::vector<float>>(size_t(n), 1.0f);
    Weight w;
    w.rows = 1;
    w.cols = n;
    w.row_bytes = size_t(n) * 4;
    w.data = buf->data();
    w.owner = buf;
    w.name = name;
    return w;
  };
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, Q = c.q_dim(), KV = c.kv_dim();
  auto& mw = model->weights;
  mw.embed = matrix(V, H, 1.0f, "embed");
  mw.final_norm = ones(H, "norm");
  mw.lm_head = c.tie_word_embeddings ? mw.embed : matrix(V, H, 0.02f, "lm_head");
  mw.layers.resize(size_t(c.num_layers));
  for (auto& l : mw.layers) {
    l.attn_norm = ones(H, "attn_norm");
    l.ffn_norm = ones(H, "ffn_norm");
    l.wq = matrix(Q, H, 0.02f, "wq");
    l.wk = matrix(KV, H, 0.02f, "wk");
    l.wv = matrix(KV, H, 0.02f, "wv");
    l.wo = matrix(H, Q, 0.02f, "wo");
    l.w_gate = matrix(I, H, 0.02f, "w_gate");
    l.w_up = matrix(I, H, 0.02f, "w_up");
    l.w_down = matrix(H, I, 0.02f, "w_down");
    if (c.qk_norm) {
      l.q_norm = ones(c.head_dim, "q_norm");
      l.k_norm = ones(c.head_dim, "k_norm");
    }
  }
  return model;
}

}  // namespace kiln
