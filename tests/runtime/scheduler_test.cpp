// Scheduler + KV manager stepped with the fake model, no engine thread. Each step: plan, check the
// plan against the limits and the KV manager, run the fake, commit, append, finish, check integrity.
// Timelines: one line per step, "id:n" = request id computes n tokens, "*" = it samples.
#include "runtime/scheduler.h"

#include <gtest/gtest.h>

#include <map>
#include <numeric>
#include <random>
#include <set>
#include <sstream>

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

struct Sim {
  Sim(int32_t num_blocks, int32_t block_size, SchedulerConfig cfg, bool prefix_caching = true)
      : fake(fake_info(num_blocks, block_size)), kv(num_blocks, block_size, prefix_caching), sched(cfg, &kv), cfg(cfg) {}

  void add(uint64_t id, std::vector<int32_t> prompt, int32_t max_tokens, uint64_t seed = 0) {
    Want w;
    w.prompt = prompt;
    w.max_tokens = max_tokens;
    w.params.seed = seed ? seed : id * 7919;
    want[id] = w;
    live.insert(id);
    sched.add(id, std::move(prompt));
  }
  void remove(uint64_t id) {
    EXPECT_TRUE(sched.remove(id));
    live.erase(id);
  }

  // One step; returns false when there was nothing to run.
  bool step() {
    const ScheduledStep& st = sched.schedule();
    for (uint64_t id : st.unschedulable) ADD_FAILURE() << "unschedulable " << id;
    if (st.empty()) return false;
    const StepBatch& b = st.batch;
    EXPECT_LE(b.num_tokens(), cfg.max_num_tokens);
    EXPECT_LE(b.num_seqs(), cfg.max_batch_size);
    std::ostringstream line;
    std::vector<SeqSampling> sampling;
    for (int32_t s = 0; s < b.num_seqs(); ++s) {
      const uint64_t id = st.seq_ids[size_t(s)];
      // The table handed to the model is exactly what the manager says the request owns.
      auto owned = kv.blocks(id);
      const int32_t nb = kv.blocks_for(b.context_lens[size_t(s)]);
      EXPECT_EQ(int32_t(owned.size()), nb);
      for (int32_t i = 0; i < nb; ++i) EXPECT_EQ(b.block_table(s)[i], owned[size_t(i)]);
      const bool samples = std::find(st.sample_seqs.begin(), st.sample_seqs.end(), s) != st.sample_seqs.end();
      line << (s ? " " : "") << id << ":" << st.num_new[size_t(s)] << (samples ? "*" : "");
    }
    for (int32_t s : st.sample_seqs) {
      const SchedRequest* r = sched.find(st.seq_ids[size_t(s)]);
      SeqSampling ss;
      ss.params = &want[r->id].params;
      ss.prompt_ids = r->tokens.data();
      ss.num_prompt = r->num_prompt;
      ss.output_ids = r->tokens.data() + r->num_prompt;
      ss.num_output = r->num_output();
      sampling.push_back(ss);
    }
    std::vector<SampledToken> out;
    EXPECT_TRUE(fake.execute(b, sampling, &out).is_ok());
    timeline.push_back(line.str());
    preempted_total += int32_t(st.preempted.size());
    const std::vector<uint64_t> ids = st.seq_ids;
    const std::vector<int32_t> samplers = st.sample_seqs;
    sched.commit_step();
    for (size_t k = 0; k < samplers.size(); ++k) {
      const uint64_t id = ids[size_t(samplers[k])];
      sched.append_token(id, out[k].id);
      const SchedRequest* r = sched.find(id);
      if (r->num_output() >= want[id].max_tokens) {
        done[id] = std::vector<int32_t>(r->output().begin(), r->output().end());
        cached_at_admission[id] = r->num_cached_tokens;
        EXPECT_TRUE(sched.remove(id));
        live.erase(id);
      }
    }
    Status ist = kv.check_integrity();
    EXPECT_TRUE(ist.is_ok()) << ist.message();
    return true;
  }
  void run(int max_steps = 10000) {
    for (int i = 0; i < max_steps && sched.has_work(); ++i) {
      if (!step()) {
        ADD_FAILURE() << "scheduler has work but planned an empty step";
        return;
      }
    }
    EXPECT_FALSE(sched.has_work());
  }
  void expect_matches_reference() {
    for (const auto& [id, out] : done) {
      EXPECT_EQ(out, fake_reference(want[id].prompt, want[id].params.seed, want[id].max_tokens, 1000))
          << "request " << id;
    }
  }

  struct Want {
    std::vector<int32_t> prompt;
    int32_t max_tokens = 0;
    SamplingParams params;
  };
  FakeExecutor fake;
  KvBlockManager kv;
  Scheduler sched;
  SchedulerConfig cfg;
  std::map<uint64_t, Want> want;
  std::set<uint64_t> live;
  std::map<uint64_t, std::vector<int32_t>> done;
  std::map<uint64_t, int32_t> cached_at_admission;
  std::vector<std::string> timeline;
  int32_t preempted_total = 0;
};

TEST(Scheduler, SingleRequestToCompletion) {
  Sim sim(16, 4, {8, 100});
  sim.add(1, tokens(6, 10), 3);
  sim.run();
  // step 1: the whole prompt, then samples; steps 2-3: one decode token each.
  EXPECT_EQ(sim.timeline, (std::vector<std::string>{"1:6*", "1:1*", "1:1*"}));
  ASSERT_EQ(sim.done.count(1), 1u);
  sim.expect_matches_reference();
  EXPECT_EQ(sim.kv.num_used_blocks(), 0);
}

TEST(Scheduler, ChunkedPrefillUnderBudgetAndBatchLimit) {
  // Budget 4 tokens, at most 2 sequences. Prompts 10, 3, 5; max_tokens 2.
  //   step 1: 1 takes the whole budget (chunk 0..3)
  //   step 2: 1 chunk 4..7
  //   step 3: 1 finishes its prompt (2) and samples; 2 starts (2 of 3)
  //   step 4: 1 decodes; 2 finishes its prompt; 3 may not start (2 running)  -> 1 done
  //   step 5: 2 decodes; 3 starts with the 3 tokens left in the budget       -> 2 done
  //   step 6: 3 finishes its prompt; step 7: 3 decodes                       -> 3 done
  Sim sim(64, 4, {2, 4});
  sim.add(1, tokens(10, 100), 2);
  sim.add(2, tokens(3, 200), 2);
  sim.add(3, tokens(5, 300), 2);
  sim.run();
  EXPECT_EQ(sim.timeline, (std::vector<std::string>{"1:4", "1:4", "1:2* 2:2", "1:1* 2:1*", "2:1* 3:3", "3:2*",
                                                    "3:1*"}));
  EXPECT_EQ(sim.done.size(), 3u);
  sim.expect_matches_reference();
  EXPECT_LE(sim.fake.max_tokens_seen.load(), 4);
  EXPECT_LE(sim.fake.max_seqs_seen.load(), 2);
}

TEST(Scheduler, PrefixCacheHitComputesOnlyTheRest) {
  // block_size 4. Request 1: 12 shared tokens + 2 of its own. Request 2: the same 12 + 3 others.
  //   step 1: 1:14*   (blocks 0-2 full -> cached)      -> 1 done, blocks free but findable
  //   step 2: 2:3*    (12 tokens served from the cache)
  Sim sim(16, 4, {8, 100});
  auto shared = tokens(12, 1);
  auto p1 = shared, p2 = shared;
  p1.insert(p1.end(), {50, 51});
  p2.insert(p2.end(), {60, 61, 62});
  sim.add(1, p1, 1);
  sim.run();
  sim.add(2, p2, 2);
  sim.run();
  EXPECT_EQ(sim.timeline, (std::vector<std::string>{"1:14*", "2:3*", "2:1*"}));
  EXPECT_EQ(sim.cached_at_admission[1], 0);
  EXPECT_EQ(sim.cached_at_admission[2], 12);
  EXPECT_EQ(sim.sched.stats().prefix_cache_queries, 14 + 15);
  EXPECT_EQ(sim.sched.stats().prefix_cache_hits, 12);
  sim.expect_matches_reference();  // the reused KV really is request 1's prefix

  // A prompt that is exactly 2 cached blocks long reuses only 1: its last token is computed.
  sim.add(3, tokens(8, 1), 1);
  sim.run();
  EXPECT_EQ(sim.timeline.back(), "3:4*");
  EXPECT_EQ(sim.cached_at_admission[3], 4);
  sim.expect_matches_reference();
}

TEST(Scheduler, SamePrefixAtOnceBothCompute) {
  // Both miss (nothing cached yet) and compute the prefix in the same step; both stay correct.
  Sim sim(16, 4, {8, 100});
  sim.add(1, tokens(9, 1), 3);
  sim.add(2, tokens(9, 1), 3, 1234);
  sim.run();
  EXPECT_EQ(sim.timeline.front(), "1:9* 2:9*");
  sim.expect_matches_reference();
}

TEST(Scheduler, CachedBlocksEvictedUnderPressure) {
  // 8 blocks of 4. Request 1 (16 tokens) leaves 4 cached blocks. Request 2 (28 tokens, 7 blocks)
  // needs 4 fresh + 3 evicted: request 1's tail goes first, its head block survives.
  Sim sim(8, 4, {8, 100});
  sim.add(1, tokens(16, 1), 1);
  sim.run();
  EXPECT_EQ(sim.kv.num_cached_free_blocks(), 4);
  sim.add(2, tokens(28, 500), 1);
  sim.run();
  EXPECT_EQ(sim.kv.num_cached_free_blocks(), 8);  // 1's head + all 7 of 2's
  sim.add(3, tokens(16, 1), 1);
  sim.run();
  EXPECT_EQ(sim.cached_at_admission[3], 4);
  sim.expect_matches_reference();
}

TEST(Scheduler, PreemptionByRecomputeGivesIdenticalOutputs) {
  // 6 blocks of 4 (24 tokens) for two requests that each grow to 8 + 12 = 20 tokens (5 blocks).
  //   step 1: 1:8* 2:8*        4 blocks used
  //   step 2: 1:1* 2:1*        position 8: each takes its 3rd block (6 used)
  //   steps 3-5: decode positions 9-11
  //   step 6: 1 needs a 4th block for position 12: none free -> preempt 2 (newest); 1 decodes alone
  //            (2's 3 full blocks go to the free list, still cached; 1 reuses the tail one)
  //   steps 7-12: 1 decodes alone, takes a 5th block at position 16 (evicting 2's second block),
  //            and finishes with 12 tokens
  //   step 13: 2:9*  re-admitted with 8 + 5 tokens: block 0 from the cache, 9 recomputed
  //   steps 14-19: 2 decodes to 12 outputs
  Sim constrained(6, 4, {8, 100});
  Sim roomy(64, 4, {8, 100});
  for (Sim* s : {&constrained, &roomy}) {
    s->add(1, tokens(8, 1), 12);
    s->add(2, tokens(8, 40), 12);
    s->run();
  }
  EXPECT_EQ(constrained.preempted_total, 1);
  EXPECT_EQ(constrained.sched.stats().num_preemptions, constrained.preempted_total);
  EXPECT_EQ(roomy.preempted_total, 0);
  std::vector<std::string> expect = {"1:8* 2:8*"};
  for (int i = 0; i < 4; ++i) expect.push_back("1:1* 2:1*");
  for (int i = 0; i < 7; ++i) expect.push_back("1:1*");
  expect.push_back("2:9*");
  for (int i = 0; i < 6; ++i) expect.push_back("2:1*");
  EXPECT_EQ(constrained.timeline, expect);
  EXPECT_EQ(constrained.done, roomy.done);
  constrained.expect_matches_reference();
  EXPECT_EQ(constrained.kv.num_used_blocks(), 0);
}

TEST(Scheduler, RemoveWaitingAndRunningFreesEverything) {
  Sim sim(8, 4, {1, 100});
  sim.add(1, tokens(10, 1), 50);
  sim.add(2, tokens(5, 1), 5);  // waits: batch size 1
  ASSERT_TRUE(sim.step());
  EXPECT_EQ(sim.sched.num_running(), 1);
  EXPECT_EQ(sim.sched.num_waiting(), 1);
  EXPECT_GT(sim.kv.num_used_blocks(), 0);
  sim.remove(2);
  sim.remove(1);
  EXPECT_FALSE(sim.sched.remove(1));  // unknown now
  EXPECT_FALSE(sim.sched.has_work());
  EXPECT_EQ(sim.kv.num_free_blocks(), 8);
  Status st = sim.kv.check_integrity();
  EXPECT_TRUE(st.is_ok()) << st.message();
}

TEST(Scheduler, RandomStress) {
  // Tiny pool, small budget, random arrivals, lengths and removals; integrity every step, and
  // every request that finishes matches its solo run.
  std::mt19937 rng(42);
  for (int round = 0; round < 4; ++round) {
    const bool caching = round % 2 == 0;
    Sim sim(12 + round * 4, 4, {int32_t(2 + round), int32_t(6 + 4 * round)}, caching);
    uint64_t next_id = 1;
    std::vector<std::vector<int32_t>> prefixes = {tokens(8, 1), tokens(5, 700), tokens(12, 300)};
    for (int it = 0; it < 600; ++it) {
      if (rng() % 3 == 0 && sim.live.size() < 12) {
        std::vector<int32_t> p;
        if (rng() % 2) p = prefixes[rng() % prefixes.size()];
        const int extra = 1 + int(rng() % 10);
        for (int k = 0; k < extra; ++k) p.push_back(int32_t(rng() % 1000));
        sim.add(next_id++, p, 1 + int32_t(rng() % 20));  // <= 42 tokens: fits the pool alone
      }
      if (rng() % 17 == 0 && !sim.live.empty()) {
        auto w = sim.live.begin();
        std::advance(w, rng() % sim.live.size());
        sim.remove(*w);
      }
      sim.step();
    }
    sim.run();
    EXPECT_GT(sim.done.size(), 20u);
    sim.expect_matches_reference();
    EXPECT_EQ(sim.kv.num_used_blocks(), 0);
    if (round == 0) {
      EXPECT_GT(sim.preempted_total, 0);
    }
  }
}

// Prompt logprobs (EngineRequest::prompt_logprobs): where the rows go in a step.
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

}  // namespace
}  // namespace kiln
