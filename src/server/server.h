// kiln's OpenAI-compatible server: the routes of `kiln serve` glued to one Engine. The HTTP layer
// owns JSON, chat templates, tokenization, detokenization and stop strings; the engine sees
// native EngineRequests (STYLE.md #9) and its events are posted to each connection's strand.
//
// Lifecycle: start() brings the listener up first (GET /health answers 503 while the model
// loads), set_backend() makes it ready, shutdown() stops accepting, lets in-flight requests end
// and stops the engine.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "chat/chat_template.h"
#include "core/status.h"
#include "runtime/engine.h"
#include "server/http_server.h"
#include "server/metrics.h"
#include "server/openai_api.h"
#include "tokenizer/tokenizer.h"

namespace kiln::server {

struct ServerOptions {
  HttpServerOptions http;
  std::string served_model_name = "kiln";
  std::string model_path;  // shown as "root" in /v1/models
  ApiLimits api;           // vocab_size is taken from the engine
  // One log line per request (core/log.h: log_event, plain or JSON): id, method, route, status,
  // times and, for generation routes, token counts. Prompts and outputs only with log_content
  // (--log_requests); headers (the API key) never.
  bool log_requests = true;
  bool log_content = false;
};

// What loading a model produces.
struct Backend {
  std::unique_ptr<Engine> engine;
  std::shared_ptr<const Tokenizer> tokenizer;
  std::optional<chat::Template> chat_template;  // none: /v1/chat/completions answers 400
  int32_t max_model_len = 0;                    // 0: engine limits / executor info
};

class Server {
 public:
  explicit Server(ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Starts the HTTP listener (the model may still be loading). Returns the bound port.
  Result<uint16_t> start();
  // The model is loaded: serve it.
  void set_backend(Backend backend);
  // Stop accepting, finish in-flight requests for up to grace_s (then cancel them), stop the
  // engine. Idempotent.
  void shutdown(double grace_s);

  Metrics& metrics();
  bool ready() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace kiln::server
