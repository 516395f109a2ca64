// Prometheus text exposition for GET /metrics. Counters and histograms are updated from the HTTP
// threads; engine gauges (queue depth, KV blocks, prefix cache) are read from EngineStats at
// scrape time. All names start with kiln_.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/engine.h"

namespace kiln::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void observe(double v);
  // "# HELP/# TYPE" plus _bucket{le=...}, _sum, _count lines.
  std::string render(const std::string& name, const std::string& help) const;
  uint64_t count() const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // [bounds_.size() + 1], last is +Inf; not cumulative
  double sum_ = 0.0;
  uint64_t n_ = 0;
};

class Metrics {
 public:
  Metrics();
  void count_response(int http_status);
  void count_finish(const std::string& reason);  // "stop", "length", "abort", "error"
  void add_prompt_tokens(int64_t n);
  void add_generation_tokens(int64_t n);
  void observe_ttft(double seconds);
  void observe_inter_token(double seconds);
  void observe_e2e(double seconds);

  // stats: null while the model is loading (engine gauges are left out).
  std::string render(const EngineStats* stats) const;

  Histogram& ttft() { return ttft_; }

 private:
  mutable std::mutex mu_;
  std::map<int, uint64_t> responses_by_code_;
  std::map<std::string, uint64_t> finished_by_reason_;
  int64_t prompt_tokens_ = 0;
  int64_t generation_tokens_ = 0;
  Histogram ttft_;
  Histogram itl_;
  Histogram e2e_;
};

}  // namespace kiln::server
