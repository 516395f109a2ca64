// Prometheus text format 0.0.4. See metrics.h.
#include "server/metrics.h"

#include <cmath>
#include <cstdio>

namespace kiln::server {

namespace {

std::string num(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

void header(std::string* out, const std::string& name, const char* type, const std::string& help) {
  *out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void scalar(std::string* out, const std::string& name, const char* type, const std::string& help, double v) {
  header(out, name, type, help);
  *out += name + " " + num(v) + "\n";
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++n_;
}

uint64_t Histogram::count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return n_;
}

std::string Histogram::render(const std::string& name, const std::string& help) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  header(&out, name, "histogram", help);
  uint64_t cum = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cum += counts_[i];
    std::string le = i < bounds_.size() ? num(bounds_[i]) : "+Inf";
    out += name + "_bucket{le=\"" + le + "\"} " + std::to_string(cum) + "\n";
  }
  out += name + "_sum " + num(sum_) + "\n";
  out += name + "_count " + std::to_string(n_) + "\n";
  return out;
}

// Bucket bounds as vLLM uses them for the same quantities.
Metrics::Metrics()
    : ttft_({0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0, 160.0, 640.0, 2560.0}),
      itl_({0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0}),
      e2e_({0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
            960.0, 1920.0, 7680.0}) {}

void Metrics::count_response(int http_status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++responses_by_code_[http_status];
}

void Metrics::count_finish(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  ++finished_by_reason_[reason];
}

void Metrics::add_prompt_tokens(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  prompt_tokens_ += n;
}

void Metrics::add_generation_tokens(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  generation_tokens_ += n;
}

void Metrics::observe_ttft(double s) { ttft_.observe(s); }
void Metrics::observe_inter_token(double s) { itl_.observe(s); }
void Metrics::observe_e2e(double s) { e2e_.observe(s); }

std::string Metrics::render(const EngineStats* stats) const {
  std::string out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    header(&out, "kiln_http_requests_total", "counter", "HTTP responses by status code.");
    for (const auto& [code, n] : responses_by_code_)
      out += "kiln_http_requests_total{code=\"" + std::to_string(code) + "\"} " + std::to_string(n) + "\n";
    header(&out, "kiln_request_success_total", "counter", "Finished generation choices by finish reason.");
    for (const auto& [reason, n] : finished_by_reason_)
      out += "kiln_request_success_total{finish_reason=\"" + reason + "\"} " + std::to_string(n) + "\n";
    scalar(&out, "kiln_prompt_tokens_total", "counter", "Prompt tokens processed.", double(prompt_tokens_));
    scalar(&out, "kiln_generation_tokens_total", "counter", "Tokens generated.", double(generation_tokens_));
  }
  out += ttft_.render("kiln_time_to_first_token_seconds", "Time from request arrival to the first generated token.");
  out += itl_.render("kiln_inter_token_latency_seconds", "Time between consecutive generated tokens of a request.");
  out += e2e_.render("kiln_e2e_request_latency_seconds", "Time from request arrival to its last token.");
  if (stats) {
    scalar(&out, "kiln_num_requests_running", "gauge", "Requests in the running batch.", stats->num_running);
    scalar(&out, "kiln_num_requests_waiting", "gauge", "Requests waiting in the queue.", stats->num_waiting);
    scalar(&out, "kiln_kv_blocks_total", "gauge", "KV cache blocks in the pool.", stats->kv_blocks_total);
    scalar(&out, "kiln_kv_blocks_used", "gauge", "KV cache blocks in use.", stats->kv_blocks_used);
    scalar(&out, "kiln_kv_blocks_free", "gauge", "KV cache blocks free.",
           stats->kv_blocks_total - stats->kv_blocks_used);
    scalar(&out, "kiln_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use.",
           stats->kv_blocks_total > 0 ? double(stats->kv_blocks_used) / stats->kv_blocks_total : 0.0);
    scalar(&out, "kiln_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           double(stats->prefix_cache_queries));
    scalar(&out, "kiln_prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.",
           double(stats->prefix_cache_hits));
    scalar(&out, "kiln_prefix_cache_hit_rate", "gauge", "Prefix cache hits / queries since start.",
           stats->prefix_cache_queries > 0 ? double(stats->prefix_cache_hits) / double(stats->prefix_cache_queries)
                                           : 0.0);
    scalar(&out, "kiln_num_preemptions_total", "counter", "Requests preempted (recomputed later).",
           double(stats->num_preemptions));
  }
  return out;
}

}  // namespace kiln::server
