// GGUF vocabularies (tokenizer.ggml.*), read as llama.cpp does (src/llama-vocab.cpp): model 'gpt2'
// is byte-level BPE with the pre-tokenizer regexes named by tokenizer.ggml.pre; model 'llama' is
// SentencePiece (score-ordered merges, byte fallback, a space prefix). Control / user-defined
// tokens become added tokens (special / not), so text containing them encodes as HF would.
#include <algorithm>

#include "formats/gguf.h"
#include "tokenizer/load.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln::tok {

namespace {

// llama.cpp's adapted regexes ((?i:...) written out as [sS] etc.), by pre-tokenizer family.
constexpr const char* kRxLlama3 =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kRxQwen2 =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kRxQwen35 =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kRxGpt2 = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))";
constexpr const char* kRxGpt4o =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kRxTekken =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct PreInfo {
  std::vector<const char*> names;
  std::vector<const char*> regexes;
  bool ignore_merges = false;
  bool add_bos = false;
};

const std::vector<PreInfo>& pre_table() {
  static const std::vector<PreInfo> table = {
      {{"default"},
       {R"([\p{P}\$\+<=>\^~\|]+)", kRxGpt2, R"(\p{N}+)", "[0-9][0-9][0-9]"}},
      {{"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"},
       {kRxLlama3}, true, true},
      {{"dbrx", "smaug-bpe", "chatglm-bpe", "glm4"}, {kRxLlama3}},
      {{"deepseek-llm"},
       {"[\r\n]",
        R"(\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+)",
        R"(\s?[!-/:-~！-／：-～‘-‟　-。]+)", R"(\s+$)", "[一-龥ࠀ-一가-퟿]+", R"(\p{N}+)"}},
      {{"deepseek-coder"}, {"[\r\n]", R"(\s?\p{L}+)", R"(\s?\p{P}+)", "[一-龥ࠀ-一가-퟿]+", R"(\p{N})"}},
      {{"deepseek-v3"},
       {R"(\p{N}{1,3})", "[一-龥぀-ゟ゠-ヿ]+",
        R"([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
      {{"falcon"}, {R"([\p{P}\$\+<=>\^~\|`]+)", kRxGpt2, "[0-9][0-9][0-9]"}},
      {{"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"},
       {R"(\p{N})", kRxGpt2}},
      {{"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
        "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "trillion", "exaone4",
        "granite-docling"},
       {kRxGpt2}},
      {{"qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"}, {kRxQwen2}},
      {{"qwen35"}, {kRxQwen35}},
      {{"poro-chat", "bloom", "gpt3-finnish"}, {R"( ?[^(\s|.,!?…。，、।۔،)]+)"}},
      {{"viking"}, {R"( ?[^(\s|.,!?…。，、।۔،)]+)", R"(\p{N})"}},
      {{"tekken"}, {kRxTekken}, true, true},
      {{"gpt-4o", "llama4", "kanana2", "minimax-m2"}, {kRxGpt4o}},
      {{"bailingmoe", "bailingmoe2", "llada-moe"},
       {R"('(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+)"}},
      {{"seed-coder"},
       {R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
      {{"grok-2"}, {kRxQwen2}},
      {{"chameleon"},
       {"<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", R"(([\t\n]|    |  ))", R"(\p{N})",
        R"([\p{P}!-/:-@\[-`{-~])", kRxGpt2},
       false, true},
  };
  return table;
}

Status err(const GgufFile& g, const std::string& key, const std::string& msg) {
  return Status::error(g.path() + ": " + key + " " + msg);
}

// Token types, as in the gguf spec / llama.cpp LLAMA_TOKEN_TYPE_*.
enum : int64_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

std::optional<int32_t> get_id(const GgufFile& g, const char* key, size_t n) {
  auto v = g.get_int(key);
  if (!v || *v < 0 || static_cast<size_t>(*v) >= n) return std::nullopt;
  return static_cast<int32_t>(*v);
}

}  // namespace

Result<std::unique_ptr<TokenizerImpl>> parse_gguf_vocab(const GgufFile& g) {
  auto model = g.get_string("tokenizer.ggml.model");
  if (!model) return err(g, "tokenizer.ggml.model", "is missing (the file holds no vocabulary)");
  if (*model != "gpt2" && *model != "llama")
    return err(g, "tokenizer.ggml.model", "'" + *model + "' is not supported (gpt2 and llama are)");
  const GgufValue* tv = g.get("tokenizer.ggml.tokens");
  const std::vector<std::string>* tokens = tv ? tv->as_string_array() : nullptr;
  if (!tokens) return err(g, "tokenizer.ggml.tokens", "is missing or not an array of strings");
  const size_t n = tokens->size();
  if (n == 0 || n > (1u << 30)) return err(g, "tokenizer.ggml.tokens", "has " + std::to_string(n) + " tokens");

  std::vector<int64_t> types;
  if (const GgufValue* v = g.get("tokenizer.ggml.token_type")) {
    types = v->as_int_array();
    if (types.size() < n) return err(g, "tokenizer.ggml.token_type", "has fewer entries than tokenizer.ggml.tokens");
  }
  types.resize(n, kNormal);

  auto t = std::make_unique<TokenizerImpl>();
  t->source = g.path();
  t->id_to_token = *tokens;
  t->model_vocab.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    // llama.cpp rejects a vocabulary with a repeated token; keep the first id instead.
    if (t->model_vocab.find((*tokens)[i]) < 0) t->model_vocab.set((*tokens)[i], static_cast<int32_t>(i));
  }
  auto unk = get_id(g, "tokenizer.ggml.unknown_token_id", n);

  const std::string general_name = [&] {
    std::string s = g.get_string("general.name").value_or("");
    for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return s;
  }();
  const bool phi3 = general_name.find("phi-3") != std::string::npos || general_name.find("phi3") != std::string::npos;

  bool add_bos = false;
  if (*model == "llama") {
    t->model = ModelKind::kSpm;
    if (const GgufValue* v = g.get("tokenizer.ggml.scores")) {
      auto sc = v->as_float_array();
      if (sc.size() < n) return err(g, "tokenizer.ggml.scores", "has fewer entries than tokenizer.ggml.tokens");
      t->scores.assign(sc.begin(), sc.begin() + n);
    }
    t->scores.resize(n, 0.0f);
    t->unk_id = unk.value_or(n > 0 ? 0 : -1);
    bool add_space_prefix = true;
    if (const GgufValue* v = g.get("tokenizer.ggml.add_space_prefix"))
      if (auto b = v->as_bool()) add_space_prefix = *b;
    if (add_space_prefix) t->normalizers.push_back(NormStep{NormKind::kPrepend, "", nullptr, "\xE2\x96\x81"});
    t->normalizers.push_back(NormStep{NormKind::kReplace, " ", nullptr, "\xE2\x96\x81"});
    DecStep rep;
    rep.kind = DecKind::kReplace;
    rep.pattern = "\xE2\x96\x81";
    rep.content = " ";
    t->decoders.push_back(rep);
    t->decoders.push_back(DecStep{DecKind::kByteFallback});
    t->decoders.push_back(DecStep{DecKind::kFuse});
    if (add_space_prefix) {
      DecStep strip;
      strip.kind = DecKind::kStrip;
      strip.content = " ";
      strip.strip_start = 1;
      t->decoders.push_back(strip);
    }
    t->has_decoder = true;
    add_bos = true;
  } else {
    t->model = ModelKind::kBpe;
    std::string pre = g.get_string("tokenizer.ggml.pre").value_or("default");
    const PreInfo* info = nullptr;
    for (const auto& p : pre_table())
      for (const char* name : p.names)
        if (pre == name) info = &p;
    if (!info) return err(g, "tokenizer.ggml.pre", "'" + pre + "' is not a known pre-tokenizer");
    for (const char* rx : info->regexes) {
      auto re = Regex::compile(rx);
      if (!re) return err(g, "tokenizer.ggml.pre", re.message());
      PreStep p;
      p.kind = PreKind::kSplit;
      p.regex = *re;
      p.behavior = SplitBehavior::kIsolated;
      t->pre_tokenizers.push_back(p);
    }
    PreStep bl;
    bl.kind = PreKind::kByteLevel;
    bl.add_prefix_space = false;
    bl.use_regex = false;
    t->pre_tokenizers.push_back(bl);
    t->decoders.push_back(DecStep{DecKind::kByteLevel});
    t->has_decoder = true;
    t->ignore_merges = info->ignore_merges;
    add_bos = info->add_bos;
    t->unk_id = unk.value_or(-1);

    const GgufValue* mv = g.get("tokenizer.ggml.merges");
    const std::vector<std::string>* merges = mv ? mv->as_string_array() : nullptr;
    if (!merges) return err(g, "tokenizer.ggml.merges", "is missing or not an array of strings");
    t->merges.reserve(merges->size());
    std::string merged;
    for (size_t r = 0; r < merges->size(); ++r) {
      const std::string& m = (*merges)[r];
      size_t sp = m.find(' ', 1);
      if (sp == std::string::npos) continue;  // llama.cpp skips such entries as well
      std::string_view a(m.data(), sp), b(m.data() + sp + 1, m.size() - sp - 1);
      int32_t ia = t->model_vocab.find(a), ib = t->model_vocab.find(b);
      merged.assign(a);
      merged.append(b);
      int32_t im = t->model_vocab.find(merged);
      if (ia < 0 || ib < 0 || im < 0) continue;
      // Keep the first (lowest) rank of a pair listed twice, as llama.cpp's map emplace does.
      if (!t->merges.find(ia, ib)) t->merges.set(ia, ib, {static_cast<int32_t>(r), im});
    }
  }

  // Added tokens from the token types.
  for (size_t i = 0; i < n; ++i) {
    int64_t ty = types[i];
    if (ty != kControl && ty != kUserDefined && ty != kUnknown) continue;
    if ((*tokens)[i].empty()) continue;
    AddedToken a;
    a.id = static_cast<int32_t>(i);
    a.content = (*tokens)[i];
    a.special = ty != kUserDefined;
    if (phi3 && a.content != "<unk>" && a.content != "<s>" && a.content != "<|endoftext|>") a.rstrip = true;
    t->added_vocab.set(a.content, a.id);
    t->added.push_back(std::move(a));
  }
  // Longest first, as llama.cpp partitions by decreasing length (the trie takes the longest anyway).
  t->finalize();

  // Special ids and flags.
  auto bos = get_id(g, "tokenizer.ggml.bos_token_id", n);
  if (!g.get("tokenizer.ggml.bos_token_id") && *model == "llama" && n > 1) bos = 1;
  auto eos = get_id(g, "tokenizer.ggml.eos_token_id", n);
  if (!g.get("tokenizer.ggml.eos_token_id") && *model == "llama" && n > 2) eos = 2;
  if (const GgufValue* v = g.get("tokenizer.ggml.add_bos_token"))
    if (auto b = v->as_bool()) add_bos = *b;
  bool add_eos = false;
  if (const GgufValue* v = g.get("tokenizer.ggml.add_eos_token"))
    if (auto b = v->as_bool()) add_eos = *b;
  if (add_bos && !bos) return err(g, "tokenizer.ggml.add_bos_token", "is true but tokenizer.ggml.bos_token_id is not set");
  if (add_eos && !eos) return err(g, "tokenizer.ggml.add_eos_token", "is true but tokenizer.ggml.eos_token_id is not set");
  t->bos_id = bos;
  if (bos) t->bos_token = t->id_to_token[*bos];
  if (add_bos) t->post_prefix.push_back(*bos);
  if (add_eos) t->post_suffix.push_back(*eos);
  t->pad_id = get_id(g, "tokenizer.ggml.padding_token_id", n);

  // End-of-generation ids: eos, eot, eom, and the tokens llama.cpp recognizes by their text.
  auto add_eos_id = [&](std::optional<int32_t> id) {
    if (id && std::find(t->eos_ids.begin(), t->eos_ids.end(), *id) == t->eos_ids.end()) t->eos_ids.push_back(*id);
  };
  add_eos_id(eos);
  if (eos) t->eos_token = t->id_to_token[*eos];
  add_eos_id(get_id(g, "tokenizer.ggml.eot_token_id", n));
  add_eos_id(get_id(g, "tokenizer.ggml.eom_token_id", n));
  for (const char* name : {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                           "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"}) {
    int32_t id = t->model_vocab.find(name);
    if (id >= 0 && (types[id] == kControl || types[id] == kUserDefined)) add_eos_id(id);
  }

  // Chat templates: tokenizer.chat_template and tokenizer.chat_template.NAME.
  if (auto s = g.get_string("tokenizer.chat_template")) t->chat_templates["default"] = *s;
  const std::string prefix = "tokenizer.chat_template.";
  for (const auto& [key, value] : g.metadata()) {
    if (key.size() > prefix.size() && key.compare(0, prefix.size(), prefix) == 0)
      if (const std::string* s = value.as_string()) t->chat_templates[key.substr(prefix.size())] = *s;
  }
  return t;
}

}  // namespace kiln::tok
