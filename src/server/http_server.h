// HTTP/1.1 server on Boost.Beast/Asio: keep-alive, header and body limits, read/idle/write
// timeouts, a routing table with API-key auth, chunked streaming (SSE) and graceful shutdown.
// Beast stays inside http_server.cpp; this header exposes plain types so the rest of the server
// compiles fast.
//
// Threads: a small fixed pool runs the io_context. Each connection has a strand; request handlers
// run on it and every ResponseWriter call hops onto it, so a handler may call the writer from any
// thread (the engine thread included) without blocking.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/log.h"
#include "core/status.h"

namespace kiln::server {

using HeaderList = std::vector<std::pair<std::string, std::string>>;

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // "/v1/models?x=1"
  std::string path;    // "/v1/models"
  HeaderList headers;  // names lowercased
  std::string body;
  std::string remote;  // "127.0.0.1:51234"
  const std::string* header(std::string_view lowercase_name) const;
};

// The response side of one request. Thread-safe; calls hop to the connection's strand and calls
// made after the response ended (or for a connection that is gone) are dropped. Exactly one of
// send() or start_stream() ... end_stream() per request.
class ResponseWriter {
 public:
  virtual ~ResponseWriter() = default;
  virtual void send(int status, std::string content_type, std::string body, HeaderList headers = {}) = 0;
  // Headers now; then write() chunks (chunked transfer encoding) and end_stream().
  virtual void start_stream(int status, std::string content_type, HeaderList headers = {}) = 0;
  virtual void write(std::string data) = 0;
  virtual void end_stream() = 0;
  // Runs fn on the connection's strand, serialized with this request's other callbacks. fn runs
  // even if the client is gone (so per-request state can be cleaned up there).
  virtual void post(std::function<void()> fn) = 0;
  // fn runs once on the strand if the client goes away before the response ends.
  virtual void on_disconnect(std::function<void()> fn) = 0;
  // What the request log line says beyond the HTTP layer's own fields: the request's id (a
  // completion id; "": keep the connection counter id) and fields such as token counts. Call it
  // before the response ends (send / end_stream), or from the on_disconnect callback.
  virtual void set_log(std::string id, std::vector<LogField> fields) = 0;
};

// One finished request (its response fully written, or its client gone), for the request log.
struct RequestRecord {
  std::string id;      // set_log's id, else "req-<connection>-<n>"
  std::string method;  // "-" when the request could not be parsed
  std::string path;    // without the query (never the query: it may hold secrets)
  int status = 0;      // the status sent; 499 when the client left before any was sent
  bool client_gone = false;
  double total_ms = 0;  // from the request's arrival (fully read) to its last byte written or the disconnect
  std::vector<LogField> fields;
};

using Handler = std::function<void(const HttpRequest&, std::shared_ptr<ResponseWriter>)>;

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 8000;                 // 0: any free port (tests)
  int num_threads = 4;
  size_t max_header_bytes = 16 << 10;   // -> 431
  size_t max_body_bytes = 8 << 20;      // -> 413
  double request_timeout_s = 30.0;      // a request's header and body must arrive within this (-> 408)
  double keep_alive_timeout_s = 30.0;   // an idle keep-alive connection is closed after this
  double write_timeout_s = 30.0;        // one write that makes no progress for this long closes the connection
  int max_connections = 1000;           // beyond this, new connections are closed at once
  std::string api_key;                  // "": no authentication
};

class HttpServer {
 public:
  explicit HttpServer(HttpServerOptions options);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Routes are matched by exact path, or by prefix when `prefix` is set (longest first). A path that
  // matches with another method gets 405 with an Allow header; no match gets 404. Routes marked
  // `open` skip the API key check. Add routes before start().
  void add_route(std::string method, std::string path, Handler handler, bool open = false, bool prefix = false);
  // Called with every response's status code (metrics).
  void set_status_observer(std::function<void(int)> fn);
  // Called once per request when it is over (on the connection's strand; keep it short).
  void set_request_observer(std::function<void(RequestRecord&&)> fn);

  // Binds, listens and starts the thread pool. Returns the bound port.
  Result<uint16_t> start();
  // Stops accepting, closes idle connections, lets in-flight responses finish for up to grace_s
  // (then closes them), stops the pool. Idempotent. = drain(grace_s) + stop().
  void shutdown(double grace_s);
  // The first half: stop accepting, close idle connections, wait up to grace_s for in-flight
  // responses. The pool keeps running (handlers posted now still run).
  void drain(double grace_s);
  // The second half: close every connection, stop and join the pool.
  void stop();
  // Requests currently being handled (response not yet complete).
  int num_active_requests() const;
  int num_connections() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

// Constant-time comparison for secrets (API keys).
bool constant_time_equal(std::string_view a, std::string_view b);

}  // namespace kiln::server
