// A fake model for runtime tests. Its "KV cache" is real paged memory: at each position it stores the
// token and a hash chained over the whole prefix, read back from the previous position's slot
// through the block table. The next token is a function of that hash, so like a real model the
// output depends on every earlier token's KV: a wrong block table, a bad prefix-cache hit or a block
// reused while still needed changes the output, and the chain check below catches it at once.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "model/executor.h"

namespace kiln::test {

inline uint64_t fake_mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// KV "value" at position pos: chained over all earlier positions.
inline uint64_t fake_kv(uint64_t prev, int32_t token, int32_t pos) {
  return fake_mix(prev ^ (uint64_t(uint32_t(token)) * 0x100000001b3ull) ^ (uint64_t(pos) << 40));
}
constexpr uint64_t kFakeKvRoot = 0x1234567;
inline int32_t fake_next_token(uint64_t last_kv, uint64_t seed, int32_t num_output, int32_t vocab,
                               const std::vector<int32_t>* banned) {
  int32_t t = int32_t(fake_mix(last_kv ^ fake_mix(seed) ^ (uint64_t(num_output) << 20)) % uint64_t(vocab));
  if (banned && int32_t(banned->size()) < vocab) {
    while (std::find(banned->begin(), banned->end(), t) != banned->end()) t = (t + 1) % vocab;
  }
  return t;
}

// The fake's prompt logprob for the row at a position whose KV value is `kv`, scoring `target`:
// a function of the whole prefix, like a real model's.
inline TokenLogprob fake_prompt_logprob(uint64_t kv, int32_t target, int32_t top_k, int32_t vocab) {
  TokenLogprob t;
  t.id = target;
  t.logprob = -float(fake_mix(kv ^ (uint64_t(uint32_t(target)) << 7)) % 10000) / 1000.0f;
  for (int32_t i = 0; i < top_k; ++i) t.top.emplace_back(int32_t(fake_mix(kv + uint64_t(i)) % uint64_t(vocab)), -0.5f * float(i));
  return t;
}

// The prompt logprobs of `prompt` computed alone with no KV cache: entry p scores prompt[p + 1].
inline std::vector<TokenLogprob> fake_prompt_reference(const std::vector<int32_t>& prompt, int32_t top_k,
                                                       int32_t vocab) {
  std::vector<TokenLogprob> out;
  uint64_t h = kFakeKvRoot;
  for (size_t p = 0; p + 1 < prompt.size(); ++p) {
    h = fake_kv(h, prompt[p], int32_t(p));
    out.push_back(fake_prompt_logprob(h, prompt[p + 1], top_k, vocab));
  }
  return out;
}

// What the fake model generates for a request run alone with no KV cache at all: the ground truth
// every scheduled/batched/preempted run must reproduce. Tokens at output index < min_tokens avoid
// `banned`.
inline std::vector<int32_t> fake_reference(const std::vector<int32_t>& prompt, uint64_t seed, int32_t n,
                                           int32_t vocab, const std::vector<int32_t>& banned = {},
                                           int32_t min_tokens = 0) {
  uint64_t h = kFakeKvRoot;
  int32_t pos = 0;
  for (int32_t t : prompt) h = fake_kv(h, t, pos++);
  std::vector<int32_t> out;
  for (int32_t k = 0; k < n; ++k) {
    const int32_t t = fake_next_token(h, seed, k, vocab, k < min_tokens && !banned.empty() ? &banned : nullptr);
    out.push_back(t);
    h = fake_kv(h, t, pos++);
  }
  return out;
}

class FakeExecutor : public ModelExecutor {
 public:
  explicit FakeExecutor(ExecutorInfo info) : info_(std::move(info)) {
    const size_t slots = size_t(info_.num_kv_blocks) * size_t(info_.block_size);
    kv_hash_.assign(slots, 0);
    kv_token_.assign(slots, -1);
    kv_pos_.assign(slots, -1);
  }
  const ExecutorInfo& info() const override { return info_; }

  Status execute(const StepBatch& b, const std::vector<SeqSampling>& sampling,
                 std::vector<SampledToken>* out) override {
    {  // test gate: lets engine tests hold a step open
      std::unique_lock<std::mutex> lock(gate_mu_);
      ++entered_;
      gate_cv_.notify_all();
      gate_cv_.wait(lock, [&] { return gate_open_; });
    }
    if (step_delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(step_delay_us.load()));
    const int32_t step = ++steps_;
    if (step == fail_at_step.load()) return Status::error("injected executor failure at step " + std::to_string(step));
    Status st = check_and_run(b, sampling, out);
    if (!st.is_ok()) ADD_FAILURE() << "fake executor, step " << step << ": " << st.message();
    max_tokens_seen = std::max(max_tokens_seen.load(), b.num_tokens());
    max_seqs_seen = std::max(max_seqs_seen.load(), b.num_seqs());
    return st;
  }

  // Prompt logprob rows: each must be a row of a sequence in this step; its value comes from the
  // KV chain at that row's position, so a row computed over a wrong prefix gives a wrong value.
  Status execute_with_prompt_logprobs(const StepBatch& b, const std::vector<SeqSampling>& sampling,
                                      std::vector<SampledToken>* out, std::vector<TokenLogprob>* prompt_out) override {
    Status st = execute(b, sampling, out);
    prompt_out->clear();
    if (!st.is_ok()) return st;
    const size_t first = size_t(b.num_sampled_rows());
    for (size_t j = 0; j < b.prompt_logprob_rows.size(); ++j) {
      const int32_t row = b.logits_rows[first + j];
      int32_t s = 0;
      while (s < b.num_seqs() && b.query_start[size_t(s) + 1] <= row) ++s;
      if (row < 0 || s >= b.num_seqs()) {
        ADD_FAILURE() << "prompt logprob row " << row << " outside the batch";
        return Status::error("bad prompt logprob row");
      }
      const uint64_t h = kv_hash_[slot(b.block_table(s), b.positions[size_t(row)])];
      const StepBatch::PromptLogprobRow& p = b.prompt_logprob_rows[j];
      prompt_out->push_back(fake_prompt_logprob(h, p.target_id, p.top_k, info_.vocab_size));
    }
    prompt_rows_total += int32_t(b.prompt_logprob_rows.size());
    return st;
  }

  void close_gate() {
    std::lock_guard<std::mutex> lock(gate_mu_);
    gate_open_ = false;
  }
  void open_gate() {
    std::lock_guard<std::mutex> lock(gate_mu_);
    gate_open_ = true;
    gate_cv_.notify_all();
  }
  // Waits until execute() has been entered n times in total.
  bool wait_entered(int n) {
    std::unique_lock<std::mutex> lock(gate_mu_);
    return gate_cv_.wait_for(lock, std::chrono::seconds(5), [&] { return entered_ >= n; });
  }

  std::atomic<int32_t> fail_at_step{-1};
  std::atomic<int32_t> step_delay_us{0};  // a slower model, so racing clients can cancel mid-run
  std::atomic<int32_t> steps_{0};
  std::atomic<int32_t> max_tokens_seen{0};
  std::atomic<int32_t> max_seqs_seen{0};
  std::atomic<int32_t> prompt_rows_total{0};  // prompt logprob rows computed, over all steps

 private:
  size_t slot(const int32_t* table, int32_t pos) const {
    return size_t(table[pos / info_.block_size]) * size_t(info_.block_size) + size_t(pos % info_.block_size);
  }

  Status check_and_run(const StepBatch& b, const std::vector<SeqSampling>& sampling, std::vector<SampledToken>* out) {
    auto fail = [](const std::string& m) { return Status::error(m); };
    const int32_t bs = info_.block_size;
    const int32_t ns = b.num_seqs();
    if (int32_t(b.query_start.size()) != ns + 1 || b.query_start[0] != 0 || b.query_start[size_t(ns)] != b.num_tokens())
      return fail("query_start malformed");
    if (b.positions.size() != b.token_ids.size()) return fail("positions size");
    if (b.block_tables.size() != size_t(ns) * size_t(b.max_blocks_per_seq)) return fail("block_tables size");
    if (size_t(b.num_sampled_rows()) != sampling.size()) return fail("sampled logits rows and sampling differ in size");
    // Blocks written this step must belong to exactly one sequence.
    std::vector<int32_t> writer(size_t(info_.num_kv_blocks), -1);
    for (int32_t s = 0; s < ns; ++s) {
      const int32_t q0 = b.query_start[size_t(s)], q1 = b.query_start[size_t(s) + 1];
      const int32_t ctx = b.context_lens[size_t(s)];
      if (q1 <= q0) return fail("seq " + std::to_string(s) + " has no tokens");
      if (ctx > b.max_blocks_per_seq * bs) return fail("context longer than the block table");
      const int32_t* table = b.block_table(s);
      const int32_t nb = (ctx + bs - 1) / bs;
      for (int32_t i = 0; i < nb; ++i) {
        if (table[i] < 0 || table[i] >= info_.num_kv_blocks) return fail("bad block id " + std::to_string(table[i]));
        for (int32_t j = 0; j < i; ++j)
          if (table[j] == table[i]) return fail("block repeated in one table");
      }
      for (int32_t r = q0; r < q1; ++r) {
        if (b.positions[size_t(r)] != ctx - (q1 - r)) return fail("positions not contiguous up to context_len");
        const int32_t blk = table[b.positions[size_t(r)] / bs];
        if (writer[size_t(blk)] >= 0 && writer[size_t(blk)] != s) return fail("two sequences write one block");
        writer[size_t(blk)] = s;
      }
    }
    for (int32_t s = 0; s < ns; ++s) {
      const int32_t* table = b.block_table(s);
      for (int32_t i = 0; i * bs < b.context_lens[size_t(s)]; ++i) {
        const int32_t w = writer[size_t(table[i])];
        if (w >= 0 && w != s) return fail("block " + std::to_string(table[i]) + " is written by another sequence");
      }
    }
    // Write: each new position's value chains from the previous slot, read through the table.
    for (int32_t s = 0; s < ns; ++s) {
      const int32_t* table = b.block_table(s);
      for (int32_t r = b.query_start[size_t(s)]; r < b.query_start[size_t(s) + 1]; ++r) {
        const int32_t pos = b.positions[size_t(r)];
        uint64_t prev = kFakeKvRoot;
        if (pos > 0) {
          const size_t ps = slot(table, pos - 1);
          if (kv_pos_[ps] != pos - 1) return fail("position " + std::to_string(pos - 1) + " missing from the KV cache");
          prev = kv_hash_[ps];
        }
        const size_t ws = slot(table, pos);
        kv_hash_[ws] = fake_kv(prev, b.token_ids[size_t(r)], pos);
        kv_token_[ws] = b.token_ids[size_t(r)];
        kv_pos_[ws] = pos;
      }
      // The whole history must still be one consistent chain (nobody overwrote a block we use).
      uint64_t h = kFakeKvRoot;
      for (int32_t pos = 0; pos < b.context_lens[size_t(s)]; ++pos) {
        const size_t ps = slot(table, pos);
        h = fake_kv(h, kv_token_[ps], pos);
        if (kv_pos_[ps] != pos || kv_hash_[ps] != h)
          return fail("seq " + std::to_string(s) + " KV history corrupt at position " + std::to_string(pos));
      }
    }
    // Sample.
    out->clear();
    for (size_t k = 0; k < sampling.size(); ++k) {
      const int32_t row = b.logits_rows[k];
      int32_t s = -1;
      for (int32_t i = 0; i < ns; ++i)
        if (b.query_start[size_t(i) + 1] - 1 == row) s = i;
      if (s < 0) return fail("logits row " + std::to_string(row) + " is not the last row of a sequence");
      const SeqSampling& ss = sampling[k];
      if (!ss.params) return fail("sampling params missing");
      const int32_t last = ss.num_output > 0 ? ss.output_ids[ss.num_output - 1] : ss.prompt_ids[ss.num_prompt - 1];
      if (last != b.token_ids[size_t(row)]) return fail("sampling ids do not end with the step's last token");
      if (ss.num_prompt + ss.num_output != b.context_lens[size_t(s)]) return fail("sampling lengths != context_len");
      const uint64_t h = kv_hash_[slot(b.block_table(s), b.context_lens[size_t(s)] - 1)];
      SampledToken t;
      t.id = fake_next_token(h, ss.params->seed, ss.num_output, info_.vocab_size, ss.banned_ids);
      out->push_back(t);
    }
    return Status::ok();
  }

  ExecutorInfo info_;
  std::vector<uint64_t> kv_hash_;  // [num_blocks, block_size]
  std::vector<int32_t> kv_token_;  // [num_blocks, block_size]
  std::vector<int32_t> kv_pos_;    // [num_blocks, block_size] position written there, -1 never
  std::mutex gate_mu_;
  std::condition_variable gate_cv_;
  bool gate_open_ = true;
  int entered_ = 0;
};

inline ExecutorInfo fake_info(int32_t num_blocks, int32_t block_size, int32_t vocab = 1000,
                              std::vector<int32_t> eos = {}, int32_t max_seq_len = 0) {
  ExecutorInfo i;
  i.vocab_size = vocab;
  i.block_size = block_size;
  i.num_kv_blocks = num_blocks;
  i.max_seq_len = max_seq_len;
  i.eos_ids = std::move(eos);
  i.device = "fake";
  return i;
}

}  // namespace kiln::test
