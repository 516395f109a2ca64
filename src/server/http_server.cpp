// Beast/Asio HTTP server. The only file of kiln that includes Beast (it is heavy to compile).
//
// One Session per TCP connection, everything it does runs on its strand:
//
//   idle --first byte--> reading (header, then body; request timeout) --> handling --> idle ...
//     ^                                                                     |
//     +---- keep-alive (idle timeout) <------ last byte of the response written
//
// While a request is handled the session keeps one read pending ("peek") so a client that goes
// away is noticed even when nothing is being written, and cancels its generation at once. Bytes a
// client pipelines meanwhile are kept for the next request. A single timer serves all phases:
// idle timeout, request timeout, write timeout; on expiry it cancels the socket's operations and
// the pending handler decides (408 for a request that is too slow, close otherwise).
#include "server/http_server.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include "core/log.h"
#include "server/openai_api.h"

namespace kiln::server {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using error_code = boost::system::error_code;

const std::string* HttpRequest::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (k == name) return &v;
  return nullptr;
}

bool constant_time_equal(std::string_view a, std::string_view b) {
  // Length leaks (it is not the secret); the content comparison does not stop early.
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

namespace {

struct Route {
  std::string method;
  std::string path;
  Handler handler;
  bool open = false;
  bool prefix = false;
};

std::string error_body(int status, const std::string& message, const std::string& code = "") {
  ApiError e;
  e.status = status;
  e.message = message;
  e.type = status >= 500 ? "server_error" : "invalid_request_error";
  e.code = code;
  return dump_json(e.to_json());
}

template <class S>
std::string str(const S& s) {
  return std::string(s.data(), s.size());
}

std::string lower(std::string_view s) {
  std::string r(s);
  for (char& c : r) c = char(std::tolower(static_cast<unsigned char>(c)));
  return r;
}

std::string status_line(int status) {
  auto reason = http::obsolete_reason(http::int_to_status(unsigned(status)));
  return "HTTP/1.1 " + std::to_string(status) + " " + str(reason) + "\r\n";
}

std::chrono::milliseconds to_ms(double seconds) {
  return std::chrono::milliseconds(int64_t(std::max(0.001, seconds) * 1000.0));
}

class Session;

}  // namespace

struct HttpServer::Impl : std::enable_shared_from_this<HttpServer::Impl> {
  explicit Impl(HttpServerOptions o) : opt(std::move(o)), acceptor(net::make_strand(ioc)) {}

  HttpServerOptions opt;
  net::io_context ioc;
  tcp::acceptor acceptor;
  std::vector<std::thread> threads;
  std::vector<Route> routes;
  std::function<void(int)> status_observer;
  std::function<void(RequestRecord&&)> request_observer;

  mutable std::mutex mu;
  std::unordered_map<uint64_t, std::weak_ptr<Session>> sessions;
  uint64_t next_session_id = 1;
  std::atomic<int> active_requests{0};
  std::atomic<bool> draining{false};
  std::atomic<bool> stopped{false};
  std::condition_variable idle_cv;  // notified when active_requests drops
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;  // during shutdown

  std::vector<std::shared_ptr<Session>> live_sessions() {
    std::vector<std::shared_ptr<Session>> live;
    std::lock_guard<std::mutex> lock(mu);
    for (auto& [id, w] : sessions)
      if (auto p = w.lock()) live.push_back(std::move(p));
    return live;
  }

  void do_accept();
  void on_accept(error_code ec, tcp::socket socket);
  void unregister(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
    sessions.erase(id);
  }
  void request_done() {
    {
      std::lock_guard<std::mutex> lock(mu);
      --active_requests;
    }
    idle_cv.notify_all();
  }
  void observe(int status) {
    if (status_observer) status_observer(status);
  }
  // Finds the route for a path: exact match first, then the longest prefix route.
  // Returns the routes of that path (any method).
  std::vector<const Route*> match(const std::string& path) const {
    std::vector<const Route*> exact, pre;
    size_t best = 0;
    for (const Route& r : routes) {
      if (!r.prefix && r.path == path) exact.push_back(&r);
      if (r.prefix && path.compare(0, r.path.size(), r.path) == 0 && path.size() > r.path.size()) {
        if (r.path.size() > best) {
          best = r.path.size();
          pre.clear();
        }
        if (r.path.size() == best) pre.push_back(&r);
      }
    }
    return exact.empty() ? pre : exact;
  }
};

namespace {

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, std::shared_ptr<HttpServer::Impl> srv, uint64_t id)
      : socket_(std::move(socket)), timer_(socket_.get_executor()), srv_(std::move(srv)), id_(id) {}
  ~Session() { srv_->unregister(id_); }

  net::any_io_executor executor() { return socket_.get_executor(); }

  void start() {
    net::dispatch(executor(), [self = shared_from_this()] { self->wait_for_data(/*first=*/true); });
  }
  // Graceful shutdown: idle connections close now, busy ones after their response.
  void drain() {
    net::post(executor(), [self = shared_from_this()] {
      if (self->phase_ == Phase::kHandling) self->keep_alive_ = false;
      else self->close();
    });
  }
  void force_close() {
    net::post(executor(), [self = shared_from_this()] { self->close(); });
  }

  // --- ResponseWriter operations, on the strand, for request `seq` ---------------------------
  bool current(uint64_t seq) const { return seq == seq_ && responding_ && phase_ != Phase::kClosed; }

  void send(uint64_t seq, int status, const std::string& content_type, std::string body, const HeaderList& headers) {
    if (!current(seq) || headers_sent_) return;
    headers_sent_ = true;
    std::string out = status_line(status);
    out += "Content-Type: " + content_type + "\r\n";
    if (status == 304 || status == 204) body.clear();  // no body, and no Content-Length for one
    else out += "Content-Length: " + std::to_string(body.size()) + "\r\n";
    for (const auto& [k, v] : headers) out += k + ": " + v + "\r\n";
    out += keep_alive_ ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n";
    out += body;
    srv_->observe(status);
    rec_.status = status;
    response_finished_ = true;
    enqueue(std::move(out));
  }

  void start_stream(uint64_t seq, int status, const std::string& content_type, const HeaderList& headers) {
    if (!current(seq) || headers_sent_) return;
    headers_sent_ = true;
    streaming_ = true;
    std::string out = status_line(status);
    out += "Content-Type: " + content_type + "\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n";
    for (const auto& [k, v] : headers) out += k + ": " + v + "\r\n";
    if (http10_) {
      keep_alive_ = false;  // HTTP/1.0 has no chunked encoding: the body ends when the connection does
      out += "Connection: close\r\n\r\n";
    } else {
      out += "Transfer-Encoding: chunked\r\n";
      out += keep_alive_ ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n";
    }
    srv_->observe(status);
    rec_.status = status;
    enqueue(std::move(out));
  }

  void write(uint64_t seq, std::string data) {
    if (!current(seq) || !streaming_ || response_finished_ || data.empty()) return;
    if (http10_) return enqueue(std::move(data));
    char size[32];
    std::snprintf(size, sizeof size, "%zx\r\n", data.size());
    std::string out = size;
    out += data;
    out += "\r\n";
    enqueue(std::move(out));
  }

  void end_stream(uint64_t seq) {
    if (!current(seq) || !streaming_ || response_finished_) return;
    response_finished_ = true;
    enqueue(http10_ ? std::string() : std::string("0\r\n\r\n"));
  }

  void set_log(uint64_t seq, std::string id, std::vector<LogField> fields) {
    if (seq != seq_ || !rec_open_) return;
    if (!id.empty()) rec_.id = std::move(id);
    rec_.fields = std::move(fields);
  }

  void set_on_disconnect(uint64_t seq, std::function<void()> fn) {
    if (current(seq)) {
      on_disconnect_ = std::move(fn);
    } else if (seq == seq_ && gone_seq_ == seq) {
      fn();  // the client left before the handler asked to be told
    }
  }

 private:
  enum class Phase { kIdle, kReading, kHandling, kLingering, kClosed };

  // --- reading -------------------------------------------------------------------------------
  void wait_for_data(bool first) {
    phase_ = Phase::kIdle;
    if (srv_->draining && !first) return close();
    if (buf_.size() > 0) return read_header();
    arm_timer(first ? srv_->opt.request_timeout_s : srv_->opt.keep_alive_timeout_s);
    start_peek();
  }

  void start_peek() {
    peek_pending_ = true;
    socket_.async_read_some(buf_.prepare(4096), [self = shared_from_this()](error_code ec, size_t n) {
      self->on_peek(ec, n);
    });
  }

  void on_peek(error_code ec, size_t n) {
    peek_pending_ = false;
    if (!ec) buf_.commit(n);
    if (phase_ == Phase::kClosed) return;
    if (phase_ == Phase::kLingering) {
      buf_.consume(buf_.size());
      if (ec) return close();
      return start_peek();
    }
    if (ec) {
      // EOF, reset, or the idle/write timer cancelled us: the client is gone or too slow.
      if (phase_ == Phase::kHandling) return client_gone();
      return close();
    }
    if (phase_ == Phase::kHandling) {
      // The next request (pipelined, or sent the moment our response arrived, before our write
      // completion ran): keep the bytes for maybe_finish(), which reads on from the buffer. No
      // new peek, so this response loses disconnect detection by reads; writes still detect it.
      return;
    }
    read_header();
  }

  void read_header() {
    phase_ = Phase::kReading;
    parser_.emplace();
    parser_->header_limit(std::uint32_t(srv_->opt.max_header_bytes));
    parser_->body_limit(srv_->opt.max_body_bytes);
    arm_timer(srv_->opt.request_timeout_s);
    http::async_read_header(socket_, buf_, *parser_,
                            [self = shared_from_this()](error_code ec, size_t) { self->on_header(ec); });
  }

  void on_header(error_code ec) {
    if (phase_ == Phase::kClosed) return;
    if (ec) return on_read_error(ec);
    auto cl = parser_->content_length();
    if (cl && *cl > srv_->opt.max_body_bytes) return on_read_error(http::error::body_limit);
    auto expect = parser_->get()[http::field::expect];
    if (cl && *cl > 0 && lower(str(expect)) == "100-continue") {
      static const std::string kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
      net::async_write(socket_, net::buffer(kContinue), [self = shared_from_this()](error_code ec, size_t) {
        if (ec || self->phase_ == Phase::kClosed) return self->close();
        self->read_body();
      });
      return;
    }
    read_body();
  }

  void read_body() {
    if (parser_->is_done()) return on_request();
    http::async_read(socket_, buf_, *parser_, [self = shared_from_this()](error_code ec, size_t) {
      if (self->phase_ == Phase::kClosed) return;
      if (ec) return self->on_read_error(ec);
      self->on_request();
    });
  }

  void on_read_error(error_code ec) {
    disarm_timer();
    if (ec == http::error::end_of_stream || ec == net::error::eof || ec == net::error::connection_reset ||
        ec == net::error::broken_pipe)
      return close();
    if (ec == net::error::operation_aborted) {
      if (timed_out_)
        return local_error(408, "the request was not received within " +
                                    std::to_string(int(srv_->opt.request_timeout_s)) + " s");
      return close();
    }
    if (ec == http::error::body_limit)
      return local_error(413, "request body is larger than the limit of " +
                                  std::to_string(srv_->opt.max_body_bytes) + " bytes");
    if (ec == http::error::header_limit)
      return local_error(431, "request header is larger than the limit of " +
                                  std::to_string(srv_->opt.max_header_bytes) + " bytes");
    local_error(400, "malformed HTTP request: " + ec.message());
  }

  // An error the HTTP layer answers itself after a failed read: the connection is not reusable.
  void local_error(int status, const std::string& message) {
    begin_response(/*keep_alive=*/false, /*http10=*/false);
    send(seq_, status, "application/json", error_body(status, message), {});
  }

  void begin_response(bool keep_alive, bool http10) {
    phase_ = Phase::kHandling;
    ++seq_;
    responding_ = true;
    headers_sent_ = streaming_ = response_finished_ = false;
    keep_alive_ = keep_alive && !srv_->draining;
    http10_ = http10;
    on_disconnect_ = nullptr;
    {
      std::lock_guard<std::mutex> lock(srv_->mu);
      ++srv_->active_requests;
    }
    rec_ = RequestRecord{};
    rec_.id = "req-" + std::to_string(id_) + "-" + std::to_string(seq_);
    rec_.method = rec_.path = "-";
    rec_start_ = std::chrono::steady_clock::now();
    rec_open_ = true;
  }

  // The request is over: hand its record to the request log, once.
  void finish_record(bool client_gone) {
    if (!rec_open_) return;
    rec_open_ = false;
    rec_.client_gone = client_gone;
    if (rec_.status == 0) rec_.status = 499;  // nothing was sent (nginx's "client closed request")
    rec_.total_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - rec_start_).count();
    if (srv_->request_observer) srv_->request_observer(std::move(rec_));
  }

  void on_request();

  // --- writing -------------------------------------------------------------------------------
  void enqueue(std::string bytes) {
    if (phase_ == Phase::kClosed) return;
    out_ += bytes;
    if (!writing_) {
      if (out_.empty()) return maybe_finish();
      flush();
    }
  }

  void flush() {
    writing_ = true;
    inflight_.swap(out_);
    out_.clear();
    arm_timer(srv_->opt.write_timeout_s);
    net::async_write(socket_, net::buffer(inflight_), [self = shared_from_this()](error_code ec, size_t) {
      self->on_write(ec);
    });
  }

  void on_write(error_code ec) {
    writing_ = false;
    inflight_.clear();
    if (phase_ == Phase::kClosed) return;
    if (ec) return client_gone();
    if (!out_.empty()) return flush();
    disarm_timer();
    maybe_finish();
  }

  void maybe_finish() {
    if (!responding_ || !response_finished_ || writing_ || !out_.empty()) return;
    responding_ = false;
    on_disconnect_ = nullptr;
    srv_->request_done();
    finish_record(/*client_gone=*/false);
    if (!keep_alive_ || srv_->draining) return linger_then_close();
    phase_ = Phase::kIdle;
    if (peek_pending_) {
      arm_timer(srv_->opt.keep_alive_timeout_s);  // the pending peek now waits for the next request
    } else {
      wait_for_data(/*first=*/false);
    }
  }

  // --- teardown ------------------------------------------------------------------------------
  // Closing a socket with unread input sends RST, which can destroy the response still in flight
  // to the client (a 413 sent while the body is still arriving). So: FIN our side, discard what
  // the client still sends for up to a second, then close.
  void linger_then_close() {
    error_code ec;
    socket_.shutdown(tcp::socket::shutdown_send, ec);
    if (ec) return close();
    phase_ = Phase::kLingering;
    buf_.consume(buf_.size());
    arm_timer(1.0);
    if (!peek_pending_) start_peek();
  }

  void client_gone() {
    if (responding_ && !response_finished_) gone_seq_ = seq_;
    close();
  }

  void close() {
    if (phase_ == Phase::kClosed) return;
    phase_ = Phase::kClosed;
    disarm_timer();
    error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
    if (responding_) {
      if (!response_finished_) gone_seq_ = seq_;
      responding_ = false;
      srv_->request_done();
      auto fn = std::move(on_disconnect_);
      on_disconnect_ = nullptr;
      if (fn && gone_seq_ == seq_) fn();  // may set_log() the request's final counts
      finish_record(/*client_gone=*/true);
    }
  }

  void arm_timer(double seconds) {
    uint64_t gen = ++timer_gen_;
    timed_out_ = false;
    timer_.expires_after(to_ms(seconds));
    timer_.async_wait([self = shared_from_this(), gen](error_code ec) {
      if (ec || gen != self->timer_gen_ || self->phase_ == Phase::kClosed) return;
      self->timed_out_ = true;
      error_code ignored;
      self->socket_.cancel(ignored);
    });
  }

  void disarm_timer() {
    ++timer_gen_;
    timer_.cancel();
  }

  tcp::socket socket_;
  net::steady_timer timer_;
  std::shared_ptr<HttpServer::Impl> srv_;
  uint64_t id_;
  beast::flat_buffer buf_;
  std::optional<http::request_parser<http::string_body>> parser_;

  Phase phase_ = Phase::kIdle;
  uint64_t timer_gen_ = 0;
  bool timed_out_ = false;
  bool peek_pending_ = false;

  uint64_t seq_ = 0;        // current request
  uint64_t gone_seq_ = 0;   // request whose client left before its response ended
  bool responding_ = false;
  bool headers_sent_ = false;
  bool streaming_ = false;
  bool response_finished_ = false;  // every byte of the response is queued
  bool keep_alive_ = false;
  bool http10_ = false;
  std::function<void()> on_disconnect_;
  RequestRecord rec_;  // the current request's log record
  std::chrono::steady_clock::time_point rec_start_;
  bool rec_open_ = false;

  std::string out_;       // queued bytes
  std::string inflight_;  // bytes of the write in progress
  bool writing_ = false;
};

class Writer : public ResponseWriter {
 public:
  Writer(std::shared_ptr<Session> s, uint64_t seq) : s_(std::move(s)), seq_(seq) {}
  void send(int status, std::string content_type, std::string body, HeaderList headers) override {
    net::dispatch(s_->executor(), [s = s_, seq = seq_, status, ct = std::move(content_type), body = std::move(body),
                                   h = std::move(headers)]() mutable { s->send(seq, status, ct, std::move(body), h); });
  }
  void start_stream(int status, std::string content_type, HeaderList headers) override {
    net::dispatch(s_->executor(), [s = s_, seq = seq_, status, ct = std::move(content_type),
                                   h = std::move(headers)] { s->start_stream(seq, status, ct, h); });
  }
  void write(std::string data) override {
    net::dispatch(s_->executor(), [s = s_, seq = seq_, d = std::move(data)]() mutable { s->write(seq, std::move(d)); });
  }
  void end_stream() override {
    net::dispatch(s_->executor(), [s = s_, seq = seq_] { s->end_stream(seq); });
  }
  void post(std::function<void()> fn) override { net::post(s_->executor(), std::move(fn)); }
  void set_log(std::string id, std::vector<LogField> fields) override {
    net::dispatch(s_->executor(), [s = s_, seq = seq_, id = std::move(id), f = std::move(fields)]() mutable {
      s->set_log(seq, std::move(id), std::move(f));
    });
  }
  void on_disconnect(std::function<void()> fn) override {
    net::dispatch(s_->executor(), [s = s_, seq = seq_, fn = std::move(fn)]() mutable {
      s->set_on_disconnect(seq, std::move(fn));
    });
  }

 private:
  std::shared_ptr<Session> s_;
  uint64_t seq_;
};

void Session::on_request() {
  disarm_timer();
  http::request<http::string_body> msg = parser_->release();
  parser_.reset();
  begin_response(msg.keep_alive(), msg.version() < 11);
  if (buf_.size() == 0 && !peek_pending_) start_peek();  // notice a client that leaves mid-response

  HttpRequest req;
  req.method = str(msg.method_string());
  req.target = str(msg.target());
  req.path = req.target.substr(0, req.target.find('?'));
  for (const auto& f : msg) req.headers.emplace_back(lower(str(f.name_string())), str(f.value()));
  req.body = std::move(msg.body());
  rec_.method = req.method;
  rec_.path = req.path;
  error_code ec;
  auto ep = socket_.remote_endpoint(ec);
  if (!ec) req.remote = ep.address().to_string() + ":" + std::to_string(ep.port());

  std::vector<const Route*> routes = srv_->match(req.path);
  if (routes.empty()) {
    send(seq_, 404, "application/json", error_body(404, "no route for " + req.method + " " + req.path), {});
    return;
  }
  const Route* route = nullptr;
  std::string allow;
  for (const Route* r : routes) {
    if (r->method == req.method) route = r;
    if (allow.find(r->method) == std::string::npos) allow += (allow.empty() ? "" : ", ") + r->method;
  }
  if (!route) {
    send(seq_, 405, "application/json",
         error_body(405, "method " + req.method + " is not allowed for " + req.path + " (allowed: " + allow + ")"),
         {{"Allow", allow}});
    return;
  }
  const std::string& key = srv_->opt.api_key;
  if (!route->open && !key.empty()) {
    const std::string* auth = req.header("authorization");
    std::string_view token;
    if (auth && auth->size() > 7 && lower(auth->substr(0, 7)) == "bearer ") token = std::string_view(*auth).substr(7);
    if (!auth || !constant_time_equal(token, key)) {
      send(seq_, 401, "application/json",
           error_body(401, auth ? "Incorrect API key provided." : "Missing API key: send 'Authorization: Bearer KEY'.",
                      "invalid_api_key"),
           {{"WWW-Authenticate", "Bearer"}});
      return;
    }
  }
  auto writer = std::make_shared<Writer>(shared_from_this(), seq_);
  try {
    route->handler(req, writer);
  } catch (const std::exception& e) {
    log_error(std::string("http: handler for ") + req.path + " threw: " + e.what());
    if (!headers_sent_) send(seq_, 500, "application/json", error_body(500, std::string("internal error: ") + e.what()), {});
    else end_stream(seq_);
  }
}

}  // namespace

void HttpServer::Impl::do_accept() {
  acceptor.async_accept(net::make_strand(ioc), [self = shared_from_this()](error_code ec, tcp::socket socket) {
    self->on_accept(ec, std::move(socket));
  });
}

void HttpServer::Impl::on_accept(error_code ec, tcp::socket socket) {
  if (ec) {
    if (ec == net::error::operation_aborted || !acceptor.is_open()) return;
    // EMFILE and friends: back off instead of spinning, keep serving the connections we have.
    log_warn("http: accept failed: " + ec.message());
    auto timer = std::make_shared<net::steady_timer>(acceptor.get_executor(), std::chrono::milliseconds(100));
    timer->async_wait([self = shared_from_this(), timer](error_code) {
      if (self->acceptor.is_open()) self->do_accept();
    });
    return;
  }
  if (draining) return;
  std::shared_ptr<Session> session;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (int(sessions.size()) < opt.max_connections) {
      error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);  // SSE chunks are small: send each at once
      uint64_t id = next_session_id++;
      session = std::make_shared<Session>(std::move(socket), shared_from_this(), id);
      sessions.emplace(id, session);
    }
  }
  if (session) session->start();  // else: the socket closes as it goes out of scope
  do_accept();
}

HttpServer::HttpServer(HttpServerOptions options) : impl_(std::make_shared<Impl>(std::move(options))) {}

HttpServer::~HttpServer() { shutdown(0.0); }

void HttpServer::add_route(std::string method, std::string path, Handler handler, bool open, bool prefix) {
  impl_->routes.push_back(Route{std::move(method), std::move(path), std::move(handler), open, prefix});
}

void HttpServer::set_status_observer(std::function<void(int)> fn) { impl_->status_observer = std::move(fn); }

void HttpServer::set_request_observer(std::function<void(RequestRecord&&)> fn) {
  impl_->request_observer = std::move(fn);
}

Result<uint16_t> HttpServer::start() {
  Impl& s = *impl_;
  std::string where = s.opt.host + ":" + std::to_string(s.opt.port);
  error_code ec;
  tcp::resolver resolver(s.ioc);
  auto results = resolver.resolve(s.opt.host, std::to_string(s.opt.port), tcp::resolver::passive, ec);
  if (ec || results.empty()) return Status::error("cannot resolve host " + s.opt.host + ": " + ec.message());
  tcp::endpoint ep = results.begin()->endpoint();
  s.acceptor.open(ep.protocol(), ec);
  if (!ec) s.acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) s.acceptor.bind(ep, ec);
  if (!ec) s.acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) return Status::error("cannot listen on " + where + ": " + ec.message());
  uint16_t port = s.acceptor.local_endpoint(ec).port();
  s.do_accept();
  int n = std::max(1, s.opt.num_threads);
  for (int i = 0; i < n; ++i)
    s.threads.emplace_back([impl = impl_] {
      for (;;) {
        try {
          impl->ioc.run();
          return;
        } catch (const std::exception& e) {
          // A handler must not take the server down: log and keep running.
          log_error(std::string("http: unhandled exception: ") + e.what());
        }
      }
    });
  return port;
}

void HttpServer::drain(double grace_s) {
  Impl& s = *impl_;
  if (s.draining.exchange(true)) return;
  // Keeps run() going until stop(), so a handler posted during shutdown always runs: one queued
  // on a stopped io_context would keep its session, and through it the server, alive forever.
  if (!s.threads.empty()) s.work.emplace(s.ioc.get_executor());
  net::post(s.acceptor.get_executor(), [impl = impl_] {
    error_code ignored;
    impl->acceptor.close(ignored);
  });
  for (auto& p : s.live_sessions()) p->drain();
  std::unique_lock<std::mutex> lock(s.mu);
  s.idle_cv.wait_for(lock, to_ms(grace_s), [&] { return s.active_requests.load() == 0; });
}

void HttpServer::stop() {
  Impl& s = *impl_;
  drain(0.0);
  if (s.stopped.exchange(true)) return;
  for (auto& p : s.live_sessions()) p->force_close();
  s.work.reset();
  // With the acceptor and every socket closed the io_context runs out of work and the threads
  // return; a handler that still holds work is cut off after a short wait.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (!s.ioc.stopped() && std::chrono::steady_clock::now() < deadline && !s.threads.empty())
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (!s.ioc.stopped() && !s.threads.empty())
    log_warn("http: shutdown: I/O still pending after closing every connection; stopping anyway");
  s.ioc.stop();
  for (auto& t : s.threads)
    if (t.joinable()) t.join();
  s.threads.clear();
}

void HttpServer::shutdown(double grace_s) {
  drain(grace_s);
  stop();
}

int HttpServer::num_active_requests() const { return impl_->active_requests.load(); }

int HttpServer::num_connections() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return int(impl_->sessions.size());
}

}  // namespace kiln::server
