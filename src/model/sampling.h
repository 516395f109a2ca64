// Per-request sampling parameters and what sampling returns. Plain data shared by the runtime,
// the executors (CPU and CUDA) and the server.
#pragma once
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace kiln {

struct SamplingParams {
  float temperature = 1.0f;         // <= 0: greedy
  float top_p = 1.0f;               // (0, 1]
  int32_t top_k = 0;                // 0 or -1: off
  float min_p = 0.0f;               // [0, 1]
  float repetition_penalty = 1.0f;  // > 0; HF semantics over prompt + output tokens
  float presence_penalty = 0.0f;    // OpenAI semantics over output tokens
  float frequency_penalty = 0.0f;
  std::vector<std::pair<int32_t, float>> logit_bias;  // token id -> added to the logit
  uint64_t seed = 0;                // always set: the engine draws one when the client gives none
  int32_t logprobs = -1;            // -1: none; k >= 0: sampled token's logprob plus the top k
  bool greedy() const { return temperature <= 0.0f || top_k == 1; }
};

struct TokenLogprob {
  int32_t id = -1;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // top-k alternatives, most likely first
};

// What the executor needs to sample one sequence this step.
struct SeqSampling {
  const SamplingParams* params = nullptr;
  const int32_t* prompt_ids = nullptr;  // for repetition penalty
  int32_t num_prompt = 0;
  const int32_t* output_ids = nullptr;  // generated so far (penalties)
  int32_t num_output = 0;
  const std::vector<int32_t>* banned_ids = nullptr;  // e.g. EOS while min_tokens is not reached
};

struct SampledToken {
  int32_t id = -1;
  std::optional<TokenLogprob> logprob;
};

}  // namespace kiln
