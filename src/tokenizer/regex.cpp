#include "tokenizer/regex.h"

#include <pcre2.h>

#include "tokenizer/unicode.h"

namespace kiln::tok {

Result<std::shared_ptr<const Regex>> Regex::compile(const std::string& pattern) {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &err_off, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof(buf));
    return Status::error("invalid regex '" + pattern + "' at offset " + std::to_string(err_off) + ": " +
                         reinterpret_cast<const char*>(buf));
  }
  // JIT roughly triples matching speed on these patterns; if it is unavailable the interpreter
  // gives the same results.
  (void)pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  auto r = std::shared_ptr<Regex>(new Regex());
  r->pattern_ = pattern;
  r->code_ = code;
  return std::shared_ptr<const Regex>(std::move(r));
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

namespace {
// One match-data block per thread, grown on demand: pcre2_match_data_create per call costs more
// than matching a short word.
struct MatchData {
  pcre2_match_data* md = nullptr;
  ~MatchData() {
    if (md) pcre2_match_data_free(md);
  }
};
thread_local MatchData t_match_data;
}  // namespace

void Regex::find_all(std::string_view text, std::vector<Match>& out) const {
  auto* code = static_cast<pcre2_code*>(code_);
  if (t_match_data.md == nullptr) t_match_data.md = pcre2_match_data_create(16, nullptr);
  pcre2_match_data* md = t_match_data.md;
  auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  while (pos <= text.size()) {
    int rc = pcre2_match(code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    // The JIT runs on a 32 KiB stack; a pattern that backtracks deeply on a huge input can exhaust
    // it. The interpreter keeps its backtracking on the heap, so retry the match there.
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
      rc = pcre2_match(code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, nullptr);
    if (rc < 0) break;  // PCRE2_ERROR_NOMATCH, or a resource limit (treated as no further match)
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t s = ov[0], e = ov[1];
    if (e < s) break;  // \K tricks; not used by tokenizer patterns
    out.push_back({s, e});
    if (e == s) {
      if (e >= text.size()) break;
      pos = e + utf8_char_len(static_cast<unsigned char>(text[e]));
    } else {
      pos = e;
    }
  }
}

}  // namespace kiln::tok
