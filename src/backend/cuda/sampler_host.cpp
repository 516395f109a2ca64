#include <algorithm>
#include <unordered_map>

#include "backend/cuda/sampler.h"

namespace kiln::cuda {

void sample_row_build(const SeqSampling& s, int32_t logits_row, int32_t V, SampleRow* row,
                      std::vector<int32_t>* ints, std::vector<float>* floats) {
  const SamplingParams& p = *s.params;
  auto push = [&](int32_t id, float v) {
    ints->push_back(id);
    floats->push_back(v);
  };
  SampleRow& r = *row;
  r = SampleRow{};
  r.logits_row = logits_row;
  r.greedy = p.greedy() ? 1 : 0;
  r.top_k = p.top_k > 0 && p.top_k < V ? p.top_k : 0;
  r.inv_t = r.greedy ? 1.0f : 1.0f / p.temperature;
  r.top_p = p.top_p;
  r.min_p = p.min_p;
  r.repetition_penalty = p.repetition_penalty;
  r.seed = p.seed;
  r.step = uint64_t(s.num_output);
  r.rep_off = int32_t(ints->size());
  if (p.repetition_penalty != 1.0f) {  // each id once, as the host's `seen` mask does
    std::vector<int32_t> u;
    u.reserve(size_t(s.num_prompt + s.num_output));
    for (int32_t i = 0; i < s.num_prompt; ++i)
      if (s.prompt_ids[i] >= 0 && s.prompt_ids[i] < V) u.push_back(s.prompt_ids[i]);
    for (int32_t i = 0; i < s.num_output; ++i)
      if (s.output_ids[i] >= 0 && s.output_ids[i] < V) u.push_back(s.output_ids[i]);
    std::sort(u.begin(), u.end());
    u.erase(std::unique(u.begin(), u.end()), u.end());
    for (int32_t id : u) push(id, 0.0f);
  }
  r.rep_n = int32_t(ints->size()) - r.rep_off;
  r.pen_off = int32_t(ints->size());
  if (p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {
    std::unordered_map<int32_t, int32_t> counts;
    for (int32_t i = 0; i < s.num_output; ++i) counts[s.output_ids[i]]++;
    for (auto [t, n] : counts)
      if (t >= 0 && t < V) push(t, p.presence_penalty + p.frequency_penalty * float(n));  // as the host sampler
  }
  r.pen_n = int32_t(ints->size()) - r.pen_off;
  r.bias_off = int32_t(ints->size());
  for (auto [t, b] : p.logit_bias)
    if (t >= 0 && t < V) push(t, b);
  r.bias_n = int32_t(ints->size()) - r.bias_off;
  r.ban_off = int32_t(ints->size());
  if (s.banned_ids)
    for (int32_t t : *s.banned_ids)
      if (t >= 0 && t < V) push(t, 0.0f);
  r.ban_n = int32_t(ints->size()) - r.ban_off;
}

}  // namespace kiln::cuda
