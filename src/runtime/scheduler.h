// Continuous batching under a token budget (STYLE.md #5): every request has num_computed and
// num_tokens (prompt + output so far); each step hands out at most max_num_tokens tokens, first to
// running requests (a decode token, or the next chunk of a prompt), then to waiting requests in
// arrival order while the budget, max_batch_size and free KV blocks allow. Whole prompts, chunks
// of prompts, prefix-cache hits and decodes are the same arithmetic. When a running request cannot
// get a block, the latest-arrived running request is preempted by recompute: its blocks are freed
// and it waits again with num_computed = 0, its output so far becoming part of what it recomputes.
//
// Plain CPU code, no executor inside: the caller runs the planned StepBatch through a model, then
// calls commit_step() and append_token(). Single-threaded (the engine thread owns it).
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "model/step_batch.h"
#include "runtime/kv_manager.h"

namespace kiln {

struct SchedulerConfig {
  int32_t max_batch_size = 64;   // sequences per step
  int32_t max_num_tokens = 2048; // tokens per step
  // Per step, tokens of a request that still owes prompt logprobs: each is a logits row
  // ([rows, vocab] f32), so this bounds that buffer (256 x 128k vocab = 128 MiB).
  int32_t max_prompt_logprob_tokens = 256;
};

struct SchedRequest {
  uint64_t id = 0;
  uint64_t arrival = 0;          // FCFS order; lower is older and has priority
  std::vector<int32_t> tokens;   // prompt + output so far
  int32_t num_prompt = 0;
  int32_t num_computed = 0;      // tokens whose KV is written
  int32_t num_cached_tokens = -1;  // prefix-cache hit at first admission; -1: not admitted yet
  // Prompt logprobs: -1 none; k >= 0: a logits row (top k) for every prompt position but the last.
  int32_t prompt_logprobs = -1;
  // Next prompt position whose row is still owed. Advanced by commit_step, never rewound: a
  // recompute after preemption does not send rows again.
  int32_t prompt_logprobs_next = 0;
  bool running = false;
  bool owes_prompt_logprobs() const { return prompt_logprobs >= 0 && prompt_logprobs_next < num_prompt - 1; }
  int32_t num_tokens() const { return int32_t(tokens.size()); }
  int32_t num_output() const { return num_tokens() - num_prompt; }
  std::span<const int32_t> prompt() const { return {tokens.data(), size_t(num_prompt)}; }
  std::span<const int32_t> output() const { return {tokens.data() + num_prompt, size_t(num_output())}; }
};

// One planned step. batch sequence s is request seq_ids[s]; logits row r (batch.logits_rows[r])
// belongs to batch sequence sample_seqs[r].
struct ScheduledStep {
  StepBatch batch;
  std::vector<uint64_t> seq_ids;       // [num_seqs]
  std::vector<int32_t> num_new;        // [num_seqs] tokens each sequence computes this step
  std::vector<int32_t> sample_seqs;    // [num_sampled_rows] batch sequence index
  // [batch.prompt_logprob_rows.size()] batch sequence index of each prompt logprob row; a
  // sequence's rows are consecutive and in position order.
  std::vector<int32_t> prompt_logprob_seqs;
  std::vector<uint64_t> preempted;     // requests preempted while planning this step
  // A waiting request that cannot be admitted even with every other request gone (the pool
  // cannot hold it): removed from the scheduler; the caller fails it. Submit-time checks make
  // this unreachable; it exists so a bad limit is an error, not a hang.
  std::vector<uint64_t> unschedulable;
  bool empty() const { return seq_ids.empty(); }
};

struct SchedulerStats {
  int64_t prefix_cache_queries = 0;  // tokens looked up at admission
  int64_t prefix_cache_hits = 0;     // of those, served from the cache
  int64_t num_preemptions = 0;
};

class Scheduler {
 public:
  Scheduler(SchedulerConfig config, KvBlockManager* kv);

  // Queues a request (arrival order = call order). The id must be new. prompt_logprobs >= 0 asks
  // for prompt logprobs (with the top k): the request takes no prefix-cache hit over positions
  // whose rows are owed, and those rows go out once each (ScheduledStep::prompt_logprob_seqs).
  void add(uint64_t id, std::vector<int32_t> prompt, int32_t prompt_logprobs = -1);
  // Drops a waiting or running request and frees its blocks. Returns false for an unknown id.
  bool remove(uint64_t id);
  const SchedRequest* find(uint64_t id) const;

  // Plans the next step into a buffer owned by the scheduler (reused, valid until the next call).
  const ScheduledStep& schedule();
  // After the step's forward pass succeeded: advances num_computed of every scheduled sequence
  // still present and registers their newly full blocks with the prefix cache. On a failed pass,
  // don't call it: the written KV is not trusted.
  void commit_step();
  // Appends a sampled token (after commit_step) to a request that sampled this step.
  void append_token(uint64_t id, int32_t token);

  int32_t num_waiting() const { return int32_t(waiting_.size()); }
  int32_t num_running() const { return int32_t(running_.size()); }
  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  const SchedulerStats& stats() const { return stats_; }
  const KvBlockManager& kv() const { return *kv_; }
  std::vector<uint64_t> waiting_ids() const;
  std::vector<uint64_t> running_ids() const;

 private:
  void preempt(SchedRequest* r);
  void insert_waiting(SchedRequest* r);
  void insert_running(SchedRequest* r);
  void fill_batch();

  SchedulerConfig config_;
  KvBlockManager* kv_;
  uint64_t next_arrival_ = 0;
  std::unordered_map<uint64_t, std::unique_ptr<SchedRequest>> requests_;
  std::deque<SchedRequest*> waiting_;  // sorted by arrival
  std::vector<SchedRequest*> running_; // sorted by arrival
  std::vector<SchedRequest*> scheduled_;  // [num_seqs] of the last planned step
  std::vector<int32_t> prompt_rows_;      // token rows of the step's prompt logprob rows
  ScheduledStep step_;
  SchedulerStats stats_;
};

}  // namespace kiln
