// The decoder pipeline as a stream: ids go in one at a time and text comes out as soon as no
// later id can change it. Tokenizer::decode runs it to the end, IncrementalDecoder runs it step by
// step, so the streamed pieces concatenate to exactly the full decode.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kiln::tok {

struct TokenizerImpl;

class DecodeStream {
 public:
  // raw: no UTF-8 repair and no holding back of incomplete sequences (Tokenizer::decode_bytes).
  DecodeStream(const TokenizerImpl& t, bool skip_special_tokens, bool raw = false);
  void push(int32_t id, std::string& out);  // appends newly final text
  void finish(std::string& out);            // appends the rest; the stream is then spent
  // Drop text still held (a byte-fallback run, an incomplete UTF-8 tail) without emitting it, but
  // keep the position-dependent state (first token seen, leading strip done). Used after a prompt.
  void discard_pending();

 private:
  struct Chunk {
    std::string text;
    bool new_token;  // starts a new token (false: continues the current one, after a Fuse)
  };
  struct StepState {
    std::string buf;      // ByteLevel: undecoded bytes; ByteFallback: the run's bytes; Replace/Strip: held text
    size_t count = 0;     // Metaspace: tokens seen; Strip: leading chars stripped
    bool flag = false;    // ByteLevel/Fuse: something emitted; Strip: leading part done
    bool post_fuse = false;  // this step sees chunks of one fused token
  };
  void feed(size_t step, Chunk c, std::string& out);
  void flush_from(size_t step, std::string& out);
  void sink(const Chunk& c, std::string& out);

  const TokenizerImpl& t_;
  bool skip_special_;
  bool raw_;
  std::vector<StepState> st_;
  std::string tail_;  // incomplete UTF-8 at the very end of the output
  bool any_token_ = false;  // no-decoder join: a token has been output
};

}  // namespace kiln::tok
