// The engine: a request queue, the scheduler, the KV block manager and one executor, stepped by
// one engine thread. The HTTP layer talks to it only through this interface and native structs
// (STYLE.md #9); events come back on the engine thread through each request's callback, which
// must not block (push into a queue and return).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/executor.h"
#include "model/sampling.h"

namespace kiln {

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };

struct TokenEvent {
  uint64_t request_id = 0;
  std::vector<SampledToken> tokens;  // new tokens since the last event (usually one)
  // With EngineRequest::prompt_logprobs >= 0, once, on the first event after the whole prompt is
  // computed: entry i scores prompt token i + 1 given tokens 0..i (num_prompt_tokens - 1 entries;
  // the first prompt token has no logprob). Rows of a chunked prefill are gathered first, and a
  // recompute after preemption does not send them again.
  std::vector<TokenLogprob> prompt_logprobs;
  FinishReason finish = FinishReason::kNone;  // set on the last event of a request
  int32_t matched_stop_token = -1;            // with kStop: the EOS/stop id that ended it
  int32_t num_prompt_tokens = 0;
  int32_t num_cached_tokens = 0;              // prompt tokens served from the prefix cache
  std::string error;                          // with kError
};

struct EngineRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int32_t max_tokens = 16;        // 0: prefill only (prompt logprobs, "score this text")
  int32_t min_tokens = 0;
  // -1: none; k >= 0: logprob of every prompt token after the first, plus the top k (see
  // TokenEvent::prompt_logprobs). Such a request computes its whole prompt: no prefix-cache hit.
  int32_t prompt_logprobs = -1;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;  // in addition to the model's EOS ids (unless ignore_eos)
  std::function<void(const TokenEvent&)> on_event;
};

struct EngineLimits {
  int32_t max_batch_size = 64;     // sequences per step
  int32_t max_num_tokens = 2048;   // tokens per step (the token budget)
  int32_t max_seq_len = 0;         // prompt + output; 0: the model's limit
  int32_t max_queue = 1024;        // waiting requests before submit() refuses
  bool enable_prefix_caching = true;
};

struct EngineStats {
  int32_t num_running = 0;
  int32_t num_waiting = 0;
  int32_t kv_blocks_total = 0;
  int32_t kv_blocks_used = 0;
  int64_t prefix_cache_queries = 0;  // prompt tokens looked up
  int64_t prefix_cache_hits = 0;     // of those, served from cache
  int64_t num_preemptions = 0;
  int64_t prompt_tokens_total = 0;
  int64_t generation_tokens_total = 0;
  // Engine-thread time: forward steps run, seconds inside the executor (launch, GPU, read-back),
  // and seconds scheduling and handling results between them (the GPU idles then).
  int64_t steps = 0;
  double execute_seconds = 0;
  double host_seconds = 0;
};

class Engine {
 public:
  static std::unique_ptr<Engine> create(std::unique_ptr<ModelExecutor> executor, EngineLimits limits);
  virtual ~Engine() = default;
  // Validates (prompt empty, prompt + max_tokens over max_seq_len: message names both numbers,
  // queue full) and enqueues. Returns the request id. Thread-safe.
  [[nodiscard]] virtual Result<uint64_t> submit(EngineRequest request) = 0;
  // Cancels a request (client gone, stop string seen): frees its blocks at the next step and
  // sends a final kCancelled event unless it already finished. Thread-safe, idempotent.
  virtual void cancel(uint64_t request_id) = 0;
  virtual EngineStats stats() const = 0;
  virtual const ExecutorInfo& info() const = 0;
  virtual const EngineLimits& limits() const = 0;
  // Stops accepting, finishes running requests (or cancels them if drain is false), joins.
  virtual void shutdown(bool drain) = 0;
};

}  // namespace kiln
