// Tokenizer: loading (directory, tokenizer.json, .gguf) and the metadata accessors.
#include "tokenizer/tokenizer.h"

#include "core/file.h"
#include "formats/gguf.h"
#include "tokenizer/load.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln {

Tokenizer::Tokenizer(std::unique_ptr<tok::TokenizerImpl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

static bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

static std::string dir_of(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash == 0 ? 1 : slash);
}

Result<std::shared_ptr<const Tokenizer>> Tokenizer::load(const std::string& path) {
  if (is_directory(path)) {
    std::string json_path = path + (ends_with(path, "/") ? "" : "/") + "tokenizer.json";
    if (!file_exists(json_path)) {
      // A kiln checkpoint or engine converted from a GGUF keeps its vocabulary as tokenizer.gguf.
      std::string gguf_path = path + (ends_with(path, "/") ? "" : "/") + "tokenizer.gguf";
      if (file_exists(gguf_path)) return load(gguf_path);
      return Status::error(path + ": no tokenizer.json (or tokenizer.gguf) in this directory");
    }
    KILN_ASSIGN_OR_RETURN(std::string text, read_file(json_path));
    KILN_ASSIGN_OR_RETURN(auto impl, tok::parse_tokenizer_json(text, json_path));
    KILN_RETURN_IF_ERROR(tok::apply_hf_configs(*impl, path));
    tok::guess_eos(*impl);
    return std::shared_ptr<const Tokenizer>(std::make_shared<Tokenizer>(std::move(impl)));
  }
  if (!file_exists(path)) return Status::error(path + ": no such file or directory");
  if (ends_with(path, ".gguf")) {
    KILN_ASSIGN_OR_RETURN(auto gguf, GgufFile::open(path));
    return from_gguf(gguf);
  }
  // A tokenizer.json file; its sibling config files (if any) belong to it.
  KILN_ASSIGN_OR_RETURN(std::string text, read_file(path));
  KILN_ASSIGN_OR_RETURN(auto impl, tok::parse_tokenizer_json(text, path));
  KILN_RETURN_IF_ERROR(tok::apply_hf_configs(*impl, dir_of(path)));
  tok::guess_eos(*impl);
  return std::shared_ptr<const Tokenizer>(std::make_shared<Tokenizer>(std::move(impl)));
}

Result<std::shared_ptr<const Tokenizer>> Tokenizer::from_gguf(const GgufFile& gguf) {
  KILN_ASSIGN_OR_RETURN(auto impl, tok::parse_gguf_vocab(gguf));
  return std::shared_ptr<const Tokenizer>(std::make_shared<Tokenizer>(std::move(impl)));
}

Result<std::shared_ptr<const Tokenizer>> Tokenizer::from_json_string(std::string_view json, const std::string& name) {
  KILN_ASSIGN_OR_RETURN(auto impl, tok::parse_tokenizer_json(json, name));
  tok::guess_eos(*impl);
  return std::shared_ptr<const Tokenizer>(std::make_shared<Tokenizer>(std::move(impl)));
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  int32_t id = impl_->token_id(token);
  return id >= 0 ? std::optional<int32_t>(id) : std::nullopt;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return impl_->id_to_token[id];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->special[id] != 0;
}

std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos_id; }
std::optional<int32_t> Tokenizer::pad_id() const { return impl_->pad_id; }
const std::vector<int32_t>& Tokenizer::eos_ids() const { return impl_->eos_ids; }
std::string Tokenizer::bos_token() const { return impl_->bos_token; }
std::string Tokenizer::eos_token() const { return impl_->eos_token; }
bool Tokenizer::add_bos() const { return !impl_->post_prefix.empty(); }
bool Tokenizer::add_eos() const { return !impl_->post_suffix.empty(); }

std::optional<std::string> Tokenizer::chat_template(std::string_view name) const {
  auto it = impl_->chat_templates.find(name);
  if (it == impl_->chat_templates.end()) return std::nullopt;
  return it->second;
}

}  // namespace kiln
