// kiln convert / kiln build: FP8 fusion rules, scales, TP sharding, engine dirs, re-planning,
// bad inputs, and the golden fixtures replayed through convert -> load.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>

#include <nlohmann/json.hpp>

#include "common/greedy_run.h"
#include "backend/cpu/cpu_executor.h"
#include "backend/cpu/cpu_fp8.h"
#include "build/build.h"
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

const std::string kGolden = std::string(KILN_SOURCE_DIR) + "/tests/golden/";
const std::vector<std::string> kFamilies = {"llama31", "qwen2", "mistral", "qwen3", "llama_linear"};

// A fresh temporary directory per test, removed at the end.
struct TempDir {
  std::string path;
  TempDir() {
    path = (fs::temp_directory_path() / ("kiln_convert_test_" + std::to_string(::getpid()) + "_" +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name()))
               .string();
    // Parameterized test names hold '/': keep one directory level.
    for (size_t i = fs::temp_directory_path().string().size() + 1; i < path.size(); ++i)
      if (path[i] == '/') path[i] = '_';
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string sub(const std::string& name) const { return path + "/" + name; }
};

std::vector<float> randn(size_t n, float stddev, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// An FP8 Weight over an owned Fp8Matrix (per-tensor scale).
Weight fp8_weight(std::shared_ptr<Fp8Matrix> m) {
  Weight w;
  w.format = WeightFormat::kF8E4M3;
  w.rows = m->rows;
  w.cols = m->cols;
  w.row_bytes = size_t(m->cols);
  w.data = m->codes.data();
  if (m->scales.size() == 1) {
    w.scale = m->scales[0];
  } else {
    w.row_scales = std::shared_ptr<const float>(m, m->scales.data());
  }
  w.owner = m;
  return w;
}

// Worst-case E4M3 rounding of a value v quantized with scale s: half a unit in the last place
// (3 mantissa bits: 2^-4 relative), or half the smallest subnormal step (2^-10 * s).
float fp8_tol(float v, float s) { return std::max(std::fabs(v) * 0.0625f, s * std::ldexp(1.0f, -10)) * 1.0001f; }

std::vector<float> rows_f32(const Weight& w) {
  std::vector<float> out(size_t(w.rows * w.cols));
  for (int64_t r = 0; r < w.rows; ++r) weight_row_to_f32(w, r, out.data() + r * w.cols);
  return out;
}

// --- FP8 building blocks ----------------------------------------------------------------------

TEST(Fp8, PerTensorQuantizeWithinRounding) {
  const int64_t R = 32, C = 48;
  auto w = randn(size_t(R * C), 0.05f, 1);
  Fp8Matrix m = fp8_quantize_matrix(w.data(), R, C, Fp8Scaling::kPerTensor);
  ASSERT_EQ(m.scales.size(), 1u);
  EXPECT_FLOAT_EQ(m.scales[0], fp8_amax(w.data(), R * C) / 448.0f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c)
      ASSERT_NEAR(m.value(r, c), w[size_t(r * C + c)], fp8_tol(w[size_t(r * C + c)], m.scales[0])) << r << "," << c;
}

TEST(Fp8, PerChannelBeatsPerTensorOnUnevenRows) {
  // Row r has magnitude 100^-(r % 4): per-tensor scaling pushes the small rows into subnormals.
  const int64_t R = 16, C = 64;
  auto w = randn(size_t(R * C), 1.0f, 2);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) w[size_t(r * C + c)] *= std::pow(100.0f, -float(r % 4));
  Fp8Matrix pt = fp8_quantize_matrix(w.data(), R, C, Fp8Scaling::kPerTensor);
  Fp8Matrix pc = fp8_quantize_matrix(w.data(), R, C, Fp8Scaling::kPerChannel);
  ASSERT_EQ(pc.scales.size(), size_t(R));
  double err_pt = 0, err_pc = 0;
  for (int64_t r = 0; r < R; ++r) {
    EXPECT_FLOAT_EQ(pc.scales[size_t(r)], fp8_amax(w.data() + r * C, C) / 448.0f);
    for (int64_t c = 0; c < C; ++c) {
      const float v = w[size_t(r * C + c)];
      ASSERT_NEAR(pc.value(r, c), v, fp8_tol(v, pc.scales[size_t(r)]));
      const float row_amax = fp8_amax(w.data() + r * C, C);  // error relative to the row's range
      err_pt += std::fabs(pt.value(r, c) - v) / row_amax;
      err_pc += std::fabs(pc.value(r, c) - v) / row_amax;
    }
  }
  std::printf("[fp8] mean error / row amax: per-tensor %.4f, per-channel %.4f\n", err_pt / double(R * C),
              err_pc / double(R * C));
  EXPECT_LT(err_pc, err_pt * 0.5);
}

TEST(Fp8, FuseTakesMaxScaleAndRequantizesOnlyDifferingShards) {
  const int64_t C = 40;
  std::vector<std::shared_ptr<Fp8Matrix>> ms;
  std::vector<Weight> ws;
  std::vector<std::vector<float>> orig;
  const float mags[3] = {0.02f, 0.08f, 0.08f};  // q small; k and v share the max scale
  const int64_t rows[3] = {24, 8, 8};
  for (int i = 0; i < 3; ++i) {
    orig.push_back(randn(size_t(rows[i] * C), mags[i], 10 + uint64_t(i)));
    if (i == 2)  // v = -k: the same amax, so the same scale as k
      for (size_t k = 0; k < orig[2].size(); ++k) orig[2][k] = -orig[1][k];
    ms.push_back(std::make_shared<Fp8Matrix>(fp8_quantize_matrix(orig[size_t(i)].data(), rows[i], C, Fp8Scaling::kPerTensor)));
    ws.push_back(fp8_weight(ms.back()));
  }
  ASSERT_EQ(ms[1]->scales[0], ms[2]->scales[0]);
  ASSERT_LT(ms[0]->scales[0], ms[1]->scales[0]);
  int32_t requantized = 0;
  Fp8Matrix f = fp8_fuse({&ws[0], &ws[1], &ws[2]}, Fp8Scaling::kPerTensor, &requantized);
  EXPECT_EQ(requantized, 1) << "only q's scale differs from the max";
  ASSERT_EQ(f.scales.size(), 1u);
  EXPECT_EQ(f.scales[0], std::max({ms[0]->scales[0], ms[1]->scales[0], ms[2]->scales[0]}));
  ASSERT_EQ(f.rows, 40);
  int64_t base = 0;
  for (int i = 0; i < 3; ++i) {
    for (int64_t r = 0; r < rows[i]; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const float shard_v = ms[size_t(i)]->value(r, c), fused_v = f.value(base + r, c);
        if (i > 0) ASSERT_EQ(f.codes[size_t((base + r) * C + c)], ms[size_t(i)]->codes[size_t(r * C + c)]) << "copied";
        else ASSERT_NEAR(fused_v, shard_v, fp8_tol(shard_v, f.scales[0])) << "requantized within FP8 rounding";
      }
    base += rows[i];
  }
}

TEST(Fp8, FusePerChannelCopiesCodesAndKeepsShardScales) {
  auto a = std::make_shared<Fp8Matrix>(fp8_quantize_matrix(randn(64, 0.1f, 3).data(), 4, 16, Fp8Scaling::kPerTensor));
  auto b = std::make_shared<Fp8Matrix>(fp8_quantize_matrix(randn(32, 1.0f, 4).data(), 2, 16, Fp8Scaling::kPerChannel));
  Weight wa = fp8_weight(a), wb = fp8_weight(b);
  int32_t rq = 0;
  Fp8Matrix f = fp8_fuse({&wa, &wb}, Fp8Scaling::kPerChannel, &rq);
  EXPECT_EQ(rq, 0);
  ASSERT_EQ(f.scales.size(), 6u);
  for (int r = 0; r < 4; ++r) EXPECT_EQ(f.scales[size_t(r)], a->scales[0]);
  for (int r = 0; r < 2; ++r) EXPECT_EQ(f.scales[size_t(4 + r)], b->scales[size_t(r)]);
  EXPECT_EQ(std::vector<uint8_t>(f.codes.begin(), f.codes.begin() + 64), a->codes);
}

TEST(Fp8, CpuLinearEmulatesQuantizedActivations) {
  const int64_t M = 5, K = 64, N = 24;
  auto x = randn(size_t(M * K), 1.0f, 5);
  x[3] = 40.0f;  // an outlier: per-token and per-tensor scales differ
  auto wf = randn(size_t(N * K), 0.05f, 6);
  auto m = std::make_shared<Fp8Matrix>(fp8_quantize_matrix(wf.data(), N, K, Fp8Scaling::kPerChannel));
  Weight w = fp8_weight(m);
  for (ActQuant mode : {ActQuant::kDynamicToken, ActQuant::kDynamicTensor, ActQuant::kStaticTensor}) {
    w.act_quant = mode;
    w.input_scale = 0.05f;
    std::vector<float> y(size_t(M * N));
    cpu_linear_fp8(x.data(), M, w, nullptr, y.data());
    // Reference in double: x_q = fp8(x / s_x), y = sum(x_q * w_q) * s_x * s_w.
    float amax_all = fp8_amax(x.data(), M * K);
    double max_err = 0;
    for (int64_t i = 0; i < M; ++i) {
      float sx = mode == ActQuant::kStaticTensor ? 0.05f
                 : mode == ActQuant::kDynamicTensor ? amax_all / 448.0f
                                                    : fp8_amax(x.data() + i * K, K) / 448.0f;
      for (int64_t r = 0; r < N; ++r) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k)
          acc += double(fp8e4m3_to_f32(f32_to_fp8e4m3(x[size_t(i * K + k)] / sx))) *
                 double(fp8e4m3_to_f32(m->codes[size_t(r * K + k)]));
        const double ref = acc * sx * m->scales[size_t(r)];
        max_err = std::max(max_err, std::fabs(ref - y[size_t(i * N + r)]) / (std::fabs(ref) + 1e-3));
      }
    }
    EXPECT_LT(max_err, 1e-4) << act_quant_name(mode);
    if (mode == ActQuant::kDynamicToken) {
      // Per-token scaling: a row's output does not depend on the batch it is in.
      std::vector<float> y1(static_cast<size_t>(N));
      cpu_linear_fp8(x.data() + 2 * K, 1, w, nullptr, y1.data());
      for (int64_t r = 0; r < N; ++r) ASSERT_EQ(y1[size_t(r)], y[size_t(2 * N + r)]);
    }
  }
}

// --- Golden fixtures through convert -> load ----------------------------------------------------

using RunOut = kiln::testing::GreedyRun;

RunOut run_model(std::shared_ptr<const Model> model, const std::vector<int32_t>& prompt, int n_new) {
  return kiln::testing::run_greedy(std::move(model), prompt, n_new);
}

struct Golden {
  std::vector<int32_t> prompt, greedy;
  std::vector<float> logits;
};

Golden read_golden(const std::string& dir) {
  Golden g;
  auto text = read_file(dir + "/golden.json");
  EXPECT_TRUE(text.is_ok()) << text.message();
  json j = json::parse(*text);
  g.prompt = j["prompt_ids"].get<std::vector<int32_t>>();
  g.greedy = j["greedy_ids"].get<std::vector<int32_t>>();
  auto bytes = read_file(dir + "/logits.bin");
  EXPECT_TRUE(bytes.is_ok());
  g.logits.resize(bytes->size() / 4);
  std::memcpy(g.logits.data(), bytes->data(), g.logits.size() * 4);
  return g;
}

struct Agreement {
  float max_diff = 0;
  int rows_top1 = 0, rows = 0;      // first-step argmax per prompt row vs the golden logits
  int greedy_same = 0, greedy = 0;  // greedy continuation, token by token, until the first mismatch
};

Agreement compare(const RunOut& r, const Golden& g, int32_t V) {
  Agreement a;
  for (size_t i = 0; i < g.logits.size(); ++i) a.max_diff = std::max(a.max_diff, std::fabs(r.logits[i] - g.logits[i]));
  a.rows = int(g.logits.size() / size_t(V));
  for (int row = 0; row < a.rows; ++row) {
    const float* x = r.logits.data() + size_t(row) * V;
    const float* y = g.logits.data() + size_t(row) * V;
    a.rows_top1 += std::max_element(x, x + V) - x == std::max_element(y, y + V) - y;
  }
  a.greedy = int(g.greedy.size());
  while (a.greedy_same < a.greedy && r.greedy[size_t(a.greedy_same)] == g.greedy[size_t(a.greedy_same)]) ++a.greedy_same;
  return a;
}

class GoldenConvert : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenConvert, AutoDtypeReproducesGoldenLogits) {
  const std::string src = kGolden + GetParam();
  TempDir t;
  ConvertOptions o;
  o.model_dir = src;
  o.output_dir = t.sub("ckpt");
  auto r = convert_checkpoint(o);
  ASSERT_TRUE(r.is_ok()) << r.message();
  BuildOptions b;
  b.checkpoint_dir = o.output_dir;
  b.output_dir = t.sub("engine");
  b.limits.max_batch_size = 4;
  auto e = build_engine(b);
  ASSERT_TRUE(e.is_ok()) << e.message();
  auto model = load_model(b.output_dir);  // through load_model's kiln-dir branch
  ASSERT_TRUE(model.is_ok()) << model.message();
  ASSERT_FALSE((*model)->weights.layers[0].wqkv.empty()) << "fused storage expected";
  Golden g = read_golden(src);
  RunOut run = run_model(*model, g.prompt, int(g.greedy.size()));
  Agreement a = compare(run, g, (*model)->config.vocab_size);
  std::printf("[convert %s] dtype %s: max |logit diff| %.3g, greedy %d/%d\n", GetParam().c_str(), r->dtype.c_str(),
              a.max_diff, a.greedy_same, a.greedy);
  EXPECT_LE(a.max_diff, 1e-3f);
  EXPECT_EQ(a.greedy_same, a.greedy);
}

// Logits of every row of one sequence in one step (teacher forcing).           [n, vocab]
std::vector<float> all_row_logits(std::shared_ptr<const Model> model, const std::vector<int32_t>& ids) {
  LoadOptions opts;
  opts.kv_cache_blocks = int32_t((ids.size() + 15) / 16);
  auto ex = make_cpu_executor(model, opts);
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  StepBatch b;
  b.clear();
  std::vector<SeqSampling> ss;
  for (size_t i = 0; i < ids.size(); ++i) {
    b.token_ids.push_back(ids[i]);
    b.positions.push_back(int32_t(i));
    b.logits_rows.push_back(int32_t(i));
    SeqSampling x;
    x.params = &greedy;
    ss.push_back(x);
  }
  b.query_start.push_back(int32_t(ids.size()));
  b.context_lens.push_back(int32_t(ids.size()));
  b.max_blocks_per_seq = opts.kv_cache_blocks;
  for (int32_t i = 0; i < opts.kv_cache_blocks; ++i) b.block_tables.push_back(i);
  std::vector<SampledToken> out;
  Status st = ex->execute(b, ss, &out);
  EXPECT_TRUE(st.is_ok()) << st.message();
  return std::vector<float>(ex->last_logits(), ex->last_logits() + ids.size() * size_t(model->config.vocab_size));
}

// FP8 against BF16 on the same weights (each family's golden checkpoint converted both ways):
// top-1 agreement over the prompt and the golden continuation (teacher-forced), and the logit
// error. The fixtures are random-weight models whose top-2 logits are close, so they are a harsh
// test of any rounding: even BF16 vs float32 changes their greedy path within a few tokens.
TEST_P(GoldenConvert, Fp8AgreesWithBf16OnTop1) {
  const std::string src = kGolden + GetParam();
  Golden g = read_golden(src);
  std::vector<int32_t> seq = g.prompt;
  seq.insert(seq.end(), g.greedy.begin(), g.greedy.end());
  TempDir t;
  struct Variant {
    const char* name;
    bool fp8;
    Fp8Scaling scaling;
    const char* activations;  // rewrites config.json's activation_scaling ("" = as converted)
  };
  std::vector<float> ref;
  int32_t V = 0;
  for (Variant v : {Variant{"bfloat16", false, Fp8Scaling::kPerTensor, ""},
                    Variant{"fp8 per-tensor", true, Fp8Scaling::kPerTensor, ""},
                    Variant{"fp8 per-channel", true, Fp8Scaling::kPerChannel, ""},
                    Variant{"fp8 weight-only", true, Fp8Scaling::kPerTensor, "none"}}) {
    ConvertOptions o;
    o.model_dir = src;
    o.output_dir = t.sub(std::to_string(seq.size()) + "_" + v.name);
    for (char& ch : o.output_dir) if (ch == ' ') ch = '_';
    o.dtype = "bfloat16";
    o.use_fp8 = v.fp8;
    o.fp8_scaling = v.scaling;
    auto r = convert_checkpoint(o);
    ASSERT_TRUE(r.is_ok()) << r.message();
    if (*v.activations) {
      auto j = json::parse(*read_file(o.output_dir + "/config.json"));
      j["quantization"]["activation_scaling"] = v.activations;
      ASSERT_TRUE(write_file(o.output_dir + "/config.json", j.dump()).is_ok());
    }
    auto model = load_model(o.output_dir);
    ASSERT_TRUE(model.is_ok()) << model.message();
    V = (*model)->config.vocab_size;
    if (v.fp8 && !*v.activations) {
      const Weight& q = (*model)->weights.layers[0].wq;
      ASSERT_EQ(q.format, WeightFormat::kF8E4M3);
      ASSERT_EQ(q.act_quant, ActQuant::kDynamicToken);
      ASSERT_EQ(bool(q.row_scales), v.scaling == Fp8Scaling::kPerChannel);
    }
    std::vector<float> logits = all_row_logits(*model, seq);
    if (!v.fp8) {
      ref = logits;
      continue;
    }
    int same = 0;
    double max_err = 0, sum_err = 0, ref_abs = 0;
    const int n = int(seq.size());
    for (int row = 0; row < n; ++row) {
      const float* x = logits.data() + size_t(row) * V;
      const float* y = ref.data() + size_t(row) * V;
      same += std::max_element(x, x + V) - x == std::max_element(y, y + V) - y;
      for (int32_t k = 0; k < V; ++k) {
        max_err = std::max(max_err, double(std::fabs(x[k] - y[k])));
        sum_err += std::fabs(x[k] - y[k]);
        ref_abs += std::fabs(y[k]);
      }
    }
    std::printf("[fp8 vs bf16 %-12s %-15s] top-1 %2d/%d (%.0f%%), logit |err| max %.3f mean %.4f (mean |logit| %.3f)\n",
                GetParam().c_str(), v.name, same, n, 100.0 * same / n, max_err, sum_err / double(n * V),
                ref_abs / double(n * V));
    EXPECT_GT(same * 2, n) << v.name << ": top-1 must agree on most tokens";
  }
}

INSTANTIATE_TEST_SUITE_P(Families, GoldenConvert, ::testing::ValuesIn(kFamilies));

// --- Tensor parallelism -------------------------------------------------------------------------

void expect_tp_round_trip(const std::string& src, bool fp8, Fp8Scaling scaling, int32_t tp) {
  TempDir t;
  ConvertOptions o;
  o.model_dir = src;
  o.use_fp8 = fp8;
  o.fp8_scaling = scaling;
  o.output_dir = t.sub("tp1");
  auto r1 = convert_checkpoint(o);
  ASSERT_TRUE(r1.is_ok()) << r1.message();
  o.output_dir = t.sub("tpn");
  o.tp_size = tp;
  auto rn = convert_checkpoint(o);
  ASSERT_TRUE(rn.is_ok()) << rn.message();
  auto whole = load_kiln_dir(t.sub("tp1"));
  ASSERT_TRUE(whole.is_ok()) << whole.message();
  auto refused = load_kiln_dir(t.sub("tpn"));
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.message().find("tp_size " + std::to_string(tp)), std::string::npos) << refused.message();
  std::vector<std::shared_ptr<Model>> ranks;
  for (int32_t r = 0; r < tp; ++r) {
    auto m = load_kiln_rank(t.sub("tpn"), r);
    ASSERT_TRUE(m.is_ok()) << m.message();
    ranks.push_back(*m);
  }
  const ModelConfig& c = (*whole)->config;
  EXPECT_EQ(ranks[0]->config.num_heads * tp, c.num_heads);
  // Column-parallel (rows split): the ranks' rows, concatenated, are the whole matrix's rows.
  auto cat_rows = [&](auto get) {
    std::vector<float> all;
    for (auto& m : ranks) {
      auto v = rows_f32(get(*m));
      all.insert(all.end(), v.begin(), v.end());
    }
    return all;
  };
  // Row-parallel (columns split): row i of the whole is the ranks' row i pieces, concatenated.
  auto cat_cols = [&](auto get) {
    const Weight& w0 = get(*ranks[0]);
    std::vector<float> all(size_t(w0.rows * w0.cols * tp));
    for (int32_t r = 0; r < tp; ++r) {
      auto v = rows_f32(get(*ranks[size_t(r)]));
      for (int64_t i = 0; i < w0.rows; ++i)
        std::copy(v.begin() + i * w0.cols, v.begin() + (i + 1) * w0.cols, all.begin() + i * w0.cols * tp + r * w0.cols);
    }
    return all;
  };
  for (int32_t l = 0; l < c.num_layers; ++l) {
    auto L = [l](const Model& m) -> const LayerWeights& { return m.weights.layers[size_t(l)]; };
    EXPECT_EQ(cat_rows([&](const Model& m) -> const Weight& { return L(m).wq; }), rows_f32(L(**whole).wq)) << l;
    EXPECT_EQ(cat_rows([&](const Model& m) -> const Weight& { return L(m).wk; }), rows_f32(L(**whole).wk)) << l;
    EXPECT_EQ(cat_rows([&](const Model& m) -> const Weight& { return L(m).wv; }), rows_f32(L(**whole).wv)) << l;
    EXPECT_EQ(cat_rows([&](const Model& m) -> const Weight& { return L(m).w_gate; }), rows_f32(L(**whole).w_gate)) << l;
    EXPECT_EQ(cat_rows([&](const Model& m) -> const Weight& { return L(m).w_up; }), rows_f32(L(**whole).w_up)) << l;
    EXPECT_EQ(cat_cols([&](const Model& m) -> const Weight& { return L(m).wo; }), rows_f32(L(**whole).wo)) << l;
    EXPECT_EQ(cat_cols([&](const Model& m) -> const Weight& { return L(m).w_down; }), rows_f32(L(**whole).w_down)) << l;
    if (c.attention_bias) {
      std::vector<float> bq;
      for (auto& m : ranks) {
        auto v = rows_f32(L(*m).bq);
        bq.insert(bq.end(), v.begin(), v.end());
      }
      EXPECT_EQ(bq, rows_f32(L(**whole).bq));
    }
  }
  EXPECT_EQ(cat_rows([](const Model& m) -> const Weight& { return m.weights.lm_head; }), rows_f32((*whole)->weights.lm_head));
  for (auto& m : ranks) EXPECT_EQ(rows_f32(m->weights.embed), rows_f32((*whole)->weights.embed)) << "replicated";
}

TEST(TensorParallel, ShardsConcatenateToUnshardedBf16) { expect_tp_round_trip(kGolden + "llama31", false, Fp8Scaling::kPerTensor, 2); }
TEST(TensorParallel, ShardsConcatenateToUnshardedQwen2Bias) { expect_tp_round_trip(kGolden + "qwen2", false, Fp8Scaling::kPerTensor, 2); }
TEST(TensorParallel, ShardsConcatenateToUnshardedFp8PerTensor) { expect_tp_round_trip(kGolden + "mistral", true, Fp8Scaling::kPerTensor, 2); }
TEST(TensorParallel, ShardsConcatenateToUnshardedFp8PerChannel) { expect_tp_round_trip(kGolden + "qwen3", true, Fp8Scaling::kPerChannel, 2); }

// --- Pre-quantized (ModelOpt-style) sources -------------------------------------------------------

// Writes an HF directory holding llama31's weights with every linear quantized to FP8 (a scale of
// its own per projection, so fusing must requantize), ModelOpt's input_scale / k_proj.k_scale
// tensors and an hf_quant_config.json.
void write_modelopt_fixture(const std::string& dir) {
  const std::string src = kGolden + "llama31";
  fs::create_directories(dir);
  fs::copy_file(src + "/config.json", dir + "/config.json");
  auto ck = SafetensorsCheckpoint::open(src);
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
  int i = 0;
  for (const std::string& name : ck->names()) {
    const SafeTensor* t = ck->find(name);
    const bool linear = name.find("_proj.weight") != std::string::npos;
    if (!linear) {
      add(name, t->dtype, t->shape, std::vector<uint8_t>(t->data, t->data + t->nbytes));
      continue;
    }
    std::vector<float> f(size_t(t->numel()));
    for (size_t k = 0; k < f.size(); ++k) f[k] = load_as_f32(t->data, t->dtype, k);
    Fp8Matrix m = fp8_quantize_matrix(f.data(), t->shape[0], t->shape[1], Fp8Scaling::kPerTensor);
    const std::string prefix = name.substr(0, name.size() - 7);
    add(name, DType::kF8E4M3, t->shape, m.codes);
    scalar(prefix + ".weight_scale", m.scales[0]);
    scalar(prefix + ".input_scale", 0.01f * float(1 + (i++ % 3)));
    if (name.find("k_proj") != std::string::npos) scalar(prefix + ".k_scale", 0.5f);
    if (name.find("v_proj") != std::string::npos) scalar(prefix + ".v_scale", 0.25f);
  }
  Status st = safetensors_write(dir + "/model.safetensors", out);
  ASSERT_TRUE(st.is_ok()) << st.message();
  st = write_file(dir + "/hf_quant_config.json",
                  R"({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}})");
  ASSERT_TRUE(st.is_ok()) << st.message();
}

TEST(PreQuantized, ModelOptFp8IsReadAsItIs) {
  TempDir t;
  write_modelopt_fixture(t.sub("hf"));
  if (HasFatalFailure()) return;
  ConvertOptions o;
  o.model_dir = t.sub("hf");
  o.output_dir = t.sub("ckpt");
  auto r = convert_checkpoint(o);  // no --use_fp8: a pre-quantized source stays FP8
  ASSERT_TRUE(r.is_ok()) << r.message();
  EXPECT_TRUE(r->prequantized);
  EXPECT_TRUE(r->fp8);
  EXPECT_GT(r->requantized_shards, 0);
  auto info = read_kiln_config(o.output_dir);
  ASSERT_TRUE(info.is_ok()) << info.message();
  EXPECT_EQ(info->json["quantization"]["source"], "modelopt");
  EXPECT_EQ(info->json["quantization"]["activation_scaling"], "static");
  EXPECT_EQ(info->json["quantization"]["kv_cache_quant_algo"], "FP8");
  EXPECT_EQ(info->json["quantization"]["kv_cache_scales"], "calibrated");
  auto src = load_model(t.sub("hf"));
  ASSERT_TRUE(src.is_ok()) << src.message();
  auto model = load_model(o.output_dir);
  ASSERT_TRUE(model.is_ok()) << model.message();
  const LayerWeights& l = (*model)->weights.layers[0];
  const LayerWeights& s = (*src)->weights.layers[0];
  EXPECT_EQ(l.wqkv.scale, std::max({s.wq.scale, s.wk.scale, s.wv.scale}));
  EXPECT_EQ(l.wq.act_quant, ActQuant::kStaticTensor);
  EXPECT_FLOAT_EQ(l.wq.input_scale, 0.03f) << "max of q/k/v input scales 0.01, 0.02, 0.03";
  EXPECT_FLOAT_EQ(l.k_scale, 0.5f);
  EXPECT_FLOAT_EQ(l.v_scale, 0.25f);
  EXPECT_TRUE((*model)->weights.fp8_kv_cache);
  // The fused views hold the source's values within FP8 rounding.
  for (auto [a, b] : {std::pair{&l.wq, &s.wq}, std::pair{&l.wk, &s.wk}, std::pair{&l.wv, &s.wv}}) {
    auto x = rows_f32(*a), y = rows_f32(*b);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(x[i], y[i], fp8_tol(y[i], l.wqkv.scale)) << i;
  }
}

TEST(PreQuantized, UnsupportedQuantAlgoIsNamed) {
  TempDir t;
  fs::copy(kGolden + "llama31", t.sub("hf"));
  ASSERT_TRUE(write_file(t.sub("hf") + "/hf_quant_config.json", R"({"quantization": {"quant_algo": "NVFP4"}})").is_ok());
  ConvertOptions o;
  o.model_dir = t.sub("hf");
  o.output_dir = t.sub("ckpt");
  auto r = convert_checkpoint(o);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.message().find("NVFP4"), std::string::npos) << r.message();
  EXPECT_NE(r.message().find("hf_quant_config.json"), std::string::npos) << r.message();
}

// --- Engine dir and plan ---------------------------------------------------------------------------

TEST(Engine, BuildWritesLimitsPlanAndLoads) {
  TempDir t;
  ConvertOptions o;
  o.model_dir = kGolden + "qwen3";
  o.output_dir = t.sub("ckpt");
  o.use_fp8 = true;
  o.fp8_kv_cache = true;
  ASSERT_TRUE(convert_checkpoint(o).is_ok());
  BuildOptions b;
  b.checkpoint_dir = o.output_dir;
  b.output_dir = t.sub("engine");
  b.limits = {6, 100, 200, 512};
  auto r = build_engine(b);
  ASSERT_TRUE(r.is_ok()) << r.message();
  EXPECT_EQ(r->plan.cuda_graph_batch_sizes, (std::vector<int32_t>{1, 2, 4, 6}));
  EXPECT_EQ(r->plan.device, "cpu");
  EXPECT_TRUE(r->plan.gemm_algorithms.empty());
  EXPECT_EQ(r->plan.kv.dtype, "fp8_e4m3");
  // bytes/token = 2 (K and V) * layers * kv_dim * 1 byte (FP8).
  auto info = read_kiln_config(b.output_dir);
  ASSERT_TRUE(info.is_ok()) << info.message();
  const ModelConfig& c = info->config;
  EXPECT_EQ(r->plan.kv.bytes_per_token, 2 * c.num_layers * c.kv_dim());
  EXPECT_EQ(r->plan.kv.blocks_for_limits, 6 * ((200 + 15) / 16));
  EXPECT_EQ(info->json["build_config"]["max_seq_len"], 200);
  EXPECT_EQ(info->json["build_config"]["gemm_plugin"], "auto");
  auto plan = read_file(b.output_dir + "/plan.json");
  ASSERT_TRUE(plan.is_ok());
  EXPECT_EQ(json::parse(*plan)["device"], "cpu");
  auto model = load_model(b.output_dir);
  ASSERT_TRUE(model.is_ok()) << model.message();
  EXPECT_EQ((*model)->weights.layers[0].wq.format, WeightFormat::kF8E4M3);
  // Loading maps the file: the FP8 matrices point into it (no conversion, no copy).
  EXPECT_EQ((*model)->weights.layers[0].wq.data, (*model)->weights.layers[0].wqkv.data);
  auto p = replan_if_needed(b.output_dir, "cpu");
  ASSERT_TRUE(p.is_ok()) << p.message();
  EXPECT_EQ(p->device_name, "cpu");
}

TEST(Engine, ReplansOnDeviceMismatchWithWarning) {
  TempDir t;
  ConvertOptions o;
  o.model_dir = kGolden + "llama31";
  o.output_dir = t.sub("engine");
  ASSERT_TRUE(convert_checkpoint(o).is_ok());
  BuildOptions b;
  b.checkpoint_dir = b.output_dir = o.output_dir;  // in place
  b.limits.max_batch_size = 8;
  b.limits.max_seq_len = 256;
  b.limits.max_input_len = 128;
  ASSERT_TRUE(build_engine(b).is_ok());
  // Pretend it was built on a GPU.
  auto text = read_file(o.output_dir + "/plan.json");
  json j = json::parse(*text);
  j["device"] = "cuda";
  j["device_name"] = "NVIDIA H100 80GB HBM3";
  j["gemm_algorithms"] = {{"64x64", 3}};
  ASSERT_TRUE(write_file(o.output_dir + "/plan.json", j.dump()).is_ok());
  ::testing::internal::CaptureStderr();
  auto p = replan_if_needed(o.output_dir, "cpu");
  std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(p.is_ok()) << p.message() << " (a device mismatch must never refuse)";
  EXPECT_NE(err.find("NVIDIA H100 80GB HBM3"), std::string::npos) << err;
  EXPECT_NE(err.find("re-planning"), std::string::npos) << err;
  EXPECT_EQ(p->device, "cpu");
  EXPECT_TRUE(p->gemm_algorithms.empty());
  EXPECT_EQ(p->limits.max_batch_size, 8) << "limits survive re-planning";
  EXPECT_EQ(p->limits.max_seq_len, 256);
  auto saved = json::parse(*read_file(o.output_dir + "/plan.json"));
  EXPECT_EQ(saved["device_name"], "cpu");
  // The GPU's planner hook fills gemm_algorithms when re-planning for a GPU.
  set_gemm_planner([](const KilnDirInfo&, EnginePlan* plan) {
    plan->gemm_algorithms = {{"planned_by", "hook"}};
    return Status::ok();
  });
  auto g = replan_if_needed(o.output_dir, "NVIDIA H200");
  set_gemm_planner(nullptr);
  ASSERT_TRUE(g.is_ok()) << g.message();
  EXPECT_EQ(g->device, "cuda");
  EXPECT_EQ(g->gemm_algorithms["planned_by"], "hook");
  ASSERT_TRUE(load_model(o.output_dir).is_ok());
}

// --- Bad inputs ------------------------------------------------------------------------------------

TEST(BadInput, UnknownDtypeIsNamed) {
  auto d = parse_convert_dtype("bfloat17");
  ASSERT_FALSE(d.is_ok());
  EXPECT_NE(d.message().find("bfloat17"), std::string::npos);
  EXPECT_NE(d.message().find("bfloat16"), std::string::npos) << "lists the accepted values";
  TempDir t;
  ConvertOptions o;
  o.model_dir = kGolden + "llama31";
  o.output_dir = t.sub("x");
  o.dtype = "int3";
  auto r = convert_checkpoint(o);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.message().find("--dtype 'int3'"), std::string::npos) << r.message();
  EXPECT_FALSE(parse_fp8_scaling("per_row").is_ok());
}

TEST(BadInput, TpSizeNotDividingHeadsNamesBothNumbers) {
  TempDir t;
  ConvertOptions o;
  o.model_dir = kGolden + "llama31";  // 4 heads, 2 kv heads
  o.output_dir = t.sub("x");
  o.tp_size = 3;
  auto r = convert_checkpoint(o);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.message().find("--tp_size (3)"), std::string::npos) << r.message();
  EXPECT_NE(r.message().find("num_attention_heads (4)"), std::string::npos) << r.message();
  o.tp_size = 4;  // divides the heads, not the kv heads
  r = convert_checkpoint(o);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.message().find("num_key_value_heads (2)"), std::string::npos) << r.message();
  EXPECT_FALSE(fs::exists(o.output_dir)) << "nothing written on a refused conversion";
}

TEST(BadInput, OutputDirNotWritableIsNamed) {
  TempDir t;
  ASSERT_TRUE(write_file(t.sub("file"), "x").is_ok());
  ConvertOptions o;
  o.model_dir = kGolden + "llama31";
  o.output_dir = t.sub("file") + "/ckpt";  // under a regular file: cannot be created
  auto r = convert_checkpoint(o);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.message().find(o.output_dir), std::string::npos) << r.message();
  if (::geteuid() != 0) {  // root ignores permission bits
    fs::create_directories(t.sub("ro"));
    fs::permissions(t.sub("ro"), fs::perms::owner_read | fs::perms::owner_exec);
    o.output_dir = t.sub("ro");
    r = convert_checkpoint(o);
    fs::permissions(t.sub("ro"), fs::perms::owner_all);
    ASSERT_FALSE(r.is_ok());
    EXPECT_NE(r.message().find("not writable"), std::string::npos) << r.message();
  }
  // build: a checkpoint that is not one.
  BuildOptions b;
  b.checkpoint_dir = kGolden + "llama31";
  b.output_dir = t.sub("engine");
  auto e = build_engine(b);
  ASSERT_FALSE(e.is_ok());
  EXPECT_NE(e.message().find("run kiln convert first"), std::string::npos) << e.message();
}

TEST(BadInput, BuildLimitsAreChecked) {
  TempDir t;
  ConvertOptions o;
  o.model_dir = kGolden + "llama31";
  o.output_dir = t.sub("ckpt");
  ASSERT_TRUE(convert_checkpoint(o).is_ok());
  BuildOptions b;
  b.checkpoint_dir = o.output_dir;
  b.output_dir = t.sub("engine");
  b.limits.max_input_len = 4096;
  b.limits.max_seq_len = 2048;
  auto e = build_engine(b);
  ASSERT_FALSE(e.is_ok());
  EXPECT_NE(e.message().find("--max_input_len (4096)"), std::string::npos) << e.message();
  EXPECT_NE(e.message().find("--max_seq_len (2048)"), std::string::npos) << e.message();
  b.limits = {};
  b.limits.max_batch_size = 0;
  e = build_engine(b);
  ASSERT_FALSE(e.is_ok());
  EXPECT_NE(e.message().find("--max_batch_size (0)"), std::string::npos) << e.message();
}

TEST(BadInput, CorruptKilnConfigIsNamed) {
  TempDir t;
  ConvertOptions o;
  o.model_dir = kGolden + "llama31";
  o.output_dir = t.sub("ckpt");
  o.use_fp8 = true;
  ASSERT_TRUE(convert_checkpoint(o).is_ok());
  auto j = json::parse(*read_file(o.output_dir + "/config.json"));
  j["quantization"]["activation_scaling"] = "sometimes";
  ASSERT_TRUE(write_file(o.output_dir + "/config.json", j.dump()).is_ok());
  auto m = load_model(o.output_dir);
  ASSERT_FALSE(m.is_ok());
  EXPECT_NE(m.message().find("activation_scaling 'sometimes'"), std::string::npos) << m.message();
  j["quantization"]["activation_scaling"] = "dynamic_per_token";
  j["kiln_format"] = 99;
  ASSERT_TRUE(write_file(o.output_dir + "/config.json", j.dump()).is_ok());
  m = load_model(o.output_dir);
  ASSERT_FALSE(m.is_ok());
  EXPECT_NE(m.message().find("kiln_format 99"), std::string::npos) << m.message();
}

// --- The default model (GGUF) ---------------------------------------------------------------------

TEST(DefaultModel, GgufConvertsWithTokenizerAndMatchesSourceGreedy) {
  const char* path = std::getenv("KILN_DEFAULT_MODEL");
  if (!path || !file_exists(path)) GTEST_SKIP() << "KILN_DEFAULT_MODEL not set or missing (make test sets it)";
  TempDir t;
  ConvertOptions o;
  o.model_dir = path;
  o.output_dir = t.sub("ckpt");
  o.dtype = "float32";  // the GGUF's values exactly (Q4_1 dequantized), so logits match closely
  auto r = convert_checkpoint(o);
  ASSERT_TRUE(r.is_ok()) << r.message();
  EXPECT_TRUE(file_exists(o.output_dir + "/tokenizer.gguf"));
  auto src = load_model(path);
  auto conv = load_model(o.output_dir);
  ASSERT_TRUE(src.is_ok() && conv.is_ok()) << conv.message();
  EXPECT_EQ((*conv)->config.rope_style, RopeStyle::kInterleaved);
  const std::vector<int32_t> prompt = {504, 3575, 282, 4649, 314};  // "The capital of France is"
  RunOut a = run_model(*src, prompt, 8), b = run_model(*conv, prompt, 8);
  float max_diff = 0;
  for (size_t i = 0; i < a.logits.size(); ++i) max_diff = std::max(max_diff, std::fabs(a.logits[i] - b.logits[i]));
  std::printf("[default model] GGUF vs converted float32: max |logit diff| %.3g\n", max_diff);
  EXPECT_LE(max_diff, 1e-2f);
  EXPECT_EQ(a.greedy, b.greedy);
}

}  // namespace
