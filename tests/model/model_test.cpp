// Unit tests of the CPU reference ops, the sampler and config parsing (no fixtures needed).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "backend/cpu/cpu_executor.h"
#include "backend/cpu/sampler.h"
#include "common/tiny_config.h"

using namespace kiln;
using nlohmann::json;

namespace {

using kiln::testing::tiny_config;

// Logits for rows of each sequence, with the sequences packed into one step or run one by one.
std::vector<std::vector<float>> step_logits(std::shared_ptr<const Model> m, const std::vector<std::vector<int32_t>>& seqs,
                                            bool batched, int chunk = 0) {
  const int32_t V = m->config.vocab_size, bs = 4, per_seq = 8;
  LoadOptions opts;
  opts.block_size = bs;
  opts.kv_cache_blocks = per_seq * int32_t(seqs.size());
  auto ex = make_cpu_executor(m, opts);
  SamplingParams sp;
  sp.temperature = 0;
  std::vector<std::vector<float>> res(seqs.size());
  auto run = [&](const std::vector<size_t>& which, const std::vector<int32_t>& starts, const std::vector<int32_t>& ends) {
    StepBatch b;
    b.clear();
    b.max_blocks_per_seq = per_seq;
    std::vector<SeqSampling> ss;
    for (size_t k = 0; k < which.size(); ++k) {
      const auto& s = seqs[which[k]];
      for (int32_t p = starts[k]; p < ends[k]; ++p) {
        b.token_ids.push_back(s[size_t(p)]);
        b.positions.push_back(p);
      }
      b.query_start.push_back(b.num_tokens());
      b.context_lens.push_back(ends[k]);
      for (int32_t i = 0; i < per_seq; ++i) b.block_tables.push_back(int32_t(which[k]) * per_seq + i);
      b.logits_rows.push_back(b.num_tokens() - 1);
      SeqSampling x;
      x.params = &sp;
      ss.push_back(x);
    }
    std::vector<SampledToken> out;
    ASSERT_TRUE(ex->execute(b, ss, &out).is_ok());
    for (size_t k = 0; k < which.size(); ++k)
      res[which[k]].assign(ex->last_logits() + k * V, ex->last_logits() + (k + 1) * V);
  };
  if (batched) {
    std::vector<size_t> all;
    std::vector<int32_t> st, en;
    for (size_t i = 0; i < seqs.size(); ++i) {
      all.push_back(i);
      st.push_back(0);
      en.push_back(int32_t(seqs[i].size()));
    }
    run(all, st, en);
  } else {
    for (size_t i = 0; i < seqs.size(); ++i) {
      const int32_t n = int32_t(seqs[i].size());
      const int32_t step = chunk > 0 ? chunk : n;
      for (int32_t p = 0; p < n; p += step) run({i}, {p}, {std::min(n, p + step)});
    }
  }
  return res;
}

TEST(CpuForward, BatchedEqualsAloneBitForBit) {
  auto m = make_dummy_model(tiny_config(), WeightFormat::kF32, 7);
  std::vector<std::vector<int32_t>> seqs = {{5, 9, 11, 3, 40, 41, 42}, {7}, {90, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}};
  auto alone = step_logits(m, seqs, false);
  auto together = step_logits(m, seqs, true);
  for (size_t i = 0; i < seqs.size(); ++i) EXPECT_EQ(alone[i], together[i]) << "sequence " << i;
}

// The default model's GGUF weights (Q4_1, Q8_0) go through other kernels than F32/BF16: the same
// request must still give identical logits alone (decode-sized steps) and in a large batch.
TEST(CpuForward, QuantizedBatchedEqualsAloneBitForBit) {
  const char* path = std::getenv("KILN_DEFAULT_MODEL");
  if (!path) GTEST_SKIP() << "KILN_DEFAULT_MODEL not set (make test sets it)";
  auto m = load_model(path);
  ASSERT_TRUE(m.is_ok()) << m.message();
  std::vector<std::vector<int32_t>> seqs = {{504, 3575, 282, 4649, 314}, {1}, {30, 31, 32}, {9, 8, 7, 6, 5, 4, 3, 2}};
  auto alone = step_logits(*m, seqs, false, 1);  // one token per step: the decode path throughout
  auto together = step_logits(*m, seqs, true);
  for (size_t i = 0; i < seqs.size(); ++i) EXPECT_EQ(alone[i], together[i]) << "sequence " << i;
}

TEST(CpuForward, ChunkedPrefillMatchesWholePrompt) {
  auto m = make_dummy_model(tiny_config(), WeightFormat::kBF16, 8);
  std::vector<std::vector<int32_t>> seqs = {{5, 9, 11, 3, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52}};
  auto whole = step_logits(m, seqs, false);
  auto chunked = step_logits(m, seqs, false, 5);
  ASSERT_EQ(whole[0].size(), chunked[0].size());
  for (size_t i = 0; i < whole[0].size(); ++i) ASSERT_NEAR(whole[0][i], chunked[0][i], 1e-4) << i;
}

TEST(Rope, Llama3ScalingBandsMatchTransformersFormula) {
  ModelConfig c = tiny_config();
  c.head_dim = 16;
  c.rope_theta = 500000.0f;
  auto plain = rope_inv_freq(c);
  c.rope_scaling = RopeScaling::kLlama3;
  c.rope_factor = 8.0f;
  c.rope_low_freq_factor = 1.0f;
  c.rope_high_freq_factor = 4.0f;
  c.rope_original_max_pos = 64;
  auto scaled = rope_inv_freq(c);
  // wavelength 2pi/f: < 16 unchanged, > 64 divided by 8, in between smoothly interpolated.
  int high = 0, low = 0, mid = 0;
  for (size_t i = 0; i < plain.size(); ++i) {
    const double wl = 2 * M_PI / plain[i];
    if (wl < 16) {
      EXPECT_FLOAT_EQ(scaled[i], plain[i]);
      ++high;
    } else if (wl > 64) {
      EXPECT_FLOAT_EQ(scaled[i], plain[i] / 8.0f);
      ++low;
    } else {
      const double smooth = (64.0 / wl - 1.0) / 3.0;
      EXPECT_NEAR(scaled[i], (1 - smooth) * plain[i] / 8.0 + smooth * plain[i], 1e-7);
      ++mid;
    }
  }
  EXPECT_GT(high, 0);
  EXPECT_GT(low, 0);
  EXPECT_GT(mid, 0);
}

std::vector<float> random_logits(int n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0, 3);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(g);
  return v;
}

TEST(Sampler, GreedyPicksArgmaxAndHonoursBiasAndBans) {
  auto logits = random_logits(50, 1);
  SamplingParams p;
  p.temperature = 0;
  SeqSampling s;
  s.params = &p;
  const int32_t best = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  EXPECT_EQ(sample_token(logits.data(), 50, s).id, best);
  p.logit_bias = {{7, 100.0f}};
  EXPECT_EQ(sample_token(logits.data(), 50, s).id, 7);
  std::vector<int32_t> banned = {7};
  s.banned_ids = &banned;
  EXPECT_NE(sample_token(logits.data(), 50, s).id, 7);
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDiffers) {
  auto logits = random_logits(200, 2);
  SamplingParams p;
  p.temperature = 1.5f;
  SeqSampling s;
  s.params = &p;
  auto draw = [&](uint64_t seed) {
    p.seed = seed;
    std::vector<int32_t> out;
    for (int i = 0; i < 40; ++i) {
      s.num_output = i;
      out.push_back(sample_token(logits.data(), 200, s).id);
    }
    return out;
  };
  EXPECT_EQ(draw(42), draw(42));
  EXPECT_NE(draw(42), draw(43));
}

TEST(Sampler, TopKTopPMinPRestrictTheSupport) {
  std::vector<float> logits = {5.0f, 4.0f, 3.0f, 0.0f, -1.0f, -2.0f};
  SamplingParams p;
  p.temperature = 1.0f;
  SeqSampling s;
  s.params = &p;
  auto support = [&] {
    std::set<int32_t> seen;
    for (int i = 0; i < 2000; ++i) {
      p.seed = uint64_t(i);
      seen.insert(sample_token(logits.data(), 6, s).id);
    }
    return seen;
  };
  EXPECT_GE(support().size(), 4u);  // ids 4, 5 have p < 0.002: rarely drawn in 2000 tries
  p.top_k = 2;
  EXPECT_EQ(support(), (std::set<int32_t>{0, 1}));
  p.top_k = 0;
  p.top_p = 0.6f;  // p0 = 0.66 already reaches it
  EXPECT_EQ(support(), (std::set<int32_t>{0}));
  p.top_p = 0.9f;  // p0 + p1 = 0.90...: two
  EXPECT_EQ(support(), (std::set<int32_t>{0, 1}));
  p.top_p = 1.0f;
  p.min_p = 0.2f;  // e^-1 = 0.37 > 0.2, e^-2 = 0.135 < 0.2
  EXPECT_EQ(support(), (std::set<int32_t>{0, 1}));
}

TEST(Sampler, PenaltiesFollowTransformersAndOpenAI) {
  std::vector<float> logits = {2.0f, 1.9f, -1.0f};
  SamplingParams p;
  p.temperature = 0;
  SeqSampling s;
  s.params = &p;
  std::vector<int32_t> prompt = {0};
  s.prompt_ids = prompt.data();
  s.num_prompt = 1;
  p.repetition_penalty = 1.1f;  // 2.0 / 1.1 = 1.82 < 1.9
  EXPECT_EQ(sample_token(logits.data(), 3, s).id, 1);
  p.repetition_penalty = 1.0f;
  std::vector<int32_t> out = {0, 0};
  s.output_ids = out.data();
  s.num_output = 2;
  p.frequency_penalty = 0.06f;  // 2.0 - 0.12 = 1.88 < 1.9
  EXPECT_EQ(sample_token(logits.data(), 3, s).id, 1);
}

TEST(Sampler, LogprobsAreRawLogSoftmaxWithTopK) {
  std::vector<float> logits = {1.0f, 2.0f, 3.0f};
  SamplingParams p;
  p.temperature = 0;
  p.logprobs = 2;
  SeqSampling s;
  s.params = &p;
  auto t = sample_token(logits.data(), 3, s);
  ASSERT_TRUE(t.logprob.has_value());
  const double lse = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  EXPECT_NEAR(t.logprob->logprob, 3.0 - lse, 1e-5);
  ASSERT_EQ(t.logprob->top.size(), 2u);
  EXPECT_EQ(t.logprob->top[0].first, 2);
  EXPECT_EQ(t.logprob->top[1].first, 1);
}

struct ConfigCase {
  const char* name;
  const char* json;
  const char* error;  // substring expected; nullptr: valid
};

class ConfigParse : public ::testing::TestWithParam<ConfigCase> {};

TEST_P(ConfigParse, AcceptsOrNamesTheProblem) {
  const ConfigCase& c = GetParam();
  auto r = config_from_hf_json(json::parse(c.json), "config.json");
  if (!c.error) {
    EXPECT_TRUE(r.is_ok()) << r.message();
  } else {
    ASSERT_FALSE(r.is_ok()) << c.name;
    EXPECT_NE(r.message().find(c.error), std::string::npos) << r.message();
  }
}

#define BASE_CFG R"("vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8)"
INSTANTIATE_TEST_SUITE_P(
    Table, ConfigParse,
    ::testing::Values(
        ConfigCase{"llama", R"({"architectures": ["LlamaForCausalLM"], )" BASE_CFG R"(, "num_key_value_heads": 2, "eos_token_id": [1, 2]})", nullptr},
        ConfigCase{"llama3 rope", R"({"architectures": ["LlamaForCausalLM"], )" BASE_CFG R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})", nullptr},
        ConfigCase{"qwen3", R"({"architectures": ["Qwen3ForCausalLM"], )" BASE_CFG R"(, "head_dim": 16})", nullptr},
        ConfigCase{"unknown arch", R"({"architectures": ["GPT2LMHeadModel"], )" BASE_CFG "}", "'GPT2LMHeadModel' is not supported (supported: LlamaForCausalLM"},
        ConfigCase{"gqa mismatch", R"({"architectures": ["LlamaForCausalLM"], )" BASE_CFG R"(, "num_key_value_heads": 3})", "num_key_value_heads (3) must divide num_attention_heads (8)"},
        ConfigCase{"missing field", R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10})", "missing required field 'hidden_size'"},
        ConfigCase{"wrong type", R"({"architectures": ["LlamaForCausalLM"], )" BASE_CFG R"(, "num_key_value_heads": "two"})", "'num_key_value_heads' must be an integer"},
        ConfigCase{"bad rope", R"({"architectures": ["LlamaForCausalLM"], )" BASE_CFG R"(, "rope_scaling": {"type": "yarn", "factor": 4}})", "rope_scaling type 'yarn' is not supported"},
        ConfigCase{"eos outside vocab", R"({"architectures": ["MistralForCausalLM"], )" BASE_CFG R"(, "eos_token_id": 100})", "eos_token_id 100 is outside the vocabulary"}));

}  // namespace
