#include "runtime/scheduler.h"

#include <algorithm>

namespace kiln {

Scheduler::Scheduler(SchedulerConfig config, KvBlockManager* kv) : config_(config), kv_(kv) {
  KILN_CHECK(config_.max_batch_size > 0 && config_.max_num_tokens > 0 && kv_ != nullptr);
  step_.batch.clear();
}

void Scheduler::add(uint64_t id, std::vector<int32_t> prompt, int32_t prompt_logprobs) {
  KILN_CHECK_MSG(!prompt.empty(), "empty prompt");
  auto r = std::make_unique<SchedRequest>();
  r->id = id;
  r->arrival = next_arrival_++;
  r->num_prompt = int32_t(prompt.size());
  r->prompt_logprobs = prompt_logprobs;
  r->tokens = std::move(prompt);
  SchedRequest* p = r.get();
  KILN_CHECK_MSG(requests_.emplace(id, std::move(r)).second, "duplicate request id");
  waiting_.push_back(p);
}

const SchedRequest* Scheduler::find(uint64_t id) const {
  auto it = requests_.find(id);
  return it == requests_.end() ? nullptr : it->second.get();
}

bool Scheduler::remove(uint64_t id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return false;
  SchedRequest* r = it->second.get();
  if (r->running) {
    running_.erase(std::find(running_.begin(), running_.end(), r));
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), r));
  }
  for (auto& s : scheduled_) {
    if (s == r) s = nullptr;  // removed between schedule() and commit_step() (an error path)
  }
  kv_->free(id);
  requests_.erase(it);
  return true;
}

void Scheduler::insert_waiting(SchedRequest* r) {
  auto pos = std::upper_bound(waiting_.begin(), waiting_.end(), r,
                              [](const SchedRequest* a, const SchedRequest* b) { return a->arrival < b->arrival; });
  waiting_.insert(pos, r);
}

void Scheduler::insert_running(SchedRequest* r) {
  auto pos = std::upper_bound(running_.begin(), running_.end(), r,
                              [](const SchedRequest* a, const SchedRequest* b) { return a->arrival < b->arrival; });
  running_.insert(pos, r);
}

void Scheduler::preempt(SchedRequest* r) {
  kv_->free(r->id);
  r->num_computed = 0;
  r->running = false;
  insert_waiting(r);
  ++stats_.num_preemptions;
  step_.preempted.push_back(r->id);
}

const ScheduledStep& Scheduler::schedule() {
  step_.seq_ids.clear();
  step_.num_new.clear();
  step_.sample_seqs.clear();
  step_.prompt_logprob_seqs.clear();
  step_.preempted.clear();
  step_.unschedulable.clear();
  scheduled_.clear();
  int32_t budget = config_.max_num_tokens;

  // 1. Running requests, oldest first. A request that cannot get its blocks preempts the newest
  // running request (possibly itself); the newest is always at the back and, as we walk from the
  // front, never already scheduled in this step.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    SchedRequest* r = running_[i];
    int32_t n = std::min(r->num_tokens() - r->num_computed, budget);
    if (r->owes_prompt_logprobs()) n = std::min(n, config_.max_prompt_logprob_tokens);
    if (n <= 0) {  // nothing to compute (cannot happen between steps; kept for safety)
      ++i;
      continue;
    }
    bool self_preempted = false;
    while (!kv_->can_allocate(r->id, r->num_computed + n)) {
      SchedRequest* victim = running_.back();
      running_.pop_back();
      preempt(victim);
      if (victim == r) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;
    KILN_CHECK(kv_->allocate(r->id, r->num_computed + n).has_value());
    scheduled_.push_back(r);
    step_.num_new.push_back(n);
    budget -= n;
    ++i;
  }

  // 2. Waiting requests in arrival order; none while this step had to preempt (blocks are short).
  // Admission stops at the first request that does not fit: no overtaking (FCFS).
  if (step_.preempted.empty()) {
    while (!waiting_.empty() && budget > 0 && int32_t(running_.size()) < config_.max_batch_size) {
      SchedRequest* r = waiting_.front();
      PrefixHit hit = kv_->find_cached_prefix(r->tokens);
      int32_t n = 0;
      if (r->owes_prompt_logprobs()) {
        // Owed rows need their logits, so the hit stops at the first owed position (no hit at
        // all before the first pass; after a preemption, the rows already sent may be cached).
        const size_t keep = size_t(r->prompt_logprobs_next / kv_->block_size());
        if (hit.blocks.size() > keep) {
          hit.blocks.resize(keep);
          hit.num_tokens = int32_t(keep) * kv_->block_size();
        }
        n = std::min({r->num_tokens() - hit.num_tokens, budget, config_.max_prompt_logprob_tokens});
      } else {
        n = std::min(r->num_tokens() - hit.num_tokens, budget);
      }
      if (!kv_->can_allocate(r->id, hit.num_tokens + n, &hit)) {
        if (running_.empty() && scheduled_.empty() && kv_->num_used_blocks() == 0) {
          // Even an empty pool cannot hold this request's first chunk: fail it rather than hang.
          waiting_.pop_front();
          step_.unschedulable.push_back(r->id);
          requests_.erase(r->id);
          continue;
        }
        break;
      }
      KILN_CHECK(kv_->allocate(r->id, hit.num_tokens + n, &hit).has_value());
      stats_.prefix_cache_queries += r->num_tokens();
      stats_.prefix_cache_hits += hit.num_tokens;
      if (r->num_cached_tokens < 0) r->num_cached_tokens = hit.num_tokens;
      r->num_computed = hit.num_tokens;
      r->running = true;
      waiting_.pop_front();
      insert_running(r);
      scheduled_.push_back(r);
      step_.num_new.push_back(n);
      budget -= n;
    }
  }

  fill_batch();
  return step_;
}

void Scheduler::fill_batch() {
  StepBatch& b = step_.batch;
  b.clear();
  int32_t max_blocks = 0;
  for (size_t s = 0; s < scheduled_.size(); ++s) {
    max_blocks = std::max(max_blocks, int32_t(kv_->blocks(scheduled_[s]->id).size()));
  }
  b.max_blocks_per_seq = max_blocks;
  // Unused table entries are -1: a kernel that reads past context_lens fails loudly in tests.
  b.block_tables.assign(scheduled_.size() * size_t(max_blocks), -1);
  prompt_rows_.clear();
  for (size_t s = 0; s < scheduled_.size(); ++s) {
    const SchedRequest* r = scheduled_[s];
    const int32_t n = step_.num_new[s];
    const int32_t row0 = int32_t(b.token_ids.size());
    for (int32_t j = 0; j < n; ++j) {
      b.token_ids.push_back(r->tokens[size_t(r->num_computed + j)]);
      b.positions.push_back(r->num_computed + j);
    }
    if (r->owes_prompt_logprobs()) {
      // Position p's logits score prompt token p + 1; the last prompt position samples instead.
      const int32_t lo = std::max(r->num_computed, r->prompt_logprobs_next);
      const int32_t hi = std::min(r->num_computed + n, r->num_prompt - 1);
      for (int32_t p = lo; p < hi; ++p) {
        prompt_rows_.push_back(row0 + p - r->num_computed);
        b.prompt_logprob_rows.push_back({r->tokens[size_t(p) + 1], r->prompt_logprobs});
        step_.prompt_logprob_seqs.push_back(int32_t(s));
      }
    }
    b.query_start.push_back(int32_t(b.token_ids.size()));
    b.context_lens.push_back(r->num_computed + n);
    auto blocks = kv_->blocks(r->id);
    std::copy(blocks.begin(), blocks.end(), b.block_tables.begin() + ptrdiff_t(s * size_t(max_blocks)));
    step_.seq_ids.push_back(r->id);
    // A sequence samples once everything it has is computed: its prompt's last chunk, or a decode.
    if (r->num_computed + n == r->num_tokens()) {
      b.logits_rows.push_back(int32_t(b.token_ids.size()) - 1);
      step_.sample_seqs.push_back(int32_t(s));
    }
  }
  b.logits_rows.insert(b.logits_rows.end(), prompt_rows_.begin(), prompt_rows_.end());
}

void Scheduler::commit_step() {
  for (size_t s = 0; s < scheduled_.size(); ++s) {
    SchedRequest* r = scheduled_[s];
    if (!r) continue;
    r->num_computed += step_.num_new[s];
    KILN_CHECK(r->num_computed <= r->num_tokens());
    if (r->prompt_logprobs >= 0)
      r->prompt_logprobs_next = std::max(r->prompt_logprobs_next, std::min(r->num_computed, r->num_prompt - 1));
    kv_->cache_full_blocks(r->id, r->tokens, r->num_computed);
  }
  scheduled_.clear();
}

void Scheduler::append_token(uint64_t id, int32_t token) {
  auto it = requests_.find(id);
  KILN_CHECK_MSG(it != requests_.end(), "append_token: unknown request");
  SchedRequest* r = it->second.get();
  KILN_CHECK_MSG(r->running && r->num_computed == r->num_tokens(), "append_token: request did not sample");
  r->tokens.push_back(token);
}

std::vector<uint64_t> Scheduler::waiting_ids() const {
  std::vector<uint64_t> ids;
  for (const SchedRequest* r : waiting_) ids.push_back(r->id);
  return ids;
}

std::vector<uint64_t> Scheduler::running_ids() const {
  std::vector<uint64_t> ids;
  for (const SchedRequest* r : running_) ids.push_back(r->id);
  return ids;
}

}  // namespace kiln
