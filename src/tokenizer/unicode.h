// UTF-8 and Unicode helpers for the tokenizer: decoding, lossy repair with the same rules as Rust's
// String::from_utf8_lossy (one U+FFFD per maximal invalid subpart, as HF tokenizers does), the
// character predicates HF uses (Rust's char::is_whitespace / is_alphanumeric / is_numeric), and
// NFC/NFKC/NFD/NFKD through utf8proc.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kiln::tok {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Length of the valid UTF-8 sequence starting at s[i], or 0 if it is invalid or truncated.
size_t utf8_valid_len(std::string_view s, size_t i);
// Decode the code point at s[i] (which must start a valid sequence); advances i.
uint32_t utf8_next(std::string_view s, size_t& i);
void utf8_append(std::string& out, uint32_t cp);
size_t utf8_char_len(unsigned char lead);  // 1..4 from the lead byte (1 for invalid leads)

bool utf8_is_valid(std::string_view s);
// Replace each maximal invalid subpart with U+FFFD (Rust from_utf8_lossy / WHATWG / Python).
std::string utf8_lossy(std::string_view s);
// Bytes at the end of `s` that form an incomplete (but so far valid) UTF-8 sequence: 0..3.
size_t utf8_incomplete_tail(std::string_view s);

bool is_whitespace(uint32_t cp);    // Unicode White_Space (Rust char::is_whitespace)
bool is_numeric(uint32_t cp);       // general category N* (Rust char::is_numeric)
bool is_alphanumeric(uint32_t cp);
bool is_punctuation(uint32_t cp);  // general category P* (Rust is_ascii_punctuation || is_punctuation)
uint32_t simple_lowercase(uint32_t cp);  // utf8proc simple case mapping (Rust uses full mapping)  // Rust char::is_alphanumeric (Alphabetic approximated by L*, Nl, Mc)

enum class NormForm { kNfc, kNfkc, kNfd, kNfkd };
// Normalize valid UTF-8. Pure-ASCII input is returned unchanged without calling utf8proc.
std::string normalize_unicode(std::string_view s, NormForm form);

}  // namespace kiln::tok
