// Internal representation shared by the tokenizer.json loader, the GGUF loader, the encoder and
// the decoder. One pipeline, as in HF tokenizers: added-token split -> normalizers ->
// pre-tokenizers -> model (BPE by merge rank, or SentencePiece by score for GGUF 'llama') ->
// post-processor; decoding runs the decoder steps as a stream (decode.cpp).
#pragma once
#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/regex.h"
#include "tokenizer/unicode.h"

namespace kiln::tok {

inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xFF51AFD7ED558CCDull);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ v) * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
    p += 8;
    n -= 8;
  }
  uint64_t v = 0;
  std::memcpy(&v, p, n);
  h = (h ^ v) * 0x94D049BB133111EBull;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 32;
  return h;
}

// string -> id, open addressing, keys in one arena: the vocab lookup is on the hot path and
// std::unordered_map<std::string,...> costs an allocation per key and a pointer chase per probe.
class StrIdMap {
 public:
  void reserve(size_t n);
  // Inserts or overwrites (a JSON object with a repeated key keeps the last value, as serde does).
  void set(std::string_view key, int32_t id);
  int32_t find(std::string_view key) const;  // -1 if absent
  size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t off = 0, len = 0;
    int32_t id = -1;  // -1: empty
  };
  void grow();
  std::vector<Slot> slots_;
  std::string arena_;
  size_t size_ = 0;
};

// (left id, right id) -> (rank, merged id).
class PairMap {
 public:
  struct Value {
    int32_t rank, id;
  };
  void reserve(size_t n);
  void set(int32_t a, int32_t b, Value v);
  const Value* find(int32_t a, int32_t b) const {
    if (slots_.empty()) return nullptr;
    uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
    size_t mask = slots_.size() - 1;
    size_t i = mix(key) & mask;
    while (true) {
      const Slot& s = slots_[i];
      if (s.v.id < 0) return nullptr;
      if (s.key == key) return &s.v;
      i = (i + 1) & mask;
    }
  }
  size_t size() const { return size_; }

 private:
  static uint64_t mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xFF51AFD7ED558CCDull;
    k ^= k >> 33;
    return k;
  }
  struct Slot {
    uint64_t key = 0;
    Value v{0, -1};
  };
  void grow();
  std::vector<Slot> slots_;
  size_t size_ = 0;
};

// Bounded cache word -> ids, direct-mapped and sharded by mutex (the Tokenizer is shared by
// threads). Words longer than kMaxKey bytes are not cached (HF: 256).
class WordCache {
 public:
  static constexpr size_t kMaxKey = 256;
  bool get(std::string_view word, std::vector<int32_t>& out) const;  // appends on hit
  void put(std::string_view word, const int32_t* ids, size_t n) const;

 private:
  static constexpr size_t kSlots = 1 << 15, kShards = 64;
  struct Slot {
    std::string key;
    std::vector<int32_t> ids;
  };
  mutable std::unique_ptr<Slot[]> slots_{new Slot[kSlots]};
  mutable std::array<std::mutex, kShards> locks_;
};

// Trie over added-token strings for leftmost-longest matching (HF uses aho-corasick with
// MatchKind::LeftmostLongest).
class TokenTrie {
 public:
  void add(std::string_view s, int32_t value);
  bool empty() const { return nodes_.size() <= 1; }
  // Longest token starting at text[pos]: its length (0 if none) and value.
  size_t longest_at(std::string_view text, size_t pos, int32_t& value) const;
  bool may_start(unsigned char c) const { return first_[c]; }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> next;  // sorted by byte
    int32_t value = -1;
  };
  std::vector<Node> nodes_{Node{}};
  std::array<bool, 256> first_{};
};

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

enum class NormKind { kNfc, kNfkc, kNfd, kNfkd, kReplace, kPrepend, kLowercase, kStrip };
struct NormStep {
  NormKind kind = NormKind::kNfc;
  std::string pattern;                    // kReplace with a String pattern
  std::shared_ptr<const Regex> regex;     // kReplace with a Regex pattern
  std::string content;                    // kReplace replacement, kPrepend text
  bool strip_left = false, strip_right = false;  // kStrip
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
enum class PrependScheme { kAlways, kNever, kFirst };
enum class PreKind { kSplit, kByteLevel, kMetaspace, kDigits, kWhitespaceSplit, kWhitespace, kPunctuation };
struct PreStep {
  PreKind kind = PreKind::kSplit;
  std::shared_ptr<const Regex> regex;  // kSplit (Regex), kByteLevel (use_regex), kWhitespace
  std::string literal;                 // kSplit with a String pattern
  bool invert = false;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool add_prefix_space = false;       // kByteLevel
  bool use_regex = true;               // kByteLevel
  std::string replacement = "\xE2\x96\x81";  // kMetaspace ('▁')
  PrependScheme prepend = PrependScheme::kAlways;
  bool split = true;                   // kMetaspace
  bool individual_digits = false;      // kDigits
};

enum class DecKind { kByteLevel, kByteFallback, kMetaspace, kReplace, kStrip, kFuse };
struct DecStep {
  DecKind kind = DecKind::kFuse;
  std::string pattern, content;        // kReplace (String pattern); kStrip content char
  std::shared_ptr<const Regex> regex;  // kReplace (Regex pattern)
  std::string replacement = "\xE2\x96\x81";  // kMetaspace
  bool prepend = true;                 // kMetaspace: prepend_scheme != never
  size_t strip_start = 0, strip_stop = 0;
};

enum class ModelKind { kBpe, kSpm };

struct TokenizerImpl {
  std::string source;  // file name for messages

  // Vocabulary: id -> token text (model vocab and added tokens); holes are "".
  std::vector<std::string> id_to_token;
  StrIdMap model_vocab;   // the model's own vocab
  StrIdMap added_vocab;   // added tokens' contents
  std::vector<uint8_t> special;  // per id: 1 if a special added token

  // Model
  ModelKind model = ModelKind::kBpe;
  PairMap merges;
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false;
  int32_t unk_id = -1;
  std::string continuing_subword_prefix, end_of_word_suffix;
  std::array<int32_t, 256> byte_token{};    // <0xXX> ids (-1 if absent)
  std::vector<int32_t> char_token;          // code point < 0x3000 -> single-char token id (-1)
  std::vector<float> scores;                // kSpm

  // Added tokens
  std::vector<AddedToken> added;
  TokenTrie raw_trie;         // normalized == false: matched on the input text
  TokenTrie normalized_trie;  // normalized == true: matched after normalization

  // Pipeline
  std::vector<NormStep> normalizers;
  std::vector<PreStep> pre_tokenizers;
  std::vector<DecStep> decoders;
  bool has_decoder = false;  // no decoder: tokens joined with " " (HF)
  std::vector<int32_t> post_prefix, post_suffix;  // post-processor for one sequence

  // Metadata
  std::optional<int32_t> bos_id, pad_id;
  std::vector<int32_t> eos_ids;
  std::string bos_token, eos_token;
  std::map<std::string, std::string, std::less<>> chat_templates;  // "default" and named

  WordCache cache;

  // Build the lookup tables that depend on the vocab (char_token, byte_token, tries); called by
  // the loaders once everything is set.
  void finalize();
  int32_t token_id(std::string_view s) const {
    int32_t id = added_vocab.find(s);
    return id >= 0 ? id : model_vocab.find(s);
  }

  // Encoding stages (encode.cpp)
  std::string normalize(std::string_view s) const;
  void encode_text(std::string_view text, std::vector<int32_t>& out) const;  // no post-processor
  void model_word(std::string_view word, std::vector<int32_t>& out) const;
};

// Byte-level (GPT-2) byte <-> code point tables.
const std::array<uint32_t, 256>& byte_to_unicode();
int byte_from_unicode(uint32_t cp);  // -1 if not a byte-level char

}  // namespace kiln::tok
