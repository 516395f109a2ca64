// Tokenizer: Hugging Face tokenizer.json (BPE: byte-level and SentencePiece-style with byte
// fallback) and GGUF vocabularies (tokenizer.ggml.model gpt2 / llama), plus the special-token
// metadata of tokenizer_config.json / generation_config.json and incremental detokenization.
// Where the formats are silent we match Hugging Face tokenizers/transformers.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace kiln {

class GgufFile;  // src/formats/gguf.h

namespace tok {
struct TokenizerImpl;  // src/tokenizer/tokenizer_impl.h
class DecodeStream;    // src/tokenizer/decode_stream.h
}

class Tokenizer {
 public:
  // path: a directory (tokenizer.json + optional tokenizer_config.json, generation_config.json,
  // special_tokens_map.json), a tokenizer.json file, or a .gguf file.
  static Result<std::shared_ptr<const Tokenizer>> load(const std::string& path);
  static Result<std::shared_ptr<const Tokenizer>> from_gguf(const GgufFile& gguf);
  // Parse tokenizer.json text directly (tests, embedded tokenizers). `name` is used in errors.
  static Result<std::shared_ptr<const Tokenizer>> from_json_string(std::string_view json,
                                                                   const std::string& name = "tokenizer.json");

  // add_special_tokens: apply the post-processor (BOS etc.), as HF's encode(add_special_tokens=).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const;
  // As HF decode: the decoder pipeline over the ids' tokens; ids out of range are skipped; invalid
  // UTF-8 becomes U+FFFD (one per byte in a byte-fallback run, one per maximal invalid subpart for
  // byte-level tokens), so the result is always valid UTF-8.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;
  // decode() without the UTF-8 repair: the raw bytes the ids stand for (byte-level bytes and
  // <0xNN> byte-fallback bytes as they are, so one token of a multi-byte character gives its
  // partial bytes). For logprob token strings ("bytes" in the OpenAI API).
  std::string decode_bytes(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  int32_t vocab_size() const;
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::string id_to_token(int32_t id) const;  // raw vocab string ("" if out of range)
  bool is_special(int32_t id) const;

  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> pad_id() const;
  // From generation_config eos_token_id (int or list) + tokenizer_config eos_token, or gguf eos/eot.
  const std::vector<int32_t>& eos_ids() const;
  std::string bos_token() const;  // strings for chat templates ("" if none)
  std::string eos_token() const;
  bool add_bos() const;  // would encode(..., true) prepend BOS
  bool add_eos() const;  // would encode(..., true) append EOS
  // Chat templates from tokenizer_config.json (a string, or a list of {name, template}) or gguf
  // tokenizer.chat_template[.NAME].
  std::optional<std::string> chat_template(std::string_view name = "default") const;

  explicit Tokenizer(std::unique_ptr<tok::TokenizerImpl> impl);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;
  const tok::TokenizerImpl& impl() const { return *impl_; }

 private:
  std::unique_ptr<tok::TokenizerImpl> impl_;
};

// Streaming detokenizer, one per request. push() never returns a partial UTF-8 sequence, and the
// concatenation of everything push()/flush() return equals decode(all pushed ids, skip_special).
// Text is held back only while a later id could still change it: an incomplete UTF-8 sequence of
// byte-level tokens, a run of byte-fallback tokens <0xNN> (HF turns a whole run into U+FFFDs if any
// part is invalid), a trailing character a Strip decoder may remove.
// With set_prefix(prompt), the output is decode(prompt + generated) minus decode(prompt) (vLLM's
// behaviour: the first generated word keeps its leading space under Metaspace/Strip decoders).
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(std::shared_ptr<const Tokenizer> tok, bool skip_special_tokens = true);
  ~IncrementalDecoder();
  IncrementalDecoder(IncrementalDecoder&&) noexcept;
  IncrementalDecoder& operator=(IncrementalDecoder&&) noexcept;
  // Prompt ids the generated ids follow: they are decoded as context only (as vLLM does), so a
  // Metaspace tokenizer keeps the leading space of the first generated word.
  void set_prefix(std::span<const int32_t> prompt_ids);
  std::string push(int32_t id);  // newly complete text (may be empty)
  std::string flush();           // the rest; an invalid UTF-8 tail becomes U+FFFD as HF decode does

 private:
  std::shared_ptr<const Tokenizer> tok_;
  std::unique_ptr<tok::DecodeStream> stream_;
};

}  // namespace kiln
