// Replays fixtures written by tools/gen_golden.py (Hugging Face transformers, float32) on the CPU
// backend: first-step logits within 1e-3 and the same 32 greedy tokens.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_executor.h"
#include "common/greedy_run.h"
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

void check_against(const std::string& name, std::shared_ptr<const Model> model, const std::string& dir,
                   bool all_rows) {
  auto text = read_file(dir + "/golden.json");
  ASSERT_TRUE(text.is_ok()) << text.message();
  json g = json::parse(*text);
  std::vector<int32_t> prompt = g["prompt_ids"].get<std::vector<int32_t>>();
  std::vector<int32_t> expect = g["greedy_ids"].get<std::vector<int32_t>>();
  std::vector<float> gaps = g["top2_gap"].get<std::vector<float>>();
  std::vector<float> ref = read_floats(dir + "/logits.bin");
  kiln::testing::GreedyRun r = kiln::testing::run_greedy(model, prompt, int(expect.size()), all_rows);
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
