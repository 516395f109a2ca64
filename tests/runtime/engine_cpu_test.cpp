// The engine over the real CPU executor with a tiny random model: a request's tokens must not depend
// on what it was batched with, on chunked prefill, on prefix-cache hits or on preemption.
#include <gtest/gtest.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <random>

#include "backend/cpu/cpu_executor.h"
#include "runtime/engine.h"
#include "common/tiny_config.h"

namespace kiln {
namespace {

using kiln::testing::tiny_config;

struct Run {
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint64_t, std::vector<int32_t>> out;
  std::map<uint64_t, FinishReason> finish;
};

struct Req {
  std::vector<int32_t> prompt;
  uint64_t seed;
  int32_t max_tokens;
  float temperature;
};

// Runs `reqs` through one engine; returns each request's tokens in submission order.
std::vector<std::vector<int32_t>> run_engine(std::shared_ptr<const Model> model, const std::vector<Req>& reqs,
                                             int32_t kv_blocks, EngineLimits limits) {
  LoadOptions opts;
  opts.block_size = 4;
  opts.kv_cache_blocks = kv_blocks;
  auto engine = Engine::create(make_cpu_executor(model, opts), limits);
  Run run;
  std::vector<uint64_t> ids;
  for (const Req& r : reqs) {
    EngineRequest e;
    e.prompt = r.prompt;
    e.max_tokens = r.max_tokens;
    e.ignore_eos = true;
    e.sampling.seed = r.seed;
    e.sampling.temperature = r.temperature;
    e.on_event = [&run](const TokenEvent& ev) {
      std::lock_guard<std::mutex> lock(run.mu);
      for (const auto& t : ev.tokens) run.out[ev.request_id].push_back(t.id);
      if (ev.finish != FinishReason::kNone) run.finish[ev.request_id] = ev.finish;
      run.cv.notify_all();
    };
    auto id = engine->submit(std::move(e));
    EXPECT_TRUE(id.is_ok()) << id.message();
    ids.push_back(id.is_ok() ? *id : 0);
  }
  {
    std::unique_lock<std::mutex> lock(run.mu);
    EXPECT_TRUE(run.cv.wait_for(lock, std::chrono::seconds(30), [&] { return run.finish.size() == reqs.size(); }));
  }
  const EngineStats st = engine->stats();
  engine->shutdown(true);
  std::vector<std::vector<int32_t>> outs;
  for (uint64_t id : ids) {
    EXPECT_EQ(run.finish[id], FinishReason::kLength);
    outs.push_back(run.out[id]);
  }
  if (kv_blocks < 40) {
    EXPECT_GT(st.num_preemptions, 0);
  }
  return outs;
}

TEST(EngineCpu, BatchedChunkedPreemptedEqualsSolo) {
  auto model = make_dummy_model(tiny_config(), WeightFormat::kF32, 11);
  std::mt19937 rng(3);
  std::vector<Req> reqs;
  const std::vector<int32_t> shared = {5, 9, 14, 20, 33, 41, 50, 61};
  for (int i = 0; i < 10; ++i) {
    Req r;
    if (i % 2) r.prompt = shared;
    for (int k = 0, n = 2 + int(rng() % 12); k < n; ++k) r.prompt.push_back(3 + int32_t(rng() % 90));
    r.seed = 1 + i % 3;
    r.max_tokens = 4 + int32_t(rng() % 16);
    r.temperature = i % 4 == 0 ? 0.0f : 0.9f;
    reqs.push_back(r);
  }
  EngineLimits roomy;
  roomy.max_batch_size = 1;
  roomy.max_num_tokens = 256;
  roomy.enable_prefix_caching = false;
  std::vector<std::vector<int32_t>> solo;
  for (const Req& r : reqs) solo.push_back(run_engine(model, {r}, 64, roomy)[0]);

  EngineLimits tight;
  tight.max_batch_size = 6;
  tight.max_num_tokens = 7;  // prompts go in chunks
  const auto batched = run_engine(model, reqs, 16, tight);
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(batched[i], solo[i]) << "request " << i;
}

}  // namespace
}  // namespace kiln
