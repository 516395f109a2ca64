#include "convert/convert.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include <fnmatch.h>

#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/file.h"
#include "core/log.h"
#include "core/thread_pool.h"
#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "model/engine_dir.h"
#include "model/fp8.h"

namespace kiln {

using nlohmann::json;
namespace fs = std::filesystem;

Result<std::string> parse_convert_dtype(const std::string& s) {
  if (s == "auto" || s == "bfloat16" || s == "float16" || s == "float32") return s;
  if (s == "bf16") return std::string("bfloat16");
  if (s == "fp16" || s == "half") return std::string("float16");
  if (s == "fp32" || s == "float") return std::string("float32");
  return Status::error("--dtype '" + s + "' is not one of auto, bfloat16, float16, float32");
}

Result<Fp8Scaling> parse_fp8_scaling(const std::string& s) {
  if (s == "per_tensor") return Fp8Scaling::kPerTensor;
  if (s == "per_channel") return Fp8Scaling::kPerChannel;
  return Status::error("--fp8_scaling '" + s + "' is not one of per_tensor, per_channel");
}

Result<ActQuant> parse_fp8_activations(const std::string& s) {
  if (s == "dynamic_per_token") return ActQuant::kDynamicToken;
  if (s == "dynamic_per_tensor") return ActQuant::kDynamicTensor;
  return Status::error("--fp8_activations '" + s + "' is not one of dynamic_per_token, dynamic_per_tensor");
}

Result<std::vector<std::string>> parse_fp8_exclude(const std::string& s) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string item = s.substr(i, j - i);
    const size_t a = item.find_first_not_of(" \t"), b = item.find_last_not_of(" \t");
    item = a == std::string::npos ? std::string() : item.substr(a, b - a + 1);
    if (item.empty())
      return Status::error("--fp8_exclude '" + s + "': empty pattern (expected comma-separated module patterns, e.g. "
                           "lm_head,model.layers.0.*,*down_proj)");
    out.push_back(item);
    i = j + 1;
  }
  return out;
}

bool module_excluded(const std::string& module, const std::vector<std::string>& patterns) {
  for (const auto& p : patterns)
    if (::fnmatch(p.c_str(), module.c_str(), 0) == 0) return true;
  return false;
}

float Fp8Matrix::value(int64_t r, int64_t c) const {
  const float s = scales.size() == 1 ? scales[0] : scales[size_t(r)];
  return fp8e4m3_to_f32(codes[size_t(r * cols + c)]) * s;
}

Fp8Matrix fp8_quantize_matrix(const float* w, int64_t rows, int64_t cols, Fp8Scaling scaling) {
  Fp8Matrix m;
  m.rows = rows;
  m.cols = cols;
  m.codes.resize(size_t(rows * cols));
  if (scaling == Fp8Scaling::kPerTensor) {
    m.scales.assign(1, fp8_scale_for_amax(fp8_amax(w, rows * cols)));
  } else {
    m.scales.resize(size_t(rows));
    for (int64_t r = 0; r < rows; ++r) m.scales[size_t(r)] = fp8_scale_for_amax(fp8_amax(w + r * cols, cols));
  }
  parallel_for(rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      fp8_quantize(w + r * cols, cols, m.scales.size() == 1 ? m.scales[0] : m.scales[size_t(r)],
                   m.codes.data() + r * cols);
  }, 64);
  return m;
}

Fp8Matrix fp8_fuse(const std::vector<const Weight*>& shards, Fp8Scaling scaling, int32_t* requantized) {
  Fp8Matrix m;
  m.cols = shards.empty() ? 0 : shards[0]->cols;
  for (const Weight* s : shards) {
    KILN_CHECK(s->format == WeightFormat::kF8E4M3 && s->cols == m.cols);
    m.rows += s->rows;
  }
  m.codes.resize(size_t(m.rows * m.cols));
  float fused = 0.0f;
  for (const Weight* s : shards)
    for (int64_t r = 0; r < s->rows; ++r) fused = std::max(fused, s->row_scale(r));
  if (scaling == Fp8Scaling::kPerTensor) m.scales.assign(1, fused > 0.0f ? fused : 1.0f);
  else m.scales.resize(size_t(m.rows));
  const float* lut = fp8_decode_table();
  int64_t row = 0;
  for (const Weight* s : shards) {
    bool rescaled = false;
    for (int64_t r = 0; r < s->rows; ++r, ++row) {
      const uint8_t* src = s->row_ptr(r);
      uint8_t* dst = m.codes.data() + row * m.cols;
      const float sr = s->row_scale(r);
      if (scaling == Fp8Scaling::kPerChannel) m.scales[size_t(row)] = sr;
      if (scaling == Fp8Scaling::kPerChannel || sr == m.scales[0]) {
        std::memcpy(dst, src, size_t(m.cols));
        continue;
      }
      // The max-scale rule (as TensorRT-LLM fuses ModelOpt qkv): dequantize with the shard's
      // scale, quantize with the fused one. The fused scale is larger, so nothing saturates.
      rescaled = true;
      for (int64_t c = 0; c < m.cols; ++c) dst[c] = f32_to_fp8e4m3(lut[src[c]] * sr / m.scales[0]);
    }
    if (rescaled && requantized) ++*requantized;
  }
  return m;
}

namespace {

// --- output tensors -------------------------------------------------------------------------

struct OutTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

OutTensor f32_tensor(const std::string& name, std::vector<int64_t> shape, const float* v, size_t n) {
  OutTensor t{name, DType::kF32, std::move(shape), std::vector<uint8_t>(n * 4)};
  std::memcpy(t.bytes.data(), v, n * 4);
  return t;
}

DType dtype_of(const std::string& d) {
  if (d == "float16") return DType::kF16;
  if (d == "float32") return DType::kF32;
  return DType::kBF16;
}

void store_f32(const float* src, int64_t n, DType t, uint8_t* dst) {
  switch (t) {
    case DType::kF32: std::memcpy(dst, src, size_t(n) * 4); return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h = f32_to_f16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h = f32_to_bf16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    default: KILN_CHECK_MSG(false, "store_f32: unsupported dtype");
  }
}

// One logical matrix of the output: parts row-concatenated (q, k, v), split across ranks by rows
// of each part (column-parallel), by columns (row-parallel), or replicated.
enum class Split { kNone, kRows, kCols };

struct Logical {
  std::string prefix;  // "model.layers.0.self_attn.qkv_proj"
  std::vector<const Weight*> parts;
  Split split = Split::kNone;
  bool fp8 = false;            // stored as FP8 (else the dtype)
  std::vector<float> input_scales;  // per part, from the source (ModelOpt); empty if none
};

struct Converter {
  const ConvertOptions& opts;
  const ModelConfig& c;
  DType dtype;
  Fp8Scaling scaling;
  int32_t tp;
  ConvertResult* result;

  // Rows of part p that rank `rank` holds: [row0, row0 + n).
  std::pair<int64_t, int64_t> part_rows(const Logical& L, size_t p, int32_t rank) const {
    const int64_t R = L.parts[p]->rows;
    if (L.split != Split::kRows) return {0, R};
    return {R / tp * rank, R / tp};
  }
  std::pair<int64_t, int64_t> cols(const Logical& L, int32_t rank) const {
    const int64_t C = L.parts[0]->cols;
    if (L.split != Split::kCols) return {0, C};
    return {C / tp * rank, C / tp};
  }

  // Emits the rank's slice of L into `out` (weight, scales, input scale).
  void emit(const Logical& L, const Fp8Matrix* full, int32_t rank, std::vector<OutTensor>* out) const {
    auto [c0, nc] = cols(L, rank);
    int64_t nrows = 0;
    for (size_t p = 0; p < L.parts.size(); ++p) nrows += part_rows(L, p, rank).second;
    OutTensor t;
    t.name = L.prefix + ".weight";
    t.shape = {nrows, nc};
    if (L.fp8) {
      t.dtype = DType::kF8E4M3;
      t.bytes.resize(size_t(nrows * nc));
      std::vector<float> row_scales;
      int64_t out_row = 0, part_base = 0;
      for (size_t p = 0; p < L.parts.size(); ++p) {
        auto [r0, n] = part_rows(L, p, rank);
        for (int64_t r = 0; r < n; ++r, ++out_row) {
          const int64_t fr = part_base + r0 + r;
          std::memcpy(t.bytes.data() + out_row * nc, full->codes.data() + fr * full->cols + c0, size_t(nc));
          if (full->scales.size() != 1) row_scales.push_back(full->scales[size_t(fr)]);
        }
        part_base += L.parts[p]->rows;
      }
      out->push_back(std::move(t));
      if (full->scales.size() == 1) out->push_back(f32_tensor(L.prefix + ".weight_scale", {}, full->scales.data(), 1));
      else out->push_back(f32_tensor(L.prefix + ".weight_scale", {nrows}, row_scales.data(), row_scales.size()));
      if (!L.input_scales.empty()) {
        const float s = *std::max_element(L.input_scales.begin(), L.input_scales.end());
        out->push_back(f32_tensor(L.prefix + ".input_scale", {}, &s, 1));
      }
      return;
    }
    t.dtype = dtype;
    const size_t es = dtype_size(dtype);
    t.bytes.resize(size_t(nrows * nc) * es);
    int64_t out_row = 0;
    for (size_t p = 0; p < L.parts.size(); ++p) {
      const Weight& w = *L.parts[p];
      auto [r0, n] = part_rows(L, p, rank);
      uint8_t* base = t.bytes.data() + size_t(out_row * nc) * es;
      parallel_for(n, [&](int64_t a, int64_t b) {
        std::vector<float> row(size_t(w.cols));
        for (int64_t r = a; r < b; ++r) {
          weight_row_to_f32(w, r0 + r, row.data());
          store_f32(row.data() + c0, nc, dtype, base + size_t(r * nc) * es);
        }
      }, 64);
      out_row += n;
    }
    out->push_back(std::move(t));
  }

  // The FP8 form of the whole logical matrix (all ranks), so every rank uses the same scales
  // and the shards concatenate back to the unsharded checkpoint exactly.
  Fp8Matrix quantize_full(const Logical& L) const {
    bool all_fp8 = true;
    for (const Weight* w : L.parts) all_fp8 = all_fp8 && w->format == WeightFormat::kF8E4M3;
    if (all_fp8) return fp8_fuse(L.parts, scaling, &result->requantized_shards);
    int64_t R = 0;
    const int64_t C = L.parts[0]->cols;
    for (const Weight* w : L.parts) R += w->rows;
    std::vector<float> f(size_t(R * C));
    int64_t base = 0;
    for (const Weight* w : L.parts) {
      parallel_for(w->rows, [&](int64_t a, int64_t b) {
        for (int64_t r = a; r < b; ++r) weight_row_to_f32(*w, r, f.data() + (base + r) * C);
      }, 64);
      base += w->rows;
    }
    return fp8_quantize_matrix(f.data(), R, C, scaling);
  }
};

// --- source ---------------------------------------------------------------------------------

struct SourceQuant {
  bool fp8 = false;      // pre-quantized FP8 weights
  bool fp8_kv = false;   // the source asks for an FP8 KV cache
  std::string producer;  // "modelopt", "fp8"
  std::vector<std::string> exclude;  // exclude_modules (ModelOpt), modules_to_not_convert (HF fp8)
};

// A list of module-name patterns at node[key], if any.
Status read_exclude_list(const json& node, const char* key, const std::string& where, std::vector<std::string>* out) {
  auto it = node.find(key);
  if (it == node.end() || it->is_null()) return Status::ok();
  if (!it->is_array()) return Status::error(where + ": " + key + " must be a list of module names");
  for (const auto& e : *it) {
    if (!e.is_string()) return Status::error(where + ": " + key + " must be a list of module names, has " + e.dump());
    out->push_back(e.get<std::string>());
  }
  return Status::ok();
}

Result<json> read_json_file(const std::string& path) {
  KILN_ASSIGN_OR_RETURN(std::string text, read_file(path));
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) return Status::error(path + ": not valid JSON");
  return j;
}

// hf_quant_config.json (ModelOpt export) or config.json:quantization_config.
Result<SourceQuant> detect_source_quant(const std::string& dir) {
  SourceQuant q;
  auto algo_check = [&](const json& node, const std::string& where) -> Status {
    if (auto a = node.find("quant_algo"); a != node.end() && a->is_string()) {
      if (*a != "FP8")
        return Status::error(where + ": quant_algo '" + a->get<std::string>() +
                             "' is not supported (kiln reads FP8 checkpoints; convert the BF16 model with --use_fp8 instead)");
      q.fp8 = true;
    }
    if (auto k = node.find("kv_cache_quant_algo"); k != node.end() && k->is_string()) {
      if (*k != "FP8")
        return Status::error(where + ": kv_cache_quant_algo '" + k->get<std::string>() + "' is not supported (FP8 or none)");
      q.fp8_kv = true;
    }
    return Status::ok();
  };
  const std::string hqc = dir + "/hf_quant_config.json";
  if (file_exists(hqc)) {
    KILN_ASSIGN_OR_RETURN(json j, read_json_file(hqc));
    const json& node = j.contains("quantization") ? j["quantization"] : j;
    if (node.is_object()) {
      KILN_RETURN_IF_ERROR(algo_check(node, hqc));
      KILN_RETURN_IF_ERROR(read_exclude_list(node, "exclude_modules", hqc, &q.exclude));
    }
    q.producer = "modelopt";
  }
  KILN_ASSIGN_OR_RETURN(json cfg, read_json_file(dir + "/config.json"));
  if (auto qc = cfg.find("quantization_config"); qc != cfg.end() && qc->is_object()) {
    const std::string where = dir + "/config.json: quantization_config";
    const std::string method = qc->value("quant_method", std::string());
    if (method == "modelopt") {
      KILN_RETURN_IF_ERROR(algo_check(*qc, where));
      KILN_RETURN_IF_ERROR(read_exclude_list(*qc, "exclude_modules", where, &q.exclude));
      q.producer = "modelopt";
    } else if (method == "fp8") {
      if (qc->contains("weight_block_size") && !(*qc)["weight_block_size"].is_null())
        return Status::error(where + ": block-wise FP8 (weight_block_size) is not supported (per-tensor or per-channel)");
      q.fp8 = true;
      q.producer = "fp8";
      KILN_RETURN_IF_ERROR(read_exclude_list(*qc, "modules_to_not_convert", where, &q.exclude));
    } else if (!method.empty()) {
      return Status::error(where + ": quant_method '" + method + "' is not supported (modelopt FP8, fp8)");
    }
  }
  return q;
}

const SafeTensor* find_any(const SafetensorsCheckpoint& ck, std::initializer_list<std::string> names) {
  for (const auto& n : names)
    if (const SafeTensor* t = ck.find(n)) return t;
  return nullptr;
}

Status make_output_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Status::error("cannot create output directory " + dir + ": " + ec.message());
  const std::string probe = dir + "/.kiln_write_test";
  Status st = write_file(probe, "");
  if (!st) return Status::error("output directory " + dir + " is not writable: " + st.message());
  fs::remove(probe, ec);
  return Status::ok();
}

Status copy_tokenizer_files(const std::string& src, const std::string& dst, std::vector<std::string>* files) {
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                        "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                        "added_tokens.json"}) {
    if (!file_exists(src + "/" + f)) continue;
    std::error_code ec;
    fs::copy_file(src + "/" + f, dst + "/" + f, fs::copy_options::overwrite_existing, ec);
    if (ec) return Status::error("copying " + src + "/" + f + " to " + dst + ": " + ec.message());
    files->push_back(f);
  }
  if (fs::is_directory(src + "/additional_chat_templates")) {
    std::error_code ec;
    fs::copy(src + "/additional_chat_templates", dst + "/additional_chat_templates",
             fs::copy_options::recursive | fs::copy_options::overwrite_existing, ec);
    if (ec) return Status::error("copying " + src + "/additional_chat_templates: " + ec.message());
    files->push_back("additional_chat_templates/");
  }
  return Status::ok();
}

// The GGUF's tokenizer.* keys in a tensor-less GGUF that Tokenizer::load reads.
Status write_gguf_tokenizer(const GgufFile& g, const std::string& path) {
  std::vector<std::pair<std::string, GgufValue>> kv;
  for (const auto& [k, v] : g.metadata())
    if (k.rfind("tokenizer.", 0) == 0 || k == "general.architecture" || k == "general.name") kv.emplace_back(k, v);
  return gguf_write(path, kv, {});
}

}  // namespace

Result<ConvertResult> convert_checkpoint(const ConvertOptions& opts) {
  ConvertResult res;
  KILN_ASSIGN_OR_RETURN(std::string dtype_name_s, parse_convert_dtype(opts.dtype));
  if (opts.model_dir.empty()) return Status::error("--model_dir is required");
  if (opts.output_dir.empty()) return Status::error("--output_dir is required");
  if (opts.tp_size < 1) return Status::error("--tp_size (" + std::to_string(opts.tp_size) + ") must be at least 1");
  const std::string& src = opts.model_dir;
  const bool is_gguf = !is_directory(src) && src.size() > 5 && src.substr(src.size() - 5) == ".gguf";
  if (!is_gguf && !is_directory(src)) {
    if (!file_exists(src)) return Status::error(src + ": no such file or directory");
    return Status::error(src + ": expected a Hugging Face model directory or a .gguf file");
  }
  if (!is_gguf && is_kiln_dir(src))
    return Status::error(src + ": already a kiln checkpoint (config.json has kiln_format); build it with kiln build");
  res.source_format = is_gguf ? "gguf" : "hf";

  SourceQuant sq;
  if (!is_gguf) {
    KILN_ASSIGN_OR_RETURN(sq, detect_source_quant(src));
  }
  KILN_ASSIGN_OR_RETURN(auto model, load_model(src));
  const ModelConfig& c = model->config;
  const ModelWeights& W = model->weights;
  std::shared_ptr<SafetensorsCheckpoint> ck;
  if (!is_gguf) {
    KILN_ASSIGN_OR_RETURN(auto opened, SafetensorsCheckpoint::open(src));
    ck = std::make_shared<SafetensorsCheckpoint>(std::move(opened));
  }
  // FP8 tensors without a quantization config still count as pre-quantized.
  for (const auto& l : W.layers)
    if (l.wq.format == WeightFormat::kF8E4M3) sq.fp8 = true;

  const int32_t tp = opts.tp_size;
  auto divides = [&](const char* what, int64_t n) -> Status {
    if (n % tp != 0)
      return Status::error("--tp_size (" + std::to_string(tp) + ") must divide " + what + " (" + std::to_string(n) + ")");
    return Status::ok();
  };
  KILN_RETURN_IF_ERROR(divides("num_attention_heads", c.num_heads));
  KILN_RETURN_IF_ERROR(divides("num_key_value_heads", c.num_kv_heads));
  KILN_RETURN_IF_ERROR(divides("intermediate_size", c.intermediate_size));

  if (dtype_name_s == "auto") {
    dtype_name_s = c.torch_dtype;
    if (dtype_name_s != "bfloat16" && dtype_name_s != "float16" && dtype_name_s != "float32") dtype_name_s = "bfloat16";
  }
  res.dtype = dtype_name_s;
  res.prequantized = sq.fp8;
  res.fp8 = opts.use_fp8 || sq.fp8;
  if (sq.fp8 && !opts.use_fp8)
    log_info("convert: " + src + " is pre-quantized FP8 (" + (sq.producer.empty() ? "F8_E4M3 tensors" : sq.producer) +
             "); its FP8 weights are kept as they are");
  const bool fp8_kv = opts.fp8_kv_cache || sq.fp8_kv;
  KILN_RETURN_IF_ERROR(make_output_dir(opts.output_dir));

  Converter cv{opts, c, dtype_of(dtype_name_s), opts.fp8_scaling, tp, &res};

  // Linears kept in `dtype`: ModelOpt's exclude_modules of the source plus --fp8_exclude.
  std::vector<std::string> exclude = sq.exclude;
  exclude.insert(exclude.end(), opts.fp8_exclude.begin(), opts.fp8_exclude.end());

  // Calibrated activation scales (ModelOpt input_scale, or --calib_file's amax): static
  // activations only if every FP8 linear has one.
  const bool calibrated = res.fp8 && !opts.input_amax.empty();
  bool all_input_scales = res.fp8 && (ck || calibrated);
  std::vector<std::string> uncalibrated;
  auto input_scale = [&](const std::string& module) -> float {
    if (calibrated) {
      auto it = opts.input_amax.find(module);
      if (it == opts.input_amax.end() || !(it->second >= 0.0f)) {
        uncalibrated.push_back(module);
        all_input_scales = false;
        return 0.0f;
      }
      return fp8_scale_for_amax(it->second);
    }
    const SafeTensor* t = ck ? ck->find(module + ".input_scale") : nullptr;
    if (!t || t->numel() != 1) {
      all_input_scales = false;
      return 0.0f;
    }
    return load_as_f32(t->data, t->dtype, 0);
  };

  // The logical matrices of each layer, in file order. A fused group is FP8 only if none of its
  // parts (nor its fused name) is excluded; a pre-quantized source's unquantized linears stay so.
  struct LayerPlan {
    Logical qkv, o, gate_up, down;
  };
  std::vector<LayerPlan> plans(size_t(c.num_layers));
  for (int32_t i = 0; i < c.num_layers; ++i) {
    const LayerWeights& l = W.layers[size_t(i)];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const std::string hp = p + "self_attn.", mp = p + "mlp.";
    LayerPlan& lp = plans[size_t(i)];
    lp.qkv = {hp + "qkv_proj", {&l.wq, &l.wk, &l.wv}, Split::kRows, false, {}};
    lp.o = {hp + "o_proj", {&l.wo}, Split::kCols, false, {}};
    lp.gate_up = {mp + "gate_up_proj", {&l.w_gate, &l.w_up}, Split::kRows, false, {}};
    lp.down = {mp + "down_proj", {&l.w_down}, Split::kCols, false, {}};
    const std::pair<Logical*, std::vector<std::string>> groups[] = {
        {&lp.qkv, {hp + "q_proj", hp + "k_proj", hp + "v_proj"}},
        {&lp.o, {hp + "o_proj"}},
        {&lp.gate_up, {mp + "gate_proj", mp + "up_proj"}},
        {&lp.down, {mp + "down_proj"}}};
    for (const auto& [L, modules] : groups) {
      bool excluded = module_excluded(L->prefix, exclude), any_fp8 = false;
      for (const auto& m : modules) excluded = excluded || module_excluded(m, exclude);
      int64_t params = 0;
      for (const Weight* w : L->parts) {
        any_fp8 = any_fp8 || w->format == WeightFormat::kF8E4M3;
        params += w->rows * w->cols;
      }
      L->fp8 = res.fp8 && !excluded && (opts.use_fp8 || any_fp8);
      (L->fp8 ? res.fp8_linear_params : res.dtype_linear_params) += params;
      if (res.fp8 && !L->fp8) res.excluded_linears.push_back(L->prefix);
      if (L->fp8 && (ck || calibrated))
        for (const auto& m : modules) L->input_scales.push_back(input_scale(m));
    }
  }
  if (!uncalibrated.empty())
    return Status::error("--calib_file: no calibrated activation amax for " + uncalibrated[0] +
                         (uncalibrated.size() > 1 ? " (and " + std::to_string(uncalibrated.size() - 1) + " more)" : ""));
  if (res.fp8 && !res.excluded_linears.empty())
    log_info("convert: " + std::to_string(res.excluded_linears.size()) + " linears kept in " + dtype_name_s +
             " by exclude_modules (" + std::to_string(res.dtype_linear_params) + " of " +
             std::to_string(res.dtype_linear_params + res.fp8_linear_params) + " linear weights)");
  if (!all_input_scales)
    for (auto& lp : plans)
      for (Logical* L : {&lp.qkv, &lp.o, &lp.gate_up, &lp.down}) L->input_scales.clear();
  const ActQuant act = !res.fp8 ? ActQuant::kNone : all_input_scales ? ActQuant::kStaticTensor : opts.fp8_activations;
  if (res.fp8 && sq.fp8 && !all_input_scales)
    log_warn("convert: the FP8 source has no input_scale for every linear; activations use " +
             std::string(act_quant_name(act)) + " scaling");

  // KV-cache scales: ModelOpt writes self_attn.k_proj.k_scale; others self_attn.k_scale or kv_scale.
  std::vector<float> k_scales(size_t(c.num_layers), 1.0f), v_scales(size_t(c.num_layers), 1.0f);
  int32_t kv_found = 0;
  if (ck)
    for (int32_t i = 0; i < c.num_layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".self_attn.";
      const SafeTensor* k = find_any(*ck, {p + "k_proj.k_scale", p + "k_scale", p + "kv_scale"});
      const SafeTensor* v = find_any(*ck, {p + "v_proj.v_scale", p + "v_scale", p + "kv_scale"});
      if (k && k->numel() == 1) k_scales[size_t(i)] = load_as_f32(k->data, k->dtype, 0), ++kv_found;
      if (v && v->numel() == 1) v_scales[size_t(i)] = load_as_f32(v->data, v->dtype, 0);
    }
  if (fp8_kv && kv_found == 0)
    log_info("convert: no calibrated k/v scales in the source; the FP8 KV cache uses scale 1.0");

  LmHeadMode lm_mode = LmHeadMode::kReplicated;
  if (tp == 1) lm_mode = c.tie_word_embeddings ? LmHeadMode::kTied : LmHeadMode::kReplicated;
  else if (c.vocab_size % tp == 0) lm_mode = LmHeadMode::kVocabSplit;

  // Quantize each logical matrix once (all ranks share its scales), then write every rank.
  std::vector<std::vector<OutTensor>> rank_out(static_cast<size_t>(tp));
  const int64_t H = c.hidden_size;
  for (int32_t r = 0; r < tp; ++r) {
    Logical emb{"model.embed_tokens", {&W.embed}, Split::kNone, false, {}};
    cv.emit(emb, nullptr, r, &rank_out[size_t(r)]);
  }
  auto norm = [&](int32_t r, const std::string& name, const Weight& w) {
    rank_out[size_t(r)].push_back(
        f32_tensor(name, {w.cols}, static_cast<const float*>(w.data), size_t(w.cols)));
  };
  for (int32_t i = 0; i < c.num_layers; ++i) {
    const LayerWeights& l = W.layers[size_t(i)];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerPlan& lp = plans[size_t(i)];
    for (Logical* L : {&lp.qkv, &lp.o, &lp.gate_up, &lp.down}) {
      Fp8Matrix full;
      if (L->fp8) full = cv.quantize_full(*L);
      for (int32_t r = 0; r < tp; ++r) {
        auto& out = rank_out[size_t(r)];
        if (L == &lp.qkv) norm(r, p + "input_layernorm.weight", l.attn_norm);
        if (L == &lp.gate_up) norm(r, p + "post_attention_layernorm.weight", l.ffn_norm);
        cv.emit(*L, L->fp8 ? &full : nullptr, r, &out);
        if (L == &lp.qkv) {
          if (c.attention_bias) {
            const int64_t Q = c.q_dim() / tp, KV = c.kv_dim() / tp;
            std::vector<float> b;
            auto add = [&](const Weight& w, int64_t n) {
              const float* d = static_cast<const float*>(w.data) + n * r;
              b.insert(b.end(), d, d + n);
            };
            add(l.bq, Q);
            add(l.bk, KV);
            add(l.bv, KV);
            out.push_back(f32_tensor(lp.qkv.prefix + ".bias", {int64_t(b.size())}, b.data(), b.size()));
          }
          if (c.qk_norm) {
            norm(r, p + "self_attn.q_norm.weight", l.q_norm);
            norm(r, p + "self_attn.k_norm.weight", l.k_norm);
          }
          if (fp8_kv) {
            out.push_back(f32_tensor(p + "self_attn.k_scale", {}, &k_scales[size_t(i)], 1));
            out.push_back(f32_tensor(p + "self_attn.v_scale", {}, &v_scales[size_t(i)], 1));
          }
        }
      }
    }
  }
  for (int32_t r = 0; r < tp; ++r) {
    norm(r, "model.norm.weight", W.final_norm);
    if (lm_mode == LmHeadMode::kReplicated) {
      Logical lm{"lm_head", {&W.lm_head}, Split::kNone, false, {}};
      cv.emit(lm, nullptr, r, &rank_out[size_t(r)]);
    } else if (lm_mode == LmHeadMode::kVocabSplit) {
      Logical lm{"lm_head", {&W.lm_head}, Split::kRows, false, {}};
      cv.emit(lm, nullptr, r, &rank_out[size_t(r)]);
    }
  }
  (void)H;

  // Files.
  for (int32_t r = 0; r < tp; ++r) {
    std::vector<SafeTensorWrite> tw;
    for (const auto& t : rank_out[size_t(r)]) {
      tw.push_back({t.name, t.dtype, t.shape, t.bytes.data(), t.bytes.size()});
      res.bytes_written += t.bytes.size();
    }
    const std::string f = kiln_rank_file(r);
    KILN_RETURN_IF_ERROR(safetensors_write(opts.output_dir + "/" + f, tw,
                                           {{"format", "pt"},
                                            {"kiln_format", std::to_string(kKilnFormatVersion)},
                                            {"tp_size", std::to_string(tp)},
                                            {"tp_rank", std::to_string(r)}}));
    res.files.push_back(f);
    rank_out[size_t(r)].clear();
  }

  json cfg = model_config_to_json(c);
  cfg["kiln_format"] = kKilnFormatVersion;
  cfg["kiln_version"] = KILN_VERSION;
  cfg["dtype"] = dtype_name_s;
  json q = {{"quant_algo", res.fp8 ? json("FP8") : json(nullptr)},
            {"kv_cache_quant_algo", fp8_kv ? json("FP8") : json(nullptr)}};
  if (res.fp8) {
    q["weight_scaling"] = opts.fp8_scaling == Fp8Scaling::kPerTensor ? "per_tensor" : "per_channel";
    q["activation_scaling"] = std::string(act_quant_name(act));
    q["source"] = sq.fp8 ? (sq.producer.empty() ? std::string("fp8") : sq.producer) : std::string("kiln");
    // ModelOpt's field: the patterns (embed_tokens and lm_head always, then the source's and
    // --fp8_exclude's); excluded_linears is what they resolved to, after the fused-group rule.
    json ex = json::array({"model.embed_tokens", "lm_head"});
    for (const auto& e : exclude)
      if (std::find(ex.begin(), ex.end(), json(e)) == ex.end()) ex.push_back(e);
    q["exclude_modules"] = ex;
    q["excluded_linears"] = res.excluded_linears;
    if (calibrated) q["activation_calibration"] = "max";
  }
  if (fp8_kv) {
    q["kv_cache_scales"] = kv_found ? "calibrated" : "unit";
    // The CPU backend keeps its KV cache in f32; the scales are recorded for the GPU's FP8 cache.
    q["kv_cache_applied_on_cpu"] = false;
  }
  cfg["quantization"] = q;
  cfg["mapping"] = {{"world_size", tp}, {"tp_size", tp}, {"lm_head", std::string(lm_head_mode_name(lm_mode))},
                    {"embedding", "replicated"}};
  cfg["weights"] = res.files;
  cfg["source"] = {{"path", fs::absolute(src).string()}, {"format", res.source_format}};
  KILN_RETURN_IF_ERROR(write_file(opts.output_dir + "/config.json", cfg.dump(2) + "\n"));
  res.files.push_back("config.json");

  if (is_gguf) {
    auto g = GgufFile::open(src);
    if (!g) return Status::error(g.message());
    KILN_RETURN_IF_ERROR(write_gguf_tokenizer(*g, opts.output_dir + "/tokenizer.gguf"));
    res.files.push_back("tokenizer.gguf");
  } else {
    KILN_RETURN_IF_ERROR(copy_tokenizer_files(src, opts.output_dir, &res.files));
  }
  return res;
}

}  // namespace kiln
