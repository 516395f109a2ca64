// tokenizer.json (HF fast-tokenizer format), tokenizer_config.json, generation_config.json and
// special_tokens_map.json. Every error names the file and the field.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <climits>
#include <filesystem>

#include "core/file.h"
#include "tokenizer/load.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln::tok {

using json = nlohmann::json;

namespace {

struct Ctx {
  const std::string& file;
  Status err(const std::string& field, const std::string& msg) const { return Status::error(file + ": " + field + " " + msg); }
};

std::string type_name(const json& j) {
  if (j.is_null()) return "null";
  if (j.is_boolean()) return "a boolean";
  if (j.is_number()) return "a number";
  if (j.is_string()) return "a string";
  if (j.is_array()) return "an array";
  return "an object";
}

Result<std::string> get_string(const Ctx& c, const json& o, const std::string& key, const std::string& field,
                               std::optional<std::string> def = std::nullopt) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) {
    if (def) return *def;
    return c.err(field + "." + key, "is missing");
  }
  if (!it->is_string()) return c.err(field + "." + key, "must be a string, not " + type_name(*it));
  return it->get<std::string>();
}

Result<bool> get_bool(const Ctx& c, const json& o, const std::string& key, const std::string& field, bool def) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return def;
  if (!it->is_boolean()) return c.err(field + "." + key, "must be a boolean, not " + type_name(*it));
  return it->get<bool>();
}

Result<int64_t> get_int(const Ctx& c, const json& o, const std::string& key, const std::string& field, int64_t def) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return def;
  if (!it->is_number_integer()) return c.err(field + "." + key, "must be an integer, not " + type_name(*it));
  return it->get<int64_t>();
}

Result<std::string> get_type(const Ctx& c, const json& o, const std::string& field) {
  if (!o.is_object()) return c.err(field, "must be an object, not " + type_name(o));
  return get_string(c, o, "type", field);
}

// {"String": "..."} or {"Regex": "..."}
Status parse_pattern(const Ctx& c, const json& o, const std::string& field, std::string& literal,
                     std::shared_ptr<const Regex>& regex) {
  auto it = o.find("pattern");
  if (it == o.end() || !it->is_object()) return c.err(field + ".pattern", "must be an object {\"String\": ...} or {\"Regex\": ...}");
  if (auto s = it->find("String"); s != it->end() && s->is_string()) {
    literal = s->get<std::string>();
    return Status::ok();
  }
  if (auto r = it->find("Regex"); r != it->end() && r->is_string()) {
    auto re = Regex::compile(r->get<std::string>());
    if (!re) return c.err(field + ".pattern.Regex", re.message());
    regex = *re;
    return Status::ok();
  }
  return c.err(field + ".pattern", "must be {\"String\": ...} or {\"Regex\": ...}");
}

Result<PrependScheme> parse_prepend_scheme(const Ctx& c, const json& o, const std::string& field) {
  auto it = o.find("prepend_scheme");
  if (it != o.end() && !it->is_null()) {
    if (!it->is_string()) return c.err(field + ".prepend_scheme", "must be a string");
    std::string s = it->get<std::string>();
    if (s == "always") return PrependScheme::kAlways;
    if (s == "never") return PrependScheme::kNever;
    if (s == "first") return PrependScheme::kFirst;
    return c.err(field + ".prepend_scheme", "'" + s + "' is not one of always, never, first");
  }
  KILN_ASSIGN_OR_RETURN(bool add, get_bool(c, o, "add_prefix_space", field, true));  // legacy field
  return add ? PrependScheme::kAlways : PrependScheme::kNever;
}

Result<std::string> parse_replacement(const Ctx& c, const json& o, const std::string& field) {
  KILN_ASSIGN_OR_RETURN(std::string r, get_string(c, o, "replacement", field, std::string("\xE2\x96\x81")));
  size_t i = 0;
  if (r.empty() || utf8_valid_len(r, i) != r.size()) return c.err(field + ".replacement", "must be one character");
  return r;
}

Status parse_normalizer(const Ctx& c, const json& o, const std::string& field, std::vector<NormStep>& out) {
  if (o.is_null()) return Status::ok();
  KILN_ASSIGN_OR_RETURN(std::string type, get_type(c, o, field));
  NormStep n;
  if (type == "Sequence") {
    auto it = o.find("normalizers");
    if (it == o.end() || !it->is_array()) return c.err(field + ".normalizers", "must be an array");
    for (size_t k = 0; k < it->size(); ++k)
      KILN_RETURN_IF_ERROR(parse_normalizer(c, (*it)[k], field + ".normalizers[" + std::to_string(k) + "]", out));
    return Status::ok();
  }
  if (type == "NFC") n.kind = NormKind::kNfc;
  else if (type == "NFKC") n.kind = NormKind::kNfkc;
  else if (type == "NFD") n.kind = NormKind::kNfd;
  else if (type == "NFKD") n.kind = NormKind::kNfkd;
  else if (type == "Lowercase") n.kind = NormKind::kLowercase;
  else if (type == "Replace") {
    n.kind = NormKind::kReplace;
    KILN_RETURN_IF_ERROR(parse_pattern(c, o, field, n.pattern, n.regex));
    KILN_ASSIGN_OR_RETURN(n.content, get_string(c, o, "content", field));
  } else if (type == "Prepend") {
    n.kind = NormKind::kPrepend;
    KILN_ASSIGN_OR_RETURN(n.content, get_string(c, o, "prepend", field));
  } else if (type == "Strip") {
    n.kind = NormKind::kStrip;
    KILN_ASSIGN_OR_RETURN(n.strip_left, get_bool(c, o, "strip_left", field, true));
    KILN_ASSIGN_OR_RETURN(n.strip_right, get_bool(c, o, "strip_right", field, true));
  } else {
    return c.err(field + ".type", "'" + type + "' is not supported (NFC, NFKC, NFD, NFKD, Replace, Prepend, Lowercase, Strip, Sequence are)");
  }
  out.push_back(std::move(n));
  return Status::ok();
}

Result<SplitBehavior> parse_behavior(const Ctx& c, const json& o, const std::string& field, const char* def) {
  KILN_ASSIGN_OR_RETURN(std::string b, get_string(c, o, "behavior", field, std::string(def)));
  if (b == "Removed") return SplitBehavior::kRemoved;
  if (b == "Isolated") return SplitBehavior::kIsolated;
  if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (b == "Contiguous") return SplitBehavior::kContiguous;
  return c.err(field + ".behavior", "'" + b + "' is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous");
}

Status parse_pre_tokenizer(const Ctx& c, const json& o, const std::string& field, std::vector<PreStep>& out) {
  if (o.is_null()) return Status::ok();
  KILN_ASSIGN_OR_RETURN(std::string type, get_type(c, o, field));
  PreStep p;
  if (type == "Sequence") {
    auto it = o.find("pretokenizers");
    if (it == o.end() || !it->is_array()) return c.err(field + ".pretokenizers", "must be an array");
    for (size_t k = 0; k < it->size(); ++k)
      KILN_RETURN_IF_ERROR(parse_pre_tokenizer(c, (*it)[k], field + ".pretokenizers[" + std::to_string(k) + "]", out));
    return Status::ok();
  }
  if (type == "Split") {
    p.kind = PreKind::kSplit;
    KILN_RETURN_IF_ERROR(parse_pattern(c, o, field, p.literal, p.regex));
    KILN_ASSIGN_OR_RETURN(p.behavior, parse_behavior(c, o, field, "Isolated"));
    KILN_ASSIGN_OR_RETURN(p.invert, get_bool(c, o, "invert", field, false));
  } else if (type == "ByteLevel") {
    p.kind = PreKind::kByteLevel;
    KILN_ASSIGN_OR_RETURN(p.add_prefix_space, get_bool(c, o, "add_prefix_space", field, true));
    KILN_ASSIGN_OR_RETURN(p.use_regex, get_bool(c, o, "use_regex", field, true));
  } else if (type == "Metaspace") {
    p.kind = PreKind::kMetaspace;
    KILN_ASSIGN_OR_RETURN(p.replacement, parse_replacement(c, o, field));
    KILN_ASSIGN_OR_RETURN(p.prepend, parse_prepend_scheme(c, o, field));
    KILN_ASSIGN_OR_RETURN(p.split, get_bool(c, o, "split", field, true));
  } else if (type == "Digits") {
    p.kind = PreKind::kDigits;
    KILN_ASSIGN_OR_RETURN(p.individual_digits, get_bool(c, o, "individual_digits", field, false));
  } else if (type == "WhitespaceSplit") {
    p.kind = PreKind::kWhitespaceSplit;
  } else if (type == "Whitespace") {
    p.kind = PreKind::kWhitespace;
  } else if (type == "Punctuation") {
    p.kind = PreKind::kPunctuation;
    KILN_ASSIGN_OR_RETURN(p.behavior, parse_behavior(c, o, field, "Isolated"));
  } else {
    return c.err(field + ".type", "'" + type + "' is not supported (Split, ByteLevel, Metaspace, Digits, WhitespaceSplit, Whitespace, Punctuation, Sequence are)");
  }
  out.push_back(std::move(p));
  return Status::ok();
}

Status parse_decoder(const Ctx& c, const json& o, const std::string& field, std::vector<DecStep>& out) {
  KILN_ASSIGN_OR_RETURN(std::string type, get_type(c, o, field));
  DecStep d;
  if (type == "Sequence") {
    auto it = o.find("decoders");
    if (it == o.end() || !it->is_array()) return c.err(field + ".decoders", "must be an array");
    for (size_t k = 0; k < it->size(); ++k)
      KILN_RETURN_IF_ERROR(parse_decoder(c, (*it)[k], field + ".decoders[" + std::to_string(k) + "]", out));
    return Status::ok();
  }
  if (type == "ByteLevel") d.kind = DecKind::kByteLevel;
  else if (type == "ByteFallback") d.kind = DecKind::kByteFallback;
  else if (type == "Fuse") d.kind = DecKind::kFuse;
  else if (type == "Metaspace") {
    d.kind = DecKind::kMetaspace;
    KILN_ASSIGN_OR_RETURN(d.replacement, parse_replacement(c, o, field));
    KILN_ASSIGN_OR_RETURN(PrependScheme ps, parse_prepend_scheme(c, o, field));
    d.prepend = ps != PrependScheme::kNever;
  } else if (type == "Replace") {
    d.kind = DecKind::kReplace;
    KILN_RETURN_IF_ERROR(parse_pattern(c, o, field, d.pattern, d.regex));
    KILN_ASSIGN_OR_RETURN(d.content, get_string(c, o, "content", field));
  } else if (type == "Strip") {
    d.kind = DecKind::kStrip;
    KILN_ASSIGN_OR_RETURN(d.content, get_string(c, o, "content", field, std::string(" ")));
    size_t i = 0;
    if (d.content.empty() || utf8_valid_len(d.content, i) != d.content.size())
      return c.err(field + ".content", "must be one character");
    KILN_ASSIGN_OR_RETURN(int64_t a, get_int(c, o, "start", field, 0));
    KILN_ASSIGN_OR_RETURN(int64_t b, get_int(c, o, "stop", field, 0));
    if (a < 0 || b < 0) return c.err(field, "start/stop must be >= 0");
    d.strip_start = static_cast<size_t>(a);
    d.strip_stop = static_cast<size_t>(b);
  } else {
    return c.err(field + ".type", "'" + type + "' is not supported (ByteLevel, ByteFallback, Metaspace, Replace, Strip, Fuse, Sequence are)");
  }
  out.push_back(std::move(d));
  return Status::ok();
}

// Resolve a special-token name of a post-processor to its ids.
Result<std::vector<int32_t>> post_token_ids(const Ctx& c, const TokenizerImpl& t, const json& specials,
                                            const std::string& name, const std::string& field) {
  if (specials.is_object()) {
    auto it = specials.find(name);
    if (it != specials.end()) {
      auto ids = it->find("ids");
      if (ids == it->end() || !ids->is_array()) return c.err(field + ".special_tokens." + name + ".ids", "must be an array of ids");
      std::vector<int32_t> r;
      for (const auto& x : *ids) {
        if (!x.is_number_integer()) return c.err(field + ".special_tokens." + name + ".ids", "must hold integers");
        r.push_back(x.get<int32_t>());
      }
      return r;
    }
  }
  int32_t id = t.token_id(name);
  if (id < 0) return c.err(field, "special token '" + name + "' is not in the vocabulary");
  return std::vector<int32_t>{id};
}

Status parse_post_processor(const Ctx& c, const json& o, const std::string& field, TokenizerImpl& t) {
  if (o.is_null()) return Status::ok();
  KILN_ASSIGN_OR_RETURN(std::string type, get_type(c, o, field));
  if (type == "Sequence") {
    auto it = o.find("processors");
    if (it == o.end() || !it->is_array()) return c.err(field + ".processors", "must be an array");
    for (size_t k = 0; k < it->size(); ++k)
      KILN_RETURN_IF_ERROR(parse_post_processor(c, (*it)[k], field + ".processors[" + std::to_string(k) + "]", t));
    return Status::ok();
  }
  if (type == "ByteLevel") return Status::ok();  // only adjusts offsets
  if (type == "TemplateProcessing") {
    auto single = o.find("single");
    if (single == o.end() || !single->is_array()) return c.err(field + ".single", "must be an array");
    const json specials = o.value("special_tokens", json::object());
    std::vector<int32_t> pre, post;
    bool seen_seq = false;
    for (size_t k = 0; k < single->size(); ++k) {
      const json& item = (*single)[k];
      std::string f = field + ".single[" + std::to_string(k) + "]";
      if (!item.is_object()) return c.err(f, "must be an object");
      if (item.contains("Sequence")) {
        seen_seq = true;
        continue;
      }
      auto st = item.find("SpecialToken");
      if (st == item.end() || !st->is_object()) return c.err(f, "must be {\"SpecialToken\": ...} or {\"Sequence\": ...}");
      KILN_ASSIGN_OR_RETURN(std::string name, get_string(c, *st, "id", f + ".SpecialToken"));
      KILN_ASSIGN_OR_RETURN(auto ids, post_token_ids(c, t, specials, name, field));
      auto& dst = seen_seq ? post : pre;
      dst.insert(dst.end(), ids.begin(), ids.end());
    }
    t.post_prefix.insert(t.post_prefix.end(), pre.begin(), pre.end());
    t.post_suffix.insert(t.post_suffix.begin(), post.begin(), post.end());
    return Status::ok();
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    auto pair_id = [&](const char* key, int32_t& id) -> Status {
      auto it = o.find(key);
      if (it == o.end() || !it->is_array() || it->size() != 2 || !(*it)[1].is_number_integer())
        return c.err(field + "." + key, "must be [token, id]");
      id = (*it)[1].get<int32_t>();
      return Status::ok();
    };
    int32_t cls = -1, sep = -1;
    KILN_RETURN_IF_ERROR(pair_id("cls", cls));
    KILN_RETURN_IF_ERROR(pair_id("sep", sep));
    t.post_prefix.push_back(cls);
    t.post_suffix.insert(t.post_suffix.begin(), sep);
    return Status::ok();
  }
  return c.err(field + ".type", "'" + type + "' is not supported (TemplateProcessing, ByteLevel, BertProcessing, RobertaProcessing, Sequence are)");
}

// model.vocab and model.merges, captured by the SAX pass (they are most of the file; a DOM for
// them costs more than everything else in loading).
struct ModelLists {
  bool have_vocab = false, have_merges = false;
  std::vector<std::pair<std::string, int64_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merge_pairs;  // [a, b] entries
  std::vector<std::string> merge_strings;                        // "a b" entries
  std::vector<uint8_t> merge_is_pair;                            // entry k: pair (1) or string (0)
};

Status parse_model(const Ctx& c, const json& m, TokenizerImpl& t, ModelLists* lists) {
  if (!m.is_object()) return c.err("model", "must be an object, not " + type_name(m));
  std::string type;
  if (auto it = m.find("type"); it != m.end() && it->is_string()) type = it->get<std::string>();
  else if (m.contains("merges")) type = "BPE";  // HF accepts an untagged BPE model
  else return c.err("model.type", "is missing");
  if (type != "BPE") return c.err("model.type", "'" + type + "' is not supported (BPE is)");
  ModelLists dom_lists;
  if (!lists || !lists->have_vocab) {
    auto vocab = m.find("vocab");
    if (vocab == m.end() || !vocab->is_object()) return c.err("model.vocab", "must be an object {token: id}");
    for (auto it = vocab->begin(); it != vocab->end(); ++it) {
      if (!it.value().is_number_integer()) return c.err("model.vocab['" + it.key() + "']", "must be an integer id");
      dom_lists.vocab.emplace_back(it.key(), it.value().get<int64_t>());
    }
  }
  const auto& vocab = lists && lists->have_vocab ? lists->vocab : dom_lists.vocab;
  t.model_vocab.reserve(vocab.size());
  int64_t max_id = -1;
  for (const auto& [key, id] : vocab) {
    if (id < 0 || id > (1 << 30)) return c.err("model.vocab['" + key + "']", "id " + std::to_string(id) + " is out of range");
    t.model_vocab.set(key, static_cast<int32_t>(id));
    max_id = std::max(max_id, id);
  }
  t.id_to_token.assign(static_cast<size_t>(max_id + 1), std::string());
  for (const auto& [key, id] : vocab) t.id_to_token[id] = key;

  KILN_ASSIGN_OR_RETURN(t.byte_fallback, get_bool(c, m, "byte_fallback", "model", false));
  KILN_ASSIGN_OR_RETURN(t.fuse_unk, get_bool(c, m, "fuse_unk", "model", false));
  KILN_ASSIGN_OR_RETURN(t.ignore_merges, get_bool(c, m, "ignore_merges", "model", false));
  KILN_ASSIGN_OR_RETURN(t.continuing_subword_prefix, get_string(c, m, "continuing_subword_prefix", "model", std::string()));
  KILN_ASSIGN_OR_RETURN(t.end_of_word_suffix, get_string(c, m, "end_of_word_suffix", "model", std::string()));
  KILN_ASSIGN_OR_RETURN(std::string unk, get_string(c, m, "unk_token", "model", std::string()));
  if (!unk.empty()) t.unk_id = t.model_vocab.find(unk);
  // (dropout is a training-time regularizer; inference ignores it, as HF does with dropout 0)

  if (!lists || !lists->have_merges) {
    auto merges = m.find("merges");
    if (merges == m.end() || merges->is_null()) return Status::ok();
    if (!merges->is_array()) return c.err("model.merges", "must be an array");
    for (size_t k = 0; k < merges->size(); ++k) {
      const json& e = (*merges)[k];
      if (e.is_string()) {
        dom_lists.merge_strings.push_back(e.get<std::string>());
        dom_lists.merge_is_pair.push_back(0);
      } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
        dom_lists.merge_pairs.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
        dom_lists.merge_is_pair.push_back(1);
      } else {
        return c.err("model.merges[" + std::to_string(k) + "]", "must be \"a b\" or [\"a\", \"b\"]");
      }
    }
  }
  const ModelLists& ml = lists && lists->have_merges ? *lists : dom_lists;
  t.merges.reserve(ml.merge_is_pair.size());
  const size_t prefix_len = t.continuing_subword_prefix.size();
  int32_t rank = 0;
  size_t next_string = 0, next_pair = 0;
  std::string a, b, merged;
  for (size_t k = 0; k < ml.merge_is_pair.size(); ++k) {
    std::string f = "model.merges[" + std::to_string(k) + "]";
    if (!ml.merge_is_pair[k]) {
      const std::string& s = ml.merge_strings[next_string++];
      if (s.rfind("#version", 0) == 0) continue;
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        return c.err(f, "'" + s + "' must be two tokens separated by one space");
      a.assign(s, 0, sp);
      b.assign(s, sp + 1, std::string::npos);
    } else {
      a = ml.merge_pairs[next_pair].first;
      b = ml.merge_pairs[next_pair].second;
      ++next_pair;
    }
    int32_t ia = t.model_vocab.find(a), ib = t.model_vocab.find(b);
    if (ia < 0) return c.err(f, "token '" + a + "' is not in model.vocab");
    if (ib < 0) return c.err(f, "token '" + b + "' is not in model.vocab");
    merged = a;
    merged.append(b, std::min(prefix_len, b.size()), std::string::npos);
    int32_t im = t.model_vocab.find(merged);
    if (im < 0) return c.err(f, "merged token '" + merged + "' is not in model.vocab");
    t.merges.set(ia, ib, {rank++, im});
  }
  return Status::ok();
}

Status parse_added_tokens(const Ctx& c, const json& root, TokenizerImpl& t) {
  auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return Status::ok();
  if (!it->is_array()) return c.err("added_tokens", "must be an array");
  for (size_t k = 0; k < it->size(); ++k) {
    const json& o = (*it)[k];
    std::string f = "added_tokens[" + std::to_string(k) + "]";
    if (!o.is_object()) return c.err(f, "must be an object");
    AddedToken a;
    KILN_ASSIGN_OR_RETURN(int64_t id, get_int(c, o, "id", f, -1));
    if (id < 0 || id > (1 << 30)) return c.err(f + ".id", "is missing or out of range");
    a.id = static_cast<int32_t>(id);
    KILN_ASSIGN_OR_RETURN(a.content, get_string(c, o, "content", f));
    if (a.content.empty()) return c.err(f + ".content", "is empty");
    KILN_ASSIGN_OR_RETURN(a.special, get_bool(c, o, "special", f, false));
    KILN_ASSIGN_OR_RETURN(a.lstrip, get_bool(c, o, "lstrip", f, false));
    KILN_ASSIGN_OR_RETURN(a.rstrip, get_bool(c, o, "rstrip", f, false));
    KILN_ASSIGN_OR_RETURN(a.single_word, get_bool(c, o, "single_word", f, false));
    KILN_ASSIGN_OR_RETURN(a.normalized, get_bool(c, o, "normalized", f, !a.special));
    if (static_cast<size_t>(a.id) >= t.id_to_token.size()) t.id_to_token.resize(a.id + 1);
    t.id_to_token[a.id] = a.content;
    t.added_vocab.set(a.content, a.id);
    t.added.push_back(std::move(a));
  }
  return Status::ok();
}

}  // namespace

namespace {

// SAX handler: builds the DOM of everything but model.vocab / model.merges, whose entries go
// straight into ModelLists (Llama 3: 128k vocab entries + 280k merges; the DOM would hold them in a
// std::map and 400k json nodes). Anything unexpected inside them gives up (`bail`), and the caller
// re-parses the plain way for the precise error.
class CaptureSax {
 public:
  CaptureSax(json& root, ModelLists& lists) : dom_(root, false), lists_(lists) {}
  bool bail = false;

  bool null() { return capture_ == kNone ? dom_.null() : fail(); }
  bool boolean(bool v) { return capture_ == kNone ? dom_.boolean(v) : fail(); }
  bool number_integer(int64_t v) { return capture_ == kVocab ? vocab_value(v) : capture_ == kNone ? dom_.number_integer(v) : fail(); }
  bool number_unsigned(uint64_t v) {
    if (capture_ == kVocab) return v > static_cast<uint64_t>(INT64_MAX) ? fail() : vocab_value(static_cast<int64_t>(v));
    return capture_ == kNone ? dom_.number_unsigned(v) : fail();
  }
  bool number_float(double v, const std::string& s) { return capture_ == kNone ? dom_.number_float(v, s) : fail(); }
  bool binary(json::binary_t& v) { return capture_ == kNone ? dom_.binary(v) : fail(); }
  bool string(std::string& v) {
    if (capture_ == kNone) return dom_.string(v);
    if (capture_ == kMerges) {
      lists_.merge_strings.push_back(std::move(v));
      lists_.merge_is_pair.push_back(0);
      return true;
    }
    if (capture_ == kMergePair && pair_n_ < 2) {
      (pair_n_++ == 0 ? pair_.first : pair_.second) = std::move(v);
      return true;
    }
    return fail();
  }
  bool start_object(std::size_t n) {
    ++depth_;
    if (capture_ != kNone) return fail();
    if (depth_ == 3 && in_model_ && key_ == "vocab") {
      capture_ = kVocab;
      lists_.have_vocab = true;
      return dom_.start_object(0);  // an empty object stands in for it in the DOM
    }
    if (depth_ == 2) in_model_ = key_ == "model";
    return dom_.start_object(n);
  }
  bool key(std::string& k) {
    if (capture_ == kVocab) {
      vocab_key_ = std::move(k);
      return true;
    }
    if (capture_ != kNone) return fail();
    if (depth_ <= 2) key_ = k;
    return dom_.key(k);
  }
  bool end_object() {
    --depth_;
    if (capture_ == kVocab) capture_ = kNone;
    else if (capture_ != kNone) return fail();
    if (depth_ == 1) in_model_ = false;
    return dom_.end_object();
  }
  bool start_array(std::size_t n) {
    ++depth_;
    if (capture_ == kMerges) {
      capture_ = kMergePair;
      pair_n_ = 0;
      return true;
    }
    if (capture_ != kNone) return fail();
    if (depth_ == 3 && in_model_ && key_ == "merges") {
      capture_ = kMerges;
      lists_.have_merges = true;
      return dom_.start_array(0);
    }
    return dom_.start_array(n);
  }
  bool end_array() {
    --depth_;
    if (capture_ == kMergePair) {
      if (pair_n_ != 2) return fail();
      lists_.merge_pairs.push_back(std::move(pair_));
      lists_.merge_is_pair.push_back(1);
      capture_ = kMerges;
      return true;
    }
    if (capture_ == kMerges) capture_ = kNone;
    else if (capture_ != kNone) return fail();
    return dom_.end_array();
  }
  bool parse_error(std::size_t pos, const std::string& tok, const nlohmann::detail::exception& e) {
    return dom_.parse_error(pos, tok, e);
  }
  bool is_errored() const { return dom_.is_errored(); }

 private:
  enum Capture { kNone, kVocab, kMerges, kMergePair };
  bool fail() {
    bail = true;
    return false;
  }
  bool vocab_value(int64_t v) {
    lists_.vocab.emplace_back(std::move(vocab_key_), v);
    return true;
  }
  nlohmann::detail::json_sax_dom_parser<json> dom_;
  ModelLists& lists_;
  Capture capture_ = kNone;
  int depth_ = 0;
  bool in_model_ = false;
  std::string key_, vocab_key_;
  std::pair<std::string, std::string> pair_;
  int pair_n_ = 0;
};

}  // namespace

Result<std::unique_ptr<TokenizerImpl>> parse_tokenizer_json(std::string_view text, const std::string& file) {
  Ctx c{file};
  json root;
  ModelLists lists;
  {
    CaptureSax sax(root, lists);
    bool ok = json::sax_parse(text.begin(), text.end(), &sax, nlohmann::detail::input_format_t::json, /*strict=*/true);
    if (!ok || sax.is_errored()) {
      // Malformed JSON, or an unusual vocab/merges entry: the plain parse gives the precise error.
      lists = ModelLists();
      root = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
    }
  }
  if (root.is_discarded()) return Status::error(file + ": not valid JSON");
  if (!root.is_object()) return Status::error(file + ": must hold a JSON object");
  auto t = std::make_unique<TokenizerImpl>();
  t->source = file;
  auto model = root.find("model");
  if (model == root.end()) return c.err("model", "is missing");
  KILN_RETURN_IF_ERROR(parse_model(c, *model, *t, &lists));
  KILN_RETURN_IF_ERROR(parse_added_tokens(c, root, *t));
  if (auto it = root.find("normalizer"); it != root.end())
    KILN_RETURN_IF_ERROR(parse_normalizer(c, *it, "normalizer", t->normalizers));
  if (auto it = root.find("pre_tokenizer"); it != root.end())
    KILN_RETURN_IF_ERROR(parse_pre_tokenizer(c, *it, "pre_tokenizer", t->pre_tokenizers));
  if (auto it = root.find("post_processor"); it != root.end())
    KILN_RETURN_IF_ERROR(parse_post_processor(c, *it, "post_processor", *t));
  if (auto it = root.find("decoder"); it != root.end() && !it->is_null()) {
    KILN_RETURN_IF_ERROR(parse_decoder(c, *it, "decoder", t->decoders));
    t->has_decoder = true;
  }
  for (int32_t id : t->post_prefix)
    if (id < 0 || static_cast<size_t>(id) >= t->id_to_token.size()) return c.err("post_processor", "token id " + std::to_string(id) + " is out of range");
  for (int32_t id : t->post_suffix)
    if (id < 0 || static_cast<size_t>(id) >= t->id_to_token.size()) return c.err("post_processor", "token id " + std::to_string(id) + " is out of range");
  t->finalize();
  // Default metadata from the post-processor: a one-token prefix is the BOS.
  if (t->post_prefix.size() == 1) {
    t->bos_id = t->post_prefix[0];
    t->bos_token = t->id_to_token[t->post_prefix[0]];
  }
  return t;
}

// --------------------------------------------------------------------------- the config files

namespace {

// "<s>" or {"content": "<s>", ...} (AddedToken as transformers serializes it); nullopt if absent.
Result<std::optional<std::string>> token_string(const Ctx& c, const json& o, const std::string& key) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (it->is_object()) {
    auto ct = it->find("content");
    if (ct != it->end() && ct->is_string()) return std::optional<std::string>(ct->get<std::string>());
  }
  return c.err(key, "must be a string or {\"content\": string}");
}

Result<std::vector<int32_t>> id_list(const Ctx& c, const json& o, const std::string& key) {
  std::vector<int32_t> r;
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return r;
  if (it->is_number_integer()) {
    r.push_back(it->get<int32_t>());
    return r;
  }
  if (it->is_array()) {
    for (const auto& x : *it) {
      if (!x.is_number_integer()) return c.err(key, "must be an integer or a list of integers");
      r.push_back(x.get<int32_t>());
    }
    return r;
  }
  return c.err(key, "must be an integer or a list of integers");
}

void add_unique(std::vector<int32_t>& v, int32_t id) {
  if (id >= 0 && std::find(v.begin(), v.end(), id) == v.end()) v.push_back(id);
}

}  // namespace

Status apply_hf_configs(TokenizerImpl& t, const std::string& dir) {
  const std::string sep = dir.empty() || dir.back() == '/' ? "" : "/";
  auto read_json = [&](const std::string& name, json& out) -> Result<bool> {
    std::string path = dir + sep + name;
    if (!file_exists(path)) return false;
    KILN_ASSIGN_OR_RETURN(std::string text, read_file(path));
    out = json::parse(text, nullptr, false);
    if (out.is_discarded() || !out.is_object()) return Status::error(path + ": not a valid JSON object");
    return true;
  };
  auto resolve = [&](const std::string& file, const std::string& key, const std::string& tok) -> Result<int32_t> {
    int32_t id = t.token_id(tok);
    if (id < 0) return Status::error(file + ": " + key + " '" + tok + "' is not in the vocabulary");
    return id;
  };

  std::optional<std::string> bos, eos, pad;
  json stm;
  KILN_ASSIGN_OR_RETURN(bool has_stm, read_json("special_tokens_map.json", stm));
  if (has_stm) {
    Ctx c{dir + sep + "special_tokens_map.json"};
    KILN_ASSIGN_OR_RETURN(bos, token_string(c, stm, "bos_token"));
    KILN_ASSIGN_OR_RETURN(eos, token_string(c, stm, "eos_token"));
    KILN_ASSIGN_OR_RETURN(pad, token_string(c, stm, "pad_token"));
  }
  json cfg;
  KILN_ASSIGN_OR_RETURN(bool has_cfg, read_json("tokenizer_config.json", cfg));
  const std::string cfg_file = dir + sep + "tokenizer_config.json";
  if (has_cfg) {
    Ctx c{cfg_file};
    // An explicit null in tokenizer_config (Qwen: "bos_token": null) means "none".
    if (cfg.contains("bos_token")) {
      KILN_ASSIGN_OR_RETURN(bos, token_string(c, cfg, "bos_token"));
    }
    if (cfg.contains("eos_token")) {
      KILN_ASSIGN_OR_RETURN(eos, token_string(c, cfg, "eos_token"));
    }
    if (cfg.contains("pad_token")) {
      KILN_ASSIGN_OR_RETURN(pad, token_string(c, cfg, "pad_token"));
    }
    if (auto it = cfg.find("chat_template"); it != cfg.end() && !it->is_null()) {
      if (it->is_string()) {
        t.chat_templates["default"] = it->get<std::string>();
      } else if (it->is_array()) {
        for (size_t k = 0; k < it->size(); ++k) {
          const json& e = (*it)[k];
          std::string f = "chat_template[" + std::to_string(k) + "]";
          if (!e.is_object()) return c.err(f, "must be {\"name\": ..., \"template\": ...}");
          KILN_ASSIGN_OR_RETURN(std::string name, get_string(c, e, "name", f));
          KILN_ASSIGN_OR_RETURN(std::string tpl, get_string(c, e, "template", f));
          t.chat_templates[name] = tpl;
        }
      } else {
        return c.err("chat_template", "must be a string or a list of {name, template}");
      }
    }
  }
  if (bos) {
    KILN_ASSIGN_OR_RETURN(int32_t id, resolve(cfg_file, "bos_token", *bos));
    t.bos_id = id;
    t.bos_token = *bos;
  } else if (has_cfg && cfg.contains("bos_token")) {
    t.bos_id.reset();
    t.bos_token.clear();
  }
  if (eos) {
    KILN_ASSIGN_OR_RETURN(int32_t id, resolve(cfg_file, "eos_token", *eos));
    t.eos_token = *eos;
    add_unique(t.eos_ids, id);
  }
  if (pad) {
    // transformers would add a missing pad token to the vocab; the model cannot produce it, so
    // there is simply no pad id (not worth refusing the whole tokenizer).
    int32_t id = t.token_id(*pad);
    if (id >= 0) t.pad_id = id;
  }
  // add_bos_token / add_eos_token rebuild the post-processor as transformers' update_post_processor
  // does: [bos] $A [eos].
  if (has_cfg && (cfg.contains("add_bos_token") || cfg.contains("add_eos_token"))) {
    Ctx c{cfg_file};
    bool had_bos = !t.post_prefix.empty();
    KILN_ASSIGN_OR_RETURN(bool add_bos, get_bool(c, cfg, "add_bos_token", "tokenizer_config", had_bos));
    KILN_ASSIGN_OR_RETURN(bool add_eos, get_bool(c, cfg, "add_eos_token", "tokenizer_config", false));
    t.post_prefix.clear();
    t.post_suffix.clear();
    if (add_bos) {
      if (!t.bos_id) return c.err("add_bos_token", "is true but there is no bos_token");
      t.post_prefix.push_back(*t.bos_id);
    }
    if (add_eos) {
      if (t.eos_ids.empty()) return c.err("add_eos_token", "is true but there is no eos_token");
      t.post_suffix.push_back(t.eos_ids[0]);
    }
  }

  // Newer transformers save the template beside the config: chat_template.jinja (it wins over the
  // config's) and additional_chat_templates/NAME.jinja; processors use chat_template.json.
  if (std::string p = dir + sep + "chat_template.jinja"; file_exists(p)) {
    KILN_ASSIGN_OR_RETURN(t.chat_templates["default"], read_file(p));
  } else if (json ct; !t.chat_templates.count("default")) {
    KILN_ASSIGN_OR_RETURN(bool has_ct, read_json("chat_template.json", ct));
    if (has_ct) {
      auto it = ct.find("chat_template");
      if (it == ct.end() || !it->is_string()) return Status::error(dir + sep + "chat_template.json: chat_template must be a string");
      t.chat_templates["default"] = it->get<std::string>();
    }
  }
  if (std::string extra = dir + sep + "additional_chat_templates"; is_directory(extra)) {
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(extra, ec)) {
      std::string name = e.path().filename().string();
      if (name.size() <= 6 || name.compare(name.size() - 6, 6, ".jinja") != 0) continue;
      KILN_ASSIGN_OR_RETURN(std::string tpl, read_file(e.path().string()));
      t.chat_templates[name.substr(0, name.size() - 6)] = std::move(tpl);
    }
  }

  json gen;
  KILN_ASSIGN_OR_RETURN(bool has_gen, read_json("generation_config.json", gen));
  if (has_gen) {
    Ctx c{dir + sep + "generation_config.json"};
    KILN_ASSIGN_OR_RETURN(auto ids, id_list(c, gen, "eos_token_id"));
    for (int32_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= t.id_to_token.size())
        return c.err("eos_token_id", std::to_string(id) + " is out of range");
      add_unique(t.eos_ids, id);
    }
    if (!t.pad_id) {
      KILN_ASSIGN_OR_RETURN(auto pads, id_list(c, gen, "pad_token_id"));
      if (!pads.empty()) t.pad_id = pads[0];
    }
    if (!t.bos_id) {
      KILN_ASSIGN_OR_RETURN(auto b, id_list(c, gen, "bos_token_id"));
      if (!b.empty() && b[0] >= 0 && static_cast<size_t>(b[0]) < t.id_to_token.size()) {
        t.bos_id = b[0];
        t.bos_token = t.id_to_token[b[0]];
      }
    }
  }
  return Status::ok();
}

// Without any config, take the EOS from well-known special tokens so generation can stop.
void guess_eos(TokenizerImpl& t) {
  if (!t.eos_ids.empty()) return;
  for (const char* name : {"</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<eos>", "<|end|>"}) {
    int32_t id = t.added_vocab.find(name);
    if (id >= 0) {
      if (t.eos_ids.empty()) t.eos_token = name;
      t.eos_ids.push_back(id);
    }
  }
}

}  // namespace kiln::tok
