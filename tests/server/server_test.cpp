// The server end to end over real sockets: the real Engine stepping an echo model (see
// server_test_util.h), the byte tokenizer, a tiny chat template.
#include <gtest/gtest.h>

#include <set>
#include <thread>

#include "server_test_util.h"

using namespace kiln::test;
using nlohmann::json;

namespace {

// The echo model replays the prompt from offset 0 when greedy (from seed % len when sampling).
json greedy(json body) {
  if (!body.contains("temperature")) body["temperature"] = 0;
  return body;
}

HttpResponse gpost(uint16_t port, const std::string& path, const json& body,
                   const std::vector<std::string>& headers = {}) {
  return post_json(port, path, greedy(body), headers);
}

json completion(uint16_t port, json body) {
  HttpResponse r = gpost(port, "/v1/completions", greedy(body));
  EXPECT_EQ(r.status, 200) << r.body;
  return r.json();
}

// Concatenated text of a streamed completion/chat for choice `index`.
std::string streamed_text(const std::vector<json>& events, int index = 0) {
  std::string text;
  for (const json& e : events) {
    if (!e.is_object() || !e.contains("choices")) continue;
    for (const json& c : e["choices"]) {
      if (c["index"] != index) continue;
      if (c.contains("text")) text += c["text"].get<std::string>();
      if (c.contains("delta") && c["delta"].contains("content")) text += c["delta"]["content"].get<std::string>();
    }
  }
  return text;
}

}  // namespace

TEST(Server, CompletionGreedyEchoAndUsage) {
  TestServer s;
  json r = completion(s.port, {{"model", "echo"}, {"prompt", "abc. "}, {"max_tokens", 7}, {"temperature", 0}});
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_EQ(r["model"], "echo");
  EXPECT_EQ(r["id"].get<std::string>().rfind("cmpl-", 0), 0u);
  EXPECT_EQ(r["choices"][0]["text"], "abc. ab");
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(r["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(r["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(r["usage"]["completion_tokens"], 7);
  EXPECT_EQ(r["usage"]["total_tokens"], 12);
  // Token-id prompts and echo.
  r = completion(s.port, {{"prompt", {104, 105}}, {"max_tokens", 3}, {"echo", true}});
  EXPECT_EQ(r["choices"][0]["text"], "hihih");
  // A list of prompts: choices are ordered prompt by prompt.
  r = completion(s.port, {{"prompt", {"xy", "z"}}, {"max_tokens", 2}, {"temperature", 0}});
  ASSERT_EQ(r["choices"].size(), 2u);
  EXPECT_EQ(r["choices"][0]["text"], "xy");
  EXPECT_EQ(r["choices"][1]["text"], "zz");
  EXPECT_EQ(r["usage"]["prompt_tokens"], 3);
}

// echo + logprobs (issue #4): the prompt's tokens lead the legacy logprobs object, the first with
// null logprob and top, each later one scored by the (echo) model; text_offset runs on into the
// generated tokens. The echo model scores target t with -t/100 and tops t+1.. at -5, -6, ...
TEST(Server, EchoWithLogprobsListsThePromptFirst) {
  TestServer s;
  auto check_prompt_part = [](const json& lp, const std::string& where) {
    ASSERT_GE(lp["tokens"].size(), 3u) << where;
    EXPECT_EQ(lp["tokens"][0], "a") << where;
    EXPECT_EQ(lp["tokens"][1], "b") << where;
    EXPECT_EQ(lp["tokens"][2], "c") << where;
    EXPECT_TRUE(lp["token_logprobs"][0].is_null()) << where;
    EXPECT_TRUE(lp["top_logprobs"][0].is_null()) << where;
    EXPECT_NEAR(lp["token_logprobs"][1].get<double>(), -0.98, 1e-6) << where;  // 'b' = 98
    EXPECT_NEAR(lp["token_logprobs"][2].get<double>(), -0.99, 1e-6) << where;
    // The target plus the top 2 ('c', 'd' after 'b'), keyed by text.
    const json& top1 = lp["top_logprobs"][1];
    EXPECT_EQ(top1.size(), 3u) << where << top1.dump();
    EXPECT_NEAR(top1["b"].get<double>(), -0.98, 1e-6) << where;
    EXPECT_NEAR(top1["c"].get<double>(), -5.0, 1e-6) << where;
    EXPECT_NEAR(top1["d"].get<double>(), -6.0, 1e-6) << where;
  };
  // max_tokens 3: prompt "abc" then "abc" generated.
  json r = completion(s.port, {{"prompt", "abc"}, {"max_tokens", 3}, {"echo", true}, {"logprobs", 2}});
  EXPECT_EQ(r["choices"][0]["text"], "abcabc");
  json lp = r["choices"][0]["logprobs"];
  check_prompt_part(lp, "max_tokens 3");
  EXPECT_EQ(lp["tokens"].size(), 6u);
  EXPECT_EQ(lp["text_offset"], json::parse("[0, 1, 2, 3, 4, 5]"));
  EXPECT_NEAR(lp["token_logprobs"][3].get<double>(), -0.25, 1e-6);  // generated: the sampler's logprob
  EXPECT_EQ(r["usage"]["completion_tokens"], 3);

  // max_tokens 0: scoring only (lm-eval-harness's loglikelihood call).
  r = completion(s.port, {{"prompt", "abc"}, {"max_tokens", 0}, {"echo", true}, {"logprobs", 2}});
  EXPECT_EQ(r["choices"][0]["text"], "abc");
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  lp = r["choices"][0]["logprobs"];
  check_prompt_part(lp, "max_tokens 0");
  EXPECT_EQ(lp["tokens"].size(), 3u);
  EXPECT_EQ(lp["text_offset"], json::parse("[0, 1, 2]"));
  EXPECT_EQ(r["usage"]["completion_tokens"], 0);
  EXPECT_EQ(r["usage"]["prompt_tokens"], 3);

  // n = 2 and two prompts: every choice carries its prompt's logprobs.
  r = completion(s.port, {{"prompt", {"abc", "abcd"}}, {"n", 2}, {"max_tokens", 1}, {"echo", true}, {"logprobs", 2}});
  ASSERT_EQ(r["choices"].size(), 4u);
  for (int i = 0; i < 4; ++i) {
    check_prompt_part(r["choices"][i]["logprobs"], "choice " + std::to_string(i));
    EXPECT_EQ(r["choices"][i]["logprobs"]["tokens"].size(), i < 2 ? 4u : 5u);
  }

  // Echo without logprobs and max_tokens 0: just the prompt.
  r = completion(s.port, {{"prompt", "xyz"}, {"max_tokens", 0}, {"echo", true}});
  EXPECT_EQ(r["choices"][0]["text"], "xyz");
  EXPECT_TRUE(r["choices"][0]["logprobs"].is_null());
  // Without echo, max_tokens 0 stays a 400.
  EXPECT_EQ(gpost(s.port, "/v1/completions", {{"prompt", "xyz"}, {"max_tokens", 0}}).status, 400);

  // Streaming: the first chunk holds the echoed prompt with its logprobs.
  for (int max_tokens : {0, 2}) {
    const std::string where = "stream max_tokens " + std::to_string(max_tokens);
    HttpResponse h = gpost(s.port, "/v1/completions",
                           {{"prompt", "abc"}, {"max_tokens", max_tokens}, {"echo", true}, {"logprobs", 2}, {"stream", true}});
    ASSERT_EQ(h.status, 200) << h.body;
    std::vector<json> ev = sse_events(h.body);
    EXPECT_EQ(streamed_text(ev), max_tokens ? "abcab" : "abc") << where;
    ASSERT_FALSE(ev.empty());
    const json& first = ev[0]["choices"][0];
    EXPECT_EQ(first["text"].get<std::string>().substr(0, 3), "abc") << where;
    check_prompt_part(first["logprobs"], where);
    std::vector<json> offsets;
    for (const json& e : ev)
      if (e.is_object() && e.contains("choices") && !e["choices"].empty() && e["choices"][0]["logprobs"].is_object())
        for (const json& o : e["choices"][0]["logprobs"]["text_offset"]) offsets.push_back(o);
    EXPECT_EQ(json(offsets), max_tokens ? json::parse("[0, 1, 2, 3, 4]") : json::parse("[0, 1, 2]")) << where;
  }
}

TEST(Server, EosEndsWithStopAndIsNotInText) {
  TestServer s;
  // Prompt "ab<eos>": the echo model emits a, b, then EOS.
  json r = completion(s.port, {{"prompt", {97, 98, kEosId}}, {"max_tokens", 10}});
  EXPECT_EQ(r["choices"][0]["text"], "ab");
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(r["usage"]["completion_tokens"], 3);
  r = completion(s.port, {{"prompt", {97, 98, kEosId}}, {"max_tokens", 5}, {"ignore_eos", true}});
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(r["usage"]["completion_tokens"], 5);
  // min_tokens bans EOS until reached (the echo model then emits the next id).
  r = completion(s.port, {{"prompt", {97, 98, kEosId}}, {"max_tokens", 5}, {"min_tokens", 4}});
  EXPECT_EQ(r["usage"]["completion_tokens"], 5);
}

TEST(Server, StopStrings) {
  TestServer s;
  json r = completion(s.port, {{"prompt", "one two three "}, {"max_tokens", 30}, {"stop", "three"}});
  EXPECT_EQ(r["choices"][0]["text"], "one two ");
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
  r = completion(s.port, {{"prompt", "one two three "}, {"max_tokens", 30}, {"stop", {"zzz", "two"}},
                          {"include_stop_str_in_output", true}});
  EXPECT_EQ(r["choices"][0]["text"], "one two");
  // The request is cancelled at once: far fewer tokens than max_tokens were generated.
  EXPECT_LT(r["usage"]["completion_tokens"].get<int>(), 12);

  // Streaming holds back text that might start a stop string: "thr" never leaks out.
  HttpResponse h = gpost(s.port, "/v1/completions", {{"prompt", "one two thrown three "}, {"max_tokens", 40}, {"stop", "three"}, {"stream", true}});
  ASSERT_EQ(h.status, 200);
  auto events = sse_events(h.body);
  EXPECT_EQ(streamed_text(events), "one two thrown ");
  EXPECT_EQ(events.back(), "[DONE]");
  json last = events[events.size() - 2];
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
}

TEST(Server, StreamingCompletionShape) {
  TestServer s;
  HttpResponse h = gpost(s.port, "/v1/completions", {{"prompt", "abcd"}, {"max_tokens", 6}, {"stream", true},
                              {"stream_options", {{"include_usage", true}}}});
  ASSERT_EQ(h.status, 200);
  EXPECT_EQ(h.header("content-type"), "text/event-stream");
  EXPECT_EQ(h.header("transfer-encoding"), "chunked");
  auto events = sse_events(h.body);
  ASSERT_GE(events.size(), 4u);
  EXPECT_EQ(events.back(), "[DONE]");
  json usage = events[events.size() - 2];
  EXPECT_EQ(usage["choices"], json::array());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 6);
  EXPECT_EQ(usage["usage"]["prompt_tokens"], 4);
  std::set<std::string> ids;
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    EXPECT_EQ(events[i]["object"], "text_completion");
    EXPECT_TRUE(events[i].contains("usage") && events[i]["usage"].is_null());
    ids.insert(events[i]["id"].get<std::string>());
  }
  EXPECT_EQ(ids.size(), 1u);
  EXPECT_EQ(streamed_text(events), "abcdab");
  EXPECT_EQ(events[events.size() - 3]["choices"][0]["finish_reason"], "length");
}

TEST(Server, ChatCompletionAndStream) {
  TestServer s;
  json body = {{"model", "echo"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 5}};
  HttpResponse h = gpost(s.port, "/v1/chat/completions", body);
  ASSERT_EQ(h.status, 200) << h.body;
  json r = h.json();
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(r["choices"][0]["message"]["role"], "assistant");
  // The prompt is "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n": the echo model
  // replays it; special tokens are skipped in the output text.
  EXPECT_EQ(r["choices"][0]["message"]["content"], "user");
  EXPECT_EQ(r["usage"]["prompt_tokens"], 1 + 5 + 2 + 1 + 1 + 1 + 10);

  body["stream"] = true;
  h = gpost(s.port, "/v1/chat/completions", body);
  ASSERT_EQ(h.status, 200);
  auto events = sse_events(h.body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events[0]["object"], "chat.completion.chunk");
  EXPECT_EQ(events[0]["choices"][0]["delta"], json::parse(R"({"role": "assistant", "content": ""})"));
  EXPECT_EQ(events.back(), "[DONE]");
  json fin = events[events.size() - 2];
  EXPECT_EQ(fin["choices"][0]["delta"], json::object());
  EXPECT_EQ(fin["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(streamed_text(events), "user");
  EXPECT_FALSE(fin.contains("usage"));
}

TEST(Server, ChatWithoutTemplateIs400) {
  TestServerConfig cfg;
  cfg.with_template = false;
  TestServer s(cfg);
  HttpResponse h = gpost(s.port, "/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "hi"}}}}});
  EXPECT_EQ(h.status, 400);
  EXPECT_NE(h.body.find("--chat_template"), std::string::npos);
}

TEST(Server, NChoicesAndSeeds) {
  TestServer s;
  json body = {{"prompt", "0123456789"}, {"max_tokens", 4}, {"n", 3}, {"temperature", 1.0}, {"seed", 5}};
  json a = completion(s.port, body);
  json b = completion(s.port, body);
  ASSERT_EQ(a["choices"].size(), 3u);
  std::set<std::string> texts;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(a["choices"][i]["index"], i);
    EXPECT_EQ(a["choices"][i]["text"], b["choices"][i]["text"]);  // seeded: reproducible
    texts.insert(a["choices"][i]["text"].get<std::string>());
  }
  EXPECT_EQ(texts.size(), 3u);  // seed + i per choice: different samples
  EXPECT_EQ(a["choices"][0]["text"], "5678");  // the echo model starts at seed % len
  EXPECT_EQ(a["usage"]["completion_tokens"], 12);
  // Unseeded sampling draws a random seed per choice.
  body.erase("seed");
  body["n"] = 8;
  json c = completion(s.port, body);
  std::set<std::string> unseeded;
  for (const json& ch : c["choices"]) unseeded.insert(ch["text"].get<std::string>());
  EXPECT_GT(unseeded.size(), 1u);
  // Streaming with n: every choice gets its own chunks and a finish.
  body["n"] = 2;
  body["seed"] = 0;
  body["stream"] = true;
  HttpResponse h = gpost(s.port, "/v1/completions", body);
  auto events = sse_events(h.body);
  EXPECT_EQ(streamed_text(events, 0), "0123");
  EXPECT_EQ(streamed_text(events, 1), "1234");
}

TEST(Server, Logprobs) {
  TestServer s;
  json r = completion(s.port, {{"prompt", "ab"}, {"max_tokens", 3}, {"logprobs", 2}});
  json lp = r["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], json::parse(R"(["a", "b", "a"])"));
  EXPECT_EQ(lp["token_logprobs"], json::parse(R"([-0.25, -0.25, -0.25])"));
  EXPECT_EQ(lp["top_logprobs"][0], json::parse(R"({"a": -0.25, "b": -1.25})"));
  EXPECT_EQ(lp["text_offset"], json::parse(R"([0, 1, 2])"));

  HttpResponse h = gpost(s.port, "/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 2}, {"logprobs", true},
                              {"top_logprobs", 1}});
  ASSERT_EQ(h.status, 200) << h.body;
  json content = h.json()["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 2u);
  EXPECT_EQ(content[1], json::parse(R"({"token": "u", "logprob": -0.25, "bytes": [117],
                                        "top_logprobs": [{"token": "u", "logprob": -0.25, "bytes": [117]}]})"));
  // Streaming chat logprobs ride on the content chunks.
  h = gpost(s.port, "/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 3}, {"logprobs", true},
                 {"stream", true}});
  int n = 0;
  for (const json& e : sse_events(h.body))
    if (e.is_object() && e["choices"].size() && e["choices"][0]["logprobs"].is_object())
      n += int(e["choices"][0]["logprobs"]["content"].size());
  EXPECT_EQ(n, 3);
}

TEST(Server, ContextLengthAndModelErrors) {
  TestServer s;  // max_seq_len 512
  json r = gpost(s.port, "/v1/completions", {{"prompt", "abcd"}, {"max_tokens", 600}}).json();
  EXPECT_EQ(r["error"]["message"],
            "This model's maximum context length is 512 tokens. However, you requested 604 tokens (4 in the prompt, "
            "600 in the completion). Please reduce the length of the prompt or completion.");
  HttpResponse h = gpost(s.port, "/v1/completions", {{"prompt", std::string(600, 'x')}});
  EXPECT_EQ(h.status, 400);
  EXPECT_NE(h.body.find("600 input tokens"), std::string::npos);
  h = gpost(s.port, "/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_completion_tokens", 1000}});
  EXPECT_EQ(h.status, 400);
  EXPECT_NE(h.body.find("in the messages, 1000 in the completion"), std::string::npos);
  h = gpost(s.port, "/v1/completions", {{"model", "gpt-4"}, {"prompt", "x"}});
  EXPECT_EQ(h.status, 404);
  EXPECT_EQ(h.json()["error"]["code"], "model_not_found");
  h = gpost(s.port, "/v1/completions", {{"prompt", ""}});
  EXPECT_EQ(h.status, 400);
  // Chat without max_tokens gets the rest of the context.
  h = gpost(s.port, "/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "hi"}}}}});
  ASSERT_EQ(h.status, 200);
  EXPECT_EQ(h.json()["usage"]["total_tokens"], 512);
}

TEST(Server, ModelsTokenizeDetokenizeVersionHealth) {
  TestServer s;
  json m = http(s.port, "GET", "/v1/models").json();
  EXPECT_EQ(m["object"], "list");
  EXPECT_EQ(m["data"][0]["id"], "echo");
  EXPECT_EQ(m["data"][0]["max_model_len"], 512);
  EXPECT_EQ(http(s.port, "GET", "/v1/models/echo").json()["id"], "echo");
  EXPECT_EQ(http(s.port, "GET", "/v1/models/other").status, 404);
  json t = post_json(s.port, "/tokenize", {{"prompt", "hi"}}).json();
  EXPECT_EQ(t["tokens"], json::parse("[104, 105]"));
  EXPECT_EQ(t["count"], 2);
  EXPECT_EQ(t["max_model_len"], 512);
  t = post_json(s.port, "/tokenize", {{"messages", {{{"role", "user"}, {"content", "hi"}}}}}).json();
  EXPECT_EQ(t["count"], 21);
  EXPECT_EQ(t["tokens"][0], kImStart);
  json d = post_json(s.port, "/detokenize", {{"tokens", {104, 105, kEosId}}}).json();
  EXPECT_EQ(d["prompt"], "hi<|endoftext|>");
  EXPECT_EQ(post_json(s.port, "/detokenize", {{"tokens", {100000}}}).status, 400);
  EXPECT_EQ(http(s.port, "GET", "/health").status, 200);
  json v = http(s.port, "GET", "/version").json();
  EXPECT_TRUE(v["version"].is_string());
}

TEST(Server, LoadingServer503UntilReady) {
  TestServerConfig cfg;
  cfg.load = false;
  TestServer s(cfg);
  EXPECT_EQ(http(s.port, "GET", "/health").status, 503);
  EXPECT_EQ(gpost(s.port, "/v1/completions", {{"prompt", "x"}}).status, 503);
  EXPECT_EQ(http(s.port, "GET", "/metrics").status, 200);
  EXPECT_EQ(http(s.port, "GET", "/version").status, 200);
}

TEST(Server, ApiKey) {
  TestServerConfig cfg;
  cfg.api_key = "sekret";
  TestServer s(cfg);
  json body = {{"prompt", "x"}, {"max_tokens", 1}};
  HttpResponse h = gpost(s.port, "/v1/completions", body);
  EXPECT_EQ(h.status, 401);
  EXPECT_EQ(h.json()["error"]["code"], "invalid_api_key");
  EXPECT_EQ(gpost(s.port, "/v1/completions", body, {"Authorization: Bearer wrong"}).status, 401);
  EXPECT_EQ(gpost(s.port, "/v1/completions", body, {"Authorization: Bearer sekre"}).status, 401);
  EXPECT_EQ(gpost(s.port, "/v1/completions", body, {"Authorization: sekret"}).status, 401);
  EXPECT_EQ(gpost(s.port, "/v1/completions", body, {"Authorization: Bearer sekret"}).status, 200);
  EXPECT_EQ(http(s.port, "GET", "/health").status, 200);  // open
  EXPECT_EQ(http(s.port, "GET", "/metrics").status, 401);
  EXPECT_EQ(http(s.port, "GET", "/metrics", "", {"Authorization: Bearer sekret"}).status, 200);
}

TEST(Server, Metrics) {
  TestServer s;
  completion(s.port, {{"prompt", "abc"}, {"max_tokens", 4}});
  gpost(s.port, "/v1/completions", {{"prompt", 5}});
  HttpResponse m = http(s.port, "GET", "/metrics");
  ASSERT_EQ(m.status, 200);
  EXPECT_NE(m.body.find("kiln_http_requests_total{code=\"200\"} 1"), std::string::npos) << m.body;
  EXPECT_NE(m.body.find("kiln_http_requests_total{code=\"400\"} 1"), std::string::npos);
  EXPECT_NE(m.body.find("kiln_prompt_tokens_total 3"), std::string::npos);
  EXPECT_NE(m.body.find("kiln_generation_tokens_total 4"), std::string::npos);
  EXPECT_NE(m.body.find("kiln_time_to_first_token_seconds_count 1"), std::string::npos);
  EXPECT_NE(m.body.find("kiln_inter_token_latency_seconds_count 3"), std::string::npos);
  EXPECT_NE(m.body.find("kiln_request_success_total{finish_reason=\"length\"} 1"), std::string::npos);
  EXPECT_EQ(metric(s.port, "kiln_kv_blocks_total"), 64);
  // The engine publishes its KV gauge after the step that retires the request, which may come just
  // after the response went out (a CI run read 1 here once).
  EXPECT_TRUE(eventually([&] { return metric(s.port, "kiln_kv_blocks_used") == 0; }));
  EXPECT_EQ(metric(s.port, "kiln_num_requests_waiting"), 0);
  EXPECT_GE(metric(s.port, "kiln_prefix_cache_hit_rate"), 0);
}

// (b) Concurrent streaming clients each get exactly what they get alone.
TEST(Server, ConcurrentStreamsMatchSolo) {
  TestServerConfig cfg;
  cfg.step_delay_ms = 1;
  TestServer s(cfg);
  const int kClients = 32;
  auto prompt_of = [](int i) { return "client " + std::to_string(i) + " says " + std::string(size_t(i % 5), '!') + ". "; };
  std::vector<std::string> solo(kClients), together(kClients);
  for (int i = 0; i < kClients; ++i)
    solo[size_t(i)] = completion(s.port, {{"prompt", prompt_of(i)}, {"max_tokens", 24}, {"temperature", 0}})["choices"][0]["text"];
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i)
    threads.emplace_back([&, i] {
      HttpResponse h = gpost(s.port, "/v1/completions", {{"prompt", prompt_of(i)}, {"max_tokens", 24}, {"temperature", 0}, {"stream", true}});
      together[size_t(i)] = streamed_text(sse_events(h.body));
    });
  for (auto& t : threads) t.join();
  for (int i = 0; i < kClients; ++i) EXPECT_EQ(together[size_t(i)], solo[size_t(i)]) << "client " << i;
}

// (d) A client killed mid-stream: its request is cancelled and its KV blocks return to the pool.
TEST(Server, DisconnectMidStreamFreesKvBlocks) {
  TestServerConfig cfg;
  cfg.step_delay_ms = 20;
  TestServer s(cfg);
  for (bool stream : {true, false}) {
    Conn c(s.port);
    ASSERT_TRUE(c.send(request_text("POST", "/v1/completions",
                                    json({{"prompt", std::string(40, 'q')}, {"max_tokens", 400}, {"stream", stream}}).dump())));
    ASSERT_TRUE(eventually([&] { return metric(s.port, "kiln_kv_blocks_used") > 0; })) << "stream=" << stream;
    c.abort();
    EXPECT_TRUE(eventually([&] { return metric(s.port, "kiln_kv_blocks_used") == 0; })) << "stream=" << stream;
    EXPECT_EQ(metric(s.port, "kiln_num_requests_running"), 0);
  }
  HttpResponse m = http(s.port, "GET", "/metrics");
  EXPECT_NE(m.body.find("kiln_request_success_total{finish_reason=\"abort\"} 2"), std::string::npos) << m.body;
  // Far fewer than 2 x 400 tokens were generated: the engine stopped right away.
  EXPECT_LT(s.exec->steps.load(), 300);
  EXPECT_EQ(http(s.port, "GET", "/health").status, 200);
}

TEST(Server, QueueFullIs503) {
  TestServerConfig cfg;
  cfg.max_queue = 1;
  cfg.step_delay_ms = 5;
  TestServer s(cfg);
  // n=4 choices can never fit a queue of 1.
  HttpResponse h = gpost(s.port, "/v1/completions", {{"prompt", "x"}, {"n", 4}, {"max_tokens", 2}});
  EXPECT_EQ(h.status, 503);
  EXPECT_EQ(h.header("retry-after"), "1");
  EXPECT_EQ(gpost(s.port, "/v1/completions", {{"prompt", "x"}, {"max_tokens", 2}}).status, 200);
}

TEST(Server, GracefulShutdownFinishesInFlight) {
  TestServerConfig cfg;
  cfg.step_delay_ms = 10;
  auto s = std::make_unique<TestServer>(cfg);
  uint16_t port = s->port;
  HttpResponse got;
  std::thread client([&] { got = gpost(port, "/v1/completions", {{"prompt", "abc"}, {"max_tokens", 30}}); });
  ASSERT_TRUE(eventually([&] { return s->exec->steps.load() > 2; }));
  s->server->shutdown(10.0);
  client.join();
  EXPECT_EQ(got.status, 200);
  EXPECT_EQ(got.json()["usage"]["completion_tokens"], 30);
  EXPECT_EQ(got.header("connection"), "close");
  Conn after(port);
  EXPECT_FALSE(after.ok());  // no longer accepting
}

TEST(Server, ChatPageAtRootIsOpenAndCacheable) {
  TestServerConfig cfg;
  cfg.api_key = "k";
  TestServer s(cfg);
  HttpResponse r = http(s.port, "GET", "/");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.header("content-type"), "text/html; charset=utf-8");
  EXPECT_NE(r.body.find("<html"), std::string::npos);
  std::string etag = r.header("etag");
  ASSERT_FALSE(etag.empty());
  Conn c(s.port);
  ASSERT_TRUE(c.send(request_text("GET", "/", "", {"If-None-Match: " + etag})));
  HttpResponse again = c.read_response();  // 304 has no Content-Length: read it on a live connection
  EXPECT_EQ(again.status, 304);
  ASSERT_TRUE(c.send(request_text("GET", "/health", "")));
  EXPECT_EQ(c.read_response().status, 200);  // the connection is still in step
}
