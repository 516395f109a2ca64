// Test doubles and helpers for the server tests: a byte-level tokenizer (token id = byte value),
// an "echo" model executor behind the real Engine, a live Server on a free port, and a raw-socket
// HTTP client (raw, so tests can also send malformed or slow requests).
//
// The echo model: output token k of a sequence is prompt[k % prompt_len] (greedy), or
// prompt[(k + seed) % prompt_len] when sampling, so with the byte tokenizer a prompt "abc. "
// generates "abc. abc. ab..." and tests can place stop strings and EOS exactly.
#pragma once
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model/executor.h"
#include "runtime/engine.h"
#include "server/server.h"
#include "tokenizer/tokenizer.h"

namespace kiln::test {

constexpr int32_t kEosId = 256;
constexpr int32_t kImStart = 257;
constexpr int32_t kImEnd = 258;
constexpr int32_t kVocab = 259;

// GPT-2's byte <-> printable-unicode map, so byte b is vocab entry b.
inline std::string byte_token(int b) {
  auto printable = [](int c) { return (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF); };
  int cp = b;
  if (!printable(b)) {
    int n = 0;
    for (int x = 0; x < b; ++x)
      if (!printable(x)) ++n;
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

inline std::string byte_tokenizer_json() {
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_token(b)] = b;
  vocab["<|endoftext|>"] = kEosId;
  vocab["<|im_start|>"] = kImStart;
  vocab["<|im_end|>"] = kImEnd;
  auto added = [](int id, const char* s) {
    return nlohmann::ordered_json{{"id", id},           {"content", s},         {"single_word", false}, {"lstrip", false},
                                  {"rstrip", false},    {"normalized", false},  {"special", true}};
  };
  nlohmann::ordered_json j = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", {added(kEosId, "<|endoftext|>"), added(kImStart, "<|im_start|>"), added(kImEnd, "<|im_end|>")}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"vocab", vocab},
        {"merges", nlohmann::ordered_json::array()}}}};
  return j.dump();
}

inline std::shared_ptr<const Tokenizer> byte_tokenizer() {
  auto t = Tokenizer::from_json_string(byte_tokenizer_json(), "byte-tokenizer.json");
  if (!t) ADD_FAILURE() << t.message();
  return t ? *t : nullptr;
}

constexpr const char* kChatTemplate =
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

class EchoExecutor : public ModelExecutor {
 public:
  EchoExecutor(int32_t num_kv_blocks = 64, int32_t max_seq_len = 512) {
    info_.vocab_size = kVocab;
    info_.block_size = 16;
    info_.num_kv_blocks = num_kv_blocks;
    info_.max_seq_len = max_seq_len;
    info_.eos_ids = {kEosId};
    info_.device = "echo";
  }
  const ExecutorInfo& info() const override { return info_; }
  Status execute(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                 std::vector<SampledToken>* out) override {
    if (int ms = step_delay_ms.load()) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    ++steps;
    out->clear();
    for (const SeqSampling& s : sampling) {
      const SamplingParams& p = *s.params;
      uint64_t k = uint64_t(s.num_output) + (p.greedy() ? 0 : p.seed);
      int32_t t = s.prompt_ids[k % uint64_t(s.num_prompt)];
      if (s.banned_ids)
        while (std::find(s.banned_ids->begin(), s.banned_ids->end(), t) != s.banned_ids->end()) t = (t + 1) % kVocab;
      SampledToken st;
      st.id = t;
      if (p.logprobs >= 0) {
        TokenLogprob lp;
        lp.id = t;
        lp.logprob = -0.25f;
        for (int32_t i = 0; i < p.logprobs; ++i) lp.top.emplace_back((t + i) % kVocab, -0.25f - float(i));
        st.logprob = lp;
      }
      out->push_back(st);
    }
    return Status::ok();
  }
  // Prompt logprobs: the row scoring target t reports logprob -t/100 and top k = t+1, t+2, ...
  // with -5, -6, ... (values a test can predict from the prompt alone).
  Status execute_with_prompt_logprobs(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                                      std::vector<SampledToken>* out, std::vector<TokenLogprob>* prompt_out) override {
    KILN_RETURN_IF_ERROR(execute(batch, sampling, out));
    prompt_out->clear();
    for (const StepBatch::PromptLogprobRow& r : batch.prompt_logprob_rows) {
      TokenLogprob lp;
      lp.id = r.target_id;
      lp.logprob = -float(r.target_id) / 100.0f;
      for (int32_t i = 0; i < r.top_k; ++i) lp.top.emplace_back((r.target_id + 1 + i) % kVocab, -5.0f - float(i));
      prompt_out->push_back(lp);
    }
    return Status::ok();
  }
  std::atomic<int> step_delay_ms{0};
  std::atomic<int> steps{0};

 private:
  ExecutorInfo info_;
};

struct TestServerConfig {
  int step_delay_ms = 0;
  bool with_template = true;
  int32_t num_kv_blocks = 64;
  int32_t max_queue = 1024;
  std::string api_key;
  double request_timeout_s = 30.0;
  double keep_alive_timeout_s = 30.0;
  size_t max_body_bytes = 8 << 20;
  bool load = true;  // false: the server starts and stays "loading"
  bool log_content = false;  // --log_requests
};

class TestServer {
 public:
  explicit TestServer(TestServerConfig cfg = {}) {
    server::ServerOptions o;
    o.http.host = "127.0.0.1";
    o.http.port = 0;
    o.http.num_threads = 3;
    o.http.api_key = cfg.api_key;
    o.http.request_timeout_s = cfg.request_timeout_s;
    o.http.keep_alive_timeout_s = cfg.keep_alive_timeout_s;
    o.http.max_body_bytes = cfg.max_body_bytes;
    o.served_model_name = "echo";
    o.model_path = "/models/echo";
    o.log_content = cfg.log_content;
    server = std::make_unique<server::Server>(o);
    auto p = server->start();
    if (!p) ADD_FAILURE() << p.message();
    port = p ? *p : 0;
    if (!cfg.load) return;
    auto ex = std::make_unique<EchoExecutor>(cfg.num_kv_blocks);
    exec = ex.get();
    exec->step_delay_ms = cfg.step_delay_ms;
    EngineLimits lim;
    lim.max_queue = cfg.max_queue;
    server::Backend b;
    b.engine = Engine::create(std::move(ex), lim);
    b.tokenizer = byte_tokenizer();
    if (cfg.with_template) {
      auto t = chat::Template::parse(kChatTemplate, "test-template");
      if (!t) ADD_FAILURE() << t.message();
      else b.chat_template = *t;
    }
    server->set_backend(std::move(b));
  }
  ~TestServer() { server->shutdown(5.0); }

  std::unique_ptr<server::Server> server;
  EchoExecutor* exec = nullptr;
  uint16_t port = 0;
};

// --- a raw HTTP/1.1 client --------------------------------------------------------------------

struct HttpResponse {
  int status = 0;  // 0: no response (connection closed / timed out)
  std::map<std::string, std::string> headers;  // lowercased names
  std::string body;  // de-chunked
  nlohmann::json json() const { return nlohmann::json::parse(body, nullptr, false); }
  std::string header(const std::string& k) const {
    auto it = headers.find(k);
    return it == headers.end() ? "" : it->second;
  }
};

class Conn {
 public:
  explicit Conn(uint16_t port, double recv_timeout_s = 15.0) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
    set_timeout(recv_timeout_s);
    int one = 1;
    if (fd_ >= 0) setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  ~Conn() { close(); }
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;
  bool ok() const { return fd_ >= 0; }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // Close with RST (SO_LINGER 0): a client killed mid-stream.
  void abort() {
    if (fd_ < 0) return;
    linger l{1, 0};
    setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close();
  }
  void set_timeout(double s) {
    if (fd_ < 0) return;
    timeval tv{time_t(s), suseconds_t((s - double(time_t(s))) * 1e6)};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  bool send(const std::string& data) {
    size_t off = 0;
    while (off < data.size()) {
      ssize_t n = ::send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += size_t(n);
    }
    return true;
  }
  // Half-close: the server sees EOF after what was sent.
  void finish_sending() {
    if (fd_ >= 0) ::shutdown(fd_, SHUT_WR);
  }
  // Reads one response; for a chunked body, on_chunk (if set) sees each chunk as it arrives.
  HttpResponse read_response(const std::function<void(const std::string&)>& on_chunk = nullptr) {
    HttpResponse r;
    size_t end;
    while ((end = buf_.find("\r\n\r\n")) == std::string::npos)
      if (!fill()) return r;
    std::string head = buf_.substr(0, end);
    buf_.erase(0, end + 4);
    size_t line_end = head.find("\r\n");
    std::string status_line = head.substr(0, line_end);
    if (status_line.size() < 12) return r;
    int status = std::atoi(status_line.c_str() + 9);
    size_t pos = line_end == std::string::npos ? head.size() : line_end + 2;
    while (pos < head.size()) {
      size_t e = head.find("\r\n", pos);
      if (e == std::string::npos) e = head.size();
      std::string line = head.substr(pos, e - pos);
      size_t colon = line.find(':');
      if (colon != std::string::npos) {
        std::string k = line.substr(0, colon);
        for (char& c : k) c = char(std::tolower(static_cast<unsigned char>(c)));
        std::string v = line.substr(colon + 1);
        while (!v.empty() && v.front() == ' ') v.erase(0, 1);
        r.headers[k] = v;
      }
      pos = e + 2;
    }
    if (status == 100) return read_response(on_chunk);
    if (status == 304 || status == 204) {
      // no body
    } else if (r.headers.count("content-length")) {
      size_t n = std::stoul(r.headers["content-length"]);
      while (buf_.size() < n)
        if (!fill()) return r;
      r.body = buf_.substr(0, n);
      buf_.erase(0, n);
    } else if (r.header("transfer-encoding") == "chunked") {
      for (;;) {
        size_t le;
        while ((le = buf_.find("\r\n")) == std::string::npos)
          if (!fill()) return r;
        size_t n = std::stoul(buf_.substr(0, le), nullptr, 16);
        while (buf_.size() < le + 2 + n + 2)
          if (!fill()) return r;
        std::string chunk = buf_.substr(le + 2, n);
        buf_.erase(0, le + 2 + n + 2);
        if (n == 0) break;
        if (on_chunk) on_chunk(chunk);
        r.body += chunk;
      }
    } else {
      while (fill()) {
      }
      r.body = buf_;
      buf_.clear();
    }
    r.status = status;
    return r;
  }
  // True when the peer closed the connection (reads EOF within the timeout).
  bool closed_by_peer() {
    char c;
    ssize_t n = ::recv(fd_, &c, 1, 0);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
  }

 private:
  bool fill() {
    char tmp[16384];
    ssize_t n = ::recv(fd_, tmp, sizeof tmp, 0);
    if (n <= 0) return false;
    buf_.append(tmp, size_t(n));
    return true;
  }
  int fd_ = -1;
  std::string buf_;
};

inline std::string request_text(const std::string& method, const std::string& path, const std::string& body,
                                const std::vector<std::string>& extra_headers = {}) {
  std::string r = method + " " + path + " HTTP/1.1\r\nHost: test\r\n";
  for (const auto& h : extra_headers) r += h + "\r\n";
  if (method == "POST" || !body.empty())
    r += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  r += "\r\n" + body;
  return r;
}

inline HttpResponse http(uint16_t port, const std::string& method, const std::string& path, const std::string& body = "",
                         const std::vector<std::string>& extra_headers = {}) {
  Conn c(port);
  if (!c.ok() || !c.send(request_text(method, path, body, extra_headers))) return {};
  return c.read_response();
}

inline HttpResponse post_json(uint16_t port, const std::string& path, const nlohmann::json& body,
                              const std::vector<std::string>& extra_headers = {}) {
  return http(port, "POST", path, body.dump(), extra_headers);
}

// The JSON payloads of an SSE body ("data: {...}" events; "[DONE]" kept as a string).
inline std::vector<nlohmann::json> sse_events(const std::string& body) {
  std::vector<nlohmann::json> out;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t e = body.find("\n\n", pos);
    if (e == std::string::npos) e = body.size();
    std::string ev = body.substr(pos, e - pos);
    pos = e + 2;
    if (ev.rfind("data: ", 0) != 0) continue;
    std::string data = ev.substr(6);
    if (data == "[DONE]") out.push_back("[DONE]");
    else out.push_back(nlohmann::json::parse(data, nullptr, false));
  }
  return out;
}

// Polls fn until true or timeout.
template <class F>
bool eventually(F fn, double timeout_s = 5.0) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(int64_t(timeout_s * 1000));
  while (std::chrono::steady_clock::now() < deadline) {
    if (fn()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return fn();
}

// A gauge from /metrics ("kiln_kv_blocks_used 3" -> 3), -1 if absent.
inline double metric(uint16_t port, const std::string& name) {
  HttpResponse r = http(port, "GET", "/metrics");
  std::string key = "\n" + name + " ";
  size_t p = r.body.find(key);
  if (p == std::string::npos) return -1;
  return std::atof(r.body.c_str() + p + key.size());
}

}  // namespace kiln::test
