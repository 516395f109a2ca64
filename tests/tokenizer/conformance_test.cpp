// 7a: llama.cpp's tokenizer conformance cases (tokenizer-tests/ggml-vocab-NAME.gguf.inp/.out):
// llama-bpe against Llama 3.1's tokenizer.json, qwen2 against Qwen3's, llama-spm / gpt-2 / phi-3
// against the vocab-only GGUF files. Expected ids have no BOS.
#include <map>
#include <mutex>
#include <sstream>

#include "tokenizer_test_util.h"

namespace kiln::test {

std::shared_ptr<const Tokenizer> shared_tokenizer(const std::string& path) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<const Tokenizer>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(path);
  if (it != cache.end()) return it->second;
  auto r = Tokenizer::load(path);
  EXPECT_TRUE(r.is_ok()) << r.message();
  if (!r.is_ok()) return nullptr;
  cache[path] = *r;
  return *r;
}

namespace {

struct Case {
  std::string text;
  std::vector<int32_t> ids;
};

std::vector<Case> read_cases(const std::string& name) {
  const std::string base = assets_dir() + "/tokenizer-tests/ggml-vocab-" + name + ".gguf";
  auto inp = read_file(base + ".inp");
  auto out = read_file(base + ".out");
  EXPECT_TRUE(inp.is_ok() && out.is_ok()) << base;
  std::vector<Case> cases;
  if (!inp.is_ok() || !out.is_ok()) return cases;
  const std::string sep = "\n__ggml_vocab_test__\n";
  size_t pos = 0;
  std::string in = *inp;
  while (true) {
    size_t f = in.find(sep, pos);
    if (f == std::string::npos) break;
    cases.push_back(Case{in.substr(pos, f - pos), {}});
    pos = f + sep.size();
  }
  std::istringstream lines(*out);
  std::string line;
  size_t k = 0;
  while (std::getline(lines, line) && k < cases.size()) {
    std::istringstream ls(line);
    int32_t id;
    while (ls >> id) cases[k].ids.push_back(id);
    ++k;
  }
  EXPECT_EQ(k, cases.size()) << base << ": .out has fewer lines than .inp has cases";
  return cases;
}

void check(const std::string& name, const std::string& tokenizer_path) {
  KILN_REQUIRE_ASSETS();
  auto tok = shared_tokenizer(assets_dir() + "/" + tokenizer_path);
  ASSERT_TRUE(tok);
  auto cases = read_cases(name);
  ASSERT_GE(cases.size(), 40u);
  int failures = 0;
  for (const auto& c : cases) {
    auto ids = tok->encode(c.text, /*add_special_tokens=*/false);
    if (ids != c.ids && ++failures <= 5)
      ADD_FAILURE() << name << ": '" << c.text << "'\n  expected " << ids_str(c.ids) << "\n  got      " << ids_str(ids);
    // Every case also round-trips through decode (these inputs are all decodable text).
    if (ids == c.ids) {
      std::string text = tok->decode(ids);
      std::string expect = c.text;
      // SentencePiece decoders drop the one leading space the encoder added (HF Strip decoder).
      EXPECT_EQ(text, expect) << name << ": decode of " << ids_str(ids);
    }
  }
  EXPECT_EQ(failures, 0) << name << ": " << failures << " of " << cases.size() << " cases differ";
}

}  // namespace

TEST(TokenizerConformance, LlamaBpe) { check("llama-bpe", "tokenizers/llama-3.1/tokenizer.json"); }
TEST(TokenizerConformance, Qwen2) { check("qwen2", "tokenizers/qwen3/tokenizer.json"); }
TEST(TokenizerConformance, LlamaSpm) { check("llama-spm", "vocab-gguf/ggml-vocab-llama-spm.gguf"); }
TEST(TokenizerConformance, Gpt2) { check("gpt-2", "vocab-gguf/ggml-vocab-gpt-2.gguf"); }
TEST(TokenizerConformance, Phi3) { check("phi-3", "vocab-gguf/ggml-vocab-phi-3.gguf"); }

}  // namespace kiln::test
