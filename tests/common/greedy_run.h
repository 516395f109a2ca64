// One sequence through a CPU executor, as the golden tests replay it: the whole prompt in the
// first step (logits for every prompt row, or only the last), then one greedy token per step.
// Shared by tests/model (golden vs transformers) and tests/convert (golden through convert).
#pragma once
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "backend/cpu/cpu_executor.h"

namespace kiln::testing {

struct GreedyRun {
  std::vector<float> logits;  // [rows, vocab] of the first step
  std::vector<int32_t> greedy;
};

inline GreedyRun run_greedy(std::shared_ptr<const Model> model, const std::vector<int32_t>& prompt, int n_new,
                            bool all_prompt_rows = true) {
  LoadOptions opts;
  opts.kv_cache_blocks = int32_t((prompt.size() + size_t(n_new) + 15) / 16);
  auto ex = make_cpu_executor(model, opts);
  const int32_t V = model->config.vocab_size;
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  GreedyRun r;
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
    for (int32_t i = step == 0 && all_prompt_rows ? 0 : n - 1; i < n; ++i) {
      b.logits_rows.push_back(i);
      SeqSampling s;
      s.params = &greedy;
      ss.push_back(s);
    }
    Status st = ex->execute(b, ss, &out);
    EXPECT_TRUE(st.is_ok()) << st.message();
    if (step == 0) r.logits.assign(ex->last_logits(), ex->last_logits() + ss.size() * size_t(V));
    computed = int32_t(all.size());
    r.greedy.push_back(out.back().id);
    all.push_back(out.back().id);
  }
  return r;
}

}  // namespace kiln::testing
