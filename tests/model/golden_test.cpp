// Replays fixtures written by tools/gen_golden.py (Hugging Face transformers, float32) on the CPU
// backend: first-step logits within 1e-3 and the same 32 greedy tokens.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_executor.h"
#include "core/file.h"

using namespace kiln;
using nlohmann::json;

namespace {

const std::string kGolden = std::string(KILN_SOURCE_DIR) + "/tests/golden/";
constexpr float kLogitTol = 1e-3f;

std::vector<float> read_floats(const std::string& path) {
  auto bytes = read_file(path);
  EXPECT_TRUE(bytes.is_ok()) << bytes.message();
  std::vector<float> v(bytes->size() / 4);
  std::memcpy(v.data(), bytes->data(), v.size() * 4);
  return v;
}

// One sequence through the executor: the prompt in one step (logits for `rows` of it), then greedy.
struct Run {
  std::vector<float> logits;  // [rows, vocab]
  std::vector<int32_t> greedy;
};

Run run_model(std::shared_ptr<const Model> model, const std::vector<int32_t>& prompt, bool all_rows, int n_new) {
  LoadOptions opts;
  opts.kv_cache_blocks = int32_t((prompt.size() + size_t(n_new) + 15) / 16);
  auto ex = make_cpu_executor(model, opts);
  const int32_t V = model->config.vocab_size;
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  Run r;
  std::vector<int32_t> all = prompt;
  std::vector<SampledToken> out;
  int32_t computed = 0;
  for (int step = 0; step < n_new; ++step) {
    StepBatch b;
    b.clear();
    const int32_t n = int32_t(all.size()) - computed;
    for (int32_t i = 0; i < n; ++i) {
      b.token_ids.push_back(all[size_t(computed + i)]);
      b.positions.push_back(computed + i);
    }
    b.query_start.push_back(n);
    b.context_lens.push_back(int32_t(all.size()));
    b.max_blocks_per_seq = opts.kv_cache_blocks;
    for (int32_t i = 0; i < opts.kv_cache_blocks; ++i) b.block_tables.push_back(i);
    std::vector<SeqSampling> ss;
    const bool want_rows = step == 0 && all_rows;
    for (int32_t i = want_rows ? 0 : n - 1; i < n; ++i) {
      b.logits_rows.push_back(i);
      SeqSampling s;
      s.params = &greedy;
      ss.push_back(s);
    }
    Status st = ex->execute(b, ss, &out);
    EXPECT_TRUE(st.is_ok()) << st.message();
    if (step == 0) r.logits.assign(ex->last_logits(), ex->last_logits() + ss.size() * size_t(V));
    computed = int32_t(all.size());
    const int32_t id = out.back().id;
    r.greedy.push_back(id);
    all.push_back(id);
  }
  return r;
}

void check_against(const std::string& name, std::shared_ptr<const Model> model, const std::string& dir,
                   bool all_rows) {
  auto text = read_file(dir + "/golden.json");
  ASSERT_TRUE(text.is_ok()) << text.message();
  json g = json::parse(*text);
  std::vector<int32_t> prompt = g["prompt_ids"].get<std::vector<int32_t>>();
  std::vector<int32_t> expect = g["greedy_ids"].get<std::vector<int32_t>>();
  std::vector<float> gaps = g["top2_gap"].get<std::vector<float>>();
  std::vector<float> ref = read_floats(dir + "/logits.bin");
  Run r = run_model(model, prompt, all_rows, int(expect.size()));
  ASSERT_EQ(r.logits.size(), ref.size()) << name;
  float max_diff = 0.0f;
  size_t worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    float d = std::fabs(r.logits[i] - ref[i]);
    if (!(d <= max_diff)) {
      max_diff = d;
      worst = i;
    }
  }
  std::printf("[golden] %-14s logits %zu values, max |diff| %.3g (at %zu: %.5f vs %.5f), transformers %s\n",
              name.c_str(), ref.size(), max_diff, worst, r.logits[worst], ref[worst],
              g["versions"]["transformers"].get<std::string>().c_str());
  EXPECT_LE(max_diff, kLogitTol) << name;
  // A greedy choice is only reproducible when its top-2 gap exceeds the logit tolerance.
  for (size_t i = 0; i < expect.size(); ++i) {
    ASSERT_GT(gaps[i], 2 * kLogitTol) << name << ": the fixture has a near-tie at step " << i
                                      << "; regenerate it with another seed";
    ASSERT_EQ(r.greedy[i], expect[i]) << name << ": greedy token " << i << " differs";
  }
}

class GoldenFamily : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenFamily, MatchesTransformers) {
  const std::string dir = kGolden + GetParam();
  if (!file_exists(dir + "/golden.json")) GTEST_FAIL() << "fixture missing: " << dir;
  auto model = load_model(dir);
  ASSERT_TRUE(model.is_ok()) << model.message();
  check_against(GetParam(), *model, dir, /*all_rows=*/true);
}

INSTANTIATE_TEST_SUITE_P(Families, GoldenFamily,
                         ::testing::Values("llama31", "qwen2", "mistral", "qwen3", "llama_linear"));

TEST(GoldenDefaultModel, SmolLM2Q4_1MatchesTransformersDequantized) {
  const char* path = std::getenv("KILN_DEFAULT_MODEL");
  if (!path || !file_exists(path)) GTEST_SKIP() << "KILN_DEFAULT_MODEL not set or missing (make test sets it)";
  auto model = load_model(path);
  ASSERT_TRUE(model.is_ok()) << model.message();
  check_against("smollm2_q4_1", *model, kGolden + "smollm2_q4_1", /*all_rows=*/false);
}

}  // namespace
