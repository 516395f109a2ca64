// Token sampling on the host: penalties, logit bias, temperature, top-k, top-p, min-p, seeded.
// The random draw for a request's n-th generated token depends only on (seed, n), so a request
// samples the same tokens whatever batch it runs in, on any backend that uses sampler_uniform.
#pragma once
#include <cstdint>
#include <vector>

#include "model/sampling.h"

namespace kiln {

// A uniform double in [0, 1) from (seed, step): splitmix64 of a mixed counter.
double sampler_uniform(uint64_t seed, uint64_t step);

// logits: [vocab]; scratch may be reused across calls.
SampledToken sample_token(const float* logits, int32_t vocab, const SeqSampling& s);

// The raw distribution of one logits row [vocab]: log-softmax, then `target`'s logprob and the
// top_k most likely tokens (ties: lower id first). The one place logprobs are computed: sampled
// tokens (sample_token) and prompt tokens (prompt logprobs, any backend with host logits) share it.
TokenLogprob token_logprob(const float* logits, int32_t vocab, int32_t target, int32_t top_k);

}  // namespace kiln
