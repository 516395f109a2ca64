// kiln serve MODEL: the OpenAI-compatible server. The HTTP listener comes up first (GET /health is
// 503 while the model loads), the model loads on a thread, SIGTERM/SIGINT stop accepting, let
// in-flight requests finish and exit 0 (a second signal exits at once).
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_executor.h"
#include "build/build.h"
#include "chat/chat_template.h"
#include "cli/cli.h"
#include "cli/executor_factory.h"
#include "core/file.h"
#include "core/log.h"
#include "runtime/engine.h"
#include "server/server.h"
#include "tokenizer/tokenizer.h"

namespace kiln::cli {
namespace {

struct ServeArgs {
  std::string model, tokenizer, host = "127.0.0.1", api_key, served_model_name, chat_template, device = "auto";
  int port = 8000;
  // 0: the engine's build limits (kiln build), else 64 / 2048 / the model's context.
  int32_t max_batch_size = 0, max_num_tokens = 0, max_seq_len = 0, kv_cache_blocks = 0, max_queue = 1024;
  std::string kv_cache_dtype = "auto", quantization = "auto";
  double kv_cache_memory_fraction = 0.0;  // 0: the backend's default
  double request_timeout = 30.0, keep_alive_timeout = 30.0, shutdown_timeout = 30.0;
  int http_threads = 0;
  int max_n = 16;
  bool no_prefix_caching = false;
  std::string log_format = "plain";
  bool log_requests = false;
};

// An engine built with `kiln build` carries its limits (plan.json), as a TensorRT-LLM engine does:
// they apply unless a flag overrides them.
ServeArgs with_engine_limits(ServeArgs a) {
  const std::string plan = a.model + "/plan.json";
  if (file_exists(plan)) {
    auto text = read_file(plan);
    auto j = text ? nlohmann::json::parse(*text, nullptr, false) : nlohmann::json();
    if (j.is_object()) {
      if (auto p = EnginePlan::from_json(j, plan)) {
        if (a.max_batch_size == 0) a.max_batch_size = p->limits.max_batch_size;
        if (a.max_num_tokens == 0) a.max_num_tokens = p->limits.max_num_tokens;
        if (a.max_seq_len == 0) a.max_seq_len = p->limits.max_seq_len;
      }
    }
  }
  if (a.max_batch_size == 0) a.max_batch_size = 64;
  if (a.max_num_tokens == 0) a.max_num_tokens = 2048;
  return a;
}

Result<std::unique_ptr<ModelExecutor>> load_executor(const ServeArgs& a) {
  LoadOptions opts;
  opts.device = a.device;
  opts.kv_cache_dtype = a.kv_cache_dtype;
  opts.quantization = a.quantization;
  opts.kv_cache_blocks = a.kv_cache_blocks;
  if (a.kv_cache_memory_fraction > 0) opts.kv_cache_memory_fraction = a.kv_cache_memory_fraction;
  opts.max_seq_len = a.max_seq_len;
  opts.max_batch_size = a.max_batch_size;
  return cli::load_executor(a.model, opts);  // cli/executor_factory.h
}

// --chat_template: a file, or the template text itself (as vLLM accepts both).
Result<std::optional<chat::Template>> load_chat_template(const ServeArgs& a, const Tokenizer& tok) {
  std::string source, name;
  if (!a.chat_template.empty()) {
    if (file_exists(a.chat_template)) {
      KILN_ASSIGN_OR_RETURN(source, read_file(a.chat_template));
      name = a.chat_template;
    } else if (a.chat_template.find("{{") != std::string::npos || a.chat_template.find("{%") != std::string::npos) {
      source = a.chat_template;
      name = "--chat_template";
    } else {
      return Status::error("--chat_template: " + a.chat_template + " is neither a file nor a template");
    }
  } else if (auto t = tok.chat_template("default")) {
    source = *t;
    name = "tokenizer chat template";
  } else {
    return std::optional<chat::Template>();  // chat completions will answer 400, completions work
  }
  auto parsed = chat::Template::parse(source, name);
  if (!parsed) return Status::error(parsed.message());
  return std::optional<chat::Template>(std::move(*parsed));
}

Result<server::Backend> load_backend(const ServeArgs& a) {
  server::Backend b;
  std::string tok_path = a.tokenizer.empty() ? a.model : a.tokenizer;
  auto tok = Tokenizer::load(tok_path);
  if (!tok) return Status::error("tokenizer: " + tok.message());
  b.tokenizer = *tok;
  KILN_ASSIGN_OR_RETURN(b.chat_template, load_chat_template(a, **tok));
  KILN_ASSIGN_OR_RETURN(auto ex, load_executor(a));
  EngineLimits lim;
  lim.max_batch_size = a.max_batch_size;
  lim.max_num_tokens = a.max_num_tokens;
  lim.max_seq_len = a.max_seq_len;
  lim.max_queue = a.max_queue;
  lim.enable_prefix_caching = !a.no_prefix_caching;
  b.engine = Engine::create(std::move(ex), lim);
  return b;
}

int serve(const ServeArgs& given) {
  const char* verb = "serve";
  const ServeArgs a = with_engine_limits(given);
  if (a.port < 0 || a.port > 65535) return fail(verb, "--port must be in [0, 65535]");
  if (a.max_batch_size < 1 || a.max_num_tokens < 1 || a.max_queue < 1)
    return fail(verb, "--max_batch_size, --max_num_tokens and --max_queue must be at least 1");
  if (a.request_timeout <= 0 || a.keep_alive_timeout <= 0) return fail(verb, "timeouts must be positive");
  if (a.kv_cache_memory_fraction < 0 || a.kv_cache_memory_fraction > 1)
    return fail(verb, "--kv_cache_memory_fraction must be in (0, 1]");
  if (a.max_n < 1) return fail(verb, "--max_n must be at least 1");
  if (a.log_format == "json") set_log_format(LogFormat::kJson);
  else if (a.log_format == "plain") set_log_format(LogFormat::kPlain);
  else return fail(verb, "--log_format must be plain or json, not '" + a.log_format + "'");

  // Signals go to sigwait() in this thread only: block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGUSR1);  // the loader thread is done
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  server::ServerOptions o;
  o.http.host = a.host;
  o.http.port = uint16_t(a.port);
  o.http.api_key = a.api_key;
  o.http.request_timeout_s = a.request_timeout;
  o.http.keep_alive_timeout_s = a.keep_alive_timeout;
  o.http.num_threads = a.http_threads > 0 ? a.http_threads
                                          : std::clamp(int(std::thread::hardware_concurrency()), 2, 4);
  o.served_model_name = a.served_model_name.empty() ? a.model : a.served_model_name;
  o.model_path = a.model;
  o.api.max_n = a.max_n;
  o.log_content = a.log_requests;
  server::Server srv(o);
  auto port = srv.start();
  if (!port) return fail(verb, port.message());
  // Through the logger so --log_format json makes every line JSON (tests read the port from this line).
  log_info("kiln serve: listening on http://" + a.host + ":" + std::to_string(*port) + " (loading " + a.model + ")");
  if (a.log_requests) log_warn("serve: --log_requests: prompts and outputs are written to the log");
  if (a.host != "127.0.0.1" && a.host != "localhost" && a.host != "::1" && a.api_key.empty())
    log_warn("serve: listening on " + a.host + " without --api_key: anyone who can reach this port can use it");

  const pthread_t main_thread = pthread_self();
  std::atomic<bool> loaded{false};
  Status load_status;
  std::thread loader([&] {
    auto t0 = std::chrono::steady_clock::now();
    auto b = load_backend(a);
    if (b) {
      std::string device = b->engine->info().device;
      int32_t blocks = b->engine->info().num_kv_blocks;
      srv.set_backend(std::move(*b));
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      char secs[32];
      std::snprintf(secs, sizeof secs, "%.1f", s);
      log_info("kiln serve: ready: model '" + o.served_model_name + "' on " + device + ", " + std::to_string(blocks) +
               " KV blocks, loaded in " + secs + " s");
      loaded = true;
    } else {
      load_status = b.status();
    }
    pthread_kill(main_thread, SIGUSR1);
  });

  int sig = 0;
  for (;;) {
    sigwait(&signals, &sig);
    if (sig != SIGUSR1) break;
    if (!loaded) {  // the load failed
      loader.join();
      srv.shutdown(0.0);
      return fail(verb, load_status.message());
    }
  }
  log_info(std::string("kiln serve: ") + (sig == SIGTERM ? "SIGTERM" : "SIGINT") +
           ": stopping (in-flight requests finish; a second signal exits now)");
  std::thread([signals] {
    int again = 0;
    for (;;) {
      sigwait(&signals, &again);
      if (again != SIGUSR1) std::_Exit(1);
    }
  }).detach();
  if (!loaded) {
    // Still loading: nothing is in flight; do not wait for the load.
    srv.shutdown(0.0);
    std::fflush(stderr);
    std::_Exit(0);
  }
  loader.join();
  srv.shutdown(a.shutdown_timeout);
  log_info("kiln serve: stopped");
  return 0;
}

}  // namespace
}  // namespace kiln::cli

KILN_VERB(serve) {
  using namespace kiln::cli;
  static ServeArgs a;
  auto* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)");
  cmd->add_option("MODEL", a.model, "HF model directory or .gguf file")->required()->envname("KILN_MODEL");
  add_flag(*cmd, "tokenizer", a.tokenizer, "tokenizer dir/file (default: the model's)");
  add_flag(*cmd, "host", a.host, "address to listen on (default 127.0.0.1; 0.0.0.0 serves other hosts)");
  add_flag(*cmd, "port", a.port, "port (default 8000)");
  add_flag(*cmd, "api_key", a.api_key, "require 'Authorization: Bearer KEY' (all routes but /health and /version)");
  add_flag(*cmd, "served_model_name", a.served_model_name, "model name in the API (default: MODEL as given)");
  add_flag(*cmd, "max_batch_size", a.max_batch_size, "sequences per engine step (default: the engine's, else 64)");
  add_flag(*cmd, "max_num_tokens", a.max_num_tokens, "tokens per engine step (default: the engine's, else 2048)");
  add_flag(*cmd, "max_seq_len", a.max_seq_len, "prompt + output limit (default: the engine's, else the model's)");
  add_flag(*cmd, "kv_cache_dtype", a.kv_cache_dtype, "auto (the checkpoint's), fp8 or bf16 (GPU KV cache)")
      ->check(CLI::IsMember({"auto", "fp8", "bf16"}));
  add_flag(*cmd, "quantization", a.quantization, "auto (FP8 weights stay FP8 on sm_89+), bf16 (dequantize)")
      ->check(CLI::IsMember({"auto", "bf16", "fp8"}));
  auto* blocks = add_flag(*cmd, "kv_cache_blocks", a.kv_cache_blocks, "KV cache blocks (default: from memory)");
  auto* frac = add_flag(*cmd, "kv_cache_memory_fraction", a.kv_cache_memory_fraction,
                        "GPU: fraction of free memory for the KV cache (default 0.9)");
  blocks->excludes(frac);
  add_flag(*cmd, "chat_template", a.chat_template, "chat template file (default: the tokenizer's)");
  add_flag(*cmd, "device", a.device, "auto (default: the GPU when one answers, else cpu), cpu, cuda or cuda:N");
  add_flag(*cmd, "max_queue", a.max_queue, "waiting requests before 503 (default 1024)");
  add_flag(*cmd, "max_n", a.max_n, "largest n (choices per request) accepted (default 16)");
  add_flag(*cmd, "request_timeout", a.request_timeout, "seconds a request's header and body may take to arrive (30)");
  add_flag(*cmd, "keep_alive_timeout", a.keep_alive_timeout, "seconds an idle keep-alive connection stays open (30)");
  add_flag(*cmd, "shutdown_timeout", a.shutdown_timeout, "seconds in-flight requests get on SIGTERM (30)");
  add_flag(*cmd, "http_threads", a.http_threads, "HTTP I/O threads (default: 2-4 by core count)");
  add_switch(*cmd, "no_prefix_caching", a.no_prefix_caching, "disable the prefix cache");
  add_flag(*cmd, "log_format", a.log_format, "log lines: plain (default) or json (one object per line)")
      ->check(CLI::IsMember({"plain", "json"}));
  add_switch(*cmd, "log_requests", a.log_requests,
             "also log each request's prompt and generated text (off: never logged)");
  cmd->callback([] {
    if (int rc = serve(a)) throw CLI::RuntimeError(rc);
  });
}
