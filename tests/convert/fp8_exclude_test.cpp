// --fp8_exclude (ModelOpt's exclude_modules): pattern parsing and matching, the fused-group rule,
// what the checkpoint records, a ModelOpt source's own exclude_modules, and static activation
// scales from calibration (--calib_file).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <memory>

#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_executor.h"
#include "backend/cpu/cpu_fp8.h"
#include "convert/convert.h"
#include "core/dtype.h"
#include "core/file.h"
#include "formats/safetensors.h"
#include "model/engine_dir.h"
#include "model/fp8.h"

using namespace kiln;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kLlama = std::string(KILN_SOURCE_DIR) + "/tests/golden/llama31";  // 2 layers

struct TempDir {
  std::string path;
  TempDir() {
    path = (fs::temp_directory_path() / ("kiln_fp8_exclude_test_" + std::to_string(::getpid()) + "_" +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name()))
               .string();
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string sub(const std::string& name) const { return path + "/" + name; }
};

std::vector<std::string> strings(const json& a) {
  std::vector<std::string> v;
  for (const auto& e : a) v.push_back(e.get<std::string>());
  return v;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

TEST(Fp8Exclude, ParsesCommaSeparatedPatterns) {
  auto p = parse_fp8_exclude("lm_head, model.layers.0.* ,*down_proj");
  ASSERT_TRUE(p.is_ok()) << p.message();
  EXPECT_EQ(*p, (std::vector<std::string>{"lm_head", "model.layers.0.*", "*down_proj"}));
  for (const char* bad : {"", "lm_head,", ",lm_head", "a,,b", " , "}) {
    auto r = parse_fp8_exclude(bad);
    ASSERT_FALSE(r.is_ok()) << "'" << bad << "'";
    EXPECT_NE(r.message().find("--fp8_exclude"), std::string::npos) << r.message();
    EXPECT_NE(r.message().find("empty pattern"), std::string::npos) << r.message();
  }
}

TEST(Fp8Exclude, MatchesAsPythonFnmatch) {
  struct Case {
    const char* module;
    std::vector<std::string> patterns;
    bool excluded;
  };
  const Case cases[] = {
      {"lm_head", {"lm_head"}, true},
      {"model.lm_head", {"lm_head"}, false},  // whole-name match, not substring
      {"model.layers.3.mlp.down_proj", {"*down_proj"}, true},
      {"model.layers.3.mlp.down_proj", {"*mlp*"}, true},  // '*' crosses dots
      {"model.layers.0.self_attn.q_proj", {"model.layers.0.*"}, true},
      {"model.layers.10.self_attn.q_proj", {"model.layers.1.*"}, false},
      {"model.layers.7.self_attn.k_proj", {"model.layers.[5-9].*"}, true},
      {"model.layers.7.self_attn.k_proj", {"model.layers.?.self_attn.?_proj"}, true},
      {"model.layers.7.self_attn.k_proj", {"*K_PROJ"}, false},  // case-sensitive, as on Linux
      {"model.layers.7.self_attn.k_proj", {"lm_head", "*o_proj", "*k_proj"}, true},
      {"model.layers.7.self_attn.k_proj", {}, false},
  };
  for (const auto& c : cases) EXPECT_EQ(module_excluded(c.module, c.patterns), c.excluded) << c.module;
}

// llama31 (2 layers) converted to FP8 with `patterns` excluded.
Result<ConvertResult> convert_excluding(const std::string& out, std::vector<std::string> patterns) {
  ConvertOptions o;
  o.model_dir = kLlama;
  o.output_dir = out;
  o.dtype = "bfloat16";
  o.use_fp8 = true;
  o.fp8_exclude = std::move(patterns);
  return convert_checkpoint(o);
}

TEST(Fp8Exclude, FusedGroupIsExcludedWholeAndRecorded) {
  TempDir t;
  // k_proj alone excludes the whole of layer 0's qkv; *down_proj every down_proj.
  auto r = convert_excluding(t.sub("ckpt"), {"model.layers.0.self_attn.k_proj", "*down_proj"});
  ASSERT_TRUE(r.is_ok()) << r.message();
  EXPECT_EQ(r->excluded_linears, (std::vector<std::string>{"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.down_proj",
                                                            "model.layers.1.mlp.down_proj"}));
  // Per layer: qkv 64x(64+32+32), o 64x64, gate_up 2x160x64, down 64x160.
  const int64_t qkv = 128 * 64, o = 64 * 64, gu = 320 * 64, down = 64 * 160;
  EXPECT_EQ(r->dtype_linear_params, qkv + 2 * down);
  EXPECT_EQ(r->fp8_linear_params, 2 * (qkv + o + gu + down) - (qkv + 2 * down));

  auto ck = SafetensorsCheckpoint::open(t.sub("ckpt"));
  ASSERT_TRUE(ck.is_ok()) << ck.message();
  auto dtype_of = [&](const std::string& n) { return ck->find(n) ? ck->find(n)->dtype : DType::kF32; };
  EXPECT_EQ(dtype_of("model.layers.0.self_attn.qkv_proj.weight"), DType::kBF16);
  EXPECT_EQ(ck->find("model.layers.0.self_attn.qkv_proj.weight_scale"), nullptr);
  EXPECT_EQ(dtype_of("model.layers.1.self_attn.qkv_proj.weight"), DType::kF8E4M3);
  EXPECT_EQ(dtype_of("model.layers.0.self_attn.o_proj.weight"), DType::kF8E4M3);
  EXPECT_EQ(dtype_of("model.layers.0.mlp.gate_up_proj.weight"), DType::kF8E4M3);
  EXPECT_EQ(dtype_of("model.layers.0.mlp.down_proj.weight"), DType::kBF16);
  EXPECT_EQ(dtype_of("model.layers.1.mlp.down_proj.weight"), DType::kBF16);

  auto info = read_kiln_config(t.sub("ckpt"));
  ASSERT_TRUE(info.is_ok()) << info.message();
  const json& q = info->json["quantization"];
  EXPECT_EQ(q["quant_algo"], "FP8");
  EXPECT_EQ(strings(q["exclude_modules"]), (std::vector<std::string>{"model.embed_tokens", "lm_head",
                                                                     "model.layers.0.self_attn.k_proj", "*down_proj"}));
  EXPECT_EQ(strings(q["excluded_linears"]), r->excluded_linears);

  // The engine loader takes each matrix in its stored format: excluded ones compute in BF16, so
  // the checkpoint sits closer to the BF16 one than the all-FP8 checkpoint does.
  auto model = load_model(t.sub("ckpt"));
  ASSERT_TRUE(model.is_ok()) << model.message();
  const auto& L = (*model)->weights.layers;
  EXPECT_EQ(L[0].wq.format, WeightFormat::kBF16);
  EXPECT_EQ(L[0].wk.format, WeightFormat::kBF16);
  EXPECT_EQ(L[1].wq.format, WeightFormat::kF8E4M3);
  EXPECT_EQ(L[1].wq.act_quant, ActQuant::kDynamicToken);
  EXPECT_EQ(L[0].w_down.format, WeightFormat::kBF16);
  EXPECT_EQ(L[0].w_gate.format, WeightFormat::kF8E4M3);
}

TEST(Fp8Exclude, ExcludingEverythingReproducesBf16) {
  TempDir t;
  auto r = convert_excluding(t.sub("fp8"), {"model.layers.*"});
  ASSERT_TRUE(r.is_ok()) << r.message();
  EXPECT_EQ(r->fp8_linear_params, 0);
  ConvertOptions o;
  o.model_dir = kLlama;
  o.output_dir = t.sub("bf16");
  o.dtype = "bfloat16";
  ASSERT_TRUE(convert_checkpoint(o).is_ok());
  auto a = SafetensorsCheckpoint::open(t.sub("fp8")), b = SafetensorsCheckpoint::open(t.sub("bf16"));
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  for (const std::string& n : b->names()) {
    const SafeTensor* x = a->find(n);
    ASSERT_NE(x, nullptr) << n;
    const SafeTensor* y = b->find(n);
    ASSERT_EQ(x->nbytes, y->nbytes) << n;
    EXPECT_EQ(std::memcmp(x->data, y->data, x->nbytes), 0) << n;
  }
}

// llama31 as a ModelOpt export that left layer 0's MLP in BF16 and listed it in exclude_modules.
void write_modelopt_partial(const std::string& dir, const std::string& hf_quant_config) {
  fs::create_directories(dir);
  fs::copy_file(kLlama + "/config.json", dir + "/config.json");
  auto ck = SafetensorsCheckpoint::open(kLlama);
  ASSERT_TRUE(ck.is_ok()) << ck.message();
  std::vector<std::unique_ptr<std::vector<uint8_t>>> keep;
  std::vector<SafeTensorWrite> out;
  auto add = [&](const std::string& name, DType dt, std::vector<int64_t> shape, std::vector<uint8_t> bytes) {
    keep.push_back(std::make_unique<std::vector<uint8_t>>(std::move(bytes)));
    out.push_back({name, dt, std::move(shape), keep.back()->data(), keep.back()->size()});
  };
  auto scalar = [&](const std::string& name, float v) {
    std::vector<uint8_t> b(4);
    std::memcpy(b.data(), &v, 4);
    add(name, DType::kF32, {}, std::move(b));
  };
  for (const std::string& name : ck->names()) {
    const SafeTensor* t = ck->find(name);
    const bool linear = name.find("_proj.weight") != std::string::npos;
    if (!linear || name.rfind("model.layers.0.mlp.", 0) == 0) {
      add(name, t->dtype, t->shape, std::vector<uint8_t>(t->data, t->data + t->nbytes));
      continue;
    }
    std::vector<float> f(size_t(t->numel()));
    for (size_t k = 0; k < f.size(); ++k) f[k] = load_as_f32(t->data, t->dtype, k);
    Fp8Matrix m = fp8_quantize_matrix(f.data(), t->shape[0], t->shape[1], Fp8Scaling::kPerTensor);
    const std::string prefix = name.substr(0, name.size() - 7);
    add(name, DType::kF8E4M3, t->shape, m.codes);
    scalar(prefix + ".weight_scale", m.scales[0]);
    scalar(prefix + ".input_scale", 0.02f);  // the excluded linears have none, as ModelOpt writes
  }
  Status st = safetensors_write(dir + "/model.safetensors", out);
  ASSERT_TRUE(st.is_ok()) << st.message();
  st = write_file(dir + "/hf_quant_config.json", hf_quant_config);
  ASSERT_TRUE(st.is_ok()) << st.message();
}

TEST(Fp8Exclude, ModelOptSourceExcludeModulesAreHonoured) {
  TempDir t;
  write_modelopt_partial(t.sub("hf"), R"({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8",
      "kv_cache_quant_algo": null, "exclude_modules": ["lm_head", "model.layers.0.mlp*"]}})");
  if (HasFatalFailure()) return;
  // With and without --use_fp8: the excluded linears are not quantized, and static activations
  // hold although they have no input_scale.
  for (bool use_fp8 : {false, true}) {
    ConvertOptions o;
    o.model_dir = t.sub("hf");
    o.output_dir = t.sub(use_fp8 ? "ckpt_fp8" : "ckpt");
    o.dtype = "bfloat16";
    o.use_fp8 = use_fp8;
    auto r = convert_checkpoint(o);
    ASSERT_TRUE(r.is_ok()) << r.message();
    EXPECT_TRUE(r->prequantized);
    EXPECT_EQ(r->excluded_linears, (std::vector<std::string>{"model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"}));
    auto info = read_kiln_config(o.output_dir);
    ASSERT_TRUE(info.is_ok()) << info.message();
    const json& q = info->json["quantization"];
    EXPECT_EQ(q["activation_scaling"], "static");
    EXPECT_TRUE(contains(strings(q["exclude_modules"]), "model.layers.0.mlp*"));
    auto model = load_model(o.output_dir);
    ASSERT_TRUE(model.is_ok()) << model.message();
    const auto& L = (*model)->weights.layers;
    EXPECT_EQ(L[0].w_gate.format, WeightFormat::kBF16) << "use_fp8 " << use_fp8;
    EXPECT_EQ(L[0].w_down.format, WeightFormat::kBF16) << "use_fp8 " << use_fp8;
    EXPECT_EQ(L[0].wq.format, WeightFormat::kF8E4M3);
    EXPECT_EQ(L[0].wq.act_quant, ActQuant::kStaticTensor);
    EXPECT_FLOAT_EQ(L[0].wq.input_scale, 0.02f);
    EXPECT_EQ(L[1].w_down.format, WeightFormat::kF8E4M3);
    // The BF16 values are the source's exactly.
    auto src = load_model(t.sub("hf"));
    ASSERT_TRUE(src.is_ok()) << src.message();
    std::vector<float> a(size_t(L[0].w_down.cols)), b(a.size());
    for (int64_t row = 0; row < L[0].w_down.rows; ++row) {
      weight_row_to_f32(L[0].w_down, row, a.data());
      weight_row_to_f32((*src)->weights.layers[0].w_down, row, b.data());
      ASSERT_EQ(a, b) << "row " << row;
    }
  }
}

TEST(Fp8Exclude, SourceExcludeListMustBeAList) {
  TempDir t;
  write_modelopt_partial(t.sub("hf"), R"({"quantization": {"quant_algo": "FP8", "exclude_modules": "lm_head"}})");
  if (HasFatalFailure()) return;
  ConvertOptions o;
  o.model_dir = t.sub("hf");
  o.output_dir = t.sub("ckpt");
  auto r = convert_checkpoint(o);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.message().find("exclude_modules"), std::string::npos) << r.message();
  EXPECT_NE(r.message().find("hf_quant_config.json"), std::string::npos) << r.message();
}

// --- calibration ---------------------------------------------------------------------------------

TEST(Fp8Calibrate, RecordsEveryLinearInputAndGivesStaticScales) {
  auto model = load_model(kLlama);
  ASSERT_TRUE(model.is_ok()) << model.message();
  std::vector<int32_t> ids;
  for (int32_t i = 0; i < 40; ++i) ids.push_back((i * 37 + 5) % 1024);
  auto stats = fp8_calibrate(*model, ids, 16);  // 3 windows: 16, 16, 8
  ASSERT_TRUE(stats.is_ok()) << stats.message();
  ASSERT_EQ(stats->size(), 2u * 7u);
  const auto& q = stats->at("model.layers.1.self_attn.q_proj");
  const auto& k = stats->at("model.layers.1.self_attn.k_proj");
  EXPECT_GT(q.amax, 0.0f);
  EXPECT_EQ(q.amax, k.amax) << "q, k, v read the same normed input";
  EXPECT_EQ(q.count, 40 * 64);
  EXPECT_EQ(stats->at("model.layers.0.mlp.down_proj").count, 40 * 160);
  EXPECT_GE(q.outlier_ratio(), 1.0);

  // Feeding the amax to convert gives every FP8 linear input_scale = amax / 448 (q/k/v fused:
  // their common value), excluded ones none.
  TempDir t;
  ConvertOptions o;
  o.model_dir = kLlama;
  o.output_dir = t.sub("ckpt");
  o.use_fp8 = true;
  o.fp8_exclude = {"model.layers.0.mlp.down_proj"};
  for (const auto& [name, s] : *stats) o.input_amax[name] = s.amax;
  auto r = convert_checkpoint(o);
  ASSERT_TRUE(r.is_ok()) << r.message();
  auto info = read_kiln_config(o.output_dir);
  ASSERT_TRUE(info.is_ok());
  EXPECT_EQ(info->json["quantization"]["activation_scaling"], "static");
  EXPECT_EQ(info->json["quantization"]["activation_calibration"], "max");
  auto m = load_model(o.output_dir);
  ASSERT_TRUE(m.is_ok()) << m.message();
  const auto& L = (*m)->weights.layers;
  EXPECT_EQ(L[1].wq.act_quant, ActQuant::kStaticTensor);
  EXPECT_FLOAT_EQ(L[1].wq.input_scale, q.amax / 448.0f);
  EXPECT_FLOAT_EQ(L[1].w_down.input_scale, stats->at("model.layers.1.mlp.down_proj").amax / 448.0f);
  EXPECT_EQ(L[0].w_down.format, WeightFormat::kBF16);

  // A calibration that lacks an FP8 linear is an error naming it.
  o.input_amax.erase("model.layers.1.mlp.up_proj");
  o.output_dir = t.sub("ckpt2");
  auto bad = convert_checkpoint(o);
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.message().find("model.layers.1.mlp.up_proj"), std::string::npos) << bad.message();
}

TEST(Fp8Calibrate, BadTokensAreNamed) {
  auto model = load_model(kLlama);
  ASSERT_TRUE(model.is_ok()) << model.message();
  auto r = fp8_calibrate(*model, {1, 2, 5000}, 16);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.message().find("5000"), std::string::npos) << r.message();
  EXPECT_FALSE(fp8_calibrate(*model, {1}, 16).is_ok());
}

}  // namespace
