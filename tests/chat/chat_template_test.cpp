#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "chat/chat_template.h"
#include "chat/jinja_value.h"

using kiln::chat::RenderLimits;
using kiln::chat::Template;
using ojson = nlohmann::ordered_json;

namespace {

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Renders `src` with `ctx`; returns the output or "ERROR: message".
std::string render(const std::string& src, const ojson& ctx = ojson::object(), const RenderLimits& limits = {}) {
  auto t = Template::parse(src);
  if (!t) return "ERROR: " + t.message();
  auto r = t->render(ctx, limits);
  if (!r) return "ERROR: " + r.message();
  return *r;
}

class ChatTemplate : public ::testing::Test {
 protected:
  void SetUp() override { setenv("KILN_DATE_OVERRIDE", "2024-07-26 09:30:00", 1); }
};

}  // namespace

// The table: every construct of the Jinja subset, expected outputs rendered by Python jinja2 under
// transformers' settings (tools/chat_snippets.py writes the fixture).
TEST_F(ChatTemplate, SnippetTableMatchesJinja2) {
  std::string path = std::string(KILN_SOURCE_DIR) + "/tests/chat/jinja_snippets.json";
  ojson fixture = ojson::parse(read_text(path));
  setenv("KILN_DATE_OVERRIDE", fixture["date_override"].get<std::string>().c_str(), 1);
  const auto& cases = fixture["cases"];
  ASSERT_GT(cases.size(), 150u);
  int failures = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& c = cases[i];
    std::string src = c["template"].get<std::string>();
    std::string got = render(src, c["context"]);
    bool got_error = got.rfind("ERROR: ", 0) == 0;
    if (c.contains("error")) {
      if (!got_error) {
        ++failures;
        ADD_FAILURE() << "case " << i << ": jinja2 raises (" << c["python_error"].get<std::string>()
                      << ") but kiln rendered\n  template: " << src << "\n  output:   " << got;
      } else {
        // Errors carry a line number: "template:N: ..."
        EXPECT_NE(got.find("template:"), std::string::npos) << got;
      }
      continue;
    }
    std::string want = c["expected"].get<std::string>();
    if (got != want) {
      ++failures;
      ADD_FAILURE() << "case " << i << "\n  template: " << src << "\n  want: " << ::testing::PrintToString(want)
                    << "\n  got:  " << ::testing::PrintToString(got);
    }
  }
  EXPECT_EQ(failures, 0);
}

TEST_F(ChatTemplate, ErrorsNameTheLine) {
  struct Case {
    const char* src;
    const char* want;  // substring of the message
  };
  const Case cases[] = {
      {"a\nb\n{% if x %}\nnever closed", "template:4: "},
      {"line1\n{{ x | nosuchfilter }}", "template:2: TemplateAssertionError: No filter named 'nosuchfilter'"},
      {"l1\nl2\n{{ raise_exception('Roles must alternate') }}", "template:3: TemplateError: Roles must alternate"},
      {"\n\n\n{{ foo.bar }}", "template:4: UndefinedError: 'foo' is undefined"},
      {"{% for m in messages %}\n{{ m.content + 1 }}\n{% endfor %}", "template:2: TypeError"},
      {"{{ 'unterminated }}", "template:1: TemplateSyntaxError"},
      {"x\n{% endif %}", "template:2: TemplateSyntaxError: Encountered unknown tag 'endif'"},
      {"{% macro m() %}\n{{ undefined_fn() }}\n{% endmacro %}\n{{ m() }}", "template:2: UndefinedError"},
      {"{# comment\n\nnever closed", "TemplateSyntaxError: Missing end of comment tag"},
  };
  ojson ctx = {{"messages", ojson::array({{{"role", "user"}, {"content", "hi"}}})}};
  for (const auto& c : cases) {
    std::string got = render(c.src, ctx);
    EXPECT_NE(got.find(c.want), std::string::npos) << "template: " << c.src << "\n got: " << got;
  }
  auto t = Template::parse("{{ x.y }}", "my.jinja");
  ASSERT_TRUE(t);
  auto r = t->render(ojson::object());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.message().rfind("my.jinja:1: ", 0), 0u) << r.message();
}

TEST_F(ChatTemplate, HostileTemplatesHitLimitsNotTheStack) {
  RenderLimits small;
  small.max_output_bytes = 1 << 20;
  small.max_loop_iterations = 100000;
  // Infinite macro recursion, deep nesting, huge loops, exponential strings.
  EXPECT_NE(render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", ojson::object(), small).find("RecursionError"), std::string::npos);
  std::string deep(5000, '(');
  EXPECT_NE(render("{{ " + deep + "1 }}", ojson::object(), small).find("ERROR: "), std::string::npos);
  std::string deep_if;
  for (int i = 0; i < 3000; ++i) deep_if += "{% if true %}";
  EXPECT_NE(render(deep_if, ojson::object(), small).find("ERROR: "), std::string::npos);
  EXPECT_NE(render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", ojson::object(), small)
                .find("loop iterations"),
            std::string::npos);
  EXPECT_NE(render("{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                   ojson::object(), small)
                .find("MemoryError"),
            std::string::npos);
  EXPECT_NE(render("{{ 'x' * 100000000000 }}", ojson::object(), small).find("MemoryError"), std::string::npos);
  EXPECT_NE(render("{{ 2 ** 100 }}", ojson::object(), small).find("OverflowError"), std::string::npos);
  // Recursion through deep expressions and deep blocks: the evaluator's depth limit, not the stack.
  std::string negs(150, '-');
  EXPECT_NE(render("{% macro m(n) %}{{ " + negs + "(m(n - 1) if n > 0 else 0) }}{% endmacro %}{{ m(60) }}",
                   ojson::object(), small)
                .find("RecursionError"),
            std::string::npos);
  std::string fors, ends;
  for (int i = 0; i < 80; ++i) fors += "{% for i in [1] %}", ends += "{% endfor %}";
  EXPECT_NE(render("{% macro m(n) %}" + fors + "{{ m(n - 1) if n > 0 else 0 }}" + ends + "{% endmacro %}{{ m(60) }}",
                   ojson::object(), small)
                .find("RecursionError"),
            std::string::npos);
  // Self-referencing namespaces print like Python's recursive reprs and are freed.
  EXPECT_EQ(render("{% set ns = namespace() %}{% set ns.me = ns %}{% set ns.l = [ns] %}{{ ns }}", ojson::object(), small),
            "<Namespace {'me': <Namespace {...}>, 'l': [<Namespace {...}>]}>");
}

TEST_F(ChatTemplate, FloatReprIsPythons) {
  using kiln::chat::jinja::float_repr;
  EXPECT_EQ(float_repr(1.0), "1.0");
  EXPECT_EQ(float_repr(0.1), "0.1");
  EXPECT_EQ(float_repr(1e16), "1e+16");
  EXPECT_EQ(float_repr(1234567890123456.0), "1234567890123456.0");
  EXPECT_EQ(float_repr(0.0001), "0.0001");
  EXPECT_EQ(float_repr(0.00001), "1e-05");
  EXPECT_EQ(float_repr(-2.5e-7), "-2.5e-07");
  EXPECT_EQ(float_repr(1.7976931348623157e308), "1.7976931348623157e+308");
  EXPECT_EQ(float_repr(-0.0), "-0.0");
  EXPECT_EQ(float_repr(123.456), "123.456");
}

TEST_F(ChatTemplate, ApplyNormalizesOpenAIMessages) {
  auto t = Template::parse(
      "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }}"
      "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}[{{ c.function.arguments | tojson }}]"
      "{% endfor %}{% endif %}|{% endfor %}{{ tools is none }}{{ documents is none }}{{ add_generation_prompt }}"
      "{{ eos_token }}{{ extra }}");
  ASSERT_TRUE(t) << t.message();
  ojson msgs = ojson::parse(R"([
    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    {"role": "assistant", "content": null, "tool_calls": [
      {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"z\": 1, \"a\": [true]}"}},
      {"id": "2", "type": "function", "function": {"name": "g", "arguments": ""}}]},
    {"role": "assistant", "content": "x", "tool_calls": []}
  ])");
  auto r = t->apply(msgs, nullptr, true, "<s>", "</s>", ojson{{"extra", 7}});
  ASSERT_TRUE(r) << r.message();
  EXPECT_EQ(*r, "<s>user:a\nb|assistant:None[{\"z\": 1, \"a\": [true]}][{}]|assistant:x|TrueTrueTrue</s>7");

  ojson bad = ojson::parse(R"([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}])");
  auto e = t->apply(bad, nullptr, false, "", "");
  ASSERT_FALSE(e);
  EXPECT_NE(e.message().find("messages[0].tool_calls[0].function.arguments is not valid JSON"), std::string::npos)
      << e.message();
}

TEST_F(ChatTemplate, KeyOrderFollowsTheInputJson) {
  auto t = Template::parse("{{ tools | tojson }}");
  ASSERT_TRUE(t);
  ojson tools = ojson::parse(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])");
  auto r = t->apply(ojson::array(), tools, false, "", "");
  ASSERT_TRUE(r) << r.message();
  EXPECT_EQ(*r, R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])");
}

TEST_F(ChatTemplate, ConcurrentRendersOfOneTemplate) {
  auto t = Template::parse(
      "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ m.content }}{% endfor %}{{ ns.n }}");
  ASSERT_TRUE(t);
  std::vector<std::thread> threads;
  std::vector<std::string> outs(8);
  for (int k = 0; k < 8; ++k) {
    threads.emplace_back([&, k] {
      Template copy = *t;  // copies share the parsed AST
      for (int it = 0; it < 200; ++it) {
        ojson msgs = ojson::array();
        for (int j = 0; j <= k; ++j) msgs.push_back({{"role", "user"}, {"content", std::to_string(j)}});
        auto r = copy.apply(msgs, nullptr, false, "", "");
        if (r) outs[k] = *r;
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int k = 0; k < 8; ++k) {
    std::string want;
    for (int j = 0; j <= k; ++j) want += std::to_string(j);
    want += std::to_string(k + 1);
    EXPECT_EQ(outs[k], want);
  }
}

TEST_F(ChatTemplate, AssetTemplatesParse) {
  std::string dir = std::string(KILN_SOURCE_DIR) + "/../shared/assets/templates";
  if (!std::filesystem::is_directory(dir)) GTEST_SKIP() << dir << " not found: asset templates not checked";
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() != ".jinja") continue;
    auto t = Template::parse(read_text(e.path().string()), e.path().filename().string());
    EXPECT_TRUE(t) << t.message();
    ++n;
  }
  EXPECT_GE(n, 12);
}

// A spot check with expected text written out (the full matrix is tests/py/test_chat_templates.py).
TEST_F(ChatTemplate, Llama32RendersLikeTransformers) {
  std::string path = std::string(KILN_SOURCE_DIR) + "/../shared/assets/templates/meta-llama-Llama-3.2-3B-Instruct.jinja";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << path << " not found";
  auto t = Template::parse(read_text(path));
  ASSERT_TRUE(t) << t.message();
  ojson msgs = ojson::parse(R"([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])");
  auto r = t->apply(msgs, nullptr, true, "<|begin_of_text|>", "<|eot_id|>");
  ASSERT_TRUE(r) << r.message();
  EXPECT_EQ(*r,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}
