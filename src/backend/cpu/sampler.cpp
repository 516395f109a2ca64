#include "backend/cpu/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>

namespace kiln {

static uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

double sampler_uniform(uint64_t seed, uint64_t step) {
  uint64_t r = splitmix64(splitmix64(seed) ^ (step * 0xd1b54a32d192ed03ull + 0x8cb92ba72f3d8dd7ull));
  return double(r >> 11) * (1.0 / 9007199254740992.0);  // 53 bits
}

static void log_softmax(const float* x, int32_t n, std::vector<float>* out) {
  const float mx = *std::max_element(x, x + n);
  double sum = 0.0;
  for (int32_t i = 0; i < n; ++i) sum += std::exp(double(x[i] - mx));
  const float lse = mx + float(std::log(sum));
  out->resize(size_t(n));
  for (int32_t i = 0; i < n; ++i) (*out)[size_t(i)] = x[i] - lse;
}

TokenLogprob token_logprob(const float* logits, int32_t vocab, int32_t target, int32_t top_k) {
  thread_local std::vector<float> lp;
  log_softmax(logits, vocab, &lp);
  TokenLogprob tl;
  tl.id = target;
  tl.logprob = target >= 0 && target < vocab ? lp[size_t(target)] : -INFINITY;
  const int32_t k = std::min<int32_t>(top_k, vocab);
  if (k > 0) {
    thread_local std::vector<int32_t> order;
    order.resize(size_t(vocab));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return lp[size_t(a)] > lp[size_t(b)] || (lp[size_t(a)] == lp[size_t(b)] && a < b);
    });
    for (int32_t i = 0; i < k; ++i) tl.top.emplace_back(order[size_t(i)], lp[size_t(order[size_t(i)])]);
  }
  return tl;
}

SampledToken sample_token(const float* logits, int32_t vocab, const SeqSampling& s) {
  const SamplingParams& p = *s.params;
  thread_local std::vector<float> x;
  x.assign(logits, logits + vocab);

  if (p.repetition_penalty != 1.0f) {  // transformers: over prompt and output tokens, once each
    thread_local std::vector<uint8_t> seen;
    seen.assign(size_t(vocab), 0);
    auto mark = [&](const int32_t* ids, int32_t n) {
      for (int32_t i = 0; i < n; ++i)
        if (ids[i] >= 0 && ids[i] < vocab) seen[size_t(ids[i])] = 1;
    };
    mark(s.prompt_ids, s.num_prompt);
    mark(s.output_ids, s.num_output);
    for (int32_t t = 0; t < vocab; ++t)
      if (seen[size_t(t)]) x[size_t(t)] = x[size_t(t)] > 0 ? x[size_t(t)] / p.repetition_penalty : x[size_t(t)] * p.repetition_penalty;
  }
  if (p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {  // OpenAI: over output tokens
    std::unordered_map<int32_t, int32_t> counts;
    for (int32_t i = 0; i < s.num_output; ++i) counts[s.output_ids[i]]++;
    for (auto [t, n] : counts)
      if (t >= 0 && t < vocab) x[size_t(t)] -= p.presence_penalty + p.frequency_penalty * float(n);
  }
  for (auto [t, b] : p.logit_bias)
    if (t >= 0 && t < vocab) x[size_t(t)] += b;
  if (s.banned_ids)
    for (int32_t t : *s.banned_ids)
      if (t >= 0 && t < vocab) x[size_t(t)] = -INFINITY;

  int32_t chosen = 0;
  if (p.greedy()) {
    chosen = int32_t(std::max_element(x.begin(), x.end()) - x.begin());  // first max: ties -> lowest id
  } else {
    // Candidates sorted by logit (ties by id, so the order is deterministic).
    thread_local std::vector<int32_t> idx;
    idx.resize(size_t(vocab));
    std::iota(idx.begin(), idx.end(), 0);
    auto by_logit = [&](int32_t a, int32_t b) { return x[size_t(a)] > x[size_t(b)] || (x[size_t(a)] == x[size_t(b)] && a < b); };
    int32_t keep = vocab;
    if (p.top_k > 0 && p.top_k < vocab) {
      keep = p.top_k;
      std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), by_logit);
    } else {
      std::sort(idx.begin(), idx.end(), by_logit);
    }
    const float inv_t = 1.0f / p.temperature;
    const float mx = x[size_t(idx[0])];
    thread_local std::vector<double> prob;
    prob.resize(size_t(keep));
    double total = 0.0;
    for (int32_t i = 0; i < keep; ++i) {
      prob[size_t(i)] = std::exp(double(x[size_t(idx[size_t(i)])] - mx) * inv_t);
      total += prob[size_t(i)];
    }
    if (p.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p (always at least one)
      double cum = 0.0;
      int32_t n = 0;
      while (n < keep) {
        cum += prob[size_t(n)] / total;
        ++n;
        if (cum >= double(p.top_p)) break;
      }
      keep = n;
    }
    if (p.min_p > 0.0f) {  // drop tokens below min_p times the most likely one
      const double floor = double(p.min_p) * prob[0];
      int32_t n = 1;
      while (n < keep && prob[size_t(n)] >= floor) ++n;
      keep = n;
    }
    total = 0.0;
    for (int32_t i = 0; i < keep; ++i) total += prob[size_t(i)];
    const double u = sampler_uniform(p.seed, uint64_t(s.num_output)) * total;
    double cum = 0.0;
    chosen = idx[size_t(keep - 1)];
    for (int32_t i = 0; i < keep; ++i) {
      cum += prob[size_t(i)];
      if (u < cum) {
        chosen = idx[size_t(i)];
        break;
      }
    }
  }

  SampledToken out;
  out.id = chosen;
  // Logprobs are reported from the model's raw distribution (vLLM's default "raw_logprobs"):
  // `logits` is the unpenalized row.
  if (p.logprobs >= 0) out.logprob = token_logprob(logits, vocab, chosen, p.logprobs);
  return out;
}

}  // namespace kiln
