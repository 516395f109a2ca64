// Prompt logprobs (EngineRequest::prompt_logprobs, the `echo` + `logprobs` of /v1/completions)
// through the scheduler and the engine, stepped by the fake model: every prompt row is computed
// (no prefix-cache hit), rows of a chunked prefill are gathered into one event, and a recompute
// after preemption sends nothing twice. The fake's row value depends on the whole prefix's KV, so
// a row computed at the wrong position or over a wrong prefix differs from fake_prompt_reference.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "runtime/engine.h"
#include "runtime/fake_executor.h"
#include "runtime/scheduler.h"

namespace kiln {
namespace {

using test::FakeExecutor;
using test::fake_info;
using test::fake_prompt_reference;
using test::fake_reference;

constexpr int32_t kVocab = 1000;

std::vector<int32_t> tokens(int32_t n, int32_t start) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

void expect_same(const std::vector<TokenLogprob>& got, const std::vector<TokenLogprob>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].id, want[i].id) << what << " row " << i;
    EXPECT_EQ(got[i].logprob, want[i].logprob) << what << " row " << i;
    EXPECT_EQ(got[i].top, want[i].top) << what << " row " << i;
  }
}

// --- scheduler: the step layout ---------------------------------------------------------------

// Timeline (budget 5, block 4), request 1 prompt of 9 tokens with prompt logprobs k=2:
//   step 1: positions 0-4, rows 0..4 (score tokens 1..5), nothing sampled
//   step 2: positions 5-8, rows 5..7 (score 6..8); position 8 samples (logits_rows[0])
//   step 3: decode, no rows
TEST(PromptLogprobsScheduler, RowsFollowSampledRowsOncePerPosition) {
  KvBlockManager kv(16, 4, true);
  Scheduler sched({4, 5}, &kv);
  const std::vector<int32_t> prompt = tokens(9, 10);
  sched.add(1, prompt, 2);
  std::vector<std::vector<int32_t>> rows_per_step;
  for (int step = 0; step < 3; ++step) {
    const ScheduledStep& st = sched.schedule();
    const StepBatch& b = st.batch;
    ASSERT_EQ(b.prompt_logprob_rows.size(), st.prompt_logprob_seqs.size());
    std::vector<int32_t> positions;
    for (size_t j = 0; j < b.prompt_logprob_rows.size(); ++j) {
      const int32_t row = b.logits_rows[size_t(b.num_sampled_rows()) + j];
      const int32_t pos = b.positions[size_t(row)];
      positions.push_back(pos);
      EXPECT_EQ(b.prompt_logprob_rows[j].target_id, prompt[size_t(pos) + 1]);
      EXPECT_EQ(b.prompt_logprob_rows[j].top_k, 2);
    }
    rows_per_step.push_back(positions);
    EXPECT_EQ(b.num_sampled_rows(), int32_t(st.sample_seqs.size()));
    const bool samples = !st.sample_seqs.empty();
    sched.commit_step();
    if (samples) sched.append_token(1, 42);
  }
  EXPECT_EQ(rows_per_step, (std::vector<std::vector<int32_t>>{{0, 1, 2, 3, 4}, {5, 6, 7}, {}}));
  EXPECT_EQ(sched.find(1)->prompt_logprobs_next, 8);
}

// A request without prompt logprobs keeps the common path: no rows, logits_rows = sampled rows.
TEST(PromptLogprobsScheduler, NoRowsWithoutPromptLogprobs) {
  KvBlockManager kv(16, 4, true);
  Scheduler sched({4, 64}, &kv);
  sched.add(1, tokens(9, 10));
  const ScheduledStep& st = sched.schedule();
  EXPECT_TRUE(st.batch.prompt_logprob_rows.empty());
  EXPECT_EQ(st.batch.logits_rows, std::vector<int32_t>{8});
}

// The prompt-logprob cap bounds the rows (logits buffer) per step even under a large budget.
TEST(PromptLogprobsScheduler, CapBoundsTokensPerStep) {
  KvBlockManager kv(64, 4, true);
  SchedulerConfig cfg{4, 1000};
  cfg.max_prompt_logprob_tokens = 8;
  Scheduler sched(cfg, &kv);
  sched.add(1, tokens(20, 10), 0);
  sched.add(2, tokens(20, 10));  // no prompt logprobs: not capped
  const ScheduledStep& st = sched.schedule();
  ASSERT_EQ(st.num_new.size(), 2u);
  EXPECT_EQ(st.num_new[0], 8);
  EXPECT_EQ(st.num_new[1], 20);
  EXPECT_EQ(st.batch.prompt_logprob_rows.size(), 8u);
}

// --- engine -------------------------------------------------------------------------------------

struct Events {
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint64_t, std::vector<TokenEvent>> by_id;
  int finished = 0;
  std::function<void(const TokenEvent&)> callback() {
    return [this](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu);
      by_id[e.request_id].push_back(e);
      finished += e.finish != FinishReason::kNone;
      cv.notify_all();
    };
  }
  bool wait_finished(int n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(10), [&] { return finished >= n; });
  }
  std::vector<int32_t> output(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
    std::vector<int32_t> out;
    for (const auto& e : by_id[id])
      for (const auto& t : e.tokens) out.push_back(t.id);
    return out;
  }
  // The prompt logprobs of a request; fails unless exactly one event carried them (prompts of
  // one token carry none) and it was the first event.
  std::vector<TokenLogprob> prompt_logprobs(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
    std::vector<TokenLogprob> out;
    int carriers = 0;
    const auto& evs = by_id[id];
    for (size_t i = 0; i < evs.size(); ++i)
      if (!evs[i].prompt_logprobs.empty()) {
        ++carriers;
        EXPECT_EQ(i, 0u) << "prompt logprobs must come with the request's first event";
        out = evs[i].prompt_logprobs;
      }
    EXPECT_LE(carriers, 1) << "prompt logprobs sent more than once";
    return out;
  }
};

struct Rig {
  Rig(ExecutorInfo info, EngineLimits limits) {
    auto f = std::make_unique<FakeExecutor>(std::move(info));
    fake = f.get();
    engine = Engine::create(std::move(f), limits);
  }
  uint64_t submit(std::vector<int32_t> prompt, int32_t max_tokens, uint64_t seed, int32_t prompt_logprobs) {
    EngineRequest r;
    r.prompt = std::move(prompt);
    r.max_tokens = max_tokens;
    r.sampling.seed = seed;
    r.prompt_logprobs = prompt_logprobs;
    r.on_event = ev.callback();
    auto id = engine->submit(std::move(r));
    EXPECT_TRUE(id.is_ok()) << id.message();
    return id.is_ok() ? *id : 0;
  }
  Events ev;  // outlives the engine
  FakeExecutor* fake = nullptr;
  std::unique_ptr<Engine> engine;
};

EngineLimits limits(int32_t batch, int32_t budget) {
  EngineLimits l;
  l.max_batch_size = batch;
  l.max_num_tokens = budget;
  return l;
}

TEST(PromptLogprobsEngine, ChunkedPrefillGathersRowsIntoTheFirstEvent) {
  Rig rig(fake_info(32, 4), limits(4, 5));  // a 13-token prompt goes in 3 chunks
  const std::vector<int32_t> prompt = {5, 900, 17, 17, 3, 250, 4, 8, 99, 1, 0, 640, 7};
  const uint64_t id = rig.submit(prompt, 4, 11, 3);
  ASSERT_TRUE(rig.ev.wait_finished(1));
  expect_same(rig.ev.prompt_logprobs(id), fake_prompt_reference(prompt, 3, kVocab), "chunked");
  EXPECT_EQ(rig.ev.output(id), fake_reference(prompt, 11, 4, kVocab));
  EXPECT_EQ(rig.fake->prompt_rows_total.load(), 12);
}

TEST(PromptLogprobsEngine, NoPrefixCacheHitForPromptLogprobs) {
  Rig rig(fake_info(64, 4), limits(4, 64));
  const std::vector<int32_t> prompt = tokens(14, 30);
  const uint64_t warm = rig.submit(prompt, 2, 1, -1);  // fills the prefix cache
  ASSERT_TRUE(rig.ev.wait_finished(1));
  const uint64_t scored = rig.submit(prompt, 2, 1, 1);
  ASSERT_TRUE(rig.ev.wait_finished(2));
  const uint64_t again = rig.submit(prompt, 2, 1, -1);  // the cache still serves plain requests
  ASSERT_TRUE(rig.ev.wait_finished(3));
  expect_same(rig.ev.prompt_logprobs(scored), fake_prompt_reference(prompt, 1, kVocab), "after a cached run");
  std::lock_guard<std::mutex> lock(rig.ev.mu);
  EXPECT_EQ(rig.ev.by_id[warm].back().num_cached_tokens, 0);
  EXPECT_EQ(rig.ev.by_id[scored].back().num_cached_tokens, 0);
  EXPECT_EQ(rig.ev.by_id[again].back().num_cached_tokens, 12);
  EXPECT_TRUE(rig.ev.by_id[warm].front().prompt_logprobs.empty());
  EXPECT_EQ(rig.fake->prompt_rows_total.load(), 13);
}

TEST(PromptLogprobsEngine, PreemptionByRecomputeSendsRowsOnce) {
  // A pool of 12 blocks of 4 for 8 requests of 10-20 prompt tokens generating 10-25 each:
  // requests are preempted (some mid-prompt, some after) and recompute.
  Rig rig(fake_info(12, 4), limits(8, 7));
  std::mt19937 rng(5);
  struct Sent {
    std::vector<int32_t> prompt;
    uint64_t seed;
    int32_t max_tokens, k;
  };
  std::map<uint64_t, Sent> sent;
  int32_t rows_wanted = 0;
  for (int i = 0; i < 8; ++i) {
    Sent s;
    for (int k = 0, n = 10 + int(rng() % 11); k < n; ++k) s.prompt.push_back(int32_t(rng() % kVocab));
    s.seed = 1 + rng() % 9;
    s.max_tokens = 10 + int32_t(rng() % 16);
    s.k = i % 3 == 2 ? -1 : int32_t(i % 3);
    if (s.k >= 0) rows_wanted += int32_t(s.prompt.size()) - 1;
    sent[rig.submit(s.prompt, s.max_tokens, s.seed, s.k)] = s;
  }
  ASSERT_TRUE(rig.ev.wait_finished(8));
  for (const auto& [id, s] : sent) {
    EXPECT_EQ(rig.ev.output(id), fake_reference(s.prompt, s.seed, s.max_tokens, kVocab)) << "request " << id;
    if (s.k >= 0) expect_same(rig.ev.prompt_logprobs(id), fake_prompt_reference(s.prompt, s.k, kVocab), "request " + std::to_string(id));
    else EXPECT_TRUE(rig.ev.prompt_logprobs(id).empty());
  }
  rig.engine->shutdown(true);
  EXPECT_GT(rig.engine->stats().num_preemptions, 0);
  EXPECT_EQ(rig.fake->prompt_rows_total.load(), rows_wanted);  // no row computed twice
}

TEST(PromptLogprobsEngine, MaxTokensZeroScoresThePromptOnly) {
  Rig rig(fake_info(32, 4), limits(4, 6));
  const std::vector<int32_t> prompt = tokens(11, 200);
  const uint64_t scored = rig.submit(prompt, 0, 3, 2);
  const uint64_t one_token = rig.submit({7}, 0, 3, 2);  // nothing to score
  const uint64_t plain = rig.submit(prompt, 0, 3, -1);  // prefill only, allowed too
  ASSERT_TRUE(rig.ev.wait_finished(3));
  expect_same(rig.ev.prompt_logprobs(scored), fake_prompt_reference(prompt, 2, kVocab), "max_tokens 0");
  std::lock_guard<std::mutex> lock(rig.ev.mu);
  for (uint64_t id : {scored, one_token, plain}) {
    ASSERT_EQ(rig.ev.by_id[id].size(), 1u) << id;
    EXPECT_EQ(rig.ev.by_id[id][0].finish, FinishReason::kLength);
    EXPECT_TRUE(rig.ev.by_id[id][0].tokens.empty());
  }
  EXPECT_TRUE(rig.ev.by_id[one_token][0].prompt_logprobs.empty());
  EXPECT_EQ(rig.engine->stats().generation_tokens_total, 0);
}

TEST(PromptLogprobsEngine, SubmitChecks) {
  Rig rig(fake_info(32, 4), limits(4, 64));
  EngineRequest r;
  r.prompt = {1, 2};
  r.max_tokens = -1;
  auto st = rig.engine->submit(r);
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find("max_tokens (-1)"), std::string::npos) << st.message();
  r.max_tokens = 0;
  r.min_tokens = 1;
  EXPECT_FALSE(rig.engine->submit(r).is_ok());
}

}  // namespace
}  // namespace kiln
