// The request log of `kiln serve`: one line per request when its response is over, plain or JSON,
// with token counts for generation routes; prompts and outputs only with log_content; never the
// API key. Lines are captured with set_log_sink.
#include <mutex>

#include "core/log.h"
#include "server_test_util.h"

namespace kiln::test {
namespace {

using nlohmann::json;

// Captures every log line while alive (the server's other lines too).
class LogCapture {
 public:
  explicit LogCapture(LogFormat format = LogFormat::kPlain) {
    set_log_format(format);
    set_log_sink([this](std::string_view line) {
      std::lock_guard<std::mutex> lock(mu_);
      lines_.emplace_back(line);
    });
  }
  ~LogCapture() {
    set_log_sink(nullptr);
    set_log_format(LogFormat::kPlain);
  }
  std::vector<std::string> lines() {
    std::lock_guard<std::mutex> lock(mu_);
    return lines_;
  }
  // The request lines ("... info request ..." or {"msg":"request"}).
  std::vector<std::string> requests() {
    std::vector<std::string> out;
    for (const std::string& l : lines())
      if (l.find(" info request ") != std::string::npos || l.find("\"msg\":\"request\"") != std::string::npos)
        out.push_back(l);
    return out;
  }
  // Waits for the n-th request line (the log line comes when the last byte is written, which can
  // be a moment after the client has read it).
  std::string wait_request(size_t n) {
    eventually([&] { return requests().size() >= n; });
    auto r = requests();
    return r.size() >= n ? r[n - 1] : std::string();
  }
  std::string all() {
    std::string s;
    for (const auto& l : lines()) s += l + "\n";
    return s;
  }

 private:
  std::mutex mu_;
  std::vector<std::string> lines_;
};

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(LogFormat, PlainAndJsonLines) {
  std::vector<LogField> f = {{"id", "chatcmpl-1"}, {"status", "200", false}, {"prompt", "a \"b\"\nc"},
                             {"output", "[\"x\"]", false}, {"empty", ""}};
  EXPECT_EQ(format_log_line(LogFormat::kPlain, "2026-11-22T09:00:00Z", LogLevel::kInfo, "request", f),
            "2026-11-22T09:00:00Z info request id=chatcmpl-1 status=200 prompt=\"a \\\"b\\\"\\nc\" output=[\"x\"] "
            "empty=\"\"");
  std::string j = format_log_line(LogFormat::kJson, "T", LogLevel::kWarn, "m\x01", f);
  json p = json::parse(j);
  EXPECT_EQ(p["time"], "T");
  EXPECT_EQ(p["level"], "warn");
  EXPECT_EQ(p["msg"], "m\x01");
  EXPECT_EQ(p["id"], "chatcmpl-1");
  EXPECT_EQ(p["status"], 200);
  EXPECT_EQ(p["prompt"], "a \"b\"\nc");
  EXPECT_EQ(p["output"], json::array({"x"}));
  EXPECT_EQ(j.find('\n'), std::string::npos);
}

TEST(RequestLog, OneLinePerRequestWithTokenCounts) {
  LogCapture log;
  TestServer s;
  json chat = {{"messages", json::array({{{"role", "user"}, {"content", "hello secret prompt"}}})}, {"max_tokens", 5}};
  HttpResponse r = post_json(s.port, "/v1/chat/completions", chat);
  ASSERT_EQ(r.status, 200) << r.body;
  std::string line = log.wait_request(1);
  std::string id = r.json()["id"];
  EXPECT_TRUE(has(line, " info request id=" + id + " method=POST route=/v1/chat/completions status=200 ")) << line;
  int64_t prompt_tokens = r.json()["usage"]["prompt_tokens"];
  EXPECT_TRUE(has(line, " prompt_tokens=" + std::to_string(prompt_tokens) + " generated_tokens=5 cached_tokens=0 ttft_ms="))
      << line;
  EXPECT_TRUE(has(line, " finish=length n=1 stream=false total_ms=")) << line;
  EXPECT_FALSE(has(line, "client_gone")) << line;
  // Prompts and outputs stay out of the log without log_content.
  EXPECT_FALSE(has(log.all(), "secret prompt")) << log.all();
  EXPECT_FALSE(has(line, "prompt=")) << line;
  EXPECT_FALSE(has(line, "output=")) << line;

  // A 404 (query string not logged), /health, a 400: one line each, with a connection counter id.
  EXPECT_EQ(http(s.port, "GET", "/nope?token=abc").status, 404);
  line = log.wait_request(2);
  EXPECT_TRUE(has(line, " method=GET route=/nope status=404 total_ms=")) << line;
  EXPECT_TRUE(has(line, " id=req-")) << line;
  EXPECT_FALSE(has(line, "abc")) << line;
  EXPECT_EQ(http(s.port, "GET", "/health").status, 200);
  EXPECT_TRUE(has(log.wait_request(3), " route=/health status=200 ")) << log.all();
  EXPECT_EQ(http(s.port, "POST", "/v1/completions", "{bad json").status, 400);
  EXPECT_TRUE(has(log.wait_request(4), " route=/v1/completions status=400 ")) << log.all();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(log.requests().size(), 4u) << log.all();
}

TEST(RequestLog, StreamedRequestLogsAtStreamEnd) {
  LogCapture log;
  TestServer s;
  HttpResponse r = post_json(s.port, "/v1/completions",
                             {{"prompt", "abc. "}, {"max_tokens", 7}, {"stream", true}, {"n", 2}});
  ASSERT_EQ(r.status, 200);
  auto events = sse_events(r.body);
  ASSERT_FALSE(events.empty());
  std::string id = events[0]["id"];
  std::string line = log.wait_request(1);
  EXPECT_TRUE(has(line, " id=" + id + " method=POST route=/v1/completions status=200 ")) << line;
  EXPECT_TRUE(has(line, " generated_tokens=14 ")) << line;
  EXPECT_TRUE(has(line, " finish=length,length n=2 stream=true ")) << line;
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(log.requests().size(), 1u) << log.all();
}

TEST(RequestLog, ApiKeyNeverLogged) {
  LogCapture log;
  TestServerConfig cfg;
  cfg.api_key = "sekret-key-123";
  cfg.log_content = true;  // even with content logging, headers are never logged
  TestServer s(cfg);
  HttpResponse r = http(s.port, "POST", "/v1/completions", json({{"prompt", "x"}}).dump(),
                        {"Authorization: Bearer wrong-key-456"});
  EXPECT_EQ(r.status, 401);
  std::string line = log.wait_request(1);
  EXPECT_TRUE(has(line, " route=/v1/completions status=401 ")) << line;
  r = http(s.port, "POST", "/v1/completions", json({{"prompt", "abc"}, {"max_tokens", 2}}).dump(),
           {"Authorization: Bearer sekret-key-123"});
  EXPECT_EQ(r.status, 200);
  log.wait_request(2);
  EXPECT_FALSE(has(log.all(), "sekret-key-123")) << log.all();
  EXPECT_FALSE(has(log.all(), "wrong-key-456")) << log.all();
}

TEST(RequestLog, JsonLinesWithContent) {
  LogCapture log(LogFormat::kJson);
  TestServerConfig cfg;
  cfg.log_content = true;
  TestServer s(cfg);
  json chat = {{"messages", json::array({{{"role", "user"}, {"content", "hi \"there\"\n"}}})}, {"max_tokens", 4}};
  HttpResponse r = post_json(s.port, "/v1/chat/completions", chat);
  ASSERT_EQ(r.status, 200) << r.body;
  json line = json::parse(log.wait_request(1), nullptr, false);
  ASSERT_TRUE(line.is_object()) << log.all();
  EXPECT_EQ(line["level"], "info");
  EXPECT_EQ(line["msg"], "request");
  EXPECT_EQ(line["id"], r.json()["id"]);
  EXPECT_EQ(line["method"], "POST");
  EXPECT_EQ(line["route"], "/v1/chat/completions");
  EXPECT_EQ(line["status"], 200);
  EXPECT_EQ(line["prompt_tokens"], r.json()["usage"]["prompt_tokens"]);
  EXPECT_EQ(line["generated_tokens"], 4);
  EXPECT_TRUE(line["ttft_ms"].is_number());
  EXPECT_TRUE(line["total_ms"].is_number());
  EXPECT_EQ(line["finish"], "length");
  EXPECT_EQ(line["n"], 1);
  // The rendered prompt and the generated text.
  EXPECT_EQ(line["prompt"], "<|im_start|>user\nhi \"there\"\n<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(line["output"], json::array({r.json()["choices"][0]["message"]["content"]}));
  // Token-id prompts are logged as ids.
  r = post_json(s.port, "/v1/completions", {{"prompt", {97, 98, 99}}, {"max_tokens", 2}});
  ASSERT_EQ(r.status, 200) << r.body;
  line = json::parse(log.wait_request(2), nullptr, false);
  EXPECT_EQ(line["prompt"], json::array({97, 98, 99})) << line.dump();
  EXPECT_EQ(line["output"], json::array({r.json()["choices"][0]["text"]})) << line.dump();
  EXPECT_EQ(line["output"][0].get<std::string>().size(), 2u) << line.dump();
  // A 404 is a JSON line too.
  EXPECT_EQ(http(s.port, "GET", "/missing").status, 404);
  line = json::parse(log.wait_request(3), nullptr, false);
  EXPECT_EQ(line["status"], 404);
  EXPECT_FALSE(line.contains("prompt"));
}

TEST(RequestLog, ClientGoneMidStream) {
  LogCapture log;
  TestServerConfig cfg;
  cfg.step_delay_ms = 20;
  TestServer s(cfg);
  for (bool stream : {true, false}) {
    size_t before = log.requests().size();
    Conn c(s.port);
    ASSERT_TRUE(c.send(request_text("POST", "/v1/completions",
                                    json({{"prompt", std::string(40, 'q')}, {"max_tokens", 400}, {"stream", stream}}).dump())));
    ASSERT_TRUE(eventually([&] { return metric(s.port, "kiln_kv_blocks_used") > 0; }));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    c.abort();
    // The /metrics polls log lines too: find this request's line.
    std::string line;
    eventually([&] {
      auto reqs = log.requests();
      for (size_t i = before; i < reqs.size(); ++i)
        if (has(reqs[i], "route=/v1/completions")) line = reqs[i];
      return !line.empty();
    });
    // Streaming: the 200 went out before the client left; a plain response sent nothing (499).
    EXPECT_TRUE(has(line, stream ? " status=200 client_gone=true " : " status=499 client_gone=true ")) << line;
    EXPECT_TRUE(has(line, " id=cmpl-")) << line;
    EXPECT_TRUE(has(line, " finish=abort ")) << line;
    EXPECT_TRUE(has(line, " ttft_ms=")) << line;
  }
}

TEST(RequestLog, OffWhenDisabled) {
  LogCapture log;
  server::ServerOptions o;
  o.http.port = 0;
  o.log_requests = false;
  server::Server srv(o);
  auto port = srv.start();
  ASSERT_TRUE(port) << port.message();
  EXPECT_EQ(http(*port, "GET", "/health").status, 503);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_TRUE(log.requests().empty()) << log.all();
  srv.shutdown(1.0);
}

}  // namespace
}  // namespace kiln::test
