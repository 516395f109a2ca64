#include "chat/chat_template.h"

#include <exception>

#include "chat/jinja_render.h"

namespace kiln::chat {

namespace detail {
struct TemplateImpl {
  std::string name;
  std::string source;
  std::vector<jinja::NodePtr> body;
};
}  // namespace detail

namespace {

std::string located(const std::string& name, const jinja::Error& e) {
  return name + ":" + std::to_string(e.line > 0 ? e.line : 1) + ": " + e.message;
}

}  // namespace

Result<Template> Template::parse(std::string source, std::string name) {
  auto impl = std::make_shared<detail::TemplateImpl>();
  impl->name = std::move(name);
  impl->source = std::move(source);
  try {
    impl->body = jinja::parse_template(impl->source);
    jinja::fold_constants(impl->body);
  } catch (const jinja::Error& e) {
    return Status::error(located(impl->name, e));
  } catch (const std::bad_alloc&) {
    return Status::error(impl->name + ": out of memory while parsing");
  }
  Template t;
  t.impl_ = std::move(impl);
  return t;
}

const std::string& Template::name() const { return impl_->name; }
const std::string& Template::source() const { return impl_->source; }

template <class J>
static Result<std::string> render_value(const detail::TemplateImpl& impl, const J& context,
                                        const RenderLimits& limits) {
  if (!context.is_object()) return Status::error(impl.name + ": render context must be a JSON object");
  try {
    jinja::Value ctx = jinja::from_json(context);
    jinja::Renderer r(ctx, limits);
    return r.render(impl.body);
  } catch (const jinja::Error& e) {
    return Status::error(located(impl.name, e));
  } catch (const std::bad_alloc&) {
    return Status::error(impl.name + ": out of memory while rendering");
  }
}

Result<std::string> Template::render(const nlohmann::json& context) const {
  return render_value(*impl_, context, RenderLimits());
}

Result<std::string> Template::render(const nlohmann::json& context, const RenderLimits& limits) const {
  return render_value(*impl_, context, limits);
}

Result<std::string> Template::render(const nlohmann::ordered_json& context, const RenderLimits& limits) const {
  return render_value(*impl_, context, limits);
}

Result<nlohmann::ordered_json> normalize_messages(const nlohmann::ordered_json& messages) {
  if (!messages.is_array()) return Status::error("messages must be a JSON array");
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    nlohmann::ordered_json m = messages[i];
    std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) return Status::error(where + " must be a JSON object");
    // Content parts that are all text become one string (vLLM's "string" content format).
    if (m.contains("content") && m["content"].is_array()) {
      const auto& parts = m["content"];
      bool all_text = true;
      for (const auto& p : parts)
        if (!p.is_object() || p.value("type", "") != "text" || !p.contains("text") || !p["text"].is_string())
          all_text = false;
      if (all_text) {
        std::string joined;
        for (size_t k = 0; k < parts.size(); ++k) {
          if (k) joined += "\n";
          joined += parts[k]["text"].get<std::string>();
        }
        m["content"] = joined;
      }
    }
    // vLLM's _postprocess_messages: tool-call arguments as objects, empty tool_calls dropped.
    if (m.contains("tool_calls")) {
      auto& calls = m["tool_calls"];
      if (calls.is_null() || (calls.is_array() && calls.empty())) {
        m.erase("tool_calls");
      } else if (calls.is_array() && m.value("role", "") == "assistant") {
        for (size_t k = 0; k < calls.size(); ++k) {
          auto& c = calls[k];
          if (!c.is_object() || !c.contains("function") || !c["function"].is_object()) continue;
          auto& fn = c["function"];
          std::string at = where + ".tool_calls[" + std::to_string(k) + "].function.arguments";
          if (!fn.contains("arguments") || fn["arguments"].is_null() ||
              (fn["arguments"].is_string() && fn["arguments"].get<std::string>().empty())) {
            fn["arguments"] = nlohmann::ordered_json::object();
          } else if (fn["arguments"].is_string()) {
            try {
              fn["arguments"] = nlohmann::ordered_json::parse(fn["arguments"].get<std::string>());
            } catch (const std::exception& e) {
              return Status::error(at + " is not valid JSON: " + e.what());
            }
          }
        }
      }
    }
    out.push_back(std::move(m));
  }
  return out;
}

Result<std::string> Template::apply(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                                    bool add_generation_prompt, const std::string& bos_token,
                                    const std::string& eos_token, const nlohmann::ordered_json& extra_vars) const {
  KILN_ASSIGN_OR_RETURN(nlohmann::ordered_json msgs, normalize_messages(messages));
  nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
  ctx["messages"] = std::move(msgs);
  ctx["tools"] = tools;  // null when absent, as transformers passes tools=None
  ctx["documents"] = nullptr;
  ctx["add_generation_prompt"] = add_generation_prompt;
  ctx["bos_token"] = bos_token;
  ctx["eos_token"] = eos_token;
  if (extra_vars.is_object())
    for (auto it = extra_vars.begin(); it != extra_vars.end(); ++it) ctx[it.key()] = it.value();
  else if (!extra_vars.is_null())
    return Status::error(impl_->name + ": extra template variables must be a JSON object");
  return render(ctx);
}

Result<std::string> Template::apply(const nlohmann::json& messages, const nlohmann::json& tools,
                                    bool add_generation_prompt, const std::string& bos_token,
                                    const std::string& eos_token, const nlohmann::json& extra_vars) const {
  return apply(nlohmann::ordered_json(messages), nlohmann::ordered_json(tools), add_generation_prompt, bos_token,
               eos_token, nlohmann::ordered_json(extra_vars));
}

}  // namespace kiln::chat
