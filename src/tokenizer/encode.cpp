// Encoding: added-token split, normalizers, pre-tokenizers, BPE / SentencePiece merges. Each step
// follows the HF tokenizers crate (tokenizers/src/{tokenizer/added_vocabulary.rs, normalizers,
// pre_tokenizers, models/bpe/word.rs}) so ids match it exactly; GGUF 'llama' vocabularies use
// llama.cpp's score-ordered SentencePiece merge instead (llm_tokenizer_spm).
#include <algorithm>
#include <climits>
#include <cstdio>
#include <queue>

#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln::tok {

// ---------------------------------------------------------------------------------- containers

void StrIdMap::reserve(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  if (cap > slots_.size()) {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(cap, Slot{});
    size_t mask = cap - 1;
    for (const Slot& s : old) {
      if (s.id < 0) continue;
      size_t i = s.hash & mask;
      while (slots_[i].id >= 0) i = (i + 1) & mask;
      slots_[i] = s;
    }
  }
}

void StrIdMap::grow() { reserve(slots_.empty() ? 16 : slots_.size()); }

void StrIdMap::set(std::string_view key, int32_t id) {
  if ((size_ + 1) * 2 > slots_.size()) grow();
  uint64_t h = hash_bytes(key.data(), key.size());
  size_t mask = slots_.size() - 1;
  size_t i = h & mask;
  while (slots_[i].id >= 0) {
    const Slot& s = slots_[i];
    if (s.hash == h && s.len == key.size() && std::memcmp(arena_.data() + s.off, key.data(), key.size()) == 0) {
      slots_[i].id = id;
      return;
    }
    i = (i + 1) & mask;
  }
  slots_[i] = Slot{h, static_cast<uint32_t>(arena_.size()), static_cast<uint32_t>(key.size()), id};
  arena_.append(key);
  ++size_;
}

int32_t StrIdMap::find(std::string_view key) const {
  if (slots_.empty()) return -1;
  uint64_t h = hash_bytes(key.data(), key.size());
  size_t mask = slots_.size() - 1;
  size_t i = h & mask;
  while (true) {
    const Slot& s = slots_[i];
    if (s.id < 0) return -1;
    if (s.hash == h && s.len == key.size() && std::memcmp(arena_.data() + s.off, key.data(), key.size()) == 0)
      return s.id;
    i = (i + 1) & mask;
  }
}

void PairMap::reserve(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  if (cap <= slots_.size()) return;
  std::vector<Slot> old = std::move(slots_);
  slots_.assign(cap, Slot{});
  size_t mask = cap - 1;
  for (const Slot& s : old) {
    if (s.v.id < 0) continue;
    size_t i = mix(s.key) & mask;
    while (slots_[i].v.id >= 0) i = (i + 1) & mask;
    slots_[i] = s;
  }
}

void PairMap::grow() { reserve(slots_.empty() ? 16 : slots_.size()); }

void PairMap::set(int32_t a, int32_t b, Value v) {
  if ((size_ + 1) * 2 > slots_.size()) grow();
  uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  size_t mask = slots_.size() - 1;
  size_t i = mix(key) & mask;
  while (slots_[i].v.id >= 0) {
    if (slots_[i].key == key) {
      slots_[i].v = v;
      return;
    }
    i = (i + 1) & mask;
  }
  slots_[i].key = key;
  slots_[i].v = v;
  ++size_;
}

bool WordCache::get(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() >= kMaxKey) return false;
  uint64_t h = hash_bytes(word.data(), word.size());
  size_t i = h & (kSlots - 1);
  std::lock_guard<std::mutex> lock(locks_[i % kShards]);
  const Slot& s = slots_[i];
  if (s.key.size() != word.size() || s.key != word || s.ids.empty()) return false;
  out.insert(out.end(), s.ids.begin(), s.ids.end());
  return true;
}

void WordCache::put(std::string_view word, const int32_t* ids, size_t n) const {
  if (word.size() >= kMaxKey || n == 0) return;
  uint64_t h = hash_bytes(word.data(), word.size());
  size_t i = h & (kSlots - 1);
  std::lock_guard<std::mutex> lock(locks_[i % kShards]);
  Slot& s = slots_[i];
  s.key.assign(word);
  s.ids.assign(ids, ids + n);
}

void TokenTrie::add(std::string_view s, int32_t value) {
  if (s.empty()) return;
  first_[static_cast<unsigned char>(s[0])] = true;
  int32_t node = 0;
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    auto& next = nodes_[node].next;
    auto it = std::lower_bound(next.begin(), next.end(), c, [](const auto& p, unsigned char x) { return p.first < x; });
    if (it != next.end() && it->first == c) {
      node = it->second;
    } else {
      int32_t child = static_cast<int32_t>(nodes_.size());
      next.insert(it, {c, child});
      nodes_.push_back(Node{});
      node = child;
    }
  }
  if (nodes_[node].value < 0) nodes_[node].value = value;  // first added wins for duplicates
}

size_t TokenTrie::longest_at(std::string_view text, size_t pos, int32_t& value) const {
  size_t best = 0;
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    auto c = static_cast<unsigned char>(text[i]);
    const auto& next = nodes_[node].next;
    auto it = std::lower_bound(next.begin(), next.end(), c, [](const auto& p, unsigned char x) { return p.first < x; });
    if (it == next.end() || it->first != c) break;
    node = it->second;
    if (nodes_[node].value >= 0) {
      best = i + 1 - pos;
      value = nodes_[node].value;
    }
  }
  return best;
}

// --------------------------------------------------------------------------------- byte level

const std::array<uint32_t, 256>& byte_to_unicode() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    std::array<bool, 256> direct{};
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b) t[b] = direct[b] ? static_cast<uint32_t>(b) : 256 + n++;
    return t;
  }();
  return table;
}

int byte_from_unicode(uint32_t cp) {
  static const std::vector<int16_t> rev = [] {
    std::vector<int16_t> r(512, -1);
    const auto& t = byte_to_unicode();
    for (int b = 0; b < 256; ++b) r[t[b]] = static_cast<int16_t>(b);
    return r;
  }();
  return cp < rev.size() ? rev[cp] : -1;
}

// Each byte's byte-level character as UTF-8 (1 or 2 bytes).
struct ByteLevelStrings {
  std::array<char, 2> s[256];
  std::array<uint8_t, 256> n;
  ByteLevelStrings() {
    const auto& t = byte_to_unicode();
    for (int b = 0; b < 256; ++b) {
      std::string u;
      utf8_append(u, t[b]);
      n[b] = static_cast<uint8_t>(u.size());
      s[b][0] = u[0];
      s[b][1] = u.size() > 1 ? u[1] : 0;
    }
  }
};
static const ByteLevelStrings kByteLevel;

static void byte_level_map(std::string_view in, std::string& out) {
  out.clear();
  out.reserve(in.size() * 2);
  for (char ch : in) {
    auto b = static_cast<unsigned char>(ch);
    out.append(kByteLevel.s[b].data(), kByteLevel.n[b]);
  }
}

// ------------------------------------------------------------------------------- normalizers

static void replace_all(std::string& s, std::string_view pat, std::string_view with) {
  if (pat.empty() || s.find(pat) == std::string::npos) return;
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (true) {
    size_t f = s.find(pat, pos);
    if (f == std::string::npos) break;
    out.append(s, pos, f - pos);
    out.append(with);
    pos = f + pat.size();
  }
  out.append(s, pos, std::string::npos);
  s.swap(out);
}

static void regex_replace_all(std::string& s, const Regex& re, std::string_view with) {
  std::vector<Regex::Match> m;
  re.find_all(s, m);
  if (m.empty()) return;
  std::string out;
  size_t pos = 0;
  for (const auto& x : m) {
    out.append(s, pos, x.start - pos);
    out.append(with);
    pos = x.end;
  }
  out.append(s, pos, std::string::npos);
  s.swap(out);
}

static std::string lowercase(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    uint32_t cp = utf8_next(s, i);
    if (cp < 0x80) {
      out += static_cast<char>(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp);
    } else {
      utf8_append(out, static_cast<uint32_t>(simple_lowercase(cp)));
    }
  }
  return out;
}


std::string TokenizerImpl::normalize(std::string_view in) const {
  std::string s(in);
  for (const NormStep& n : normalizers) {
    switch (n.kind) {
      case NormKind::kNfc: s = normalize_unicode(s, NormForm::kNfc); break;
      case NormKind::kNfkc: s = normalize_unicode(s, NormForm::kNfkc); break;
      case NormKind::kNfd: s = normalize_unicode(s, NormForm::kNfd); break;
      case NormKind::kNfkd: s = normalize_unicode(s, NormForm::kNfkd); break;
      case NormKind::kReplace:
        if (n.regex) regex_replace_all(s, *n.regex, n.content);
        else replace_all(s, n.pattern, n.content);
        break;
      case NormKind::kPrepend:
        if (!s.empty()) s.insert(0, n.content);  // HF: nothing is prepended to an empty string
        break;
      case NormKind::kLowercase: s = lowercase(s); break;
      case NormKind::kStrip: {
        size_t b = 0, e = s.size();
        if (n.strip_left) {
          while (b < e) {
            size_t j = b;
            if (!is_whitespace(utf8_next(s, j))) break;
            b = j;
          }
        }
        if (n.strip_right) {
          while (e > b) {
            size_t j = e - 1;
            while (j > b && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) --j;
            size_t k = j;
            if (!is_whitespace(utf8_next(s, k))) break;
            e = j;
          }
        }
        s = s.substr(b, e - b);
        break;
      }
    }
  }
  return s;
}

// ---------------------------------------------------------------------------- pre-tokenizers

namespace {

struct Word {
  std::string text;
  bool at_start;  // begins at offset 0 of the original input (Metaspace prepend_scheme "first")
};

struct Span {
  size_t start, end;
  bool is_match;
};

// HF NormalizedString::split: turn pattern matches covering the word into the pieces to keep.
void apply_behavior(const Word& w, const std::vector<Span>& spans, SplitBehavior behavior, std::vector<Word>& out) {
  std::vector<std::pair<size_t, size_t>> keep;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const auto& s : spans) keep.emplace_back(s.start, s.end);
      break;
    case SplitBehavior::kRemoved:
      for (const auto& s : spans)
        if (!s.is_match) keep.emplace_back(s.start, s.end);
      break;
    case SplitBehavior::kContiguous: {
      bool prev = false;
      for (const auto& s : spans) {
        if (s.is_match == prev && !keep.empty()) keep.back().second = s.end;
        else keep.emplace_back(s.start, s.end);
        prev = s.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool prev = false;
      for (const auto& s : spans) {
        if (s.is_match && !prev && !keep.empty()) keep.back().second = s.end;
        else keep.emplace_back(s.start, s.end);
        prev = s.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool prev = false;
      for (size_t k = spans.size(); k-- > 0;) {
        const auto& s = spans[k];
        if (s.is_match && !prev && !keep.empty()) keep.back().first = s.start;
        else keep.emplace_back(s.start, s.end);
        prev = s.is_match;
      }
      std::reverse(keep.begin(), keep.end());
      break;
    }
  }
  for (const auto& [b, e] : keep) {
    if (e > b) out.push_back(Word{w.text.substr(b, e - b), w.at_start && b == 0});
  }
}

// Matches of a per-character predicate, each matching character its own match (HF Pattern for Fn(char)).
template <class Pred>
void char_spans(std::string_view s, Pred pred, std::vector<Span>& spans) {
  size_t last = 0, i = 0;
  while (i < s.size()) {
    size_t b = i;
    uint32_t cp = utf8_next(s, i);
    if (pred(cp)) {
      if (last < b) spans.push_back({last, b, false});
      spans.push_back({b, i, true});
      last = i;
    }
  }
  if (last < s.size()) spans.push_back({last, s.size(), false});
}

void match_spans(const std::vector<Regex::Match>& m, size_t n, std::vector<Span>& spans) {
  size_t prev = 0;
  for (const auto& x : m) {
    if (prev != x.start) spans.push_back({prev, x.start, false});
    spans.push_back({x.start, x.end, true});
    prev = x.end;
  }
  if (prev != n) spans.push_back({prev, n, false});
}

void literal_spans(std::string_view s, std::string_view pat, std::vector<Span>& spans) {
  std::vector<Regex::Match> m;
  if (!pat.empty()) {
    size_t pos = 0;
    while (true) {
      size_t f = s.find(pat, pos);
      if (f == std::string_view::npos) break;
      m.push_back({f, f + pat.size()});
      pos = f + pat.size();
    }
  }
  match_spans(m, s.size(), spans);
}

const Regex& gpt2_regex() {
  static const std::shared_ptr<const Regex> re =
      Regex::compile(R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)").value();
  return *re;
}

const Regex& whitespace_regex() {
  static const std::shared_ptr<const Regex> re = Regex::compile(R"(\w+|[^\w\s]+)").value();
  return *re;
}

void regex_split(const std::vector<Word>& in, const Regex& re, bool invert, SplitBehavior behavior,
                 std::vector<Word>& out) {
  std::vector<Regex::Match> m;
  std::vector<Span> spans;
  for (const Word& w : in) {
    m.clear();
    spans.clear();
    re.find_all(w.text, m);
    match_spans(m, w.text.size(), spans);
    if (invert)
      for (auto& s : spans) s.is_match = !s.is_match;
    apply_behavior(w, spans, behavior, out);
  }
}

}  // namespace

static void pre_tokenize(const std::vector<PreStep>& steps, std::vector<Word>& words) {
  std::vector<Word> next;
  std::vector<Span> spans;
  for (const PreStep& p : steps) {
    next.clear();
    switch (p.kind) {
      case PreKind::kSplit:
        if (p.regex) {
          regex_split(words, *p.regex, p.invert, p.behavior, next);
        } else {
          for (const Word& w : words) {
            spans.clear();
            literal_spans(w.text, p.literal, spans);
            if (p.invert)
              for (auto& s : spans) s.is_match = !s.is_match;
            apply_behavior(w, spans, p.behavior, next);
          }
        }
        break;
      case PreKind::kByteLevel: {
        if (p.add_prefix_space)
          for (Word& w : words)
            if (w.text.empty() || w.text[0] != ' ') w.text.insert(0, " ");
        if (p.use_regex) regex_split(words, gpt2_regex(), false, SplitBehavior::kIsolated, next);
        else next.swap(words);
        std::string mapped;
        for (Word& w : next) {
          byte_level_map(w.text, mapped);
          w.text.swap(mapped);
        }
        break;
      }
      case PreKind::kMetaspace:
        for (Word& w : words) {
          replace_all(w.text, " ", p.replacement);
          bool starts = w.text.compare(0, p.replacement.size(), p.replacement) == 0;
          if (!starts && (p.prepend == PrependScheme::kAlways || (p.prepend == PrependScheme::kFirst && w.at_start)))
            w.text.insert(0, p.replacement);
          if (p.split) {
            spans.clear();
            literal_spans(w.text, p.replacement, spans);
            apply_behavior(w, spans, SplitBehavior::kMergedWithNext, next);
          } else {
            next.push_back(std::move(w));
          }
        }
        break;
      case PreKind::kDigits:
        for (const Word& w : words) {
          spans.clear();
          char_spans(w.text, is_numeric, spans);
          apply_behavior(w, spans, p.individual_digits ? SplitBehavior::kIsolated : SplitBehavior::kContiguous, next);
        }
        break;
      case PreKind::kWhitespaceSplit:
        for (const Word& w : words) {
          spans.clear();
          char_spans(w.text, is_whitespace, spans);
          apply_behavior(w, spans, SplitBehavior::kRemoved, next);
        }
        break;
      case PreKind::kWhitespace:
        regex_split(words, whitespace_regex(), true, SplitBehavior::kRemoved, next);
        break;
      case PreKind::kPunctuation:
        for (const Word& w : words) {
          spans.clear();
          char_spans(w.text, is_punctuation, spans);
          apply_behavior(w, spans, p.behavior, next);
        }
        break;
    }
    words.swap(next);
  }
}

// ------------------------------------------------------------------------------------ models

namespace {

struct Sym {
  int32_t id;
  int32_t prev, next;
  int32_t len;  // bytes of the word it covers; 0 once merged away
};

// HF Word::merge_all: repeatedly merge the adjacent pair of lowest rank (leftmost on ties).
// Short words keep each pair's rank in an array and rescan it (no heap, no hash lookups after the
// first); long words (SentencePiece-style BPE without pre-tokenizer sees whole lines) use a heap.
void bpe_merge(const PairMap& merges, std::vector<Sym>& syms) {
  const int32_t n = static_cast<int32_t>(syms.size());
  if (n < 2) return;
  constexpr int32_t kNone = INT32_MAX;
  if (n <= 64) {
    int32_t rank[64], new_id[64];
    auto pair_at = [&](int32_t i) {
      int32_t j = syms[i].next;
      const PairMap::Value* v = j >= 0 ? merges.find(syms[i].id, syms[j].id) : nullptr;
      rank[i] = v ? v->rank : kNone;
      new_id[i] = v ? v->id : -1;
    };
    for (int32_t i = 0; i < n; ++i) pair_at(i);
    while (true) {
      int32_t best = -1, best_rank = kNone;
      for (int32_t i = 0; i >= 0; i = syms[i].next)
        if (rank[i] < best_rank) best_rank = rank[i], best = i;
      if (best < 0) break;
      int32_t j = syms[best].next;
      syms[best].id = new_id[best];
      syms[best].len += syms[j].len;
      syms[j].len = 0;
      syms[best].next = syms[j].next;
      if (syms[j].next >= 0) syms[syms[j].next].prev = best;
      pair_at(best);
      if (syms[best].prev >= 0) pair_at(syms[best].prev);
    }
    return;
  }
  struct Cand {
    int32_t rank, pos, id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> q;
  for (int32_t i = 0; i + 1 < n; ++i)
    if (const auto* v = merges.find(syms[i].id, syms[i + 1].id)) q.push({v->rank, i, v->id});
  while (!q.empty()) {
    Cand c = q.top();
    q.pop();
    Sym& s = syms[c.pos];
    if (s.len == 0 || s.next < 0) continue;
    int32_t j = s.next;
    const auto* v = merges.find(s.id, syms[j].id);
    if (v == nullptr || v->id != c.id) continue;  // stale entry
    s.id = c.id;
    s.len += syms[j].len;
    syms[j].len = 0;
    s.next = syms[j].next;
    if (s.next >= 0) syms[s.next].prev = c.pos;
    if (s.prev >= 0)
      if (const auto* pv = merges.find(syms[s.prev].id, s.id)) q.push({pv->rank, s.prev, pv->id});
    if (s.next >= 0)
      if (const auto* nv = merges.find(s.id, syms[s.next].id)) q.push({nv->rank, c.pos, nv->id});
  }
}

}  // namespace

static void bpe_word(const TokenizerImpl& t, std::string_view word, std::vector<int32_t>& out) {
  if (word.empty()) return;
  if (t.ignore_merges) {
    int32_t id = t.model_vocab.find(word);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }
  if (t.cache.get(word, out)) return;
  std::vector<Sym> syms;
  syms.reserve(word.size());
  int32_t unk = -1, unk_len = 0;
  auto add = [&](int32_t id, int32_t len) {
    int32_t idx = static_cast<int32_t>(syms.size());
    if (idx > 0) syms.back().next = idx;
    syms.push_back(Sym{id, idx - 1, -1, len});
  };
  const bool affixes = !t.continuing_subword_prefix.empty() || !t.end_of_word_suffix.empty();
  std::string tmp;
  size_t i = 0;
  while (i < word.size()) {
    size_t b = i;
    uint32_t cp = utf8_next(word, i);
    std::string_view ch = word.substr(b, i - b);
    int32_t id;
    std::string_view s = ch;
    if (affixes) {
      tmp.clear();
      if (b > 0) tmp += t.continuing_subword_prefix;
      tmp.append(ch);
      if (i == word.size()) tmp += t.end_of_word_suffix;
      s = tmp;
      id = t.model_vocab.find(s);
    } else {
      id = cp < t.char_token.size() ? t.char_token[cp] : t.model_vocab.find(ch);
    }
    const int32_t len = static_cast<int32_t>(i - b);
    if (id >= 0) {
      if (unk >= 0) {
        add(unk, unk_len);
        unk = -1;
      }
      add(id, len);
      continue;
    }
    if (t.byte_fallback) {
      bool all = true;
      for (char c : s) all = all && t.byte_token[static_cast<unsigned char>(c)] >= 0;
      if (all) {
        // (a pending unk is kept pending, as HF does)
        for (char c : s) add(t.byte_token[static_cast<unsigned char>(c)], 1);
        continue;
      }
    }
    if (t.unk_id >= 0) {
      if (unk >= 0 && t.fuse_unk) {
        unk_len += len;
      } else {
        if (unk >= 0) add(unk, unk_len);
        unk = t.unk_id;
        unk_len = len;
      }
    }
    // No vocab entry, no byte fallback, no unk: the character is dropped (HF does the same).
  }
  if (unk >= 0) add(unk, unk_len);
  bpe_merge(t.merges, syms);
  size_t first = out.size();
  for (int32_t k = 0; k >= 0 && k < static_cast<int32_t>(syms.size()); k = syms[k].next) out.push_back(syms[k].id);
  t.cache.put(word, out.data() + first, out.size() - first);
}

// llama.cpp llm_tokenizer_spm: symbols are characters; repeatedly merge the adjacent pair whose
// concatenation is a token with the highest score (leftmost on ties); symbols that are not
// tokens become <0xXX> byte tokens.
static void spm_word(const TokenizerImpl& t, std::string_view text, std::vector<int32_t>& out) {
  if (text.empty()) return;
  if (t.cache.get(text, out)) return;
  struct S {
    int32_t prev, next;
    size_t off, n;
  };
  std::vector<S> syms;
  size_t off = 0;
  while (off < text.size()) {
    size_t n = std::min(utf8_char_len(static_cast<unsigned char>(text[off])), text.size() - off);
    int32_t idx = static_cast<int32_t>(syms.size());
    syms.push_back(S{idx - 1, off + n == text.size() ? -1 : idx + 1, off, n});
    off += n;
  }
  struct Bigram {
    float score;
    int32_t left, right;
    size_t size;
  };
  auto cmp = [](const Bigram& a, const Bigram& b) { return a.score < b.score || (a.score == b.score && a.left > b.left); };
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(cmp)> q(cmp);
  auto try_add = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    std::string_view s = text.substr(syms[l].off, syms[l].n + syms[r].n);
    int32_t id = t.model_vocab.find(s);
    if (id < 0) return;
    float score = static_cast<size_t>(id) < t.scores.size() ? t.scores[id] : 0.0f;
    q.push(Bigram{score, l, r, s.size()});
  };
  for (int32_t k = 1; k < static_cast<int32_t>(syms.size()); ++k) try_add(k - 1, k);
  while (!q.empty()) {
    Bigram b = q.top();
    q.pop();
    S& l = syms[b.left];
    S& r = syms[b.right];
    if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }
  size_t first = out.size();
  for (int32_t k = 0; k >= 0; k = syms[k].next) {
    std::string_view s = text.substr(syms[k].off, syms[k].n);
    int32_t id = t.model_vocab.find(s);
    if (id >= 0) {
      out.push_back(id);
      continue;
    }
    for (char c : s) {
      int32_t bt = t.byte_token[static_cast<unsigned char>(c)];
      if (bt >= 0) out.push_back(bt);
      else if (t.unk_id >= 0) out.push_back(t.unk_id);
    }
  }
  t.cache.put(text, out.data() + first, out.size() - first);
}

void TokenizerImpl::model_word(std::string_view word, std::vector<int32_t>& out) const {
  switch (model) {
    case ModelKind::kBpe: bpe_word(*this, word, out); break;
    case ModelKind::kSpm: spm_word(*this, word, out); break;
  }
}

// ------------------------------------------------------------------------------ added tokens

namespace {

struct Piece {
  size_t start, end;
  int32_t added;  // index into TokenizerImpl::added, or -1 for text
};

uint32_t last_char(std::string_view s) {
  size_t j = s.size() - 1;
  while (j > 0 && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) --j;
  return utf8_next(s, j);
}

// HF AddedVocabulary::find_matches: leftmost-longest matches, then single_word / lstrip / rstrip.
void split_added(const TokenizerImpl& t, const TokenTrie& trie, std::string_view s, std::vector<Piece>& out) {
  size_t start_offset = 0, pos = 0;
  while (pos < s.size()) {
    if (!trie.may_start(static_cast<unsigned char>(s[pos]))) {
      ++pos;
      continue;
    }
    int32_t idx = -1;
    size_t len = trie.longest_at(s, pos, idx);
    if (len == 0) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + len;
    pos = stop;
    const AddedToken& tok = t.added[idx];
    if (tok.single_word) {
      bool start_space = start == 0 || !is_alphanumeric(last_char(s.substr(0, start)));
      bool stop_space = true;
      if (stop < s.size()) {
        size_t j = stop;
        stop_space = !is_alphanumeric(utf8_next(s, j));
      }
      if (!start_space || !stop_space) continue;
    }
    if (tok.lstrip) {
      size_t ns = start;
      while (ns > 0) {
        size_t j = ns - 1;
        while (j > 0 && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) --j;
        size_t k = j;
        if (!is_whitespace(utf8_next(s, k))) break;
        ns = j;
      }
      start = std::max(ns, start_offset);
    }
    if (tok.rstrip) {
      while (stop < s.size()) {
        size_t j = stop;
        if (!is_whitespace(utf8_next(s, j))) break;
        stop = j;
      }
      pos = stop;
    }
    if (start > start_offset) out.push_back({start_offset, start, -1});
    out.push_back({start, stop, idx});
    start_offset = stop;
  }
  if (start_offset < s.size()) out.push_back({start_offset, s.size(), -1});
}

}  // namespace

void TokenizerImpl::encode_text(std::string_view input, std::vector<int32_t>& out) const {
  // Invalid UTF-8 is repaired first (U+FFFD per maximal invalid subpart): HF's API only takes str.
  std::string repaired;
  if (!utf8_is_valid(input)) {
    repaired = utf8_lossy(input);
    input = repaired;
  }
  std::vector<Piece> pieces;
  split_added(*this, raw_trie, input, pieces);
  std::vector<Word> words;
  std::vector<Piece> sub;
  for (const Piece& p : pieces) {
    if (p.added >= 0) {
      out.push_back(added[p.added].id);
      continue;
    }
    std::string norm = normalize(input.substr(p.start, p.end - p.start));
    if (norm.empty()) continue;
    words.clear();
    if (normalized_trie.empty()) {
      words.push_back(Word{std::move(norm), p.start == 0});
    } else {
      sub.clear();
      split_added(*this, normalized_trie, norm, sub);
      // Added tokens found after normalization end a run of words: flush words before them.
      for (const Piece& q : sub) {
        if (q.added >= 0) {
          pre_tokenize(pre_tokenizers, words);
          for (const Word& w : words) model_word(w.text, out);
          words.clear();
          out.push_back(added[q.added].id);
        } else {
          words.push_back(Word{norm.substr(q.start, q.end - q.start), p.start == 0 && q.start == 0});
        }
      }
    }
    pre_tokenize(pre_tokenizers, words);
    for (const Word& w : words) model_word(w.text, out);
  }
}

void TokenizerImpl::finalize() {
  byte_token.fill(-1);
  char buf[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
    byte_token[b] = model_vocab.find(buf);
  }
  char_token.assign(0x3000, -1);
  std::string u;
  for (uint32_t cp = 0; cp < char_token.size(); ++cp) {
    if (cp >= 0xD800 && cp < 0xE000) continue;
    u.clear();
    utf8_append(u, cp);
    char_token[cp] = model_vocab.find(u);
  }
  special.assign(id_to_token.size(), 0);
  raw_trie = TokenTrie();
  normalized_trie = TokenTrie();
  for (size_t k = 0; k < added.size(); ++k) {
    const AddedToken& a = added[k];
    if (a.id >= 0 && static_cast<size_t>(a.id) < special.size() && a.special) special[a.id] = 1;
    if (a.normalized) normalized_trie.add(normalize(a.content), static_cast<int32_t>(k));
    else raw_trie.add(a.content, static_cast<int32_t>(k));
  }
}

}  // namespace kiln::tok

// ---------------------------------------------------------------------------------- public API

namespace kiln {

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special_tokens) ids = impl_->post_prefix;
  impl_->encode_text(text, ids);
  if (add_special_tokens) ids.insert(ids.end(), impl_->post_suffix.begin(), impl_->post_suffix.end());
  return ids;
}

}  // namespace kiln
