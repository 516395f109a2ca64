// The OpenAI-compatible API surface as plain data: JSON bodies -> validated native request structs
// (with an OpenAI-shaped ApiError on bad input), and result structs -> response JSON. No HTTP, no
// engine, no tokenizer here, so every rule is tested from tables (STYLE.md #10).
//
// Validation follows what vLLM and OpenAI accept: unknown fields are ignored, null means "not
// given", integers may be written as integral floats (10.0), booleans are never numbers.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/sampling.h"

namespace kiln::server {

// Insertion-ordered JSON: tools and messages reach the chat template with the client's key order
// (templates print them with tojson), and responses list fields in OpenAI's order.
using Json = nlohmann::ordered_json;

// {"error": {"message", "type", "param", "code"}} with the HTTP status it travels with.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // "" -> null
  std::string code;   // "" -> null
  Json to_json() const;
};
ApiError api_bad_request(std::string message, std::string param = "");
ApiError api_not_found(std::string message, std::string code = "");

// What the API layer knows about the served model when it validates.
struct ApiLimits {
  int32_t vocab_size = 0;   // token ids (prompts, logit_bias, stop_token_ids) must be below it
  int32_t max_n = 16;       // choices per request (vLLM allows any n; each choice is an engine request)
  int32_t max_prompts = 256;  // prompts per /v1/completions request
  int32_t max_logprobs = 20;  // vLLM's default max_logprobs
};

// Sampling and stopping options shared by /v1/completions and /v1/chat/completions.
struct GenerationOptions {
  int32_t n = 1;
  bool stream = false;
  bool include_usage = false;             // stream_options.include_usage
  std::optional<int32_t> max_tokens;      // absent: completions 16; chat: the rest of the context
  int32_t min_tokens = 0;
  bool ignore_eos = false;
  std::vector<std::string> stop;          // non-empty strings, at most 4
  std::vector<int32_t> stop_token_ids;
  bool include_stop_str_in_output = false;
  bool skip_special_tokens = true;
  std::optional<uint64_t> seed;           // absent: the server draws one per choice
  int32_t logprobs = -1;                  // -1: none; k >= 0: sampled token plus top k
  SamplingParams sampling;                // seed and logprobs are filled per choice by the server
};

struct CompletionRequest {
  std::string model;                               // "" if not given
  std::vector<std::string> text_prompts;           // exactly one of the two lists is non-empty
  std::vector<std::vector<int32_t>> token_prompts;
  bool echo = false;  // with logprobs: the prompt tokens' logprobs come first (vLLM, legacy OpenAI)
  GenerationOptions gen;
};

struct ChatRequest {
  std::string model;
  Json messages;  // validated; "developer" mapped to "system"
  Json tools;     // null if none
  bool add_generation_prompt = true;
  bool continue_final_message = false;
  Json chat_template_kwargs = Json::object();
  GenerationOptions gen;
};

struct TokenizeRequest {
  bool is_chat = false;
  std::string prompt;        // !is_chat
  Json messages;   // is_chat (validated like chat)
  Json tools;
  bool add_special_tokens = true;  // default: true for a prompt, false for messages (vLLM)
  bool add_generation_prompt = true;
};

// Parses a request body: 400 unless it is a JSON object.
std::optional<ApiError> parse_json_body(std::string_view body, Json* out);
std::optional<ApiError> parse_completion_request(const Json& body, const ApiLimits& limits,
                                                 CompletionRequest* out);
std::optional<ApiError> parse_chat_request(const Json& body, const ApiLimits& limits, ChatRequest* out);
std::optional<ApiError> parse_tokenize_request(const Json& body, TokenizeRequest* out);
std::optional<ApiError> parse_detokenize_request(const Json& body, const ApiLimits& limits,
                                                 std::vector<int32_t>* out);
// Validates an OpenAI messages array (roles, content strings or text parts, tool calls) and
// returns it normalized for a chat template.
std::optional<ApiError> validate_messages(const Json& messages, Json* out);

// The 400 for prompt + max_tokens over the context, as vLLM words it ("... (100 in the messages,
// 2000 in the completion) ..."); `what` is "messages" or "prompt".
ApiError context_length_error(int64_t max_model_len, int64_t prompt_tokens, int64_t max_tokens, const char* what);

// --- responses -------------------------------------------------------------------------------

// One generated token as the API reports it. `token` holds the token's raw bytes (possibly a
// partial UTF-8 sequence); JSON output shows it with U+FFFD for invalid bytes and lists the raw
// bytes in chat's "bytes".
struct LogprobItem {
  std::string token;
  float logprob = 0.0f;
  std::vector<std::pair<std::string, float>> top;  // most likely first
  bool has_logprob = true;  // false: the first echoed prompt token (logprob and top are null)
};

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;
  Json to_json() const;
};

struct ChoiceResult {
  int32_t index = 0;
  std::string text;
  std::string finish_reason;  // "stop", "length", "abort"; "" -> null
  bool has_logprobs = false;
  std::vector<LogprobItem> logprobs;
  int64_t text_offset0 = 0;   // completions: text_offset of the first logprob entry
};

struct ResponseMeta {
  std::string id;       // "chatcmpl-..." / "cmpl-..."
  int64_t created = 0;  // unix seconds
  std::string model;
  std::string system_fingerprint;  // "" -> omitted
};

// Logprobs in the legacy completions shape {tokens, token_logprobs, top_logprobs, text_offset}.
Json completion_logprobs_json(const std::vector<LogprobItem>& items, int64_t text_offset0);
// Logprobs in chat's shape {content: [{token, logprob, bytes, top_logprobs: [...]}]}.
Json chat_logprobs_json(const std::vector<LogprobItem>& items);

Json completion_response(const ResponseMeta& meta, const std::vector<ChoiceResult>& choices,
                                   const Usage& usage);
Json chat_response(const ResponseMeta& meta, const std::vector<ChoiceResult>& choices, const Usage& usage);

// Streaming chunks. `usage_null` adds "usage": null (OpenAI does so on every chunk when
// stream_options.include_usage is set).
Json completion_chunk(const ResponseMeta& meta, const ChoiceResult& delta, bool usage_null);
// role_chunk: the first chunk of a choice ({"role": "assistant", "content": ""}).
Json chat_chunk(const ResponseMeta& meta, const ChoiceResult& delta, bool role_chunk, bool usage_null);
Json usage_chunk(const ResponseMeta& meta, const char* object, const Usage& usage);

// JSON text with invalid UTF-8 replaced by U+FFFD (never throws).
std::string dump_json(const Json& j);
// "data: {...}\n\n"
std::string sse_event(const Json& j);

// Text up to the first stop string (and its position), searching from `from` (a byte offset).
// Returns npos when none occurs.
size_t find_stop(std::string_view text, const std::vector<std::string>& stops, size_t from, size_t* stop_len);
// Bytes at the end of `text` that could be the start of a stop string (held back while streaming).
size_t stop_holdback(std::string_view text, const std::vector<std::string>& stops);
// A token's raw bytes as valid UTF-8 (invalid sequences -> U+FFFD), as the API shows tokens.
std::string token_display(const std::string& raw);
// Number of Unicode code points in UTF-8 text (OpenAI's text_offset counts characters).
int64_t utf8_length(std::string_view text);

}  // namespace kiln::server
