// kiln template TEMPLATE --messages FILE.json [--tools FILE.json] [--add_generation_prompt]
//   [--tokenizer DIR] [--var NAME=VALUE ...]: render a chat template exactly as transformers'
// apply_chat_template would, and print the prompt with no added newline.
// TEMPLATE is a model directory (tokenizer_config.json's chat_template, or chat_template.jinja),
// a .gguf file (tokenizer.chat_template) or a template file.
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "chat/chat_template.h"
#include "cli/cli.h"
#include "core/file.h"
#include "formats/gguf.h"

namespace kiln::cli {
namespace {

using ojson = nlohmann::ordered_json;

struct TemplateArgs {
  std::string path, tokenizer, messages, tools;
  bool add_generation_prompt = false;
  std::vector<std::string> vars;
};

struct Loaded {
  std::string source;
  std::string name;
  std::string bos, eos;
  bool have_tokens = false;
};

// bos_token / eos_token of a tokenizer_config.json: a string or {"content": ...}.
std::string token_field(const ojson& cfg, const char* key) {
  if (!cfg.contains(key)) return "";
  const auto& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return "";
}

Result<ojson> read_json(const std::string& path) {
  KILN_ASSIGN_OR_RETURN(std::string text, read_file(path));
  try {
    return ojson::parse(text);
  } catch (const std::exception& e) {
    return Status::error(path + ": not valid JSON: " + e.what());
  }
}

Status tokens_from_dir(const std::string& dir, Loaded& out) {
  std::string cfg_path = dir + "/tokenizer_config.json";
  if (!file_exists(cfg_path)) return Status::error(dir + ": no tokenizer_config.json");
  KILN_ASSIGN_OR_RETURN(ojson cfg, read_json(cfg_path));
  out.bos = token_field(cfg, "bos_token");
  out.eos = token_field(cfg, "eos_token");
  out.have_tokens = true;
  return Status::ok();
}

Status tokens_from_gguf(const GgufFile& g, Loaded& out) {
  const GgufValue* toks = g.get("tokenizer.ggml.tokens");
  const std::vector<std::string>* list = toks ? toks->as_string_array() : nullptr;
  if (!list) return Status::error(g.path() + ": no tokenizer.ggml.tokens");
  auto pick = [&](const char* key) -> std::string {
    auto id = g.get_int(key);
    if (!id || *id < 0 || static_cast<size_t>(*id) >= list->size()) return "";
    return (*list)[static_cast<size_t>(*id)];
  };
  out.bos = pick("tokenizer.ggml.bos_token_id");
  out.eos = pick("tokenizer.ggml.eos_token_id");
  out.have_tokens = true;
  return Status::ok();
}

std::string parent_dir(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

bool ends_with(const std::string& s, const char* suf) {
  size_t n = std::char_traits<char>::length(suf);
  return s.size() >= n && s.compare(s.size() - n, n, suf) == 0;
}

Result<Loaded> load_template(const std::string& path, bool have_tools) {
  Loaded out;
  out.name = path;
  if (is_directory(path)) {
    std::string cfg_path = path + "/tokenizer_config.json";
    if (file_exists(cfg_path)) {
      KILN_ASSIGN_OR_RETURN(ojson cfg, read_json(cfg_path));
      out.bos = token_field(cfg, "bos_token");
      out.eos = token_field(cfg, "eos_token");
      out.have_tokens = true;
      if (cfg.contains("chat_template")) {
        const auto& ct = cfg["chat_template"];
        if (ct.is_string()) {
          out.source = ct.get<std::string>();
          out.name = cfg_path + ":chat_template";
          return out;
        }
        if (ct.is_array()) {
          // Named templates: transformers picks "tool_use" when tools are given and it exists,
          // else "default".
          const ojson* chosen = nullptr;
          const char* want = have_tools ? "tool_use" : "default";
          for (int pass = 0; pass < 2 && !chosen; ++pass) {
            for (const auto& e : ct)
              if (e.is_object() && e.value("name", "") == want && e.contains("template") && e["template"].is_string())
                chosen = &e;
            want = "default";
          }
          if (!chosen) return Status::error(cfg_path + ": chat_template has no 'default' template");
          out.source = (*chosen)["template"].get<std::string>();
          out.name = cfg_path + ":chat_template[" + (*chosen)["name"].get<std::string>() + "]";
          return out;
        }
        return Status::error(cfg_path + ": chat_template must be a string or a list of named templates");
      }
    }
    std::string jinja_path = path + "/chat_template.jinja";
    if (file_exists(jinja_path)) {
      KILN_ASSIGN_OR_RETURN(out.source, read_file(jinja_path));
      out.name = jinja_path;
      return out;
    }
    return Status::error(path + ": no chat template (tokenizer_config.json has no chat_template and there is no chat_template.jinja)");
  }
  if (ends_with(path, ".gguf")) {
    KILN_ASSIGN_OR_RETURN(GgufFile g, GgufFile::open(path));
    auto src = g.get_string("tokenizer.chat_template");
    if (!src) return Status::error(path + ": no tokenizer.chat_template in the GGUF metadata");
    out.source = *src;
    out.name = path + ":tokenizer.chat_template";
    Status st = tokens_from_gguf(g, out);
    (void)st;  // a GGUF without a vocabulary still renders, with empty bos/eos
    return out;
  }
  KILN_ASSIGN_OR_RETURN(out.source, read_file(path));
  std::string dir = parent_dir(path);
  if (file_exists(dir + "/tokenizer_config.json")) {
    Status st = tokens_from_dir(dir, out);
    (void)st;
  }
  return out;
}

int run_template(const TemplateArgs& a) {
  const char* verb = "template";
  ojson messages, tools = nullptr;
  {
    auto m = read_json(a.messages);
    if (!m) return fail(verb, m.message());
    messages = std::move(*m);
    // Accept a whole chat-completions body too: {"messages": [...], "tools": [...]}.
    if (messages.is_object() && messages.contains("messages")) {
      if (messages.contains("tools") && a.tools.empty()) tools = messages["tools"];
      ojson inner = messages["messages"];
      messages = std::move(inner);
    }
    if (!messages.is_array()) return fail(verb, a.messages + ": expected a JSON array of messages");
  }
  if (!a.tools.empty()) {
    auto t = read_json(a.tools);
    if (!t) return fail(verb, t.message());
    tools = std::move(*t);
    if (tools.is_object() && tools.contains("tools")) {
      ojson inner = tools["tools"];
      tools = std::move(inner);
    }
    if (!tools.is_array()) return fail(verb, a.tools + ": expected a JSON array of tools");
  }
  auto loaded = load_template(a.path, !tools.is_null());
  if (!loaded) return fail(verb, loaded.message());
  if (!a.tokenizer.empty()) {
    Status st;
    if (ends_with(a.tokenizer, ".gguf")) {
      auto g = GgufFile::open(a.tokenizer);
      st = g ? tokens_from_gguf(*g, *loaded) : g.status();
    } else {
      std::string dir = is_directory(a.tokenizer) ? a.tokenizer : parent_dir(a.tokenizer);
      st = tokens_from_dir(dir, *loaded);
    }
    if (!st) return fail(verb, "--tokenizer: " + st.message());
  }
  ojson vars = ojson::object();
  for (const auto& kv : a.vars) {
    size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) return fail(verb, "--var expects NAME=VALUE, got '" + kv + "'");
    std::string name = kv.substr(0, eq), value = kv.substr(eq + 1);
    try {
      vars[name] = ojson::parse(value);
    } catch (const std::exception&) {
      vars[name] = value;  // not JSON: a plain string
    }
  }
  auto tmpl = chat::Template::parse(loaded->source, loaded->name);
  if (!tmpl) return fail(verb, tmpl.message());
  auto text = tmpl->apply(messages, tools, a.add_generation_prompt, loaded->bos, loaded->eos, vars);
  if (!text) return fail(verb, text.message());
  std::fwrite(text->data(), 1, text->size(), stdout);
  std::fflush(stdout);
  return 0;
}

}  // namespace
}  // namespace kiln::cli

KILN_VERB(template) {
  using namespace kiln::cli;
  static TemplateArgs a;
  auto* cmd = app.add_subcommand("template", "Render a chat template (as transformers' apply_chat_template)");
  cmd->add_option("TEMPLATE", a.path, "model dir, .gguf, or template file")->required();
  add_flag(*cmd, "messages", a.messages, "JSON file: OpenAI-style messages array")->required();
  add_flag(*cmd, "tools", a.tools, "JSON file: OpenAI-style tools array");
  add_flag(*cmd, "tokenizer", a.tokenizer, "dir with tokenizer_config.json (or a .gguf) for bos/eos tokens");
  add_switch(*cmd, "add_generation_prompt", a.add_generation_prompt, "end with the assistant turn's header");
  add_flag(*cmd, "var", a.vars, "NAME=VALUE template variable (VALUE parsed as JSON if valid), repeatable");
  cmd->callback([] {
    if (int rc = run_template(a)) throw CLI::RuntimeError(rc);
  });
}
