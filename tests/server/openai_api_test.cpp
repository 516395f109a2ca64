// Request validation and response shapes of the OpenAI API layer, as tables (no model, no HTTP).
#include <gtest/gtest.h>

#include "server/openai_api.h"

using namespace kiln::server;
using nlohmann::json;

namespace {

ApiLimits limits() {
  ApiLimits l;
  l.vocab_size = 1000;
  return l;
}

struct Case {
  const char* body;
  int status;             // 0: valid
  const char* contains;   // substring of the error message (or param when it starts with '@')
};

std::optional<ApiError> parse(bool chat, const std::string& body) {
  Json j;
  if (auto e = parse_json_body(body, &j)) return e;
  if (chat) {
    ChatRequest r;
    return parse_chat_request(j, limits(), &r);
  }
  CompletionRequest r;
  return parse_completion_request(j, limits(), &r);
}

void run_table(bool chat, const std::vector<Case>& cases) {
  for (const Case& c : cases) {
    auto e = parse(chat, c.body);
    SCOPED_TRACE(c.body);
    if (c.status == 0) {
      EXPECT_FALSE(e.has_value()) << e->message;
      continue;
    }
    ASSERT_TRUE(e.has_value());
    EXPECT_EQ(e->status, c.status);
    std::string want = c.contains;
    if (!want.empty() && want[0] == '@') EXPECT_EQ(e->param, want.substr(1));
    else EXPECT_NE(e->message.find(want), std::string::npos) << "message: " << e->message;
  }
}

}  // namespace

TEST(OpenAiApi, CompletionValidationTable) {
  run_table(false, {
      {R"({"prompt": "hi"})", 0, ""},
      {R"({"model": "m", "prompt": ["a", "b"], "max_tokens": 5})", 0, ""},
      {R"({"prompt": [1, 2, 3]})", 0, ""},
      {R"({"prompt": [[1, 2], [3]]})", 0, ""},
      {R"({"prompt": "hi", "max_tokens": 10.0})", 0, ""},
      {R"({"prompt": "hi", "unknown_field": {"x": 1}})", 0, ""},
      {R"({"prompt": "hi", "temperature": null, "stop": null})", 0, ""},
      {R"({"prompt": "hi", "best_of": 1})", 0, ""},
      {R"({"prompt": "hi", "logprobs": 5})", 0, ""},
      {R"({"prompt": "hi", "stream": true, "stream_options": {"include_usage": true}})", 0, ""},
      {R"({"prompt": "hi", "seed": 18446744073709551615})", 0, ""},
      {R"({"prompt": "hi", "seed": -5})", 0, ""},
      {R"({"prompt": "hi", "top_k": -1})", 0, ""},
      {R"({"prompt": "hi", "logit_bias": {"5": -100, "999": 100}})", 0, ""},
      {R"({})", 400, "@prompt"},
      {R"({"prompt": 5})", 400, "'prompt' must be a string or an array"},
      {R"({"prompt": []})", 400, "must not be empty"},
      {R"({"prompt": [[]]})", 400, "must not be empty"},
      {R"({"prompt": ["a", 1]})", 400, "only strings"},
      {R"({"prompt": [1, "a"]})", 400, "@prompt"},
      {R"({"prompt": [1, 1000]})", 400, "out of range"},
      {R"({"prompt": [-1]})", 400, "out of range"},
      {R"({"prompt": [true]})", 400, "@prompt"},
      {R"({"prompt": "hi", "model": 3})", 400, "'model' must be a string"},
      {R"({"prompt": "hi", "max_tokens": 0})", 400, "'max_tokens' must be at least 1"},
      {R"({"prompt": "hi", "max_tokens": -5})", 400, "@max_tokens"},
      {R"({"prompt": "hi", "max_tokens": "10"})", 400, "'max_tokens' must be an integer, got a string"},
      {R"({"prompt": "hi", "max_tokens": 10.5})", 400, "must be an integer"},
      {R"({"prompt": "hi", "max_tokens": true})", 400, "got a boolean"},
      {R"({"prompt": "hi", "max_tokens": 1e300})", 400, "@max_tokens"},
      {R"({"prompt": "hi", "max_tokens": 99999999999999999999999})", 400, "@max_tokens"},
      {R"({"prompt": "hi", "n": 0})", 400, "'n' must be between 1 and 16"},
      {R"({"prompt": "hi", "n": 17})", 400, "@n"},
      {R"({"prompt": "hi", "temperature": 2.5})", 400, "'temperature' must be in [0, 2]"},
      {R"({"prompt": "hi", "temperature": -0.1})", 400, "@temperature"},
      {R"({"prompt": "hi", "temperature": "hot"})", 400, "must be a number"},
      {R"({"prompt": "hi", "top_p": 0})", 400, "'top_p' must be in (0, 1]"},
      {R"({"prompt": "hi", "top_p": 1.01})", 400, "@top_p"},
      {R"({"prompt": "hi", "top_k": -2})", 400, "@top_k"},
      {R"({"prompt": "hi", "min_p": 1.5})", 400, "@min_p"},
      {R"({"prompt": "hi", "presence_penalty": 3})", 400, "@presence_penalty"},
      {R"({"prompt": "hi", "frequency_penalty": -2.5})", 400, "@frequency_penalty"},
      {R"({"prompt": "hi", "repetition_penalty": 0})", 400, "@repetition_penalty"},
      {R"({"prompt": "hi", "logprobs": 21})", 400, "'logprobs' must be between 0 and 20"},
      {R"({"prompt": "hi", "logprobs": true})", 400, "@logprobs"},
      {R"({"prompt": "hi", "echo": true, "logprobs": 1})", 0, ""},  // prompt logprobs (issue #4)
      {R"({"prompt": "hi", "echo": true, "logprobs": 0, "max_tokens": 0})", 0, ""},  // score the prompt
      {R"({"prompt": "hi", "echo": true, "max_tokens": 0})", 0, ""},
      {R"({"prompt": "hi", "logprobs": 2, "max_tokens": 0})", 400, "allowed only with 'echo'"},
      {R"({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]})", 400, "at most 4"},
      {R"({"prompt": "hi", "stop": 5})", 400, "@stop"},
      {R"({"prompt": "hi", "stop": [5]})", 400, "@stop"},
      {R"({"prompt": "hi", "stream": "yes"})", 400, "'stream' must be a boolean"},
      {R"({"prompt": "hi", "stream_options": {"include_usage": true}})", 400, "only allowed when 'stream'"},
      {R"({"prompt": "hi", "stream": true, "stream_options": 1})", 400, "@stream_options"},
      {R"({"prompt": "hi", "logit_bias": {"x": 1}})", 400, "@logit_bias"},
      {R"({"prompt": "hi", "logit_bias": {"1000": 1}})", 400, "not a token id"},
      {R"({"prompt": "hi", "logit_bias": {"5": 101}})", 400, "[-100, 100]"},
      {R"({"prompt": "hi", "logit_bias": {"5": "a"}})", 400, "@logit_bias"},
      {R"({"prompt": "hi", "logit_bias": [1]})", 400, "@logit_bias"},
      {R"({"prompt": "hi", "min_tokens": 10, "max_tokens": 5})", 400, "@min_tokens"},
      {R"({"prompt": "hi", "min_tokens": -1})", 400, "@min_tokens"},
      {R"({"prompt": "hi", "best_of": 3})", 400, "@best_of"},
      {R"({"prompt": "hi", "suffix": "x"})", 400, "@suffix"},
      {R"({"prompt": "hi", "stop_token_ids": [1, 5000]})", 400, "@stop_token_ids"},
      {R"({"prompt": "hi", "seed": 1.5})", 400, "@seed"},
      {R"({"prompt": "hi", "seed": "1"})", 400, "@seed"},
  });
}

TEST(OpenAiApi, ChatValidationTable) {
  run_table(true, {
      {R"({"messages": [{"role": "user", "content": "hi"}]})", 0, ""},
      {R"({"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]})", 0, ""},
      {R"({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})", 0, ""},
      {R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null,
           "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "42"}]})", 0, ""},
      {R"({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5, "logprobs": true, "top_logprobs": 3})", 0, ""},
      {R"({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"})", 0, ""},
      {R"({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}})", 0, ""},
      {R"({})", 400, "'messages' is required"},
      {R"({"messages": []})", 400, "must not be empty"},
      {R"({"messages": "hi"})", 400, "'messages' must be an array"},
      {R"({"messages": [5]})", 400, "messages[0] must be an object"},
      {R"({"messages": [{"content": "hi"}]})", 400, "messages[0].role must be a string"},
      {R"({"messages": [{"role": "wizard", "content": "hi"}]})", 400, "role 'wizard' is not one of"},
      {R"({"messages": [{"role": "user"}]})", 400, "content is required"},
      {R"({"messages": [{"role": "user", "content": 5}]})", 400, "must be a string or an array"},
      {R"({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})", 400, "'image_url' are not supported"},
      {R"({"messages": [{"role": "user", "content": [{"type": "text"}]}]})", 400, "text must be a string"},
      {R"({"messages": [{"role": "user", "content": [5]}]})", 400, "must be an object"},
      {R"({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]})", 400, "only assistant"},
      {R"({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"function": 1}]}]})", 400, "function must be an object"},
      {R"({"messages": [{"role": "user", "content": "hi", "name": 5}]})", 400, "name must be a string"},
      {R"({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3})", 400, "needs 'logprobs'"},
      {R"({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21})", 400, "@top_logprobs"},
      {R"({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1})", 400, "@logprobs"},
      {R"({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0})", 400, "@max_completion_tokens"},
      {R"({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})", 400, "'max_tokens' must be at least 1"},
      {R"({"messages": [{"role": "user", "content": "hi"}], "tools": {}})", 400, "@tools"},
      {R"({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "retrieval"}]})", 400, "@tools"},
      {R"({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"})", 400, "@tool_choice"},
      {R"({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}})", 400, "@response_format"},
      {R"({"messages": [{"role": "user", "content": "hi"}], "temperature": 3})", 400, "@temperature"},
  });
}

TEST(OpenAiApi, BodyShapeLimits) {
  Json j;
  EXPECT_FALSE(parse_json_body(R"({"a": 1})", &j));
  auto e = parse_json_body("{not json", &j);
  ASSERT_TRUE(e);
  EXPECT_NE(e->message.find("not valid JSON"), std::string::npos);
  e = parse_json_body("[1, 2]", &j);
  ASSERT_TRUE(e);
  EXPECT_NE(e->message.find("must be a JSON object"), std::string::npos);
  e = parse_json_body("", &j);
  ASSERT_TRUE(e);
  // Deep nesting is refused before parsing (copies and dumps of JSON recurse).
  std::string deep = "{\"a\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  e = parse_json_body(deep, &j);
  ASSERT_TRUE(e);
  EXPECT_NE(e->message.find("levels deep"), std::string::npos);
  // Brackets inside strings do not count.
  std::string in_string = "{\"a\": \"" + std::string(1000, '[') + "\\\"\"}";
  EXPECT_FALSE(parse_json_body(in_string, &j));
  std::string wide = "{";
  for (int i = 0; i < 2000; ++i) wide += (i ? ",\"k" : "\"k") + std::to_string(i) + "\": 1";
  wide += "}";
  e = parse_json_body(wide, &j);
  ASSERT_TRUE(e);
  EXPECT_NE(e->message.find("members"), std::string::npos);
  // Invalid UTF-8 inside a string is rejected by the parser, not a crash later.
  e = parse_json_body("{\"prompt\": \"\xff\xfe\"}", &j);
  EXPECT_TRUE(e);
}

TEST(OpenAiApi, ParsedValues) {
  Json j;
  ASSERT_FALSE(parse_json_body(R"({"prompt": [[1, 2], [3]], "n": 2, "stop": ["", "x"], "seed": 7,
      "temperature": 0, "top_k": -1, "max_tokens": 9, "logit_bias": {"3": -100}, "echo": true, "ignore_eos": true,
      "stream": true, "stream_options": {"include_usage": true}})", &j));
  CompletionRequest r;
  ASSERT_FALSE(parse_completion_request(j, limits(), &r));
  EXPECT_EQ(r.token_prompts, (std::vector<std::vector<int32_t>>{{1, 2}, {3}}));
  EXPECT_EQ(r.gen.n, 2);
  EXPECT_EQ(r.gen.stop, std::vector<std::string>{"x"});  // empty stop strings are dropped
  EXPECT_EQ(r.gen.seed, std::optional<uint64_t>(7));
  EXPECT_EQ(r.gen.sampling.temperature, 0.0f);
  EXPECT_EQ(r.gen.sampling.top_k, 0);
  EXPECT_EQ(r.gen.max_tokens, std::optional<int32_t>(9));
  ASSERT_EQ(r.gen.sampling.logit_bias.size(), 1u);
  EXPECT_EQ(r.gen.sampling.logit_bias[0], (std::pair<int32_t, float>(3, -100.0f)));
  EXPECT_TRUE(r.echo);
  EXPECT_TRUE(r.gen.ignore_eos);
  EXPECT_TRUE(r.gen.include_usage);
  EXPECT_EQ(r.gen.logprobs, -1);

  ASSERT_FALSE(parse_json_body(R"({"messages": [{"role": "developer", "content": "s"}, {"role": "user", "content": "u"}],
      "max_tokens": 3, "max_completion_tokens": 7, "logprobs": true, "top_logprobs": 2})", &j));
  ChatRequest c;
  ASSERT_FALSE(parse_chat_request(j, limits(), &c));
  EXPECT_EQ(c.messages[0]["role"], "system");  // developer is system for templates
  EXPECT_EQ(c.gen.max_tokens, std::optional<int32_t>(7));  // max_completion_tokens wins
  EXPECT_EQ(c.gen.logprobs, 2);
  EXPECT_TRUE(c.add_generation_prompt);
}

TEST(OpenAiApi, TokenizeRequests) {
  Json j;
  TokenizeRequest t;
  ASSERT_FALSE(parse_json_body(R"({"prompt": "hello"})", &j));
  ASSERT_FALSE(parse_tokenize_request(j, &t));
  EXPECT_FALSE(t.is_chat);
  EXPECT_TRUE(t.add_special_tokens);
  ASSERT_FALSE(parse_json_body(R"({"messages": [{"role": "user", "content": "x"}]})", &j));
  ASSERT_FALSE(parse_tokenize_request(j, &t));
  EXPECT_TRUE(t.is_chat);
  EXPECT_FALSE(t.add_special_tokens);
  ASSERT_FALSE(parse_json_body(R"({})", &j));
  EXPECT_TRUE(parse_tokenize_request(j, &t));
  ASSERT_FALSE(parse_json_body(R"({"prompt": "a", "messages": []})", &j));
  EXPECT_TRUE(parse_tokenize_request(j, &t));
  std::vector<int32_t> ids;
  ASSERT_FALSE(parse_json_body(R"({"tokens": [1, 2, 999]})", &j));
  EXPECT_FALSE(parse_detokenize_request(j, limits(), &ids));
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 2, 999}));
  ASSERT_FALSE(parse_json_body(R"({"tokens": [1000]})", &j));
  EXPECT_TRUE(parse_detokenize_request(j, limits(), &ids));
  ASSERT_FALSE(parse_json_body(R"({"tokens": "1"})", &j));
  EXPECT_TRUE(parse_detokenize_request(j, limits(), &ids));
}

TEST(OpenAiApi, ContextLengthMessageNamesBothNumbers) {
  ApiError e = context_length_error(2048, 100, 2000, "messages");
  EXPECT_EQ(e.status, 400);
  EXPECT_EQ(e.message,
            "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (100 in the "
            "messages, 2000 in the completion). Please reduce the length of the messages or completion.");
  e = context_length_error(2048, 3000, 0, "prompt");
  EXPECT_NE(e.message.find("your request has 3000 input tokens"), std::string::npos);
}

TEST(OpenAiApi, ErrorShape) {
  ApiError e = api_bad_request("bad", "temperature");
  json j = json::parse(dump_json(e.to_json()));
  EXPECT_EQ(j, json::parse(R"({"error": {"message": "bad", "type": "invalid_request_error", "param": "temperature", "code": null}})"));
  e = api_not_found("nope", "model_not_found");
  j = json::parse(dump_json(e.to_json()));
  EXPECT_EQ(e.status, 404);
  EXPECT_EQ(j["error"]["code"], "model_not_found");
  EXPECT_TRUE(j["error"]["param"].is_null());
}

TEST(OpenAiApi, StopStringHelpers) {
  struct StopCase {
    std::string text;
    std::vector<std::string> stops;
    size_t found;
    size_t holdback;
  };
  const size_t npos = std::string::npos;
  for (const StopCase& c : std::vector<StopCase>{
           {"hello world", {"wor"}, 6, 0},
           {"hello wo", {"world"}, npos, 2},
           {"hello w", {"world", "hello!"}, npos, 1},
           {"hello", {"hello!"}, npos, 5},
           {"abcabc", {"ca", "bc"}, 1, 1},
           {"abc", {"x"}, npos, 0},
           {"", {"abc"}, npos, 0},
           {"xab", {"abab"}, npos, 2},
       }) {
    SCOPED_TRACE(c.text);
    size_t len = 0;
    EXPECT_EQ(find_stop(c.text, c.stops, 0, &len), c.found);
    EXPECT_EQ(stop_holdback(c.text, c.stops), c.holdback);
  }
  size_t len = 0;
  EXPECT_EQ(find_stop("abcabc", {"abc"}, 1, &len), 3u);
  EXPECT_EQ(len, 3u);
  EXPECT_EQ(utf8_length("h\xc3\xa9llo"), 5);
  EXPECT_EQ(token_display("a\xe2\x82"), "a\xef\xbf\xbd");  // a partial UTF-8 token shows U+FFFD
}

TEST(OpenAiApi, ResponseShapes) {
  ResponseMeta meta{"cmpl-1", 1700000000, "m", "fp"};
  ChoiceResult c;
  c.index = 0;
  c.text = "hi";
  c.finish_reason = "length";
  c.has_logprobs = true;
  c.logprobs = {{"h", -0.5f, {{"h", -0.5f}, {"x", -1.0f}}}, {"i", -std::numeric_limits<float>::infinity(), {}}};
  Usage u{3, 2, 0};
  json j = json::parse(dump_json(completion_response(meta, {c}, u)));
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["text"], "hi");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"], json::parse(R"({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})"));
  json lp = j["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], json::parse(R"(["h", "i"])"));
  EXPECT_EQ(lp["token_logprobs"], json::parse(R"([-0.5, -9999.0])"));  // -inf is clamped as vLLM does
  EXPECT_EQ(lp["top_logprobs"][0], json::parse(R"({"h": -0.5, "x": -1.0})"));
  EXPECT_EQ(lp["text_offset"], json::parse(R"([0, 1])"));

  // echo + logprobs: the first prompt token has null logprob and top; offsets run from 0 over the
  // prompt tokens' text into the generated ones.
  ChoiceResult e = c;
  e.text = "ab\xc3\xa9hi";
  e.logprobs.insert(e.logprobs.begin(), {{"ab", 0.0f, {}, false}, {"\xc3\xa9", -2.0f, {{"x", -0.25f}}}});
  json elp = json::parse(dump_json(completion_response(meta, {e}, u)))["choices"][0]["logprobs"];
  EXPECT_EQ(elp["tokens"], json::parse(R"(["ab", "\u00e9", "h", "i"])"));
  EXPECT_EQ(elp["token_logprobs"], json::parse(R"([null, -2.0, -0.5, -9999.0])"));
  EXPECT_EQ(elp["top_logprobs"][0], nullptr);
  EXPECT_EQ(elp["top_logprobs"][1], json::parse(R"({"\u00e9": -2.0, "x": -0.25})"));
  EXPECT_EQ(elp["text_offset"], json::parse(R"([0, 2, 3, 4])"));

  j = json::parse(dump_json(chat_response(meta, {c}, u)));
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"], json::parse(R"({"role": "assistant", "content": "hi"})"));
  EXPECT_EQ(j["choices"][0]["logprobs"]["content"][0],
            json::parse(R"({"token": "h", "logprob": -0.5, "bytes": [104],
                            "top_logprobs": [{"token": "h", "logprob": -0.5, "bytes": [104]},
                                             {"token": "x", "logprob": -1.0, "bytes": [120]}]})"));
  EXPECT_EQ(j["system_fingerprint"], "fp");

  ChoiceResult d;
  d.index = 1;
  j = json::parse(dump_json(chat_chunk(meta, d, /*role_chunk=*/true, /*usage_null=*/true)));
  EXPECT_EQ(j["object"], "chat.completion.chunk");
  EXPECT_EQ(j["choices"][0]["delta"], json::parse(R"({"role": "assistant", "content": ""})"));
  EXPECT_TRUE(j["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(j.contains("usage") && j["usage"].is_null());
  d.finish_reason = "stop";
  j = json::parse(dump_json(chat_chunk(meta, d, false, false)));
  EXPECT_EQ(j["choices"][0]["delta"], json::object());
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_FALSE(j.contains("usage"));
  j = json::parse(dump_json(usage_chunk(meta, "text_completion", u)));
  EXPECT_EQ(j["choices"], json::array());
  EXPECT_EQ(j["usage"]["total_tokens"], 5);
  EXPECT_EQ(sse_event(Json{{"a", 1}}), "data: {\"a\":1}\n\n");
  // Invalid UTF-8 never throws on the way out.
  EXPECT_EQ(dump_json(Json("a\xff")), "\"a\xef\xbf\xbd\"");
}
