// The engine thread: drains the submit/cancel queue, plans a step with the scheduler, runs it
// through the executor, appends sampled tokens, finishes requests and emits events. Sleeps on a
// condition variable when there is nothing to do (no spinning).
#include "runtime/engine.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "core/log.h"
#include "runtime/kv_manager.h"
#include "runtime/scheduler.h"

namespace kiln {

namespace {

struct Submitted {
  uint64_t id;
  EngineRequest req;
};

// What the engine keeps per live request beside the scheduler's tokens.
struct Live {
  EngineRequest req;
  std::vector<int32_t> min_tokens_banned;  // EOS (unless ignore_eos) + stop ids, while output < min_tokens
  std::vector<TokenLogprob> prompt_logprobs;  // gathered over the prompt's chunks until sent
};

class EngineImpl final : public Engine {
 public:
  EngineImpl(std::unique_ptr<ModelExecutor> executor, EngineLimits limits)
      : executor_(std::move(executor)), info_(executor_->info()), limits_(limits) {
    const int64_t pool_tokens = int64_t(info_.num_kv_blocks) * info_.block_size;
    int64_t max_len = pool_tokens;
    if (info_.max_seq_len > 0) max_len = std::min<int64_t>(max_len, info_.max_seq_len);
    if (limits_.max_seq_len > 0) {
      if (limits_.max_seq_len > max_len)
        log_warn("engine: max_seq_len " + std::to_string(limits_.max_seq_len) + " lowered to " +
                 std::to_string(max_len) + " (model limit / KV cache of " + std::to_string(pool_tokens) + " tokens)");
      max_len = std::min<int64_t>(max_len, limits_.max_seq_len);
    }
    limits_.max_seq_len = int32_t(max_len);
    limits_.max_batch_size = std::max(1, limits_.max_batch_size);
    limits_.max_num_tokens = std::max(1, limits_.max_num_tokens);
    limits_.max_queue = std::max(1, limits_.max_queue);
    kv_ = std::make_unique<KvBlockManager>(info_.num_kv_blocks, info_.block_size, limits_.enable_prefix_caching);
    sched_ = std::make_unique<Scheduler>(SchedulerConfig{limits_.max_batch_size, limits_.max_num_tokens}, kv_.get());
    published_.kv_blocks_total = info_.num_kv_blocks;
    thread_ = std::thread([this] { loop(); });
  }

  ~EngineImpl() override { shutdown(false); }

  Result<uint64_t> submit(EngineRequest request) override {
    const int32_t n = int32_t(request.prompt.size());
    if (n == 0) return Status::error("prompt is empty");
    for (int32_t i = 0; i < n; ++i) {
      const int32_t t = request.prompt[size_t(i)];
      if (t < 0 || t >= info_.vocab_size)
        return Status::error("prompt token id " + std::to_string(t) + " at position " + std::to_string(i) +
                             " is outside the vocabulary [0, " + std::to_string(info_.vocab_size) + ")");
    }
    if (request.max_tokens < 0)
      return Status::error("max_tokens (" + std::to_string(request.max_tokens) + ") must not be negative");
    if (request.prompt_logprobs > info_.vocab_size)
      return Status::error("prompt_logprobs (" + std::to_string(request.prompt_logprobs) +
                           ") exceeds the vocabulary (" + std::to_string(info_.vocab_size) + ")");
    if (request.min_tokens < 0 || request.min_tokens > request.max_tokens)
      return Status::error("min_tokens (" + std::to_string(request.min_tokens) + ") must be in [0, max_tokens (" +
                           std::to_string(request.max_tokens) + ")]");
    const int64_t pool_tokens = int64_t(info_.num_kv_blocks) * info_.block_size;
    if (n > pool_tokens)
      return Status::error("prompt (" + std::to_string(n) + " tokens) can never fit in the KV cache (" +
                           std::to_string(info_.num_kv_blocks) + " blocks of " + std::to_string(info_.block_size) +
                           " tokens = " + std::to_string(pool_tokens) + " tokens)");
    if (int64_t(n) + request.max_tokens > limits_.max_seq_len)
      return Status::error("prompt (" + std::to_string(n) + " tokens) + max_tokens (" +
                           std::to_string(request.max_tokens) + ") = " + std::to_string(int64_t(n) + request.max_tokens) +
                           " exceeds max_seq_len (" + std::to_string(limits_.max_seq_len) + ")");
    std::lock_guard<std::mutex> lock(mu_);
    if (!accepting_) return Status::error("server is shutting down");
    const int64_t waiting = published_.num_waiting;  // includes submits not yet drained
    if (waiting >= limits_.max_queue)
      return Status::error("queue full (" + std::to_string(waiting) + " requests waiting, max_queue " +
                           std::to_string(limits_.max_queue) + ")");
    const uint64_t id = next_id_++;
    submits_.push_back(Submitted{id, std::move(request)});
    ++published_.num_waiting;  // counted at once so back-to-back submits see the queue fill
    cv_.notify_one();
    return id;
  }

  void cancel(uint64_t request_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    cancels_.push_back(request_id);
    cv_.notify_one();
  }

  EngineStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return published_;
  }
  const ExecutorInfo& info() const override { return info_; }
  const EngineLimits& limits() const override { return limits_; }

  void shutdown(bool drain) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      accepting_ = false;
      stopping_ = true;
      if (!drain) cancel_all_ = true;
      cv_.notify_one();
    }
    std::lock_guard<std::mutex> join_lock(join_mu_);
    if (thread_.joinable()) thread_.join();
  }

 private:
  void loop();
  void take_queued(std::vector<Submitted>* subs, std::vector<uint64_t>* cancels, bool* cancel_all, bool* stopping);
  void finish(uint64_t id, FinishReason reason, std::vector<SampledToken> tokens, int32_t matched = -1,
              std::string error = {}, std::vector<TokenLogprob> prompt_logprobs = {});
  void run_step(const ScheduledStep& step);
  void publish_stats();

  std::unique_ptr<ModelExecutor> executor_;
  const ExecutorInfo info_;
  EngineLimits limits_;
  std::unique_ptr<KvBlockManager> kv_;
  std::unique_ptr<Scheduler> sched_;

  // Engine-thread state.
  std::unordered_map<uint64_t, Live> live_;
  std::vector<SeqSampling> sampling_;
  std::vector<SampledToken> sampled_;
  std::vector<TokenLogprob> prompt_lps_;
  int64_t prompt_tokens_total_ = 0;
  int64_t generation_tokens_total_ = 0;
  int64_t steps_ = 0;
  double execute_seconds_ = 0, host_seconds_ = 0;

  // Shared with callers, under mu_.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Submitted> submits_;
  std::vector<uint64_t> cancels_;
  bool accepting_ = true, stopping_ = false, cancel_all_ = false;
  uint64_t next_id_ = 1;
  EngineStats published_;

  std::mutex join_mu_;
  std::thread thread_;
};

void EngineImpl::take_queued(std::vector<Submitted>* subs, std::vector<uint64_t>* cancels, bool* cancel_all,
                             bool* stopping) {
  std::unique_lock<std::mutex> lock(mu_);
  // Sleep only when there is nothing to run and nothing queued.
  cv_.wait(lock, [&] { return !submits_.empty() || !cancels_.empty() || stopping_ || sched_->has_work(); });
  subs->swap(submits_);
  cancels->swap(cancels_);
  *cancel_all = cancel_all_;
  *stopping = stopping_;
}

void EngineImpl::finish(uint64_t id, FinishReason reason, std::vector<SampledToken> tokens, int32_t matched,
                        std::string error, std::vector<TokenLogprob> prompt_logprobs) {
  auto it = live_.find(id);
  if (it == live_.end()) return;
  const SchedRequest* r = sched_->find(id);
  TokenEvent ev;
  ev.request_id = id;
  ev.tokens = std::move(tokens);
  ev.finish = reason;
  ev.matched_stop_token = matched;
  ev.num_prompt_tokens = int32_t(it->second.req.prompt.size());
  ev.num_cached_tokens = r ? std::max(0, r->num_cached_tokens) : 0;
  ev.error = std::move(error);
  ev.prompt_logprobs = std::move(prompt_logprobs);
  auto on_event = std::move(it->second.req.on_event);
  sched_->remove(id);
  live_.erase(it);
  if (on_event) on_event(ev);
}

void EngineImpl::run_step(const ScheduledStep& step) {
  sampling_.clear();
  for (int32_t s : step.sample_seqs) {
    const uint64_t id = step.seq_ids[size_t(s)];
    const SchedRequest* r = sched_->find(id);
    const Live& l = live_.at(id);
    SeqSampling ss;
    ss.params = &l.req.sampling;
    ss.prompt_ids = r->tokens.data();
    ss.num_prompt = r->num_prompt;
    ss.output_ids = r->tokens.data() + r->num_prompt;
    ss.num_output = r->num_output();
    if (r->num_output() < l.req.min_tokens && !l.min_tokens_banned.empty()) ss.banned_ids = &l.min_tokens_banned;
    sampling_.push_back(ss);
  }
  sampled_.clear();
  const auto t0 = std::chrono::steady_clock::now();
  Status st = step.batch.prompt_logprob_rows.empty()
                  ? executor_->execute(step.batch, sampling_, &sampled_)
                  : executor_->execute_with_prompt_logprobs(step.batch, sampling_, &sampled_, &prompt_lps_);
  ++steps_;
  execute_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (st.is_ok() && !step.batch.prompt_logprob_rows.empty() &&
      prompt_lps_.size() != step.batch.prompt_logprob_rows.size())
    st = Status::error("executor returned " + std::to_string(prompt_lps_.size()) + " prompt logprobs for " +
                       std::to_string(step.batch.prompt_logprob_rows.size()) + " rows");
  if (st.is_ok() && sampled_.size() != sampling_.size())
    st = Status::error("executor returned " + std::to_string(sampled_.size()) + " tokens for " +
                       std::to_string(sampling_.size()) + " sampling sequences");
  if (!st.is_ok()) {
    // The KV written by a failed pass is not trusted: nothing is committed to the prefix cache.
    log_error("engine: step failed: " + st.message());
    const std::vector<uint64_t> ids = step.seq_ids;
    for (uint64_t id : ids) finish(id, FinishReason::kError, {}, -1, st.message());
    return;
  }
  sched_->commit_step();
  for (size_t j = 0; j < step.prompt_logprob_seqs.size(); ++j) {
    auto it = live_.find(step.seq_ids[size_t(step.prompt_logprob_seqs[j])]);
    if (it != live_.end()) it->second.prompt_logprobs.push_back(std::move(prompt_lps_[j]));
  }
  for (size_t k = 0; k < step.sample_seqs.size(); ++k) {
    const uint64_t id = step.seq_ids[size_t(step.sample_seqs[k])];
    auto it = live_.find(id);
    if (it == live_.end()) continue;
    Live& l = it->second;
    // A request samples once its prompt is computed: its gathered prompt logprobs go out now.
    std::vector<TokenLogprob> prompt_lps;
    if (l.req.prompt_logprobs >= 0) prompt_lps.swap(l.prompt_logprobs);
    if (l.req.max_tokens == 0) {  // prefill only: the sampled token is not part of the result
      finish(id, FinishReason::kLength, {}, -1, {}, std::move(prompt_lps));
      continue;
    }
    SampledToken tok = std::move(sampled_[k]);
    const int32_t t = tok.id;
    sched_->append_token(id, t);
    ++generation_tokens_total_;
    const SchedRequest* r = sched_->find(id);
    int32_t matched = -1;
    if (!l.req.ignore_eos && std::find(info_.eos_ids.begin(), info_.eos_ids.end(), t) != info_.eos_ids.end())
      matched = t;
    if (std::find(l.req.stop_token_ids.begin(), l.req.stop_token_ids.end(), t) != l.req.stop_token_ids.end())
      matched = t;
    std::vector<SampledToken> toks;
    toks.push_back(std::move(tok));
    if (matched >= 0 && r->num_output() >= l.req.min_tokens) {
      finish(id, FinishReason::kStop, std::move(toks), matched, {}, std::move(prompt_lps));
    } else if (r->num_output() >= l.req.max_tokens || r->num_tokens() >= limits_.max_seq_len) {
      finish(id, FinishReason::kLength, std::move(toks), -1, {}, std::move(prompt_lps));
    } else {
      TokenEvent ev;
      ev.request_id = id;
      ev.tokens = std::move(toks);
      ev.prompt_logprobs = std::move(prompt_lps);
      ev.num_prompt_tokens = r->num_prompt;
      ev.num_cached_tokens = std::max(0, r->num_cached_tokens);
      if (l.req.on_event) l.req.on_event(ev);
    }
  }
}

void EngineImpl::publish_stats() {
  const SchedulerStats& ss = sched_->stats();
  std::lock_guard<std::mutex> lock(mu_);
  published_.num_running = sched_->num_running();
  published_.num_waiting = sched_->num_waiting() + int32_t(submits_.size());
  published_.kv_blocks_total = kv_->num_blocks();
  published_.kv_blocks_used = kv_->num_used_blocks();
  published_.prefix_cache_queries = ss.prefix_cache_queries;
  published_.prefix_cache_hits = ss.prefix_cache_hits;
  published_.num_preemptions = ss.num_preemptions;
  published_.prompt_tokens_total = prompt_tokens_total_;
  published_.generation_tokens_total = generation_tokens_total_;
  published_.steps = steps_;
  published_.execute_seconds = execute_seconds_;
  published_.host_seconds = host_seconds_;
}

void EngineImpl::loop() {
  std::vector<Submitted> subs;
  std::vector<uint64_t> cancels;
  for (;;) {
    bool cancel_all = false, stopping = false;
    subs.clear();
    cancels.clear();
    take_queued(&subs, &cancels, &cancel_all, &stopping);
    for (Submitted& s : subs) {
      Live l;
      l.req = std::move(s.req);
      if (l.req.min_tokens > 0) {
        if (!l.req.ignore_eos) l.min_tokens_banned = info_.eos_ids;
        l.min_tokens_banned.insert(l.min_tokens_banned.end(), l.req.stop_token_ids.begin(),
                                   l.req.stop_token_ids.end());
      }
      prompt_tokens_total_ += int64_t(l.req.prompt.size());
      sched_->add(s.id, l.req.prompt, l.req.prompt_logprobs);
      live_.emplace(s.id, std::move(l));
    }
    // Cancels apply at this step boundary; unknown or finished ids are ignored.
    for (uint64_t id : cancels) finish(id, FinishReason::kCancelled, {});
    if (cancel_all) {
      std::vector<uint64_t> ids;
      for (const auto& [id, l] : live_) ids.push_back(id);
      std::sort(ids.begin(), ids.end());
      for (uint64_t id : ids) finish(id, FinishReason::kCancelled, {});
    }
    if (sched_->has_work()) {
      const auto t0 = std::chrono::steady_clock::now();
      const double exec0 = execute_seconds_;
      const ScheduledStep& step = sched_->schedule();
      for (uint64_t id : step.unschedulable) finish(id, FinishReason::kError, {}, -1, "request cannot fit in the KV cache");
      publish_stats();  // admitted requests leave the queue now, not after the forward pass
      if (!step.empty()) run_step(step);
      host_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() -
                       (execute_seconds_ - exec0);
    } else {
      // Idle: a cheap moment to verify the block accounting (STYLE.md #6).
      const Status st = kv_->check_integrity();
      KILN_CHECK_MSG(st.is_ok() && kv_->num_used_blocks() == 0, st.message());
    }
    publish_stats();
    if (stopping && !sched_->has_work()) {
      std::lock_guard<std::mutex> lock(mu_);
      if (submits_.empty()) break;  // accepting_ is false: nothing new can arrive
    }
  }
}

}  // namespace

std::unique_ptr<Engine> Engine::create(std::unique_ptr<ModelExecutor> executor, EngineLimits limits) {
  return std::make_unique<EngineImpl>(std::move(executor), limits);
}

}  // namespace kiln
