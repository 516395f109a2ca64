// The engine with its real thread, stepped by the fake model; events arrive through callbacks.
#include "runtime/engine.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "runtime/fake_executor.h"

namespace kiln {
namespace {

using test::FakeExecutor;
using test::fake_info;
using test::fake_reference;

std::vector<int32_t> tokens(int32_t n, int32_t start) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

struct Collector {
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint64_t, std::vector<TokenEvent>> events;
  int finished = 0;

  std::function<void(const TokenEvent&)> callback() {
    return [this](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu);
      auto& v = events[e.request_id];
      EXPECT_TRUE(v.empty() || v.back().finish == FinishReason::kNone) << "event after the final one";
      v.push_back(e);
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
    for (const auto& e : events[id])
      for (const auto& t : e.tokens) out.push_back(t.id);
    return out;
  }
  TokenEvent last(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
    return events[id].empty() ? TokenEvent{} : events[id].back();
  }
  size_t num_events(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
    return events[id].size();
  }
};

struct Rig {
  Rig(ExecutorInfo info, EngineLimits limits) {
    auto f = std::make_unique<FakeExecutor>(std::move(info));
    fake = f.get();
    engine = Engine::create(std::move(f), limits);
  }
  EngineRequest req(std::vector<int32_t> prompt, int32_t max_tokens, uint64_t seed) {
    EngineRequest r;
    r.prompt = std::move(prompt);
    r.max_tokens = max_tokens;
    r.sampling.seed = seed;
    r.on_event = c.callback();
    return r;
  }
  uint64_t submit(EngineRequest r) {
    auto id = engine->submit(std::move(r));
    EXPECT_TRUE(id.is_ok()) << id.message();
    return id.is_ok() ? *id : 0;
  }
  // Stats are published by the engine thread after events are sent: poll briefly.
  bool wait_idle() {
    for (int i = 0; i < 2000; ++i) {
      EngineStats s = engine->stats();
      if (s.num_running == 0 && s.num_waiting == 0 && s.kv_blocks_used == 0) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return false;
  }
  Collector c;  // outlives the engine (declared first, destroyed last)
  FakeExecutor* fake = nullptr;
  std::unique_ptr<Engine> engine;
};

EngineLimits limits(int32_t batch, int32_t budget, int32_t max_queue = 1024, int32_t max_seq_len = 0) {
  EngineLimits l;
  l.max_batch_size = batch;
  l.max_num_tokens = budget;
  l.max_queue = max_queue;
  l.max_seq_len = max_seq_len;
  return l;
}

TEST(Engine, SingleRequestStreamsEveryToken) {
  Rig rig(fake_info(32, 4), limits(8, 64));
  const auto prompt = tokens(7, 3);
  const uint64_t id = rig.submit(rig.req(prompt, 5, 77));
  ASSERT_TRUE(rig.c.wait_finished(1));
  EXPECT_EQ(rig.c.output(id), fake_reference(prompt, 77, 5, 1000));
  EXPECT_EQ(rig.c.num_events(id), 5u);  // one per token; the last carries the finish
  const TokenEvent last = rig.c.last(id);
  EXPECT_EQ(last.finish, FinishReason::kLength);
  EXPECT_EQ(last.tokens.size(), 1u);
  EXPECT_EQ(last.num_prompt_tokens, 7);
  ASSERT_TRUE(rig.wait_idle());
  const EngineStats s = rig.engine->stats();
  EXPECT_EQ(s.generation_tokens_total, 5);
  EXPECT_EQ(s.prompt_tokens_total, 7);
  EXPECT_EQ(s.kv_blocks_total, 32);
  // One prefill step (it samples the first token), then four decode steps; the time split between
  // the executor and the engine's own work is counted (bench throughput prints it).
  EXPECT_EQ(s.steps, 5);
  EXPECT_GT(s.execute_seconds, 0.0);
  EXPECT_GE(s.host_seconds, 0.0);
}

TEST(Engine, BatchedWithPreemptionEqualsSolo) {
  // 24 requests through a small pool and budget: chunked prefill, preemption, prefix hits; every
  // output must equal the request's solo run.
  Rig rig(fake_info(24, 4), limits(6, 16));
  std::mt19937 rng(7);
  std::map<uint64_t, std::pair<std::vector<int32_t>, std::pair<uint64_t, int32_t>>> sent;
  for (int i = 0; i < 24; ++i) {
    std::vector<int32_t> p = tokens(int32_t(rng() % 12), 1);  // some share a prefix
    for (int k = 0, n = 1 + int(rng() % 20); k < n; ++k) p.push_back(int32_t(rng() % 1000));
    const uint64_t seed = rng() % 5 + 1;  // equal seeds on purpose: batch position must not matter
    const int32_t max_tokens = 1 + int32_t(rng() % 30);
    const uint64_t id = rig.submit(rig.req(p, max_tokens, seed));
    sent[id] = {p, {seed, max_tokens}};
  }
  ASSERT_TRUE(rig.c.wait_finished(24));
  for (const auto& [id, s] : sent) {
    EXPECT_EQ(rig.c.output(id), fake_reference(s.first, s.second.first, s.second.second, 1000)) << "request " << id;
    EXPECT_EQ(rig.c.last(id).finish, FinishReason::kLength);
  }
  ASSERT_TRUE(rig.wait_idle());
  const EngineStats st = rig.engine->stats();
  EXPECT_GT(st.num_preemptions, 0);
  EXPECT_GT(st.prefix_cache_hits, 0);
  EXPECT_LE(rig.fake->max_tokens_seen.load(), 16);
  EXPECT_LE(rig.fake->max_seqs_seen.load(), 6);
}

// A prompt and seed whose unconstrained output is [a, EOS, b, ...] with a, b not EOS and b != a.
struct StopCase {
  std::vector<int32_t> prompt;
  uint64_t seed;
  std::vector<int32_t> ref;
};
StopCase find_stop_case(int32_t vocab, int32_t eos) {
  for (uint64_t seed = 1; seed < 100000; ++seed) {
    std::vector<int32_t> p = {int32_t(seed % 7), 5, 6, 7, 8};
    auto ref = fake_reference(p, seed, 8, vocab);
    if (ref[0] != eos && ref[1] == eos && ref[2] != eos && ref[2] != ref[0]) return {p, seed, ref};
  }
  ADD_FAILURE() << "no stop case found";
  return {};
}

TEST(Engine, EosStopIdsMinTokensIgnoreEos) {
  constexpr int32_t kVocab = 32, kEos = 3;
  Rig rig(fake_info(64, 4, kVocab, {kEos}), limits(8, 64));
  const StopCase sc = find_stop_case(kVocab, kEos);
  ASSERT_FALSE(sc.prompt.empty());

  // EOS ends it, and the final event carries the EOS token.
  const uint64_t a = rig.submit(rig.req(sc.prompt, 8, sc.seed));
  // ignore_eos: runs to max_tokens through the EOS.
  EngineRequest rb = rig.req(sc.prompt, 8, sc.seed);
  rb.ignore_eos = true;
  const uint64_t b = rig.submit(std::move(rb));
  // A stop id ends it (EOS ignored, so it runs past index 1).
  EngineRequest rc = rig.req(sc.prompt, 8, sc.seed);
  rc.ignore_eos = true;
  rc.stop_token_ids = {sc.ref[2]};
  const uint64_t c = rig.submit(std::move(rc));
  // min_tokens 3: EOS is banned for the first 3 tokens.
  EngineRequest rd = rig.req(sc.prompt, 8, sc.seed);
  rd.min_tokens = 3;
  const uint64_t d = rig.submit(std::move(rd));
  ASSERT_TRUE(rig.c.wait_finished(4));

  EXPECT_EQ(rig.c.output(a), std::vector<int32_t>(sc.ref.begin(), sc.ref.begin() + 2));
  EXPECT_EQ(rig.c.last(a).finish, FinishReason::kStop);
  EXPECT_EQ(rig.c.last(a).matched_stop_token, kEos);

  EXPECT_EQ(rig.c.output(b), sc.ref);
  EXPECT_EQ(rig.c.last(b).finish, FinishReason::kLength);

  EXPECT_EQ(rig.c.output(c), std::vector<int32_t>(sc.ref.begin(), sc.ref.begin() + 3));
  EXPECT_EQ(rig.c.last(c).finish, FinishReason::kStop);
  EXPECT_EQ(rig.c.last(c).matched_stop_token, sc.ref[2]);

  auto ref_d = fake_reference(sc.prompt, sc.seed, 8, kVocab, {kEos}, 3);
  std::vector<int32_t> want_d;
  for (int32_t t : ref_d) {
    want_d.push_back(t);
    if (t == kEos) break;
  }
  EXPECT_EQ(rig.c.output(d), want_d);
  EXPECT_NE(rig.c.output(d)[1], kEos);
  EXPECT_GE(rig.c.output(d).size(), 4u);
  EXPECT_EQ(rig.c.last(d).finish, want_d.back() == kEos ? FinishReason::kStop : FinishReason::kLength);
}

TEST(Engine, SubmitRefusals) {
  Rig rig(fake_info(8, 4, 100, {}, 0), limits(8, 64, 1024, 0));
  EXPECT_EQ(rig.engine->limits().max_seq_len, 32);  // the pool (8 x 4) is the limit
  auto r = rig.engine->submit(rig.req(tokens(40, 0), 1, 1));
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.message().find("can never fit"), std::string::npos) << r.message();
  r = rig.engine->submit(rig.req(tokens(10, 0), 30, 1));
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.message(), "prompt (10 tokens) + max_tokens (30) = 40 exceeds max_seq_len (32)");
  r = rig.engine->submit(rig.req({}, 1, 1));
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.message(), "prompt is empty");
  r = rig.engine->submit(rig.req({1, 2, 5000}, 1, 1));
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.message().find("5000"), std::string::npos) << r.message();
  r = rig.engine->submit(rig.req({1, -1}, 1, 1));
  EXPECT_FALSE(r.is_ok());
  r = rig.engine->submit(rig.req({1}, -1, 1));  // 0 is allowed: prefill only (prompt logprobs)
  EXPECT_FALSE(r.is_ok());

  Rig model_limit(fake_info(64, 4, 100, {}, 100), limits(8, 64, 1024, 50));
  EXPECT_EQ(model_limit.engine->limits().max_seq_len, 50);
  r = model_limit.engine->submit(model_limit.req(tokens(10, 0), 41, 1));
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.message().find("max_seq_len (50)"), std::string::npos) << r.message();
  EXPECT_TRUE(model_limit.engine->submit(model_limit.req(tokens(10, 0), 40, 1)).is_ok());
  EXPECT_TRUE(model_limit.c.wait_finished(1));
}

TEST(Engine, QueueFull) {
  // One request runs (held inside the model by the gate), two wait, the fourth is refused.
  Rig rig(fake_info(32, 4), limits(1, 64, 2));
  rig.fake->close_gate();
  rig.submit(rig.req(tokens(4, 1), 3, 1));
  ASSERT_TRUE(rig.fake->wait_entered(1));
  rig.submit(rig.req(tokens(4, 1), 3, 2));
  rig.submit(rig.req(tokens(4, 1), 3, 3));
  auto r = rig.engine->submit(rig.req(tokens(4, 1), 3, 4));
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.message().rfind("queue full", 0), 0u) << r.message();
  EXPECT_EQ(rig.engine->stats().num_waiting, 2);
  rig.fake->open_gate();
  ASSERT_TRUE(rig.c.wait_finished(3));
  ASSERT_TRUE(rig.wait_idle());
  EXPECT_TRUE(rig.engine->submit(rig.req(tokens(4, 1), 3, 4)).is_ok());
  EXPECT_TRUE(rig.c.wait_finished(4));
}

TEST(Engine, CancelWaitingAndRunning) {
  Rig rig(fake_info(32, 4), limits(1, 64));
  rig.fake->close_gate();
  const uint64_t a = rig.submit(rig.req(tokens(6, 1), 20, 1));
  ASSERT_TRUE(rig.fake->wait_entered(1));  // a is inside its first step
  const uint64_t b = rig.submit(rig.req(tokens(6, 1), 20, 2));  // waits (batch size 1)
  rig.engine->cancel(b);
  rig.engine->cancel(a);
  rig.engine->cancel(a);       // idempotent
  rig.engine->cancel(123456);  // unknown: no-op
  rig.fake->open_gate();
  ASSERT_TRUE(rig.c.wait_finished(2));
  // a finished its step in flight (one token), then was cancelled at the step boundary.
  EXPECT_EQ(rig.c.num_events(a), 2u);
  EXPECT_EQ(rig.c.output(a).size(), 1u);
  EXPECT_EQ(rig.c.last(a).finish, FinishReason::kCancelled);
  EXPECT_EQ(rig.c.num_events(b), 1u);
  EXPECT_EQ(rig.c.last(b).finish, FinishReason::kCancelled);
  EXPECT_TRUE(rig.c.last(b).tokens.empty());
  ASSERT_TRUE(rig.wait_idle());
  EXPECT_EQ(rig.engine->stats().kv_blocks_used, 0);
  // Cancelling a finished request sends nothing.
  rig.engine->cancel(a);
  const uint64_t c = rig.submit(rig.req(tokens(3, 1), 2, 3));
  ASSERT_TRUE(rig.c.wait_finished(3));
  EXPECT_EQ(rig.c.num_events(a), 2u);
  EXPECT_EQ(rig.c.last(c).finish, FinishReason::kLength);
}

TEST(Engine, ExecutorErrorFailsTheStepAndKeepsServing) {
  Rig rig(fake_info(32, 4), limits(8, 64));
  rig.fake->fail_at_step = 2;
  const auto prompt = tokens(5, 1);
  const uint64_t a = rig.submit(rig.req(prompt, 5, 1));
  ASSERT_TRUE(rig.c.wait_finished(1));
  EXPECT_EQ(rig.c.output(a).size(), 1u);  // step 1 sampled, step 2 failed
  const TokenEvent last = rig.c.last(a);
  EXPECT_EQ(last.finish, FinishReason::kError);
  EXPECT_NE(last.error.find("injected executor failure"), std::string::npos) << last.error;
  ASSERT_TRUE(rig.wait_idle());
  // The same prompt again: the failed step's KV was not cached, the output is right.
  const uint64_t b = rig.submit(rig.req(prompt, 5, 1));
  ASSERT_TRUE(rig.c.wait_finished(2));
  EXPECT_EQ(rig.c.output(b), fake_reference(prompt, 1, 5, 1000));
}

TEST(Engine, PrefixCacheReportedInEventsAndStats) {
  Rig rig(fake_info(32, 4), limits(8, 64));
  auto p1 = tokens(12, 1), p2 = tokens(12, 1);
  p1.push_back(500);
  p2.push_back(600);
  rig.submit(rig.req(p1, 2, 1));
  ASSERT_TRUE(rig.c.wait_finished(1));
  const uint64_t b = rig.submit(rig.req(p2, 2, 1));
  ASSERT_TRUE(rig.c.wait_finished(2));
  EXPECT_EQ(rig.c.last(b).num_cached_tokens, 12);
  EXPECT_EQ(rig.c.output(b), fake_reference(p2, 1, 2, 1000));
  ASSERT_TRUE(rig.wait_idle());
  const EngineStats s = rig.engine->stats();
  EXPECT_EQ(s.prefix_cache_queries, 26);
  EXPECT_EQ(s.prefix_cache_hits, 12);
}

TEST(Engine, ShutdownDrainFinishesEverything) {
  Rig rig(fake_info(32, 4), limits(2, 8));
  std::vector<uint64_t> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(rig.submit(rig.req(tokens(5, i), 6, uint64_t(i + 1))));
  rig.engine->shutdown(true);
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ(rig.c.last(ids[i]).finish, FinishReason::kLength);
    EXPECT_EQ(rig.c.output(ids[i]), fake_reference(tokens(5, int32_t(i)), i + 1, 6, 1000));
  }
  auto r = rig.engine->submit(rig.req(tokens(3, 1), 1, 1));
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.message(), "server is shutting down");
  rig.engine->shutdown(true);  // twice is fine
}

TEST(Engine, ShutdownWithoutDrainCancels) {
  Rig rig(fake_info(200, 4), limits(1, 64));
  rig.fake->close_gate();
  std::vector<uint64_t> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(rig.submit(rig.req(tokens(5, 1), 500, uint64_t(i + 1))));
  ASSERT_TRUE(rig.fake->wait_entered(1));
  std::thread stopper([&] { rig.engine->shutdown(false); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let shutdown raise its flags
  rig.fake->open_gate();
  stopper.join();
  for (uint64_t id : ids) EXPECT_EQ(rig.c.last(id).finish, FinishReason::kCancelled) << id;
}

TEST(Engine, RandomClientsWithCancels) {
  // Four client threads submit and sometimes cancel; every request ends exactly once, the ones
  // not cancelled match their solo run, and the pool is whole at the end.
  Rig rig(fake_info(20, 4, 1000), limits(5, 12, 4096));
  rig.fake->step_delay_us = 20;
  std::mutex mu;
  std::map<uint64_t, std::pair<std::vector<int32_t>, std::pair<uint64_t, int32_t>>> sent;
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&, t] {
      std::mt19937 rng(uint32_t(100 + t));
      for (int i = 0; i < 40; ++i) {
        std::vector<int32_t> p = tokens(int32_t(rng() % 9), 1);
        for (int k = 0, n = 1 + int(rng() % 12); k < n; ++k) p.push_back(int32_t(rng() % 1000));
        const uint64_t seed = 1 + rng() % 1000;
        const int32_t max_tokens = 1 + int32_t(rng() % 25);
        auto id = rig.engine->submit(rig.req(p, max_tokens, seed));
        ASSERT_TRUE(id.is_ok()) << id.message();
        {
          std::lock_guard<std::mutex> lock(mu);
          sent[*id] = {p, {seed, max_tokens}};
        }
        if (rng() % 4 == 0) {
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
          rig.engine->cancel(*id);
        }
      }
    });
  }
  for (auto& c : clients) c.join();
  ASSERT_TRUE(rig.c.wait_finished(160));
  int cancelled = 0;
  for (const auto& [id, s] : sent) {
    const TokenEvent last = rig.c.last(id);
    const auto out = rig.c.output(id);
    const auto ref = fake_reference(s.first, s.second.first, s.second.second, 1000);
    if (last.finish == FinishReason::kCancelled) {
      ++cancelled;
      EXPECT_EQ(out, std::vector<int32_t>(ref.begin(), ref.begin() + ptrdiff_t(out.size()))) << id;
    } else {
      EXPECT_EQ(last.finish, FinishReason::kLength);
      EXPECT_EQ(out, ref) << id;
    }
  }
  EXPECT_GT(cancelled, 0);
  ASSERT_TRUE(rig.wait_idle());
  EXPECT_EQ(rig.engine->stats().kv_blocks_used, 0);
}

// --- prompt logprobs (EngineRequest::prompt_logprobs: `echo` + `logprobs`) ---------------------
// Every prompt row is computed (no prefix-cache hit), rows of a chunked prefill are gathered into
// the first event, and a recompute after preemption sends nothing twice. The fake's row value
// depends on the whole prefix's KV, so a row computed at the wrong position or over a wrong
// prefix differs from fake_prompt_reference.

using test::fake_prompt_reference;

EngineRequest scored_req(Rig& rig, std::vector<int32_t> prompt, int32_t max_tokens, uint64_t seed, int32_t k) {
  EngineRequest r = rig.req(std::move(prompt), max_tokens, seed);
  r.prompt_logprobs = k;
  return r;
}

// A request's prompt logprobs; fails unless at most one event carried them, the first.
std::vector<TokenLogprob> prompt_logprobs_of(Collector& c, uint64_t id) {
  std::lock_guard<std::mutex> lock(c.mu);
  std::vector<TokenLogprob> out;
  int carriers = 0;
  const auto& evs = c.events[id];
  for (size_t i = 0; i < evs.size(); ++i)
    if (!evs[i].prompt_logprobs.empty()) {
      ++carriers;
      EXPECT_EQ(i, 0u) << "prompt logprobs must come with the request's first event";
      out = evs[i].prompt_logprobs;
    }
  EXPECT_LE(carriers, 1) << "prompt logprobs sent more than once";
  return out;
}

void expect_same(const std::vector<TokenLogprob>& got, const std::vector<TokenLogprob>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].id, want[i].id) << what << " row " << i;
    EXPECT_EQ(got[i].logprob, want[i].logprob) << what << " row " << i;
    EXPECT_EQ(got[i].top, want[i].top) << what << " row " << i;
  }
}

TEST(EnginePromptLogprobs, ChunkedPrefillGathersRowsIntoTheFirstEvent) {
  Rig rig(fake_info(32, 4), limits(4, 5));  // a 13-token prompt goes in 3 chunks
  const std::vector<int32_t> prompt = {5, 900, 17, 17, 3, 250, 4, 8, 99, 1, 0, 640, 7};
  const uint64_t id = rig.submit(scored_req(rig, prompt, 4, 11, 3));
  ASSERT_TRUE(rig.c.wait_finished(1));
  expect_same(prompt_logprobs_of(rig.c, id), fake_prompt_reference(prompt, 3, 1000), "chunked");
  EXPECT_EQ(rig.c.output(id), fake_reference(prompt, 11, 4, 1000));
  EXPECT_EQ(rig.fake->prompt_rows_total.load(), 12);
}

TEST(EnginePromptLogprobs, NoPrefixCacheHit) {
  Rig rig(fake_info(64, 4), limits(4, 64));
  const std::vector<int32_t> prompt = tokens(14, 30);
  const uint64_t warm = rig.submit(rig.req(prompt, 2, 1));  // fills the prefix cache
  ASSERT_TRUE(rig.c.wait_finished(1));
  const uint64_t scored = rig.submit(scored_req(rig, prompt, 2, 1, 1));
  ASSERT_TRUE(rig.c.wait_finished(2));
  const uint64_t again = rig.submit(rig.req(prompt, 2, 1));  // the cache still serves plain requests
  ASSERT_TRUE(rig.c.wait_finished(3));
  expect_same(prompt_logprobs_of(rig.c, scored), fake_prompt_reference(prompt, 1, 1000), "after a cached run");
  EXPECT_TRUE(prompt_logprobs_of(rig.c, warm).empty());
  EXPECT_EQ(rig.c.last(warm).num_cached_tokens, 0);
  EXPECT_EQ(rig.c.last(scored).num_cached_tokens, 0);
  EXPECT_EQ(rig.c.last(again).num_cached_tokens, 12);
  EXPECT_EQ(rig.fake->prompt_rows_total.load(), 13);
}

TEST(EnginePromptLogprobs, PreemptionByRecomputeSendsRowsOnce) {
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
    for (int k = 0, n = 10 + int(rng() % 11); k < n; ++k) s.prompt.push_back(int32_t(rng() % 1000));
    s.seed = 1 + rng() % 9;
    s.max_tokens = 10 + int32_t(rng() % 16);
    s.k = i % 3 == 2 ? -1 : int32_t(i % 3);
    if (s.k >= 0) rows_wanted += int32_t(s.prompt.size()) - 1;
    sent[rig.submit(scored_req(rig, s.prompt, s.max_tokens, s.seed, s.k))] = s;
  }
  ASSERT_TRUE(rig.c.wait_finished(8));
  for (const auto& [id, s] : sent) {
    EXPECT_EQ(rig.c.output(id), fake_reference(s.prompt, s.seed, s.max_tokens, 1000)) << "request " << id;
    if (s.k >= 0)
      expect_same(prompt_logprobs_of(rig.c, id), fake_prompt_reference(s.prompt, s.k, 1000), "request " + std::to_string(id));
    else
      EXPECT_TRUE(prompt_logprobs_of(rig.c, id).empty());
  }
  rig.engine->shutdown(true);
  EXPECT_GT(rig.engine->stats().num_preemptions, 0);
  EXPECT_EQ(rig.fake->prompt_rows_total.load(), rows_wanted);  // no row computed twice
}

TEST(EnginePromptLogprobs, MaxTokensZeroScoresThePromptOnly) {
  Rig rig(fake_info(32, 4), limits(4, 6));
  const std::vector<int32_t> prompt = tokens(11, 200);
  const uint64_t scored = rig.submit(scored_req(rig, prompt, 0, 3, 2));
  const uint64_t one_token = rig.submit(scored_req(rig, {7}, 0, 3, 2));  // nothing to score
  const uint64_t plain = rig.submit(rig.req(prompt, 0, 3));              // prefill only, allowed too
  ASSERT_TRUE(rig.c.wait_finished(3));
  expect_same(prompt_logprobs_of(rig.c, scored), fake_prompt_reference(prompt, 2, 1000), "max_tokens 0");
  for (uint64_t id : {scored, one_token, plain}) {
    ASSERT_EQ(rig.c.num_events(id), 1u) << id;
    EXPECT_EQ(rig.c.last(id).finish, FinishReason::kLength);
    EXPECT_TRUE(rig.c.last(id).tokens.empty());
  }
  EXPECT_TRUE(rig.c.last(one_token).prompt_logprobs.empty());
  ASSERT_TRUE(rig.wait_idle());
  EXPECT_EQ(rig.engine->stats().generation_tokens_total, 0);
}

}  // namespace
}  // namespace kiln
