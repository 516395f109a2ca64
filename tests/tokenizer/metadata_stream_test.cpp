// Metadata (bos/eos/pad, add_bos, chat templates) from the config files and GGUF keys; GGUF
// vocabulary errors; incremental decoding (never a partial UTF-8 sequence, pieces concatenate to
// the full decode) on the real tokenizers.
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "formats/gguf.h"
#include "tokenizer/unicode.h"
#include "tokenizer_test_util.h"

namespace kiln::test {
namespace {

using json = nlohmann::json;

TEST(TokenizerMetadata, Llama31Directory) {
  KILN_REQUIRE_ASSETS();
  auto t = shared_tokenizer(assets_dir() + "/tokenizers/llama-3.1");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->vocab_size(), 128256);
  EXPECT_EQ(t->bos_id(), 128000);
  EXPECT_EQ(t->bos_token(), "<|begin_of_text|>");
  EXPECT_EQ(t->eos_token(), "<|eot_id|>");
  EXPECT_EQ(ids_str(t->eos_ids()), "[128009]");
  EXPECT_TRUE(t->add_bos());
  EXPECT_FALSE(t->add_eos());
  EXPECT_TRUE(t->is_special(128000));
  EXPECT_FALSE(t->is_special(9906));
  EXPECT_EQ(t->token_to_id("Hello"), 9906);
  EXPECT_EQ(t->id_to_token(9906), "Hello");
  EXPECT_EQ(t->id_to_token(-1), "");
  EXPECT_EQ(t->id_to_token(1 << 20), "");
  ASSERT_TRUE(t->chat_template().has_value());
  EXPECT_NE(t->chat_template()->find("start_header_id"), std::string::npos);
  EXPECT_FALSE(t->chat_template("tool_use").has_value());
  EXPECT_EQ(ids_str(t->encode("Hello world", true)), "[128000,9906,1917]");
  EXPECT_EQ(ids_str(t->encode("<|begin_of_text|>Hi<|eot_id|>", false)), "[128000,13347,128009]");
}

TEST(TokenizerMetadata, Qwen3Directory) {
  KILN_REQUIRE_ASSETS();
  auto t = shared_tokenizer(assets_dir() + "/tokenizers/qwen3");
  ASSERT_TRUE(t);
  EXPECT_FALSE(t->bos_id().has_value());  // "bos_token": null
  EXPECT_EQ(t->bos_token(), "");
  EXPECT_FALSE(t->add_bos());
  EXPECT_EQ(t->eos_token(), "<|im_end|>");
  EXPECT_EQ(ids_str(t->eos_ids()), "[151645]");
  EXPECT_EQ(t->pad_id(), 151643);
  EXPECT_FALSE(t->is_special(151657));  // <tool_call> is an added token that is not special
  EXPECT_TRUE(t->is_special(151644));
  EXPECT_EQ(t->decode(std::vector<int32_t>{151644, 151657, 151645}, true), "<tool_call>");
  ASSERT_TRUE(t->chat_template().has_value());
}

TEST(TokenizerMetadata, MistralJsonAlone) {
  KILN_REQUIRE_ASSETS();
  auto t = shared_tokenizer(assets_dir() + "/tokenizers/mistral-7b/tokenizer.json");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->bos_id(), 1);  // from the TemplateProcessing post-processor
  EXPECT_EQ(t->bos_token(), "<s>");
  EXPECT_EQ(ids_str(t->eos_ids()), "[2]");  // no config: the well-known "</s>"
  EXPECT_FALSE(t->chat_template().has_value());
  EXPECT_EQ(ids_str(t->encode("Hello world", true)), "[1,22557,1526]");
}

TEST(TokenizerMetadata, GgufVocabularies) {
  KILN_REQUIRE_ASSETS();
  auto spm = shared_tokenizer(assets_dir() + "/vocab-gguf/ggml-vocab-llama-spm.gguf");
  ASSERT_TRUE(spm);
  EXPECT_EQ(spm->bos_id(), 1);
  EXPECT_EQ(ids_str(spm->eos_ids()), "[2]");
  EXPECT_TRUE(spm->add_bos());
  EXPECT_EQ(ids_str(spm->encode("Hello world", true)), "[1,15043,3186]");
  EXPECT_EQ(spm->decode(std::vector<int32_t>{1, 15043, 3186}, true), "Hello world");
  auto phi3 = shared_tokenizer(assets_dir() + "/vocab-gguf/ggml-vocab-phi-3.gguf");
  ASSERT_TRUE(phi3);
  EXPECT_EQ(ids_str(phi3->eos_ids()), "[32000,32007]");  // eos + <|end|> (end of generation)
  EXPECT_EQ(phi3->pad_id(), 32000);
  ASSERT_TRUE(phi3->chat_template().has_value());
  // phi-3 special tokens strip the whitespace after them (llama.cpp's RSTRIP attribute)
  EXPECT_EQ(ids_str(phi3->encode("<|user|>\nHi", false)), ids_str(phi3->encode("<|user|>Hi", false)));
  auto gpt2 = shared_tokenizer(assets_dir() + "/vocab-gguf/ggml-vocab-gpt-2.gguf");
  ASSERT_TRUE(gpt2);
  EXPECT_FALSE(gpt2->add_bos());
  EXPECT_EQ(ids_str(gpt2->eos_ids()), "[50256]");
  EXPECT_TRUE(gpt2->is_special(50256));
}

// A directory with all the config files (written to a temp dir).
TEST(TokenizerMetadata, ConfigFiles) {
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("kiln_tok_cfg_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const json& j) { std::ofstream(dir / name) << j.dump(); };
  json added = json::array();
  std::vector<std::string> toks = {"<unk>", "<s>", "</s>", "<pad>", "<|eot|>", "a"};
  json vocab = json::object();
  for (size_t i = 0; i < toks.size(); ++i) {
    vocab[toks[i]] = i;
    if (i < 5) added.push_back({{"id", i}, {"content", toks[i]}, {"special", true}});
  }
  write("tokenizer.json", {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}}, {"added_tokens", added}});
  write("tokenizer_config.json",
        {{"bos_token", {{"__type", "AddedToken"}, {"content", "<s>"}}}, {"eos_token", "</s>"}, {"pad_token", "<pad>"},
         {"add_bos_token", true}, {"add_eos_token", true},
         {"chat_template", json::array({{{"name", "default"}, {"template", "D"}}, {{"name", "tool_use"}, {"template", "T"}}})}});
  write("generation_config.json", {{"eos_token_id", {2, 4}}, {"bos_token_id", 1}});
  auto r = Tokenizer::load(dir.string());
  ASSERT_TRUE(r.is_ok()) << r.message();
  const Tokenizer& t = **r;
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.pad_id(), 3);
  EXPECT_EQ(ids_str(t.eos_ids()), "[2,4]");
  EXPECT_EQ(t.eos_token(), "</s>");
  EXPECT_TRUE(t.add_bos());
  EXPECT_TRUE(t.add_eos());
  EXPECT_EQ(ids_str(t.encode("a", true)), "[1,5,2]");  // add_bos_token / add_eos_token rebuild the template
  EXPECT_EQ(t.chat_template(), "D");
  EXPECT_EQ(t.chat_template("tool_use"), "T");
  // chat_template.jinja wins over the config's; additional_chat_templates/NAME.jinja add names
  std::ofstream(dir / "chat_template.jinja") << "J";
  fs::create_directories(dir / "additional_chat_templates");
  std::ofstream(dir / "additional_chat_templates" / "rag.jinja") << "R";
  auto r2 = Tokenizer::load(dir.string());
  ASSERT_TRUE(r2.is_ok()) << r2.message();
  EXPECT_EQ((*r2)->chat_template(), "J");
  EXPECT_EQ((*r2)->chat_template("rag"), "R");
  EXPECT_EQ((*r2)->chat_template("tool_use"), "T");
  // errors name the file and the field
  write("tokenizer_config.json", {{"eos_token", "<nope>"}});
  auto bad = Tokenizer::load(dir.string());
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.message().find("tokenizer_config.json: eos_token '<nope>' is not in the vocabulary"), std::string::npos) << bad.message();
  write("tokenizer_config.json", {{"chat_template", 5}});
  bad = Tokenizer::load(dir.string());
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.message().find("tokenizer_config.json: chat_template must be a string or a list"), std::string::npos) << bad.message();
  write("tokenizer_config.json", json::object());
  write("generation_config.json", {{"eos_token_id", "x"}});
  bad = Tokenizer::load(dir.string());
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.message().find("generation_config.json: eos_token_id must be an integer or a list"), std::string::npos) << bad.message();
  fs::remove_all(dir);
  auto missing = Tokenizer::load(dir.string());
  ASSERT_FALSE(missing.is_ok());
  EXPECT_NE(missing.message().find("no such file or directory"), std::string::npos);
}

TEST(TokenizerGguf, VocabularyErrors) {
  struct Case {
    std::vector<std::pair<std::string, GgufValue>> kv;
    std::string error;
  };
  std::vector<std::string> toks = {"a", "b", "ab"};
  const std::vector<Case> cases = {
      {{{"general.architecture", "llama"}}, "tokenizer.ggml.model is missing"},
      {{{"tokenizer.ggml.model", "bert"}, {"tokenizer.ggml.tokens", toks}}, "tokenizer.ggml.model 'bert' is not supported (gpt2 and llama are)"},
      {{{"tokenizer.ggml.model", "gpt2"}}, "tokenizer.ggml.tokens is missing or not an array of strings"},
      {{{"tokenizer.ggml.model", "gpt2"}, {"tokenizer.ggml.tokens", toks}, {"tokenizer.ggml.pre", "martian"}, {"tokenizer.ggml.merges", std::vector<std::string>{"a b"}}},
       "tokenizer.ggml.pre 'martian' is not a known pre-tokenizer"},
      {{{"tokenizer.ggml.model", "gpt2"}, {"tokenizer.ggml.tokens", toks}}, "tokenizer.ggml.merges is missing"},
      {{{"tokenizer.ggml.model", "llama"}, {"tokenizer.ggml.tokens", toks}, {"tokenizer.ggml.scores", std::vector<float>{0.f}}},
       "tokenizer.ggml.scores has fewer entries than tokenizer.ggml.tokens"},
      {{{"tokenizer.ggml.model", "gpt2"}, {"tokenizer.ggml.tokens", toks}, {"tokenizer.ggml.merges", std::vector<std::string>{"a b"}}, {"tokenizer.ggml.add_bos_token", true}},
       "tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is not set"},
  };
  for (const auto& c : cases) {
    auto bytes = gguf_serialize(c.kv, {});
    ASSERT_TRUE(bytes.is_ok()) << bytes.message();
    auto g = GgufFile::from_bytes(*bytes, "vocab.gguf");
    ASSERT_TRUE(g.is_ok()) << g.message();
    auto t = Tokenizer::from_gguf(*g);
    ASSERT_FALSE(t.is_ok()) << c.error;
    EXPECT_EQ(t.message().rfind("vocab.gguf: " + c.error, 0), 0u) << t.message();
  }
  // a minimal valid one
  auto bytes = gguf_serialize({{"tokenizer.ggml.model", "gpt2"}, {"tokenizer.ggml.pre", "qwen2"}, {"tokenizer.ggml.tokens", toks},
                               {"tokenizer.ggml.merges", std::vector<std::string>{"a b"}}, {"tokenizer.chat_template", "X"},
                               {"tokenizer.chat_template.rag", "R"}},
                              {});
  auto g = GgufFile::from_bytes(*bytes, "vocab.gguf");
  ASSERT_TRUE(g.is_ok());
  auto t = Tokenizer::from_gguf(*g);
  ASSERT_TRUE(t.is_ok()) << t.message();
  EXPECT_EQ(ids_str((*t)->encode("ab", false)), "[2]");
  EXPECT_EQ((*t)->chat_template(), "X");
  EXPECT_EQ((*t)->chat_template("rag"), "R");
}

// Incremental decoding: every piece is valid UTF-8 and the pieces add up to decode().
void check_stream(const std::shared_ptr<const Tokenizer>& t, const std::vector<int32_t>& ids, bool skip) {
  IncrementalDecoder dec(t, skip);
  std::string all;
  for (int32_t id : ids) {
    std::string piece = dec.push(id);
    ASSERT_TRUE(tok::utf8_is_valid(piece)) << "partial UTF-8 after id " << id << " in " << ids_str(ids);
    all += piece;
  }
  std::string rest = dec.flush();
  ASSERT_TRUE(tok::utf8_is_valid(rest));
  all += rest;
  EXPECT_EQ(all, t->decode(ids, skip)) << ids_str(ids);
}

TEST(TokenizerStream, PiecesConcatenateToDecode) {
  KILN_REQUIRE_ASSETS();
  for (const char* path : {"tokenizers/llama-3.1", "tokenizers/qwen3", "tokenizers/mistral-7b/tokenizer.json",
                           "vocab-gguf/ggml-vocab-llama-spm.gguf", "vocab-gguf/ggml-vocab-gpt-2.gguf"}) {
    auto t = shared_tokenizer(assets_dir() + "/" + path);
    ASSERT_TRUE(t);
    std::mt19937 rng(1234);
    // byte-ish ids: the first 300 ids hold <0xNN> (SentencePiece) or single byte-level characters
    for (int n = 0; n < 300; ++n) {
      std::vector<int32_t> ids;
      int len = 1 + static_cast<int>(rng() % 16);
      for (int k = 0; k < len; ++k)
        ids.push_back(static_cast<int32_t>(rng() % 2 ? rng() % 300 : rng() % static_cast<uint32_t>(t->vocab_size())));
      check_stream(t, ids, n % 2 == 0);
    }
    for (const char* text : {"Hello world! 你好，世界 🦙🚀 👨‍👩‍👧", "  leading spaces\n\ttabs", "ab\xC3\xA9\xE2\x82\xAC"}) {
      check_stream(t, t->encode(text, true), true);
      check_stream(t, t->encode(text, true), false);
    }
  }
}

TEST(TokenizerStream, HoldsIncompleteCharacters) {
  KILN_REQUIRE_ASSETS();
  auto llama = shared_tokenizer(assets_dir() + "/tokenizers/llama-3.1");
  ASSERT_TRUE(llama);
  // "€" as byte-level pieces: E2 82 (one token "âĤ") then AC ("¬"): nothing until it is complete.
  auto first = llama->token_to_id("\xC3\xA2\xC4\xA4");
  auto second = llama->token_to_id("\xC2\xAC");
  ASSERT_TRUE(first && second);
  IncrementalDecoder d(llama);
  EXPECT_EQ(d.push(*first), "");
  EXPECT_EQ(d.push(*second), "\xE2\x82\xAC");
  EXPECT_EQ(d.flush(), "");
  IncrementalDecoder d2(llama);
  EXPECT_EQ(d2.push(*first), "");
  EXPECT_EQ(d2.flush(), "\xEF\xBF\xBD");  // an unfinished character at the end becomes U+FFFD
  EXPECT_EQ(llama->decode_bytes(std::vector<int32_t>{*first}), "\xE2\x82");

  auto mistral = shared_tokenizer(assets_dir() + "/tokenizers/mistral-7b/tokenizer.json");
  ASSERT_TRUE(mistral);
  // byte-fallback runs are held until a non-byte token ends them (a later byte could make the
  // whole run invalid, which HF decodes as one U+FFFD per byte)
  auto e2 = *mistral->token_to_id("<0xE2>"), x82 = *mistral->token_to_id("<0x82>"), xac = *mistral->token_to_id("<0xAC>");
  auto a = *mistral->token_to_id("\xE2\x96\x81" "a");
  IncrementalDecoder m(mistral);
  EXPECT_EQ(m.push(a), "a");
  EXPECT_EQ(m.push(e2), "");
  EXPECT_EQ(m.push(x82), "");
  EXPECT_EQ(m.push(xac), "");
  EXPECT_EQ(m.push(a), "\xE2\x82\xAC a");
  EXPECT_EQ(m.flush(), "");
}

TEST(TokenizerStream, PrefixGivesContext) {
  KILN_REQUIRE_ASSETS();
  auto mistral = shared_tokenizer(assets_dir() + "/tokenizers/mistral-7b/tokenizer.json");
  ASSERT_TRUE(mistral);
  auto prompt = mistral->encode("Hello", true);  // <s> ▁Hello
  auto gen = mistral->encode("world again", false);  // ▁world ▁again
  // Alone, the first generated token loses its leading space (the decoder strips it) ...
  IncrementalDecoder alone(mistral);
  std::string text;
  for (int32_t id : gen) text += alone.push(id);
  text += alone.flush();
  EXPECT_EQ(text, "world again");
  // ... after the prompt as context it keeps it, as vLLM does.
  IncrementalDecoder ctx(mistral);
  ctx.set_prefix(prompt);
  text.clear();
  for (int32_t id : gen) text += ctx.push(id);
  text += ctx.flush();
  EXPECT_EQ(text, " world again");
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), gen.begin(), gen.end());
  EXPECT_EQ(mistral->decode(prompt, true) + text, mistral->decode(all, true));
}

// One Tokenizer is shared by the server's threads: encode/decode are const and thread-safe (the
// word cache is locked, regex match data is per thread).
TEST(TokenizerThreads, ConcurrentEncodeMatchesSerial) {
  KILN_REQUIRE_ASSETS();
  auto t = shared_tokenizer(assets_dir() + "/tokenizers/qwen3");
  ASSERT_TRUE(t);
  std::vector<std::string> texts;
  for (int k = 0; k < 200; ++k)
    texts.push_back("line " + std::to_string(k) + ": h\u00e9llo w\u00f6rld " + std::string(k % 7, ' ') + "\xE4\xBD\xA0\xE5\xA5\xBD " +
                    std::to_string(k * 7919));
  std::vector<std::vector<int32_t>> serial;
  for (const auto& s : texts) serial.push_back(t->encode(s, true));
  std::vector<int> bad(4, 0);
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w)
    threads.emplace_back([&, w] {
      for (int round = 0; round < 5; ++round)
        for (size_t k = 0; k < texts.size(); ++k) {
          size_t i = (k * 31 + static_cast<size_t>(w) * 17 + static_cast<size_t>(round)) % texts.size();
          if (t->encode(texts[i], true) != serial[i]) ++bad[w];
          if (t->decode(serial[i], true) != t->decode(serial[i], true)) ++bad[w];
        }
    });
  for (auto& th : threads) th.join();
  for (int w = 0; w < 4; ++w) EXPECT_EQ(bad[w], 0) << "thread " << w;
}

}  // namespace
}  // namespace kiln::test
