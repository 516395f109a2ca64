// PCRE2 (8-bit, UTF + UCP, JIT-compiled) for the pre-tokenizer and normalizer patterns, which use
// \p{L}/\p{N} classes and lookahead. Thread-safe: match data is per call.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace kiln::tok {

class Regex {
 public:
  // Compile `pattern` (HF/Oniguruma syntax is accepted as far as PCRE2 shares it).
  static Result<std::shared_ptr<const Regex>> compile(const std::string& pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  struct Match {
    size_t start, end;
  };
  // All non-overlapping matches, left to right (an empty match advances by one character).
  // `text` must be valid UTF-8.
  void find_all(std::string_view text, std::vector<Match>& out) const;
  const std::string& pattern() const { return pattern_; }

 private:
  Regex() = default;
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code*
};

}  // namespace kiln::tok
