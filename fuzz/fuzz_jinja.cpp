// libFuzzer target for the chat-template interpreter: any template text must parse and render, or
// fail with "fuzz.jinja:LINE: message", never crash, hang or exhaust memory. The render limits are
// tightened so every input finishes in milliseconds.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "chat/chat_template.h"

namespace {

const nlohmann::ordered_json& context() {
  static const nlohmann::ordered_json ctx = nlohmann::ordered_json::parse(R"({
    "messages": [
      {"role": "system", "content": "You are helpful."},
      {"role": "user", "content": "Hi <b>there</b> \u00e9\u65e5 \ud83d\ude00"},
      {"role": "assistant", "content": null, "tool_calls": [
        {"id": "abc123XYZ", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "x": [1.5, true, null]}}}]},
      {"role": "tool", "tool_call_id": "abc123XYZ", "content": "{\"temp\": 21}"},
      {"role": "assistant", "content": "<think>\nok\n</think>\n\nIt is 21."}
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
    "documents": null,
    "add_generation_prompt": true,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "n": 3,
    "f": 2.5
  })");
  return ctx;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 64 * 1024) return 0;
  std::string src(reinterpret_cast<const char*>(data), size);
  auto t = kiln::chat::Template::parse(src, "fuzz.jinja");
  if (!t) {
    KILN_CHECK_MSG(t.message().rfind("fuzz.jinja:", 0) == 0, t.message());
    return 0;
  }
  kiln::chat::RenderLimits limits;
  limits.max_output_bytes = 1 << 20;
  limits.max_depth = 64;
  limits.max_loop_iterations = 1 << 16;
  limits.max_work = 16u << 20;
  auto r = t->render(context(), limits);
  if (!r) KILN_CHECK_MSG(r.message().rfind("fuzz.jinja:", 0) == 0, r.message());
  else KILN_CHECK(r->size() <= limits.max_output_bytes);
  return 0;
}
