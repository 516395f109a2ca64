// kiln bench serve --url URL --concurrency C --num_prompts N --input_len I --output_len O: load
// test a running OpenAI-compatible server (kiln serve, vLLM, ...) the way vLLM's `bench serve`
// measures it. N random-token prompts go to /v1/completions (token-id prompts, ignore_eos,
// streaming with include_usage) from C client threads, each on its own keep-alive connection.
//   TTFT  request start -> first chunk with text
//   ITL   gaps between consecutive text chunks (all requests pooled)
//   TPOT  (latency - TTFT) / (output tokens - 1), per request
//   E2EL  request start -> last byte
// Throughputs are over the wall time of the whole run. The server's tokens come from its usage
// chunk, so tokens that decode to no text still count.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "core/status.h"

namespace kiln::cli {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

struct BenchServeArgs {
  std::string url = "http://127.0.0.1:8000", model, api_key, output = "text";
  int32_t concurrency = 8, num_prompts = 64, input_len = 128, output_len = 128, vocab_size = 0;
  int64_t seed = 0;
};

struct Target {
  std::string host, port;
};

Result<Target> parse_url(const std::string& url) {
  std::string rest = url;
  if (rest.rfind("http://", 0) == 0) rest = rest.substr(7);
  else if (rest.find("://") != std::string::npos) return Status::error("--url: only http:// is supported, got " + url);
  rest = rest.substr(0, rest.find('/'));
  Target t;
  size_t colon = rest.rfind(':');
  if (colon == std::string::npos) {
    t.host = rest;
    t.port = "80";
  } else {
    t.host = rest.substr(0, colon);
    t.port = rest.substr(colon + 1);
  }
  if (t.host.empty() || t.port.empty()) return Status::error("--url: cannot read host:port from " + url);
  return t;
}

double secs(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

struct RequestResult {
  bool ok = false;
  std::string error;
  double ttft = 0, latency = 0;
  int64_t output_tokens = 0;
  std::vector<double> itl;
};

// One client: a keep-alive connection, reopened after an error.
class Client {
 public:
  Client(const Target& t, const std::string& api_key) : target_(t), api_key_(api_key), stream_(ioc_) {}

  Result<json> get_json(const std::string& path) {
    try {
      ensure_connected();
      http::request<http::empty_body> req{http::verb::get, path, 11};
      set_headers(req);
      http::write(stream_, req);
      beast::flat_buffer buf;
      http::response<http::string_body> res;
      http::read(stream_, buf, res);
      if (res.result_int() != 200)
        return Status::error("GET " + path + ": HTTP " + std::to_string(res.result_int()) + ": " + res.body());
      json j = json::parse(res.body(), nullptr, false);
      if (j.is_discarded()) return Status::error("GET " + path + ": not JSON");
      return j;
    } catch (const std::exception& e) {
      reset();
      return Status::error("GET " + path + ": " + e.what());
    }
  }

  RequestResult stream_completion(const std::string& body) {
    RequestResult r;
    const Clock::time_point start = Clock::now();
    Clock::time_point last{};
    bool first = true;
    std::string pending;
    try {
      ensure_connected();
      http::request<http::string_body> req{http::verb::post, "/v1/completions", 11};
      set_headers(req);
      req.set(http::field::content_type, "application/json");
      req.body() = body;
      req.prepare_payload();
      http::write(stream_, req);
      beast::flat_buffer buf;
      http::response_parser<http::string_body> parser;
      parser.body_limit(boost::none);
      std::string error_body;
      auto on_data = [&](std::string_view data) {
        pending.append(data);
        size_t e;
        while ((e = pending.find("\n\n")) != std::string::npos) {
          std::string ev = pending.substr(0, e);
          pending.erase(0, e + 2);
          if (ev.rfind("data: ", 0) != 0) continue;
          std::string payload = ev.substr(6);
          if (payload == "[DONE]") continue;
          json j = json::parse(payload, nullptr, false);
          if (j.is_discarded()) continue;
          if (j.contains("error")) r.error = j["error"].value("message", "error event");
          if (j.contains("usage") && j["usage"].is_object()) r.output_tokens = j["usage"].value("completion_tokens", 0);
          if (!j.contains("choices") || j["choices"].empty()) continue;
          const json& c = j["choices"][0];
          if (!c.contains("text") || !c["text"].is_string() || c["text"].get<std::string>().empty()) continue;
          const Clock::time_point now = Clock::now();
          if (first) r.ttft = secs(now - start);
          else r.itl.push_back(secs(now - last));
          first = false;
          last = now;
        }
      };
      // Beast keeps a reference to the callback: it must outlive the reads below.
      auto on_chunk = [&](std::uint64_t, beast::string_view data, beast::error_code&) -> std::size_t {
        on_data(std::string_view(data.data(), data.size()));
        return data.size();
      };
      parser.on_chunk_body(on_chunk);
      http::read_header(stream_, buf, parser);
      const unsigned status = parser.get().result_int();
      while (!parser.is_done()) http::read_some(stream_, buf, parser);
      if (status != 200) {
        r.error = "HTTP " + std::to_string(status) + ": " + parser.get().body();
        if (!parser.get().keep_alive()) reset();
        return r;
      }
      if (!parser.get().keep_alive()) reset();
    } catch (const std::exception& e) {
      reset();
      r.error = e.what();
      return r;
    }
    r.latency = secs(Clock::now() - start);
    r.ok = r.error.empty() && !first;
    if (first && r.error.empty()) r.error = "no text in the response";
    return r;
  }

 private:
  template <class Req>
  void set_headers(Req& req) {
    req.set(http::field::host, target_.host);
    req.set(http::field::user_agent, "kiln-bench");
    if (!api_key_.empty()) req.set(http::field::authorization, "Bearer " + api_key_);
  }
  void ensure_connected() {
    if (connected_) return;
    tcp::resolver resolver(ioc_);
    stream_.connect(resolver.resolve(target_.host, target_.port));
    stream_.socket().set_option(tcp::no_delay(true));
    connected_ = true;
  }
  void reset() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
    connected_ = false;
  }

  Target target_;
  std::string api_key_;
  net::io_context ioc_;
  beast::tcp_stream stream_;
  bool connected_ = false;
};

struct Summary {
  double mean = 0, median = 0, p90 = 0, p99 = 0;
};

// Percentiles by linear interpolation, as numpy.percentile (what vLLM's bench uses).
Summary summarize(std::vector<double> v) {
  Summary s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  auto pct = [&](double p) {
    double idx = p / 100.0 * double(v.size() - 1);
    size_t lo = size_t(std::floor(idx)), hi = size_t(std::ceil(idx));
    return v[lo] + (v[hi] - v[lo]) * (idx - double(lo));
  };
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / double(v.size());
  s.median = pct(50);
  s.p90 = pct(90);
  s.p99 = pct(99);
  return s;
}

int bench_serve(const BenchServeArgs& a) {
  const char* verb = "bench serve";
  if (a.concurrency < 1 || a.num_prompts < 1 || a.input_len < 1 || a.output_len < 1)
    return fail(verb, "--concurrency, --num_prompts, --input_len and --output_len must be at least 1");
  if (a.output != "text" && a.output != "json") return fail(verb, "--output must be text or json");
  auto target = parse_url(a.url);
  if (!target) return fail(verb, target.message());

  Client probe(*target, a.api_key);
  std::string model = a.model;
  int32_t vocab = a.vocab_size;
  {
    auto models = probe.get_json("/v1/models");
    if (!models) return fail(verb, models.message());
    const json& data = (*models)["data"];
    if (!data.is_array() || data.empty()) return fail(verb, "/v1/models lists no model");
    if (model.empty()) model = data[0].value("id", "");
    for (const json& m : data)
      if (m.value("id", "") == model && vocab <= 0 && m.contains("vocab_size") && m["vocab_size"].is_number_integer())
        vocab = m["vocab_size"].get<int32_t>();
  }
  if (vocab <= 0) return fail(verb, "the server does not report its vocab_size: pass --vocab_size");

  // Random token prompts, away from the ends of the vocabulary where special tokens tend to live.
  std::mt19937_64 rng(uint64_t(a.seed));
  const int32_t lo = vocab >= 1000 ? vocab / 50 : 0, hi = vocab >= 1000 ? vocab - vocab / 10 : vocab;
  std::uniform_int_distribution<int32_t> pick(lo, hi - 1);
  auto make_body = [&](const std::vector<int32_t>& prompt, int32_t max_tokens) {
    json body = {{"model", model},          {"prompt", prompt},  {"max_tokens", max_tokens},
                 {"ignore_eos", true},      {"temperature", 0},  {"stream", true},
                 {"stream_options", {{"include_usage", true}}}};
    return body.dump();
  };
  std::vector<std::string> bodies;
  for (int32_t i = 0; i < a.num_prompts; ++i) {
    std::vector<int32_t> prompt(size_t(a.input_len));
    for (auto& t : prompt) t = pick(rng);
    bodies.push_back(make_body(prompt, a.output_len));
  }
  // One test request first (as vLLM does): it checks the setup and warms the server.
  {
    RequestResult w = probe.stream_completion(make_body(std::vector<int32_t>(size_t(std::min(a.input_len, 16)), lo), 2));
    if (!w.ok) return fail(verb, "test request failed: " + w.error);
  }
  std::fprintf(stderr, "bench serve: %d prompts (%d in, %d out tokens), concurrency %d, model %s\n", a.num_prompts,
               a.input_len, a.output_len, a.concurrency, model.c_str());

  std::vector<RequestResult> results(bodies.size());
  std::atomic<size_t> next{0};
  const Clock::time_point t0 = Clock::now();
  std::vector<std::thread> threads;
  for (int32_t c = 0; c < std::min(a.concurrency, a.num_prompts); ++c)
    threads.emplace_back([&] {
      Client client(*target, a.api_key);
      for (size_t i; (i = next++) < bodies.size();) results[i] = client.stream_completion(bodies[i]);
    });
  for (auto& t : threads) t.join();
  const double duration = secs(Clock::now() - t0);

  std::vector<double> ttft, tpot, itl, e2el;
  int64_t out_tokens = 0, completed = 0;
  std::string first_error;
  for (const RequestResult& r : results) {
    if (!r.ok) {
      if (first_error.empty()) first_error = r.error;
      continue;
    }
    ++completed;
    out_tokens += r.output_tokens;
    ttft.push_back(r.ttft);
    e2el.push_back(r.latency);
    if (r.output_tokens > 1) tpot.push_back((r.latency - r.ttft) / double(r.output_tokens - 1));
    itl.insert(itl.end(), r.itl.begin(), r.itl.end());
  }
  const int64_t in_tokens = completed * a.input_len;
  const Summary s_ttft = summarize(ttft), s_tpot = summarize(tpot), s_itl = summarize(itl), s_e2el = summarize(e2el);
  const double req_tput = double(completed) / duration, out_tput = double(out_tokens) / duration,
               total_tput = double(in_tokens + out_tokens) / duration;

  std::printf("============ Serving Benchmark Result ============\n");
  std::printf("%-40s %d\n", "Successful requests:", int(completed));
  std::printf("%-40s %d\n", "Failed requests:", int(results.size() - size_t(completed)));
  std::printf("%-40s %d\n", "Maximum request concurrency:", a.concurrency);
  std::printf("%-40s %.2f\n", "Benchmark duration (s):", duration);
  std::printf("%-40s %lld\n", "Total input tokens:", (long long)in_tokens);
  std::printf("%-40s %lld\n", "Total generated tokens:", (long long)out_tokens);
  std::printf("%-40s %.2f\n", "Request throughput (req/s):", req_tput);
  std::printf("%-40s %.2f\n", "Output token throughput (tok/s):", out_tput);
  std::printf("%-40s %.2f\n", "Total token throughput (tok/s):", total_tput);
  auto section = [](const char* title, const char* name, const Summary& s) {
    std::printf("%s\n", title);
    std::printf("Mean %-35s %.2f\n", (std::string(name) + " (ms):").c_str(), s.mean * 1e3);
    std::printf("Median %-33s %.2f\n", (std::string(name) + " (ms):").c_str(), s.median * 1e3);
    std::printf("P90 %-36s %.2f\n", (std::string(name) + " (ms):").c_str(), s.p90 * 1e3);
    std::printf("P99 %-36s %.2f\n", (std::string(name) + " (ms):").c_str(), s.p99 * 1e3);
  };
  section("---------------Time to First Token----------------", "TTFT", s_ttft);
  section("-----Time per Output Token (excl. 1st token)------", "TPOT", s_tpot);
  section("---------------Inter-token Latency----------------", "ITL", s_itl);
  section("----------------End-to-end Latency----------------", "E2EL", s_e2el);
  std::printf("==================================================\n");
  if (!first_error.empty()) std::fprintf(stderr, "bench serve: first error: %s\n", first_error.c_str());
  if (a.output == "json") {
    auto sj = [](const Summary& s) {
      return json{{"mean_ms", s.mean * 1e3}, {"median_ms", s.median * 1e3}, {"p90_ms", s.p90 * 1e3}, {"p99_ms", s.p99 * 1e3}};
    };
    json j = {{"model", model},
              {"num_prompts", a.num_prompts},
              {"concurrency", a.concurrency},
              {"input_len", a.input_len},
              {"output_len", a.output_len},
              {"completed", completed},
              {"failed", int64_t(results.size()) - completed},
              {"duration_s", duration},
              {"total_input_tokens", in_tokens},
              {"total_output_tokens", out_tokens},
              {"request_throughput", req_tput},
              {"output_throughput", out_tput},
              {"total_token_throughput", total_tput},
              {"ttft", sj(s_ttft)},
              {"tpot", sj(s_tpot)},
              {"itl", sj(s_itl)},
              {"e2el", sj(s_e2el)}};
    std::printf("%s\n", j.dump().c_str());
  }
  return completed == int64_t(results.size()) ? 0 : fail(verb, std::to_string(results.size() - size_t(completed)) +
                                                                   " requests failed: " + first_error);
}

}  // namespace
}  // namespace kiln::cli

KILN_VERB(bench_serve) {
  using namespace kiln::cli;
  CLI::App* bench = nullptr;
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; }))
    if (sub->get_name() == "bench") bench = sub;
  if (!bench) {
    bench = app.add_subcommand("bench", "Benchmarks: latency, throughput, serve");
    bench->require_subcommand(1);
  }
  static BenchServeArgs a;
  auto* cmd = bench->add_subcommand("serve", "Load-test a running server (vLLM bench serve metrics)");
  add_flag(*cmd, "url", a.url, "server base URL (default http://127.0.0.1:8000)");
  add_flag(*cmd, "model", a.model, "model name (default: the first of /v1/models)");
  add_flag(*cmd, "api_key", a.api_key, "sent as 'Authorization: Bearer KEY'");
  add_flag(*cmd, "concurrency", a.concurrency, "requests in flight (default 8)");
  add_flag(*cmd, "num_prompts", a.num_prompts, "requests in total (default 64)");
  add_flag(*cmd, "input_len", a.input_len, "prompt tokens per request (default 128)");
  add_flag(*cmd, "output_len", a.output_len, "generated tokens per request (default 128)");
  add_flag(*cmd, "vocab_size", a.vocab_size, "token ids are drawn below this (default: from /v1/models)");
  add_flag(*cmd, "seed", a.seed, "seed of the random prompts (default 0)");
  add_flag(*cmd, "output", a.output, "text | json (adds one JSON line)");
  cmd->callback([] {
    if (int rc = bench_serve(a)) throw CLI::RuntimeError(rc);
  });
}
