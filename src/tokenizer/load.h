// Loaders behind Tokenizer::load / from_gguf (internal).
#pragma once
#include <memory>
#include <string>
#include <string_view>

#include "core/status.h"

namespace kiln {
class GgufFile;
}

namespace kiln::tok {

struct TokenizerImpl;

Result<std::unique_ptr<TokenizerImpl>> parse_tokenizer_json(std::string_view text, const std::string& file);
// tokenizer_config.json, generation_config.json, special_tokens_map.json in `dir`, each optional.
Status apply_hf_configs(TokenizerImpl& t, const std::string& dir);
void guess_eos(TokenizerImpl& t);
Result<std::unique_ptr<TokenizerImpl>> parse_gguf_vocab(const GgufFile& gguf);

}  // namespace kiln::tok
