// Decoding (HF decoders: ByteLevel, ByteFallback, Metaspace, Replace, Strip, Fuse) as a stream.
// HF's decode_chain works on the whole token list; here each step passes chunks on as soon as
// they are final. Steps after a Fuse (or ByteLevel, which fuses) see the output as chunks of one
// token, so a Strip there acts on the whole text, as in HF.
#include <algorithm>

#include "tokenizer/decode_stream.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln::tok {

DecodeStream::DecodeStream(const TokenizerImpl& t, bool skip_special_tokens, bool raw)
    : t_(t), skip_special_(skip_special_tokens), raw_(raw), st_(t.decoders.size()) {
  bool fused = false;
  for (size_t k = 0; k < t.decoders.size(); ++k) {
    st_[k].post_fuse = fused;
    if (t.decoders[k].kind == DecKind::kFuse || t.decoders[k].kind == DecKind::kByteLevel) fused = true;
  }
}

static int byte_fallback_value(std::string_view tok) {
  // HF: token.len() == 6 && starts_with("<0x") && ends_with('>') && u8::from_str_radix(&token[3..5], 16)
  if (tok.size() != 6 || tok.compare(0, 3, "<0x") != 0 || tok[5] != '>') return -1;
  int v = 0;
  for (int k = 3; k < 5; ++k) {
    char c = tok[k];
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

// Characters of a byte-level token back to bytes; a token with any other character is kept as its
// UTF-8 (HF ByteLevel decoder).
static void byte_level_unmap(std::string_view tok, std::string& out) {
  size_t start = out.size();
  size_t i = 0;
  while (i < tok.size()) {
    size_t n = utf8_valid_len(tok, i);
    int b = -1;
    if (n > 0) {
      size_t j = i;
      b = byte_from_unicode(utf8_next(tok, j));
    }
    if (b < 0) {
      out.resize(start);
      out.append(tok);
      return;
    }
    out += static_cast<char>(b);
    i += n;
  }
}

static void replace_str(std::string& s, std::string_view pat, std::string_view with) {
  if (pat.empty()) return;
  size_t pos = 0;
  while ((pos = s.find(pat, pos)) != std::string::npos) {
    s.replace(pos, pat.size(), with);
    pos += with.size();
  }
}

static void replace_regex(std::string& s, const Regex& re, std::string_view with) {
  if (!utf8_is_valid(s)) return;
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

// Length of the longest suffix of s that is a proper prefix of pat (text that may become a match).
static size_t partial_match_suffix(std::string_view s, std::string_view pat) {
  for (size_t k = std::min(s.size(), pat.size() - 1); k > 0; --k)
    if (s.substr(s.size() - k) == pat.substr(0, k)) return k;
  return 0;
}

void DecodeStream::sink(const Chunk& c, std::string& out) {
  std::string text;
  if (!t_.has_decoder && c.new_token) {
    if (any_token_) text += ' ';
    any_token_ = true;
  }
  text += c.text;
  if (raw_) {
    out += text;
    return;
  }
  // Final guard: never emit a partial UTF-8 sequence (also repairs invalid bytes that a raw GGUF
  // token may hold).
  tail_ += text;
  size_t keep = utf8_incomplete_tail(tail_);
  std::string_view ready(tail_.data(), tail_.size() - keep);
  if (utf8_is_valid(ready)) out.append(ready);
  else out += utf8_lossy(ready);
  tail_.erase(0, tail_.size() - keep);
}

void DecodeStream::feed(size_t step, Chunk c, std::string& out) {
  if (step == st_.size()) {
    sink(c, out);
    return;
  }
  const DecStep& d = t_.decoders[step];
  StepState& s = st_[step];
  switch (d.kind) {
    case DecKind::kByteLevel: {
      byte_level_unmap(c.text, s.buf);
      size_t keep = raw_ ? 0 : utf8_incomplete_tail(s.buf);
      if (s.buf.size() > keep) {
        std::string_view ready(s.buf.data(), s.buf.size() - keep);
        Chunk o{raw_ || utf8_is_valid(ready) ? std::string(ready) : utf8_lossy(ready), !s.flag};
        s.buf.erase(0, s.buf.size() - keep);
        s.flag = true;
        feed(step + 1, std::move(o), out);
      }
      return;
    }
    case DecKind::kByteFallback: {
      int b = (c.new_token && !s.post_fuse) ? byte_fallback_value(c.text) : -1;
      if (b >= 0) {
        s.buf += static_cast<char>(b);
        return;
      }
      flush_from(step, out);  // a non-byte token ends the run
      feed(step + 1, std::move(c), out);
      return;
    }
    case DecKind::kMetaspace: {
      if (c.new_token) ++s.count;
      bool first = s.count <= 1;  // HF: token index 0 drops the replacement instead of a space
      if (first && d.prepend) replace_str(c.text, d.replacement, "");
      else replace_str(c.text, d.replacement, " ");
      feed(step + 1, std::move(c), out);
      return;
    }
    case DecKind::kReplace: {
      if (!s.post_fuse || d.regex) {
        if (d.regex) replace_regex(c.text, *d.regex, d.content);
        else replace_str(c.text, d.pattern, d.content);
        feed(step + 1, std::move(c), out);
        return;
      }
      // Fused text arrives in chunks: hold back a tail that may be the start of a match.
      bool new_token = c.new_token && s.buf.empty();
      std::string text = s.buf + c.text;
      size_t keep = partial_match_suffix(text, d.pattern);
      s.buf = text.substr(text.size() - keep);
      text.resize(text.size() - keep);
      replace_str(text, d.pattern, d.content);
      if (!text.empty() || new_token) feed(step + 1, Chunk{std::move(text), new_token}, out);
      return;
    }
    case DecKind::kStrip: {
      if (!s.post_fuse) {  // per token
        std::string& t = c.text;
        size_t b = 0, cut = 0;
        for (size_t k = 0; k < d.strip_start && b < t.size(); ++k) {
          if (t.compare(b, d.content.size(), d.content) != 0) break;
          b += d.content.size();
          cut = b;
        }
        size_t e = t.size();
        for (size_t k = 0; k < d.strip_stop && e > cut; ++k) {
          if (e < d.content.size() || t.compare(e - d.content.size(), d.content.size(), d.content) != 0) break;
          e -= d.content.size();
        }
        t = t.substr(cut, e - cut);
        feed(step + 1, std::move(c), out);
        return;
      }
      std::string text = std::move(c.text);
      if (!s.flag) {  // leading: strip up to strip_start content chars at the start of the whole text
        size_t b = 0;
        while (s.count < d.strip_start && b < text.size() && text.compare(b, d.content.size(), d.content) == 0) {
          b += d.content.size();
          ++s.count;
        }
        text.erase(0, b);
        if (s.count >= d.strip_start || !text.empty()) s.flag = true;
        if (text.empty()) return;
      }
      if (d.strip_stop == 0) {
        feed(step + 1, Chunk{std::move(text), false}, out);
        return;
      }
      // trailing: hold the last strip_stop content chars until more text shows they are not final
      text = s.buf + text;
      size_t e = text.size(), held = 0;
      while (held < d.strip_stop && e >= d.content.size() &&
             text.compare(e - d.content.size(), d.content.size(), d.content) == 0) {
        e -= d.content.size();
        ++held;
      }
      s.buf = text.substr(e);
      text.resize(e);
      if (!text.empty()) feed(step + 1, Chunk{std::move(text), false}, out);
      return;
    }
    case DecKind::kFuse: {
      Chunk o{std::move(c.text), !s.flag};
      s.flag = true;
      feed(step + 1, std::move(o), out);
      return;
    }
  }
}

// Release what step `step` holds (end of a byte-fallback run, or end of stream).
void DecodeStream::flush_from(size_t step, std::string& out) {
  const DecStep& d = t_.decoders[step];
  StepState& s = st_[step];
  switch (d.kind) {
    case DecKind::kByteFallback: {
      if (s.buf.empty()) return;
      std::string run;
      run.swap(s.buf);
      if (raw_ || utf8_is_valid(run)) {
        feed(step + 1, Chunk{std::move(run), true}, out);
      } else {
        for (size_t k = 0; k < run.size(); ++k) feed(step + 1, Chunk{std::string(kReplacementChar), true}, out);
      }
      return;
    }
    case DecKind::kByteLevel: {
      if (s.buf.empty()) return;
      Chunk o{raw_ ? s.buf : utf8_lossy(s.buf), !s.flag};
      s.buf.clear();
      s.flag = true;
      feed(step + 1, std::move(o), out);
      return;
    }
    case DecKind::kReplace: {
      if (s.buf.empty()) return;
      std::string text;
      text.swap(s.buf);
      replace_str(text, d.pattern, d.content);
      feed(step + 1, Chunk{std::move(text), false}, out);
      return;
    }
    case DecKind::kStrip:
      s.buf.clear();  // trailing content chars of the whole text: stripped
      return;
    case DecKind::kMetaspace:
    case DecKind::kFuse:
      return;
  }
}

void DecodeStream::push(int32_t id, std::string& out) {
  if (id < 0 || static_cast<size_t>(id) >= t_.id_to_token.size()) return;  // HF: unknown ids are skipped
  if (skip_special_ && t_.special[id]) return;
  const std::string& tok = t_.id_to_token[id];
  if (tok.empty() && t_.model_vocab.find(tok) < 0 && t_.added_vocab.find(tok) < 0) return;  // a hole
  feed(0, Chunk{tok, true}, out);
}

void DecodeStream::finish(std::string& out) {
  for (size_t k = 0; k < st_.size(); ++k) flush_from(k, out);
  if (!tail_.empty()) {
    out += utf8_lossy(tail_);
    tail_.clear();
  }
}

void DecodeStream::discard_pending() {
  for (size_t k = 0; k < st_.size(); ++k) {
    switch (t_.decoders[k].kind) {
      case DecKind::kByteFallback:
      case DecKind::kByteLevel:
      case DecKind::kReplace:
      case DecKind::kStrip:
        st_[k].buf.clear();
        break;
      case DecKind::kMetaspace:
      case DecKind::kFuse:
        break;
    }
  }
  tail_.clear();
}

}  // namespace kiln::tok

namespace kiln {

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  tok::DecodeStream s(*impl_, skip_special_tokens);
  std::string out;
  for (int32_t id : ids) s.push(id, out);
  s.finish(out);
  return out;
}

std::string Tokenizer::decode_bytes(std::span<const int32_t> ids, bool skip_special_tokens) const {
  tok::DecodeStream s(*impl_, skip_special_tokens, /*raw=*/true);
  std::string out;
  for (int32_t id : ids) s.push(id, out);
  s.finish(out);
  return out;
}

IncrementalDecoder::IncrementalDecoder(std::shared_ptr<const Tokenizer> tok, bool skip_special_tokens)
    : tok_(std::move(tok)), stream_(std::make_unique<tok::DecodeStream>(tok_->impl(), skip_special_tokens)) {}
IncrementalDecoder::~IncrementalDecoder() = default;
IncrementalDecoder::IncrementalDecoder(IncrementalDecoder&&) noexcept = default;
IncrementalDecoder& IncrementalDecoder::operator=(IncrementalDecoder&&) noexcept = default;

void IncrementalDecoder::set_prefix(std::span<const int32_t> prompt_ids) {
  std::string ignored;
  for (int32_t id : prompt_ids) stream_->push(id, ignored);
  stream_->discard_pending();
}

std::string IncrementalDecoder::push(int32_t id) {
  std::string out;
  stream_->push(id, out);
  return out;
}

std::string IncrementalDecoder::flush() {
  std::string out;
  stream_->finish(out);
  return out;
}

}  // namespace kiln
