// OpenAI request validation and response shapes. See openai_api.h.
#include "server/openai_api.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

namespace kiln::server {

using json = Json;

json ApiError::to_json() const {
  json e = {{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (!param.empty()) e["param"] = param;
  if (!code.empty()) e["code"] = code;
  return json{{"error", std::move(e)}};
}

ApiError api_bad_request(std::string message, std::string param) {
  ApiError e;
  e.status = 400;
  e.message = std::move(message);
  e.param = std::move(param);
  return e;
}

ApiError api_not_found(std::string message, std::string code) {
  ApiError e;
  e.status = 404;
  e.message = std::move(message);
  e.type = "invalid_request_error";
  e.code = std::move(code);
  return e;
}

namespace {

using MaybeError = std::optional<ApiError>;

#define KILN_API_TRY(expr)              \
  do {                                  \
    if (auto kiln_e_ = (expr)) return kiln_e_; \
  } while (0)

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer";
    case json::value_t::number_float: return "a number";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    case json::value_t::binary: return "binary";
    case json::value_t::discarded: return "discarded";
  }
  return "unknown";
}

// The value as the client wrote it, shortened for messages.
std::string shown(const json& v) {
  std::string s = dump_json(v);
  if (s.size() > 64) s = s.substr(0, 61) + "...";
  return s;
}

const json* find(const json& o, const char* key) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return nullptr;
  return &*it;
}

// Integers: JSON integers, or integral floats (pydantic's lax mode accepts 10.0). `overflow` is set
// for integers that do not fit in int64 (they are out of every range we accept).
bool as_int(const json& v, int64_t* out, bool* overflow) {
  *overflow = false;
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u > uint64_t(std::numeric_limits<int64_t>::max())) {
      *overflow = true;
      *out = std::numeric_limits<int64_t>::max();
    } else {
      *out = int64_t(u);
    }
    return true;
  }
  if (v.is_number_integer()) {
    *out = v.get<int64_t>();
    return true;
  }
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (!std::isfinite(d) || d != std::floor(d)) return false;
    if (d >= 9.2e18 || d <= -9.2e18) {
      *overflow = true;
      *out = d > 0 ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int64_t>::min();
      return true;
    }
    *out = int64_t(d);
    return true;
  }
  return false;
}

std::string range_text(int64_t lo, int64_t hi) {
  if (hi == std::numeric_limits<int64_t>::max()) return "at least " + std::to_string(lo);
  return "between " + std::to_string(lo) + " and " + std::to_string(hi);
}

MaybeError read_int(const json& o, const char* key, int64_t lo, int64_t hi, std::optional<int64_t>* out) {
  const json* v = find(o, key);
  if (!v) return {};
  int64_t x = 0;
  bool overflow = false;
  if (!as_int(*v, &x, &overflow))
    return api_bad_request(std::string("'") + key + "' must be an integer, got " + type_name(*v) +
                               (v->is_number() ? " " + shown(*v) : ""),
                           key);
  if (overflow || x < lo || x > hi)
    return api_bad_request(std::string("'") + key + "' must be " + range_text(lo, hi) + ", got " + shown(*v), key);
  *out = x;
  return {};
}

template <class T>
MaybeError read_int_into(const json& o, const char* key, int64_t lo, int64_t hi, T* out) {
  std::optional<int64_t> v;
  KILN_API_TRY(read_int(o, key, lo, hi, &v));
  if (v) *out = T(*v);
  return {};
}

struct FloatRange {
  double lo, hi;
  bool lo_open = false, hi_open = false;
};

std::string fmt_num(double d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", d);
  return buf;
}

MaybeError read_float(const json& o, const char* key, FloatRange r, float* out) {
  const json* v = find(o, key);
  if (!v) return {};
  if (!v->is_number())
    return api_bad_request(std::string("'") + key + "' must be a number, got " + type_name(*v), key);
  double d = v->get<double>();
  bool ok = std::isfinite(d) && (r.lo_open ? d > r.lo : d >= r.lo) && (r.hi_open ? d < r.hi : d <= r.hi);
  if (!ok) {
    std::string range;
    if (r.hi >= 1e300)
      range = std::string(r.lo_open ? "greater than " : "at least ") + fmt_num(r.lo);
    else
      range = std::string("in ") + (r.lo_open ? "(" : "[") + fmt_num(r.lo) + ", " + fmt_num(r.hi) + (r.hi_open ? ")" : "]");
    return api_bad_request(std::string("'") + key + "' must be " + range + ", got " + shown(*v), key);
  }
  *out = float(d);
  return {};
}

MaybeError read_bool(const json& o, const char* key, bool* out) {
  const json* v = find(o, key);
  if (!v) return {};
  if (!v->is_boolean())
    return api_bad_request(std::string("'") + key + "' must be a boolean, got " + type_name(*v), key);
  *out = v->get<bool>();
  return {};
}

MaybeError read_string(const json& o, const char* key, std::string* out) {
  const json* v = find(o, key);
  if (!v) return {};
  if (!v->is_string()) return api_bad_request(std::string("'") + key + "' must be a string, got " + type_name(*v), key);
  *out = v->get<std::string>();
  return {};
}

// A token id list: every element an integer in [0, vocab_size) (vocab_size 0: no upper check).
MaybeError read_token_ids(const json& arr, const char* key, int32_t vocab_size, std::vector<int32_t>* out) {
  out->clear();
  out->reserve(arr.size());
  for (const json& t : arr) {
    int64_t id = 0;
    bool overflow = false;
    if (!as_int(t, &id, &overflow))
      return api_bad_request(std::string("'") + key + "' must hold integer token ids, got " + type_name(t), key);
    if (overflow || id < 0 || (vocab_size > 0 && id >= vocab_size))
      return api_bad_request(std::string("'") + key + "': token id " + shown(t) + " is out of range [0, " +
                                 std::to_string(vocab_size) + ")",
                             key);
    out->push_back(int32_t(id));
  }
  return {};
}

MaybeError parse_stop(const json& o, GenerationOptions* g) {
  const json* v = find(o, "stop");
  if (!v) return {};
  std::vector<std::string> stops;
  if (v->is_string()) {
    stops.push_back(v->get<std::string>());
  } else if (v->is_array()) {
    if (v->size() > 4) return api_bad_request("'stop' takes at most 4 sequences, got " + std::to_string(v->size()), "stop");
    for (const json& s : *v) {
      if (!s.is_string()) return api_bad_request(std::string("'stop' must hold strings, got ") + type_name(s), "stop");
      stops.push_back(s.get<std::string>());
    }
  } else {
    return api_bad_request(std::string("'stop' must be a string or an array of strings, got ") + type_name(*v), "stop");
  }
  for (auto& s : stops)
    if (!s.empty()) g->stop.push_back(std::move(s));  // an empty stop would end every request at once
  return {};
}

MaybeError parse_logit_bias(const json& o, int32_t vocab_size, SamplingParams* sp) {
  const json* v = find(o, "logit_bias");
  if (!v) return {};
  if (!v->is_object())
    return api_bad_request(std::string("'logit_bias' must be an object, got ") + type_name(*v), "logit_bias");
  if (v->size() > 1024) return api_bad_request("'logit_bias' has more than 1024 entries", "logit_bias");
  for (auto it = v->begin(); it != v->end(); ++it) {
    const std::string& key = it.key();
    bool digits = !key.empty() && key.size() <= 10 &&
                  std::all_of(key.begin(), key.end(), [](char c) { return c >= '0' && c <= '9'; });
    int64_t id = digits ? std::stoll(key) : -1;
    if (!digits || (vocab_size > 0 && id >= vocab_size))
      return api_bad_request("'logit_bias' key '" + key + "' is not a token id in [0, " + std::to_string(vocab_size) + ")",
                             "logit_bias");
    if (!it->is_number())
      return api_bad_request("'logit_bias' values must be numbers, got " + std::string(type_name(*it)), "logit_bias");
    double b = it->get<double>();
    if (!(b >= -100.0 && b <= 100.0))
      return api_bad_request("'logit_bias' values must be in [-100, 100], got " + shown(*it), "logit_bias");
    sp->logit_bias.emplace_back(int32_t(id), float(b));
  }
  return {};
}

// Fields shared by completions and chat.
MaybeError parse_generation(const json& o, const ApiLimits& limits, bool chat, GenerationOptions* g) {
  KILN_API_TRY(read_int_into(o, "n", 1, limits.max_n, &g->n));
  KILN_API_TRY(read_bool(o, "stream", &g->stream));
  if (const json* so = find(o, "stream_options")) {
    if (!so->is_object())
      return api_bad_request(std::string("'stream_options' must be an object, got ") + type_name(*so), "stream_options");
    if (!g->stream)
      return api_bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options");
    KILN_API_TRY(read_bool(*so, "include_usage", &g->include_usage));
  }
  std::optional<int64_t> max_tokens;
  // Completions take 0 with echo (checked by the caller): score the prompt, generate nothing.
  KILN_API_TRY(read_int(o, "max_tokens", chat ? 1 : 0, std::numeric_limits<int64_t>::max(), &max_tokens));
  if (chat) {
    std::optional<int64_t> mct;
    KILN_API_TRY(read_int(o, "max_completion_tokens", 1, std::numeric_limits<int64_t>::max(), &mct));
    if (mct) max_tokens = mct;
  }
  // Numbers beyond int32 cannot fit any context; keep them large so the context check names them.
  if (max_tokens) g->max_tokens = int32_t(std::min<int64_t>(*max_tokens, std::numeric_limits<int32_t>::max()));
  KILN_API_TRY(read_int_into(o, "min_tokens", 0, std::numeric_limits<int32_t>::max(), &g->min_tokens));
  if (g->max_tokens && g->min_tokens > *g->max_tokens)
    return api_bad_request("'min_tokens' (" + std::to_string(g->min_tokens) + ") must not exceed 'max_tokens' (" +
                               std::to_string(*g->max_tokens) + ")",
                           "min_tokens");
  KILN_API_TRY(read_bool(o, "ignore_eos", &g->ignore_eos));
  KILN_API_TRY(parse_stop(o, g));
  if (const json* v = find(o, "stop_token_ids")) {
    if (!v->is_array())
      return api_bad_request(std::string("'stop_token_ids' must be an array, got ") + type_name(*v), "stop_token_ids");
    KILN_API_TRY(read_token_ids(*v, "stop_token_ids", limits.vocab_size, &g->stop_token_ids));
  }
  KILN_API_TRY(read_bool(o, "include_stop_str_in_output", &g->include_stop_str_in_output));
  KILN_API_TRY(read_bool(o, "skip_special_tokens", &g->skip_special_tokens));
  if (const json* v = find(o, "seed")) {
    int64_t s = 0;
    bool overflow = false;
    if (!as_int(*v, &s, &overflow)) return api_bad_request(std::string("'seed' must be an integer, got ") + type_name(*v), "seed");
    if (v->is_number_unsigned())
      g->seed = v->get<uint64_t>();
    else if (overflow)
      return api_bad_request("'seed' must fit in 64 bits, got " + shown(*v), "seed");
    else
      g->seed = uint64_t(s);
  }
  SamplingParams& sp = g->sampling;
  KILN_API_TRY(read_float(o, "temperature", {0.0, 2.0}, &sp.temperature));
  KILN_API_TRY(read_float(o, "top_p", {0.0, 1.0, true, false}, &sp.top_p));
  KILN_API_TRY(read_int_into(o, "top_k", -1, std::numeric_limits<int32_t>::max(), &sp.top_k));
  if (sp.top_k < 0) sp.top_k = 0;
  KILN_API_TRY(read_float(o, "min_p", {0.0, 1.0}, &sp.min_p));
  KILN_API_TRY(read_float(o, "presence_penalty", {-2.0, 2.0}, &sp.presence_penalty));
  KILN_API_TRY(read_float(o, "frequency_penalty", {-2.0, 2.0}, &sp.frequency_penalty));
  KILN_API_TRY(read_float(o, "repetition_penalty", {0.0, 1e308, true, false}, &sp.repetition_penalty));
  KILN_API_TRY(parse_logit_bias(o, limits.vocab_size, &sp));
  return {};
}

MaybeError parse_model(const json& o, std::string* model) { return read_string(o, "model", model); }

MaybeError parse_tools(const json& o, json* tools) {
  *tools = nullptr;
  const json* v = find(o, "tools");
  if (!v) return {};
  if (!v->is_array()) return api_bad_request(std::string("'tools' must be an array, got ") + type_name(*v), "tools");
  for (const json& t : *v) {
    if (!t.is_object()) return api_bad_request("'tools' must hold objects", "tools");
    const json* type = find(t, "type");
    if (!type || !type->is_string() || *type != "function")
      return api_bad_request("'tools': only tools of type 'function' are supported", "tools");
    const json* fn = find(t, "function");
    if (!fn || !fn->is_object()) return api_bad_request("'tools': each tool needs a 'function' object", "tools");
    const json* name = find(*fn, "name");
    if (!name || !name->is_string()) return api_bad_request("'tools': each function needs a string 'name'", "tools");
  }
  if (!v->empty()) *tools = *v;
  return {};
}

}  // namespace

// Shape limits checked on the raw text before parsing. Copying and dumping a JSON value recurse,
// so 8 MiB of "[[[[" must be refused before it becomes one; and an insertion-ordered object finds
// keys linearly, so members per object are bounded too (a 1024-member object costs ~0.5M string
// compares; an 8 MiB body of them stays near a second).
struct JsonShape {
  int max_depth = 0;
  int64_t max_members = 0;
};

static JsonShape json_shape(std::string_view body) {
  JsonShape shape;
  std::vector<int64_t> members;  // per open container: commas seen + 1 (objects only; -1 for arrays)
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      members.push_back(c == '{' ? 1 : -1);
      shape.max_depth = std::max(shape.max_depth, int(members.size()));
    } else if (c == ']' || c == '}') {
      if (!members.empty()) members.pop_back();
    } else if (c == ',' && !members.empty() && members.back() > 0) {
      shape.max_members = std::max(shape.max_members, ++members.back());
    }
  }
  return shape;
}

std::optional<ApiError> parse_json_body(std::string_view body, json* out) {
  constexpr int kMaxDepth = 64;
  constexpr int64_t kMaxMembers = 1024;
  JsonShape shape = json_shape(body);
  if (shape.max_depth > kMaxDepth)
    return api_bad_request("request body nests JSON " + std::to_string(shape.max_depth) + " levels deep; at most " +
                           std::to_string(kMaxDepth) + " are accepted");
  if (shape.max_members > kMaxMembers)
    return api_bad_request("request body has a JSON object with " + std::to_string(shape.max_members) +
                           " members; at most " + std::to_string(kMaxMembers) + " are accepted");
  *out = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (out->is_discarded()) {
    // Re-parse with exceptions for the parser's position message.
    std::string detail;
    try {
      json discard = json::parse(body.begin(), body.end());
    } catch (const json::exception& e) {
      detail = e.what();
    }
    return api_bad_request("request body is not valid JSON" + (detail.empty() ? std::string() : ": " + detail));
  }
  if (!out->is_object())
    return api_bad_request(std::string("request body must be a JSON object, got ") + type_name(*out));
  return {};
}

std::optional<ApiError> parse_completion_request(const json& o, const ApiLimits& limits, CompletionRequest* out) {
  *out = CompletionRequest{};
  KILN_API_TRY(parse_model(o, &out->model));
  const json* p = find(o, "prompt");
  if (!p) return api_bad_request("'prompt' is required", "prompt");
  auto too_many = [&](size_t n) {
    return api_bad_request("'prompt' holds " + std::to_string(n) + " prompts; at most " +
                               std::to_string(limits.max_prompts) + " per request",
                           "prompt");
  };
  if (p->is_string()) {
    out->text_prompts.push_back(p->get<std::string>());
  } else if (p->is_array()) {
    if (p->empty()) return api_bad_request("'prompt' must not be empty", "prompt");
    const json& first = p->front();
    if (first.is_string()) {
      if (p->size() > size_t(limits.max_prompts)) return too_many(p->size());
      for (const json& s : *p) {
        if (!s.is_string()) return api_bad_request("'prompt': a list of prompts must hold only strings", "prompt");
        out->text_prompts.push_back(s.get<std::string>());
      }
    } else if (first.is_array()) {
      if (p->size() > size_t(limits.max_prompts)) return too_many(p->size());
      for (const json& ids : *p) {
        if (!ids.is_array())
          return api_bad_request("'prompt': a list of token-id lists must hold only arrays", "prompt");
        if (ids.empty()) return api_bad_request("'prompt': a token-id list must not be empty", "prompt");
        out->token_prompts.emplace_back();
        KILN_API_TRY(read_token_ids(ids, "prompt", limits.vocab_size, &out->token_prompts.back()));
      }
    } else if (first.is_number()) {
      out->token_prompts.emplace_back();
      KILN_API_TRY(read_token_ids(*p, "prompt", limits.vocab_size, &out->token_prompts.back()));
    } else {
      return api_bad_request(std::string("'prompt' must be a string, a list of strings, a list of token ids or a list "
                                         "of token-id lists; got a list of ") +
                                 type_name(first),
                             "prompt");
    }
  } else {
    return api_bad_request(std::string("'prompt' must be a string or an array, got ") + type_name(*p), "prompt");
  }
  KILN_API_TRY(read_bool(o, "echo", &out->echo));
  KILN_API_TRY(parse_generation(o, limits, /*chat=*/false, &out->gen));
  KILN_API_TRY(read_int_into(o, "logprobs", 0, limits.max_logprobs, &out->gen.logprobs));
  if (out->gen.max_tokens && *out->gen.max_tokens == 0 && !out->echo)
    return api_bad_request("'max_tokens' must be at least 1, got 0 (0 is allowed only with 'echo': the prompt comes "
                           "back, with its logprobs when 'logprobs' is set)",
                           "max_tokens");
  if (const json* b = find(o, "best_of")) {
    int64_t best_of = 0;
    bool overflow = false;
    if (!as_int(*b, &best_of, &overflow) || overflow || best_of != out->gen.n)
      return api_bad_request("'best_of' is not supported; leave it out or set it equal to 'n'", "best_of");
  }
  if (const json* s = find(o, "suffix")) {
    if (!s->is_string()) return api_bad_request(std::string("'suffix' must be a string, got ") + type_name(*s), "suffix");
    if (!s->get<std::string>().empty()) return api_bad_request("'suffix' is not supported", "suffix");
  }
  return {};
}

std::optional<ApiError> validate_messages(const json& messages, json* out) {
  if (!messages.is_array())
    return api_bad_request(std::string("'messages' must be an array, got ") + type_name(messages), "messages");
  if (messages.empty()) return api_bad_request("'messages' must not be empty", "messages");
  *out = json::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) return api_bad_request(where + " must be an object, got " + type_name(m), "messages");
    const json* role = find(m, "role");
    if (!role || !role->is_string()) return api_bad_request(where + ".role must be a string", "messages");
    std::string r = role->get<std::string>();
    if (r != "system" && r != "developer" && r != "user" && r != "assistant" && r != "tool")
      return api_bad_request(where + ".role '" + r +
                                 "' is not one of 'system', 'developer', 'user', 'assistant', 'tool'",
                             "messages");
    json msg = m;
    if (r == "developer") msg["role"] = "system";  // templates know no "developer"; it is system's successor
    const json* content = find(m, "content");
    if (!content) {
      if (r != "assistant") return api_bad_request(where + ".content is required for role '" + r + "'", "messages");
    } else if (content->is_array()) {
      for (size_t k = 0; k < content->size(); ++k) {
        const json& part = (*content)[k];
        std::string pw = where + ".content[" + std::to_string(k) + "]";
        if (!part.is_object()) return api_bad_request(pw + " must be an object", "messages");
        const json* type = find(part, "type");
        if (!type || !type->is_string()) return api_bad_request(pw + ".type must be a string", "messages");
        if (*type != "text")
          return api_bad_request(pw + ": content parts of type '" + type->get<std::string>() +
                                     "' are not supported (only 'text')",
                                 "messages");
        const json* text = find(part, "text");
        if (!text || !text->is_string()) return api_bad_request(pw + ".text must be a string", "messages");
      }
    } else if (!content->is_string()) {
      return api_bad_request(where + ".content must be a string or an array of content parts, got " +
                                 type_name(*content),
                             "messages");
    }
    if (const json* name = find(m, "name"); name && !name->is_string())
      return api_bad_request(where + ".name must be a string", "messages");
    if (const json* calls = find(m, "tool_calls")) {
      if (r != "assistant") return api_bad_request(where + ": only assistant messages carry tool_calls", "messages");
      if (!calls->is_array()) return api_bad_request(where + ".tool_calls must be an array", "messages");
      for (const json& c : *calls) {
        if (!c.is_object()) return api_bad_request(where + ".tool_calls must hold objects", "messages");
        const json* fn = find(c, "function");
        if (!fn || !fn->is_object())
          return api_bad_request(where + ".tool_calls[].function must be an object", "messages");
        const json* name = find(*fn, "name");
        if (!name || !name->is_string())
          return api_bad_request(where + ".tool_calls[].function.name must be a string", "messages");
        const json* args = find(*fn, "arguments");
        if (args && !args->is_string() && !args->is_object())
          return api_bad_request(where + ".tool_calls[].function.arguments must be a string", "messages");
      }
    }
    if (const json* id = find(m, "tool_call_id"); id && !id->is_string())
      return api_bad_request(where + ".tool_call_id must be a string", "messages");
    out->push_back(std::move(msg));
  }
  return {};
}

std::optional<ApiError> parse_chat_request(const json& o, const ApiLimits& limits, ChatRequest* out) {
  *out = ChatRequest{};
  KILN_API_TRY(parse_model(o, &out->model));
  const json* messages = find(o, "messages");
  if (!messages) return api_bad_request("'messages' is required", "messages");
  KILN_API_TRY(validate_messages(*messages, &out->messages));
  KILN_API_TRY(parse_tools(o, &out->tools));
  if (const json* tc = find(o, "tool_choice")) {
    if (tc->is_string() && (*tc == "none" || *tc == "auto")) {
      if (*tc == "none") out->tools = nullptr;
    } else {
      return api_bad_request("'tool_choice' must be \"auto\" or \"none\" (kiln does not force tool calls)",
                             "tool_choice");
    }
  }
  if (const json* rf = find(o, "response_format")) {
    const json* type = rf->is_object() ? find(*rf, "type") : nullptr;
    if (!type || !type->is_string()) return api_bad_request("'response_format' must be an object with a 'type'", "response_format");
    if (*type != "text")
      return api_bad_request("'response_format' type '" + type->get<std::string>() + "' is not supported (only 'text')",
                             "response_format");
  }
  KILN_API_TRY(read_bool(o, "add_generation_prompt", &out->add_generation_prompt));
  KILN_API_TRY(read_bool(o, "continue_final_message", &out->continue_final_message));
  if (out->continue_final_message && out->add_generation_prompt && find(o, "add_generation_prompt"))
    return api_bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                           "continue_final_message");
  if (out->continue_final_message) out->add_generation_prompt = false;
  if (const json* kw = find(o, "chat_template_kwargs")) {
    if (!kw->is_object()) return api_bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs");
    out->chat_template_kwargs = *kw;
  }
  KILN_API_TRY(parse_generation(o, limits, /*chat=*/true, &out->gen));
  bool logprobs = false;
  KILN_API_TRY(read_bool(o, "logprobs", &logprobs));
  std::optional<int64_t> top;
  KILN_API_TRY(read_int(o, "top_logprobs", 0, limits.max_logprobs, &top));
  if (top && *top > 0 && !logprobs)
    return api_bad_request("'top_logprobs' needs 'logprobs' set to true", "top_logprobs");
  if (logprobs) out->gen.logprobs = int32_t(top.value_or(0));
  return {};
}

std::optional<ApiError> parse_tokenize_request(const json& o, TokenizeRequest* out) {
  *out = TokenizeRequest{};
  const json* prompt = find(o, "prompt");
  const json* messages = find(o, "messages");
  if ((prompt != nullptr) == (messages != nullptr))
    return api_bad_request("give exactly one of 'prompt' (a string) or 'messages'", prompt ? "messages" : "prompt");
  if (prompt) {
    if (!prompt->is_string()) return api_bad_request(std::string("'prompt' must be a string, got ") + type_name(*prompt), "prompt");
    out->prompt = prompt->get<std::string>();
  } else {
    out->is_chat = true;
    out->add_special_tokens = false;
    KILN_API_TRY(validate_messages(*messages, &out->messages));
    KILN_API_TRY(parse_tools(o, &out->tools));
    KILN_API_TRY(read_bool(o, "add_generation_prompt", &out->add_generation_prompt));
  }
  KILN_API_TRY(read_bool(o, "add_special_tokens", &out->add_special_tokens));
  return {};
}

std::optional<ApiError> parse_detokenize_request(const json& o, const ApiLimits& limits, std::vector<int32_t>* out) {
  const json* t = find(o, "tokens");
  if (!t) return api_bad_request("'tokens' is required", "tokens");
  if (!t->is_array()) return api_bad_request(std::string("'tokens' must be an array, got ") + type_name(*t), "tokens");
  return read_token_ids(*t, "tokens", limits.vocab_size, out);
}

ApiError context_length_error(int64_t max_model_len, int64_t prompt_tokens, int64_t max_tokens, const char* what) {
  if (prompt_tokens >= max_model_len)
    return api_bad_request("This model's maximum context length is " + std::to_string(max_model_len) +
                           " tokens. However, your request has " + std::to_string(prompt_tokens) + " input tokens (" +
                           what + "). Please reduce the length of the " + what + ".");
  return api_bad_request("This model's maximum context length is " + std::to_string(max_model_len) +
                             " tokens. However, you requested " + std::to_string(prompt_tokens + max_tokens) +
                             " tokens (" + std::to_string(prompt_tokens) + " in the " + what + ", " +
                             std::to_string(max_tokens) + " in the completion). Please reduce the length of the " +
                             what + " or completion.",
                         "max_tokens");
}

// --- responses -------------------------------------------------------------------------------

namespace {

// -inf (a token the sampler would never pick) has no JSON form: vLLM reports -9999.0.
double clamp_logprob(float lp) { return std::max(double(lp), -9999.0); }

json bytes_json(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(int(c));
  return b;
}

json meta_json(const ResponseMeta& meta, const char* object) {
  json j = {{"id", meta.id}, {"object", object}, {"created", meta.created}, {"model", meta.model}};
  if (!meta.system_fingerprint.empty()) j["system_fingerprint"] = meta.system_fingerprint;
  return j;
}

json finish_json(const std::string& f) { return f.empty() ? json(nullptr) : json(f); }

}  // namespace

json Usage::to_json() const {
  json u = {{"prompt_tokens", prompt_tokens},
            {"completion_tokens", completion_tokens},
            {"total_tokens", prompt_tokens + completion_tokens}};
  if (cached_tokens > 0) u["prompt_tokens_details"] = {{"cached_tokens", cached_tokens}};
  return u;
}

json completion_logprobs_json(const std::vector<LogprobItem>& items, int64_t text_offset0) {
  json tokens = json::array(), token_logprobs = json::array(), top_logprobs = json::array(),
       text_offset = json::array();
  int64_t offset = text_offset0;
  for (const LogprobItem& it : items) {
    std::string tok = token_display(it.token);
    tokens.push_back(tok);
    text_offset.push_back(offset);
    offset += utf8_length(tok);
    if (!it.has_logprob) {  // the first echoed prompt token: nothing before it to condition on
      token_logprobs.push_back(nullptr);
      top_logprobs.push_back(nullptr);
      continue;
    }
    token_logprobs.push_back(clamp_logprob(it.logprob));
    // vLLM's shape: the sampled token plus the top alternatives, keyed by their text.
    json top = json::object();
    top[tok] = clamp_logprob(it.logprob);
    for (const auto& [t, lp] : it.top) {
      std::string k = token_display(t);
      if (!top.contains(k)) top[k] = clamp_logprob(lp);
    }
    top_logprobs.push_back(std::move(top));
  }
  return {{"tokens", tokens}, {"token_logprobs", token_logprobs}, {"top_logprobs", top_logprobs},
          {"text_offset", text_offset}};
}

json chat_logprobs_json(const std::vector<LogprobItem>& items) {
  json content = json::array();
  for (const LogprobItem& it : items) {
    json top = json::array();
    for (const auto& [t, lp] : it.top)
      top.push_back({{"token", token_display(t)}, {"logprob", clamp_logprob(lp)}, {"bytes", bytes_json(t)}});
    content.push_back({{"token", token_display(it.token)},
                       {"logprob", clamp_logprob(it.logprob)},
                       {"bytes", bytes_json(it.token)},
                       {"top_logprobs", std::move(top)}});
  }
  return {{"content", std::move(content)}};
}

json completion_response(const ResponseMeta& meta, const std::vector<ChoiceResult>& choices, const Usage& usage) {
  json j = meta_json(meta, "text_completion");
  json cs = json::array();
  for (const ChoiceResult& c : choices)
    cs.push_back({{"index", c.index},
                  {"text", c.text},
                  {"logprobs", c.has_logprobs ? completion_logprobs_json(c.logprobs, c.text_offset0) : json(nullptr)},
                  {"finish_reason", finish_json(c.finish_reason)}});
  j["choices"] = std::move(cs);
  j["usage"] = usage.to_json();
  return j;
}

json chat_response(const ResponseMeta& meta, const std::vector<ChoiceResult>& choices, const Usage& usage) {
  json j = meta_json(meta, "chat.completion");
  json cs = json::array();
  for (const ChoiceResult& c : choices)
    cs.push_back({{"index", c.index},
                  {"message", {{"role", "assistant"}, {"content", c.text}}},
                  {"logprobs", c.has_logprobs ? chat_logprobs_json(c.logprobs) : json(nullptr)},
                  {"finish_reason", finish_json(c.finish_reason)}});
  j["choices"] = std::move(cs);
  j["usage"] = usage.to_json();
  return j;
}

json completion_chunk(const ResponseMeta& meta, const ChoiceResult& delta, bool usage_null) {
  json j = meta_json(meta, "text_completion");
  j["choices"] = json::array(
      {{{"index", delta.index},
        {"text", delta.text},
        {"logprobs", delta.has_logprobs ? completion_logprobs_json(delta.logprobs, delta.text_offset0) : json(nullptr)},
        {"finish_reason", finish_json(delta.finish_reason)}}});
  if (usage_null) j["usage"] = nullptr;
  return j;
}

json chat_chunk(const ResponseMeta& meta, const ChoiceResult& delta, bool role_chunk, bool usage_null) {
  json j = meta_json(meta, "chat.completion.chunk");
  json d = json::object();
  if (role_chunk) {
    d["role"] = "assistant";
    d["content"] = "";
  } else if (!delta.text.empty()) {
    d["content"] = delta.text;
  }
  j["choices"] = json::array({{{"index", delta.index},
                               {"delta", std::move(d)},
                               {"logprobs", delta.has_logprobs ? chat_logprobs_json(delta.logprobs) : json(nullptr)},
                               {"finish_reason", finish_json(delta.finish_reason)}}});
  if (usage_null) j["usage"] = nullptr;
  return j;
}

json usage_chunk(const ResponseMeta& meta, const char* object, const Usage& usage) {
  json j = meta_json(meta, object);
  j["choices"] = json::array();
  j["usage"] = usage.to_json();
  return j;
}

std::string dump_json(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string sse_event(const json& j) { return "data: " + dump_json(j) + "\n\n"; }

size_t find_stop(std::string_view text, const std::vector<std::string>& stops, size_t from, size_t* stop_len) {
  size_t best = std::string_view::npos;
  for (const std::string& s : stops) {
    size_t p = text.find(s, std::min(from, text.size()));
    if (p != std::string_view::npos && (best == std::string_view::npos || p < best)) {
      best = p;
      if (stop_len) *stop_len = s.size();
    }
  }
  return best;
}

size_t stop_holdback(std::string_view text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& s : stops) {
    size_t k = std::min(text.size(), s.size() - 1);
    for (; k > hold; --k)
      if (text.substr(text.size() - k) == std::string_view(s).substr(0, k)) break;
    hold = std::max(hold, k);
  }
  return hold;
}

std::string token_display(const std::string& raw) {
  json j = raw;
  std::string quoted = j.dump(-1, ' ', false, json::error_handler_t::replace);
  return json::parse(quoted).get<std::string>();
}

int64_t utf8_length(std::string_view text) {
  int64_t n = 0;
  for (unsigned char c : text) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace kiln::server
