// Tables for the pipeline pieces on tiny tokenizers built in the test (no model files): malformed
// tokenizer.json errors, normalizers, pre-tokenizer split behaviours, BPE details, added-token
// options, post-processor, decoders.
#include <nlohmann/json.hpp>

#include <random>

#include "formats/gguf.h"

#include "tokenizer_test_util.h"

namespace kiln::test {
namespace {

using json = nlohmann::json;

// A BPE tokenizer over `tokens` (ids in order) with `merges`; other parts given as JSON.
std::string make_json(const std::vector<std::string>& tokens, const std::vector<std::string>& merges,
                      json normalizer = nullptr, json pre = nullptr, json decoder = nullptr, json post = nullptr,
                      json added = json::array(), json model_extra = json::object()) {
  json vocab = json::object();
  for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
  json model = {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}};
  for (auto& [k, v] : model_extra.items()) model[k] = v;
  json j = {{"model", model}, {"normalizer", normalizer}, {"pre_tokenizer", pre},
            {"decoder", decoder}, {"post_processor", post}, {"added_tokens", added}};
  return j.dump();
}

std::shared_ptr<const Tokenizer> make(const std::string& j) {
  auto r = Tokenizer::from_json_string(j);
  EXPECT_TRUE(r.is_ok()) << r.message();
  return r.is_ok() ? *r : nullptr;
}

// Token strings of an encoding, joined with '|', to read tables easily.
std::string pieces(const Tokenizer& t, std::string_view text, bool special = false) {
  std::string s;
  for (int32_t id : t.encode(text, special)) s += (s.empty() ? "" : "|") + t.id_to_token(id);
  return s;
}

TEST(TokenizerJson, MalformedInputsGiveFieldErrors) {
  const std::string ok_model = R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";
  struct Case {
    std::string json, error;
  };
  const std::vector<Case> cases = {
      {"not json", "tokenizer.json: not valid JSON"},
      {"[1, 2]", "tokenizer.json: must hold a JSON object"},
      {"{}", "tokenizer.json: model is missing"},
      {R"({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}})", "tokenizer.json: model.type 'Unigram' is not supported (BPE is)"},
      {R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})", "tokenizer.json: model.type 'WordPiece' is not supported (BPE is)"},
      {R"({"model": {"vocab": {"a": 0}}})", "tokenizer.json: model.type is missing"},
      {R"({"model": 3})", "tokenizer.json: model must be an object, not a number"},
      {R"({"model": {"type": "BPE", "vocab": ["a"], "merges": []}})", "tokenizer.json: model.vocab must be an object {token: id}"},
      {R"({"model": {"type": "BPE", "vocab": {"a": "x"}, "merges": []}})", "tokenizer.json: model.vocab['a'] must be an integer id"},
      {R"({"model": {"type": "BPE", "vocab": {"a": -4}, "merges": []}})", "tokenizer.json: model.vocab['a'] id -4 is out of range"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a zz"]}})", "tokenizer.json: model.merges[0] token 'zz' is not in model.vocab"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a a"]}})", "tokenizer.json: model.merges[0] merged token 'aa' is not in model.vocab"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b c"]}})", "tokenizer.json: model.merges[0] 'a b c' must be two tokens separated by one space"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [7]}})", "tokenizer.json: model.merges[0] must be \"a b\" or [\"a\", \"b\"]"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": "yes"}})", "tokenizer.json: model.byte_fallback must be a boolean, not a string"},
      {"{" + ok_model + R"(, "normalizer": {"type": "BertNormalizer"}})", "tokenizer.json: normalizer.type 'BertNormalizer' is not supported"},
      {"{" + ok_model + R"(, "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Precompiled"}]}})", "tokenizer.json: normalizer.normalizers[1].type 'Precompiled' is not supported"},
      {"{" + ok_model + R"(, "normalizer": {"type": "Replace", "pattern": {"Regex": "(("}, "content": ""}})", "tokenizer.json: normalizer.pattern.Regex invalid regex '(('"},
      {"{" + ok_model + R"(, "normalizer": {"type": "Replace", "pattern": "x", "content": ""}})", "tokenizer.json: normalizer.pattern must be an object"},
      {"{" + ok_model + R"(, "pre_tokenizer": {"type": "Split", "pattern": {"String": "x"}, "behavior": "Sideways"}})", "tokenizer.json: pre_tokenizer.behavior 'Sideways' is not one of Removed, Isolated"},
      {"{" + ok_model + R"(, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits"}, {"type": "BertPreTokenizer"}]}})", "tokenizer.json: pre_tokenizer.pretokenizers[1].type 'BertPreTokenizer' is not supported"},
      {"{" + ok_model + R"(, "pre_tokenizer": {"type": "Metaspace", "replacement": "ab"}})", "tokenizer.json: pre_tokenizer.replacement must be one character"},
      {"{" + ok_model + R"(, "pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "sometimes"}})", "tokenizer.json: pre_tokenizer.prepend_scheme 'sometimes' is not one of always, never, first"},
      {"{" + ok_model + R"(, "pre_tokenizer": {"no_type": 1}})", "tokenizer.json: pre_tokenizer.type is missing"},
      {"{" + ok_model + R"(, "decoder": {"type": "WordPiece"}})", "tokenizer.json: decoder.type 'WordPiece' is not supported"},
      {"{" + ok_model + R"(, "decoder": {"type": "Strip", "content": " ", "start": -1, "stop": 0}})", "tokenizer.json: decoder start/stop must be >= 0"},
      {"{" + ok_model + R"(, "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<x>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}})", "tokenizer.json: post_processor special token '<x>' is not in the vocabulary"},
      {"{" + ok_model + R"(, "post_processor": {"type": "TemplateProcessing", "single": 3}})", "tokenizer.json: post_processor.single must be an array"},
      {"{" + ok_model + R"(, "post_processor": {"type": "Weird"}})", "tokenizer.json: post_processor.type 'Weird' is not supported"},
      {"{" + ok_model + R"(, "added_tokens": [{"id": 5}]})", "tokenizer.json: added_tokens[0].content is missing"},
      {"{" + ok_model + R"(, "added_tokens": [{"id": -1, "content": "x"}]})", "tokenizer.json: added_tokens[0].id is missing or out of range"},
      {"{" + ok_model + R"(, "added_tokens": {"id": 1}})", "tokenizer.json: added_tokens must be an array"},
  };
  for (const auto& c : cases) {
    auto r = Tokenizer::from_json_string(c.json);
    ASSERT_FALSE(r.is_ok()) << c.json;
    EXPECT_EQ(r.message().rfind(c.error, 0), 0u) << "input: " << c.json << "\n  got: " << r.message() << "\n want: " << c.error;
  }
}

TEST(TokenizerJson, NormalizersApplyInOrder) {
  // Character-level vocab, no merges: ids show the normalized characters.
  std::vector<std::string> chars = {"a", "b", "e", "f", "i", "\xC3\xA9" /*é*/, "\xCC\x81" /*U+0301*/, "\xE2\x96\x81" /*▁*/, "x", "1", " "};
  struct Case {
    json normalizer;
    std::string input, expected;
  };
  const std::vector<Case> cases = {
      {nullptr, "e\xCC\x81", "e|\xCC\x81"},
      {{{"type", "NFC"}}, "e\xCC\x81", "\xC3\xA9"},
      {{{"type", "NFD"}}, "\xC3\xA9", "e|\xCC\x81"},
      {{{"type", "NFKC"}}, "\xEF\xAC\x81" /*ﬁ*/, "f|i"},
      {{{"type", "NFC"}}, "\xEF\xAC\x81", ""},  // ﬁ stays a ligature, which this vocab lacks: dropped
      {{{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}, "a b", "a|\xE2\x96\x81|b"},
      {{{"type", "Replace"}, {"pattern", {{"Regex", "[0-9]+"}}}, {"content", "x"}}, "a123b1", "a|x|b|x"},
      {{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}}, "ab", "\xE2\x96\x81|a|b"},
      {{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}}, "", ""},
      {{{"type", "Sequence"}, {"normalizers", {{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}}, {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}}}},
       "a b", "\xE2\x96\x81|a|\xE2\x96\x81|b"},
      {{{"type", "Lowercase"}}, "AB", "a|b"},
      {{{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}}, "  a b \t", "a| |b"},
  };
  for (const auto& c : cases) {
    auto t = make(make_json(chars, {}, c.normalizer));
    ASSERT_TRUE(t);
    EXPECT_EQ(pieces(*t, c.input), c.expected) << c.normalizer.dump() << " on '" << c.input << "'";
  }
}

TEST(TokenizerJson, SplitBehaviours) {
  // Merges glue a/b to '-' only when they land in the same pre-token.
  std::vector<std::string> tokens = {"a", "b", "-", "a-", "-b", "ab", "--", "a--", "--b"};
  std::vector<std::string> merges = {"a -", "- b", "a b", "- -", "a --", "-- b"};
  struct Case {
    std::string behavior;
    bool invert;
    std::string input, expected;
  };
  const std::vector<Case> cases = {
      {"Isolated", false, "a-b", "a|-|b"},
      {"Removed", false, "a-b", "a|b"},
      {"MergedWithPrevious", false, "a-b", "a-|b"},
      {"MergedWithNext", false, "a-b", "a|-b"},
      {"Contiguous", false, "a--b", "a|--|b"},
      {"Isolated", false, "a--b", "a|-|-|b"},
      {"MergedWithPrevious", false, "a--b", "a-|-|b"},
      {"Removed", true, "a-b", "-"},  // inverted: the non-matches are removed
  };
  for (const auto& c : cases) {
    json pre = {{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", c.behavior}, {"invert", c.invert}};
    auto t = make(make_json(tokens, merges, nullptr, pre));
    ASSERT_TRUE(t);
    EXPECT_EQ(pieces(*t, c.input), c.expected) << c.behavior << (c.invert ? " inverted" : "") << " on " << c.input;
  }
}

TEST(TokenizerJson, PreTokenizers) {
  std::vector<std::string> tokens = {"1", "2", "3", "12", "123", "a", "b", "ab", "\xE2\x96\x81", "\xE2\x96\x81" "a", "\xE2\x96\x81" "ab", "b" "\xE2\x96\x81", "\xC4\xA0" /*Ġ*/, "\xC4\xA0" "a"};
  std::vector<std::string> merges = {"1 2", "12 3", "\xE2\x96\x81 a", "\xE2\x96\x81" "a b", "a b", "b \xE2\x96\x81", "\xC4\xA0 a"};
  struct Case {
    json pre;
    std::string input, expected;
  };
  const json ms_first = {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", "first"}, {"split", false}};
  const json ms_never_split = {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", "never"}, {"split", true}};
  const std::vector<Case> cases = {
      {{{"type", "Digits"}, {"individual_digits", true}}, "123ab", "1|2|3|ab"},
      {{{"type", "Digits"}, {"individual_digits", false}}, "123ab", "123|ab"},
      {ms_first, "ab", "\xE2\x96\x81" "ab"},
      {ms_first, "ab ab", "\xE2\x96\x81" "ab|\xE2\x96\x81" "ab"},
      {ms_never_split, "ab ab", "ab|\xE2\x96\x81" "ab"},
      {{{"type", "Metaspace"}, {"add_prefix_space", true}}, "a", "\xE2\x96\x81" "a"},  // legacy field
      {{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}, "a", "\xC4\xA0" "a"},
      {{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}, "ab 12", "ab|\xC4\xA0|12"},
      {{{"type", "WhitespaceSplit"}}, "ab  \t ab", "ab|ab"},
      {{{"type", "Sequence"}, {"pretokenizers", {{{"type", "WhitespaceSplit"}}, {{"type", "Digits"}, {"individual_digits", true}}}}}, "12 ab", "1|2|ab"},
  };
  for (const auto& c : cases) {
    auto t = make(make_json(tokens, merges, nullptr, c.pre));
    ASSERT_TRUE(t);
    EXPECT_EQ(pieces(*t, c.input), c.expected) << c.pre.dump() << " on '" << c.input << "'";
  }
}

TEST(TokenizerJson, BpeModelOptions) {
  struct Case {
    std::vector<std::string> tokens;
    std::vector<std::string> merges;
    json extra;
    std::string input, expected;
  };
  const std::vector<Case> cases = {
      // rank order, not left-to-right: "b c" (rank 0) before "a b" (rank 1)
      {{"a", "b", "c", "bc", "ab", "abc"}, {"b c", "a b"}, json::object(), "abc", "a|bc"},
      {{"a", "b", "c", "bc", "ab", "abc"}, {"a b", "b c", "ab c"}, json::object(), "abc", "abc"},
      // ties broken leftmost
      {{"a", "aa"}, {"a a"}, json::object(), "aaa", "aa|a"},
      // byte fallback for characters outside the vocab
      {{"<unk>", "<0xC3>", "<0xA9>", "a"}, {}, {{"byte_fallback", true}, {"unk_token", "<unk>"}}, "a\xC3\xA9", "a|<0xC3>|<0xA9>"},
      // unk, fused or not
      {{"<unk>", "a"}, {}, {{"unk_token", "<unk>"}, {"fuse_unk", true}}, "xya", "<unk>|a"},
      {{"<unk>", "a"}, {}, {{"unk_token", "<unk>"}, {"fuse_unk", false}}, "xya", "<unk>|<unk>|a"},
      // no unk, no fallback: unknown characters vanish (as in HF)
      {{"a"}, {}, json::object(), "xa", "a"},
      // ignore_merges: a word in the vocab is taken whole
      {{"a", "b", "c", "ab", "abc"}, {"a b"}, {{"ignore_merges", true}}, "abc", "abc"},
      {{"a", "b", "c", "ab", "abc"}, {"a b"}, {{"ignore_merges", false}}, "abc", "ab|c"},
      // continuing_subword_prefix / end_of_word_suffix
      {{"a", "##b", "a##b", "ab"}, {"a ##b"}, {{"continuing_subword_prefix", "##"}}, "ab", "ab"},
      {{"a", "b</w>", "ab</w>"}, {"a b</w>"}, {{"end_of_word_suffix", "</w>"}}, "ab", "ab</w>"},
  };
  for (const auto& c : cases) {
    auto t = make(make_json(c.tokens, c.merges, nullptr, nullptr, nullptr, nullptr, json::array(), c.extra));
    ASSERT_TRUE(t);
    EXPECT_EQ(pieces(*t, c.input), c.expected) << c.extra.dump() << " on '" << c.input << "'";
  }
  // Merges as pairs (the newer serialization) give the same result as "a b" strings.
  auto t = make(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}})");
  ASSERT_TRUE(t);
  EXPECT_EQ(pieces(*t, "ab"), "ab");
}

TEST(TokenizerJson, AddedTokenOptions) {
  std::vector<std::string> tokens = {"a", "b", " ", "<x>", "ab", "\xE2\x96\x81"};
  struct Case {
    json added;
    std::string input, expected;
  };
  auto tok = [](bool lstrip, bool rstrip, bool single_word, bool normalized = false, bool special = true) {
    return json::array({{{"id", 3}, {"content", "<x>"}, {"special", special}, {"lstrip", lstrip}, {"rstrip", rstrip},
                         {"single_word", single_word}, {"normalized", normalized}}});
  };
  const std::vector<Case> cases = {
      {tok(false, false, false), "a <x> b", "a| |<x>| |b"},
      {tok(true, false, false), "a  <x> b", "a|<x>| |b"},
      {tok(false, true, false), "a <x>  b", "a| |<x>|b"},
      {tok(true, true, false), "a \t<x>\n b", "a|<x>|b"},
      // not a single word: '<x>' stays text, whose characters this vocab lacks (dropped, as HF does),
      // so a and b meet and merge
      {tok(false, false, true), "a<x>b", "ab"},
      {tok(false, false, true), "a <x> b", "a| |<x>| |b"},
      {tok(false, false, false), "<x><x>", "<x>|<x>"},
      {tok(false, false, false), "a<x", "a"},  // a prefix alone is text
  };
  for (const auto& c : cases) {
    auto t = make(make_json(tokens, {"a b"}, nullptr, nullptr, nullptr, nullptr, c.added));
    ASSERT_TRUE(t);
    EXPECT_EQ(pieces(*t, c.input), c.expected) << c.added.dump() << " on '" << c.input << "'";
  }
  // normalized added tokens are matched after the normalizer ran (here: ' ' -> '▁' makes "<x>" from "<x>").
  json norm = {{"type", "Replace"}, {"pattern", {{"String", "y"}}}, {"content", "x"}};
  auto t = make(make_json(tokens, {}, norm, nullptr, nullptr, nullptr, tok(false, false, false, true, false)));
  ASSERT_TRUE(t);
  EXPECT_EQ(pieces(*t, "a<y>"), "a|<x>");
  auto t2 = make(make_json(tokens, {}, norm, nullptr, nullptr, nullptr, tok(false, false, false, false, false)));
  ASSERT_TRUE(t2);
  EXPECT_EQ(pieces(*t2, "a<y>"), "a");  // not normalized: '<y>' is text, normalized to "<x>" characters, not in vocab
  EXPECT_FALSE(t2->is_special(3));
  EXPECT_TRUE(t->token_to_id("<x>").has_value());
}

TEST(TokenizerJson, PostProcessorTemplate) {
  std::vector<std::string> tokens = {"<s>", "</s>", "a"};
  json added = json::array({{{"id", 0}, {"content", "<s>"}, {"special", true}}, {{"id", 1}, {"content", "</s>"}, {"special", true}}});
  json post = {{"type", "TemplateProcessing"},
               {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}, {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}}},
               {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {0}}, {"tokens", {"<s>"}}}}, {"</s>", {{"id", "</s>"}, {"ids", {1}}, {"tokens", {"</s>"}}}}}}};
  auto t = make(make_json(tokens, {}, nullptr, nullptr, nullptr, post, added));
  ASSERT_TRUE(t);
  EXPECT_EQ(ids_str(t->encode("a", true)), "[0,2,1]");
  EXPECT_EQ(ids_str(t->encode("a", false)), "[2]");
  EXPECT_EQ(ids_str(t->encode("", true)), "[0,1]");
  EXPECT_TRUE(t->add_bos());
  EXPECT_TRUE(t->add_eos());
  EXPECT_EQ(t->bos_id(), 0);
  EXPECT_EQ(t->bos_token(), "<s>");
  ASSERT_EQ(t->eos_ids().size(), 1u);  // guessed from the well-known "</s>"
  EXPECT_EQ(t->eos_ids()[0], 1);
}

TEST(TokenizerJson, Decoders) {
  std::vector<std::string> tokens = {"<s>", "<0xE2>", "<0x82>", "<0xAC>", "\xE2\x96\x81" "a", "b", "\xE2\x96\x81", "<0x41>"};
  json added = json::array({{{"id", 0}, {"content", "<s>"}, {"special", true}}});
  const json replace = {{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}}, {"content", " "}};
  const json spm = {{"type", "Sequence"}, {"decoders", {replace, {{"type", "ByteFallback"}}, {{"type", "Fuse"}}, {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
  const json metaspace = {{"type", "Sequence"}, {"decoders", {{{"type", "ByteFallback"}}, {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", "always"}}}}};
  struct Case {
    json decoder;
    std::vector<int32_t> ids;
    bool skip;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {spm, {4, 5, 4}, false, "ab a"},
      {spm, {1, 2, 3}, false, "\xE2\x82\xAC"},                     // a valid byte run: €
      {spm, {1, 2, 3, 1, 4}, false, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD a"},  // invalid run: U+FFFD per byte
      {spm, {1, 2, 5}, false, "\xEF\xBF\xBD\xEF\xBF\xBD" "b"},
      {spm, {0, 4}, false, "<s> a"},                               // Strip only strips a leading space
      {spm, {0, 4}, true, "a"},
      {spm, {6, 6, 4}, false, "  a"},
      {spm, {7, 4}, false, "A a"},
      {metaspace, {4, 4}, false, "a a"},
      {metaspace, {6, 4}, false, " a"},                              // the first token drops its '▁'
      {metaspace, {0, 4}, false, "<s> a"},
      {metaspace, {0, 4}, true, "a"},
      {nullptr, {4, 5}, false, "\xE2\x96\x81" "a b"},                // no decoder: tokens joined by spaces
      {{{"type", "Strip"}, {"content", "b"}, {"start", 0}, {"stop", 1}}, {5, 5}, false, ""},  // per token
  };
  for (const auto& c : cases) {
    auto t = make(make_json(tokens, {}, nullptr, nullptr, c.decoder, nullptr, added));
    ASSERT_TRUE(t);
    EXPECT_EQ(t->decode(c.ids, c.skip), c.expected) << c.decoder.dump() << " " << ids_str(c.ids);
  }
  auto t = make(make_json(tokens, {}, nullptr, nullptr, spm, nullptr, added));
  ASSERT_TRUE(t);
  EXPECT_EQ(t->decode(std::vector<int32_t>{99, -1, 4}), "a");  // unknown ids are skipped
  EXPECT_EQ(t->decode_bytes(std::vector<int32_t>{1, 2}), "\xE2\x82");  // raw bytes, no U+FFFD
}

TEST(TokenizerJson, ByteLevelDecoderRepairsInvalidUtf8) {
  // Byte-level tokens for the bytes E2 82 AC (€) and 28 '('.
  std::vector<std::string> tokens = {"\xC3\xA2" /*â = E2*/, "\xC4\xA4" /*Ĥ = 82*/, "\xC2\xAC" /*¬ = AC*/, "("};
  json dec = {{"type", "ByteLevel"}};
  auto t = make(make_json(tokens, {}, nullptr, nullptr, dec));
  ASSERT_TRUE(t);
  struct Case {
    std::vector<int32_t> ids;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {{0, 1, 2}, "\xE2\x82\xAC"},
      {{0, 1}, "\xEF\xBF\xBD"},                // truncated sequence: one U+FFFD (maximal subpart)
      {{0, 3, 1}, "\xEF\xBF\xBD(\xEF\xBF\xBD"},
      {{1, 1}, "\xEF\xBF\xBD\xEF\xBF\xBD"},    // stray continuation bytes: one each
  };
  for (const auto& c : cases) EXPECT_EQ(t->decode(c.ids), c.expected) << ids_str(c.ids);
}

TEST(TokenizerJson, InvalidUtf8InputIsReplaced) {
  std::vector<std::string> tokens = {"a", "\xEF\xBF\xBD", "b"};
  auto t = make(make_json(tokens, {}));
  ASSERT_TRUE(t);
  struct Case {
    std::string input, expected;
  };
  const std::vector<Case> cases = {
      {"a\xFF" "b", "a|\xEF\xBF\xBD|b"},
      {"a\xE2\x82" "b", "a|\xEF\xBF\xBD|b"},       // truncated 3-byte sequence: one replacement
      {"\xC0\x80", "\xEF\xBF\xBD|\xEF\xBF\xBD"},    // overlong: C0 and 80 are each invalid
      {"\xED\xA0\x80", "\xEF\xBF\xBD|\xEF\xBF\xBD|\xEF\xBF\xBD"},  // surrogate
      {"\xF0\x9F\x98", "\xEF\xBF\xBD"},
  };
  for (const auto& c : cases) EXPECT_EQ(pieces(*t, c.input), c.expected) << "input bytes of '" << c.input << "'";
}

}  // namespace
}  // namespace kiln::test

namespace kiln::test {
namespace {

// Corrupted inputs load or fail with a message, never crash; what loads encodes and decodes.
TEST(TokenizerJson, RandomCorruptionsNeverCrash) {
  const json added = json::array({{{"id", 5}, {"content", "<s>"}, {"special", true}, {"lstrip", true}},
                                  {{"id", 6}, {"content", "xy"}, {"single_word", true}, {"normalized", true}}});
  const json norm = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFKC"}}, {{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}}}}};
  const json pre = {{"type", "Sequence"}, {"pretokenizers", {{{"type", "Split"}, {"pattern", {{"Regex", "\\p{L}+|\\s+(?!\\S)"}}}, {"behavior", "Isolated"}},
                                                            {{"type", "Metaspace"}, {"prepend_scheme", "first"}}}}};
  const json dec = {{"type", "Sequence"}, {"decoders", {{{"type", "ByteFallback"}}, {{"type", "Metaspace"}}, {{"type", "Fuse"}}, {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 1}}}}};
  const std::string base = make_json({"a", "b", "ab", "\xE2\x96\x81", "<0x41>", "<s>", "xy", "\xE2\x96\x81" "a"}, {"a b", "\xE2\x96\x81 a"},
                                     norm, pre, dec, nullptr, added, {{"byte_fallback", true}});
  ASSERT_TRUE(Tokenizer::from_json_string(base).is_ok());
  std::mt19937 rng(7);
  int loaded = 0;
  for (int n = 0; n < 1500; ++n) {
    std::string s = base;
    int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits; ++k) {
      size_t pos = rng() % s.size();
      switch (rng() % 3) {
        case 0: s[pos] = static_cast<char>(rng() % 256); break;
        case 1: s.erase(pos, 1 + rng() % 8); break;
        case 2: s.insert(pos, 1, "{}[]\",:0-9\\ab"[rng() % 14]); break;
      }
      if (s.empty()) s = "{";
    }
    auto r = Tokenizer::from_json_string(s);
    if (!r.is_ok()) {
      EXPECT_EQ(r.message().rfind("tokenizer.json: ", 0), 0u) << r.message();
      continue;
    }
    ++loaded;
    auto ids = (*r)->encode("ab <s> xy a\xC3\xA9\xF0\x9F\xA6\x99 \xFF", true);
    (void)(*r)->decode(ids);
    std::vector<int32_t> junk = {0, 1, 2, 3, 4, 5, 6, 7, -3, 1 << 30};
    IncrementalDecoder d(*r);
    for (int32_t id : junk) (void)d.push(id);
    (void)d.flush();
  }
  EXPECT_GT(loaded, 10);  // the corruption also hits parts that still load
}

TEST(TokenizerGguf, RandomCorruptionsNeverCrash) {
  auto bytes = gguf_serialize({{"tokenizer.ggml.model", "llama"},
                               {"tokenizer.ggml.tokens", std::vector<std::string>{"<unk>", "<s>", "</s>", "<0x41>", "\xE2\x96\x81", "a", "\xE2\x96\x81" "a"}},
                               {"tokenizer.ggml.scores", std::vector<float>{0, 0, 0, 0, -1, -2, -3}},
                               {"tokenizer.ggml.token_type", std::vector<int32_t>{2, 3, 3, 6, 1, 1, 1}},
                               {"tokenizer.ggml.bos_token_id", uint32_t(1)}},
                              {});
  ASSERT_TRUE(bytes.is_ok());
  std::mt19937 rng(11);
  for (int n = 0; n < 1500; ++n) {
    std::string s = *bytes;
    for (int k = 0; k < 1 + static_cast<int>(rng() % 3); ++k) s[rng() % s.size()] = static_cast<char>(rng() % 256);
    auto g = GgufFile::from_bytes(s, "v.gguf");
    if (!g.is_ok()) continue;
    auto r = Tokenizer::from_gguf(*g);
    if (!r.is_ok()) {
      EXPECT_EQ(r.message().rfind("v.gguf: ", 0), 0u) << r.message();
      continue;
    }
    auto ids = (*r)->encode("a aa <s>A\xFF", true);
    (void)(*r)->decode(ids, n % 2 == 0);
  }
}

}  // namespace
}  // namespace kiln::test
