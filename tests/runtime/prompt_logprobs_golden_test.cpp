// Prompt logprobs from kiln's CPU engine against Hugging Face transformers (never against kiln):
//  - tests/golden/<family>/prompt_logprobs.json (tools/gen_prompt_logprobs.py): transformers'
//    float32 log-softmax at every prompt position, target + top-2, for a 23-token prompt that the
//    engine prefills whole and in 2-3 chunks, with max_tokens 0 (scoring only) and 3;
//  - tests/golden/<family>/logits.bin (tools/gen_golden.py): transformers' logits at every prompt
//    position of golden.json's prompt; the log-softmax is taken here, in double.
// Tolerance 1e-3, as the golden logits tests.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_executor.h"
#include "core/file.h"
#include "runtime/engine.h"

namespace kiln {
namespace {

using nlohmann::json;

const std::string kGolden = std::string(KILN_SOURCE_DIR) + "/tests/golden/";
constexpr float kTol = 1e-3f;

struct Scored {
  std::vector<TokenLogprob> prompt;
  std::vector<int32_t> output;
  FinishReason finish = FinishReason::kNone;
};

// One request through a CPU engine over the family's weights.
Scored score(std::shared_ptr<const Model> model, const std::vector<int32_t>& prompt, int32_t max_tokens,
             int32_t budget, int32_t top_k) {
  LoadOptions opts;
  opts.block_size = 4;
  opts.kv_cache_blocks = 64;
  EngineLimits limits;
  limits.max_num_tokens = budget;
  auto engine = Engine::create(make_cpu_executor(std::move(model), opts), limits);
  std::mutex mu;
  std::condition_variable cv;
  Scored s;
  int carriers = 0;
  EngineRequest r;
  r.prompt = prompt;
  r.max_tokens = max_tokens;
  r.prompt_logprobs = top_k;
  r.sampling.temperature = 0.0f;
  r.ignore_eos = true;
  r.on_event = [&](const TokenEvent& ev) {
    std::lock_guard<std::mutex> lock(mu);
    if (!ev.prompt_logprobs.empty()) {
      ++carriers;
      s.prompt = ev.prompt_logprobs;
    }
    for (const SampledToken& t : ev.tokens) s.output.push_back(t.id);
    s.finish = ev.finish;
    cv.notify_all();
  };
  auto id = engine->submit(std::move(r));
  EXPECT_TRUE(id.is_ok()) << id.message();
  {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return s.finish != FinishReason::kNone; }));
  }
  engine->shutdown(true);
  EXPECT_EQ(carriers, prompt.size() > 1 ? 1 : 0);
  return s;
}

// Rows of logprobs [rows][2] of the top two tokens may swap on a near-tie: compare ids only where
// the reference's gap exceeds the tolerance, logprobs always.
void expect_top2(const TokenLogprob& got, const std::vector<int32_t>& ids, const std::vector<double>& lps,
                 const std::string& where) {
  ASSERT_EQ(got.top.size(), 2u) << where;
  for (size_t j = 0; j < 2; ++j) EXPECT_NEAR(got.top[j].second, lps[j], kTol) << where << " top " << j;
  if (lps[0] - lps[1] > 2 * kTol) {
    EXPECT_EQ(got.top[0].first, ids[0]) << where;
    EXPECT_EQ(got.top[1].first, ids[1]) << where;
  }
  // Sanity on any distribution: logprobs <= 0, the best is at least the target.
  EXPECT_LE(got.logprob, 0.0f) << where;
  EXPECT_GE(got.top[0].second, got.logprob - 1e-6f) << where;
}

class PromptLogprobsGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(PromptLogprobsGolden, MatchesTransformersWholeAndChunked) {
  const std::string dir = kGolden + GetParam();
  if (!file_exists(dir + "/prompt_logprobs.json"))
    GTEST_FAIL() << "fixture missing: " << dir << "/prompt_logprobs.json (tools/gen_prompt_logprobs.py)";
  auto text = read_file(dir + "/prompt_logprobs.json");
  ASSERT_TRUE(text.is_ok()) << text.message();
  const json g = json::parse(*text);
  const auto prompt = g["prompt_ids"].get<std::vector<int32_t>>();
  const auto target = g["target_logprobs"].get<std::vector<double>>();
  const auto top_ids = g["top2_ids"].get<std::vector<std::vector<int32_t>>>();
  const auto top_lps = g["top2_logprobs"].get<std::vector<std::vector<double>>>();
  ASSERT_EQ(target.size() + 1, prompt.size());
  auto model = load_model(dir);
  ASSERT_TRUE(model.is_ok()) << model.message();

  // Budgets: the whole prompt in one step; 3 chunks (8+8+7); 2 chunks (12+11).
  for (int32_t budget : {256, 8, 12}) {
    for (int32_t max_tokens : {0, 3}) {
      const std::string run = GetParam() + " budget " + std::to_string(budget) + " max_tokens " + std::to_string(max_tokens);
      Scored s = score(*model, prompt, max_tokens, budget, 2);
      EXPECT_EQ(s.finish, FinishReason::kLength) << run;
      EXPECT_EQ(s.output.size(), size_t(max_tokens)) << run;
      ASSERT_EQ(s.prompt.size(), target.size()) << run;
      float worst = 0.0f;
      for (size_t i = 0; i < target.size(); ++i) {
        const std::string where = run + " row " + std::to_string(i);
        EXPECT_EQ(s.prompt[i].id, prompt[i + 1]) << where;
        EXPECT_NEAR(s.prompt[i].logprob, target[i], kTol) << where;
        worst = std::max(worst, float(std::fabs(s.prompt[i].logprob - target[i])));
        expect_top2(s.prompt[i], top_ids[i], top_lps[i], where);
      }
      if (budget == 256 && max_tokens == 0)
        std::printf("[prompt logprobs] %-8s %zu rows, max |diff| vs transformers %.3g\n", GetParam().c_str(),
                    target.size(), worst);
    }
  }
}

// golden.json's prompt against transformers' logits at every prompt position (logits.bin).
TEST_P(PromptLogprobsGolden, MatchesLogSoftmaxOfGoldenLogits) {
  const std::string dir = kGolden + GetParam();
  auto text = read_file(dir + "/golden.json");
  ASSERT_TRUE(text.is_ok()) << text.message();
  const json g = json::parse(*text);
  const auto prompt = g["prompt_ids"].get<std::vector<int32_t>>();
  auto bytes = read_file(dir + "/logits.bin");
  ASSERT_TRUE(bytes.is_ok()) << bytes.message();
  auto model = load_model(dir);
  ASSERT_TRUE(model.is_ok()) << model.message();
  const size_t V = size_t((*model)->config.vocab_size);
  ASSERT_EQ(bytes->size(), prompt.size() * V * 4) << "logits.bin must hold every prompt position";
  std::vector<float> logits(prompt.size() * V);
  std::memcpy(logits.data(), bytes->data(), bytes->size());

  Scored s = score(*model, prompt, 1, 5, 2);  // 12 tokens in chunks of 5
  ASSERT_EQ(s.prompt.size(), prompt.size() - 1);
  for (size_t i = 0; i + 1 < prompt.size(); ++i) {
    const float* row = logits.data() + i * V;
    double mx = row[0];
    for (size_t t = 1; t < V; ++t) mx = std::max(mx, double(row[t]));
    double sum = 0.0;
    for (size_t t = 0; t < V; ++t) sum += std::exp(double(row[t]) - mx);
    const double lse = mx + std::log(sum);
    std::vector<int32_t> order(V);
    for (size_t t = 0; t < V; ++t) order[t] = int32_t(t);
    std::partial_sort(order.begin(), order.begin() + 2, order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
    const std::string where = GetParam() + " golden row " + std::to_string(i);
    EXPECT_NEAR(s.prompt[i].logprob, double(row[prompt[i + 1]]) - lse, kTol) << where;
    expect_top2(s.prompt[i], {order[0], order[1]}, {double(row[order[0]]) - lse, double(row[order[1]]) - lse}, where);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, PromptLogprobsGolden, ::testing::Values("llama31", "qwen2"));

}  // namespace
}  // namespace kiln
