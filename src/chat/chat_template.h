// Chat templates: a Jinja2 interpreter sufficient for real models' chat templates, rendering
// byte-identical to Python jinja2 under Hugging Face transformers' settings
// (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, {% generation %},
// transformers' tojson, raise_exception, strftime_now).
//
// Content-parts choice (apply): an OpenAI message whose "content" is an array of parts that are
// all {"type": "text", "text": ...} is flattened to one string, parts joined with "\n" (vLLM's
// "string" content format). Arrays with any non-text part are passed through untouched, as
// transformers does. Assistant "tool_calls" that are null or [] are dropped, and each call's
// "arguments" given as a JSON string is parsed into an object, null/"" becoming {} (vLLM's
// _postprocess_messages); a string that is not valid JSON is an error, as in vLLM.
//
// Key order: Python dicts keep insertion order and `tojson` prints in that order, so callers that
// want byte-identical output must hand in nlohmann::ordered_json (parse request bodies with
// nlohmann::ordered_json::parse). The nlohmann::json overloads work too, with keys sorted.
//
// Context: as transformers' apply_chat_template, `tools` and `documents` are always defined and
// are None when not given (so `tools is defined` is true and `tools is none` tells them apart).
// Extra variables override the standard ones.
//
// Known differences from Python (none matter for real chat templates): integers are 64-bit
// (Python's big integers overflow into an OverflowError here); Markup/autoescape-specific `+`
// escaping after `|safe` is not modelled; printing a Python object's identity (generators, bound
// methods: "<generator object ... at 0x...>") gives the same text without the address; pprint
// does not wrap long lines; limits (RenderLimits) stop hostile templates earlier than Python would.
// Tests: tests/chat (snippet table from jinja2), tests/py/test_chat_templates.py (real templates).
#pragma once
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "core/status.h"

namespace kiln::chat {

namespace detail {
struct TemplateImpl;  // parsed AST, immutable after parse
}

// Limits that keep a hostile template from hanging or exhausting the stack/memory. Exceeding one
// is a render error, never a crash.
struct RenderLimits {
  size_t max_output_bytes = 16u << 20;   // 16 MiB of rendered text (incl. set-block captures)
  int max_depth = 64;                    // macro/call/filter recursion
  size_t max_loop_iterations = 1u << 20; // total iterations over one render
  // Bytes of strings plus list/dict elements built over one render: bounds the time quadratic
  // templates (appending to a growing string in a loop) can take.
  size_t max_work = size_t(64) << 20;
};

class Template {
 public:
  // Parses `source`. Errors read "NAME:LINE: message".
  static Result<Template> parse(std::string source, std::string name = "template");

  // Renders with `context` (a JSON object) as the template's globals. Thread-safe: const, no
  // shared mutable state. Errors (raise_exception, undefined attribute, type errors, limits) read
  // "NAME:LINE: message".
  Result<std::string> render(const nlohmann::json& context) const;
  Result<std::string> render(const nlohmann::json& context, const RenderLimits& limits) const;
  Result<std::string> render(const nlohmann::ordered_json& context,
                             const RenderLimits& limits = RenderLimits()) const;

  // Builds the HF context {messages, tools (when not null), add_generation_prompt, bos_token,
  // eos_token, ...extra_vars} after normalizing messages (see the file comment) and renders.
  Result<std::string> apply(const nlohmann::json& messages, const nlohmann::json& tools /*null if none*/,
                            bool add_generation_prompt, const std::string& bos_token,
                            const std::string& eos_token,
                            const nlohmann::json& extra_vars = nlohmann::json::object()) const;
  Result<std::string> apply(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                            bool add_generation_prompt, const std::string& bos_token,
                            const std::string& eos_token,
                            const nlohmann::ordered_json& extra_vars = nlohmann::ordered_json::object()) const;

  const std::string& name() const;
  const std::string& source() const;

 private:
  std::shared_ptr<const detail::TemplateImpl> impl_;
};

// Messages in OpenAI's shape -> what HF templates expect (see the file comment). Exposed so the
// server can normalize once and so tests can check it.
Result<nlohmann::ordered_json> normalize_messages(const nlohmann::ordered_json& messages);

// Today's date for strftime_now: the env var KILN_DATE_OVERRIDE ("YYYY-MM-DD" or
// "YYYY-MM-DD HH:MM:SS") pins it, for deterministic tests; otherwise local time.
std::string strftime_now(const std::string& format);

}  // namespace kiln::chat
