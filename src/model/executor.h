// The boundary between the runtime (scheduler, KV manager: plain CPU code) and a backend's model.
// An executor owns the weights and the KV cache memory; the runtime owns which blocks hold what.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/sampling.h"
#include "model/step_batch.h"

namespace kiln {

struct ExecutorInfo {
  int32_t vocab_size = 0;
  int32_t block_size = 16;      // tokens per KV block
  int32_t num_kv_blocks = 0;    // physical blocks available
  int32_t max_seq_len = 0;      // model context limit
  std::vector<int32_t> eos_ids; // from the model/generation config
  std::string device;           // "cpu", "cuda:0 (NVIDIA H100 80GB HBM3)", ...
};

class ModelExecutor {
 public:
  virtual ~ModelExecutor() = default;
  virtual const ExecutorInfo& info() const = 0;
  // Forward over batch, then sample one token for each entry of `sampling` (one per logits row,
  // in batch.logits_rows order). Sequences whose rows are absent (mid-prompt chunks) sample
  // nothing. out->size() == sampling.size() on success.
  [[nodiscard]] virtual Status execute(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                                       std::vector<SampledToken>* out) = 0;
  // execute() for a batch that may ask for prompt logprobs: samples as execute() does for the
  // first batch.num_sampled_rows() logits rows, and fills prompt_out with one TokenLogprob per
  // batch.prompt_logprob_rows entry (id = its target, the raw log-softmax, top k most likely
  // first). The default serves executors that compute no prompt logprobs (test fakes): it
  // refuses a batch that asks for them.
  [[nodiscard]] virtual Status execute_with_prompt_logprobs(const StepBatch& batch,
                                                            const std::vector<SeqSampling>& sampling,
                                                            std::vector<SampledToken>* out,
                                                            std::vector<TokenLogprob>* prompt_out) {
    prompt_out->clear();
    if (!batch.prompt_logprob_rows.empty())
      return Status::error("prompt logprobs are not supported by the " + info().device + " executor");
    return execute(batch, sampling, out);
  }
};

}  // namespace kiln
