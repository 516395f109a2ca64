// kiln info MODEL: what a model directory, GGUF file or engine holds (config, tensors by format,
// sizes, tokenizer and chat template presence). --output json for scripts.
#include <cstdio>
#include <map>

#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "core/file.h"
#include "model/weights.h"
#include "tokenizer/tokenizer.h"

namespace kiln::cli {
namespace {

std::string rope_name(const ModelConfig& c) {
  switch (c.rope_scaling) {
    case RopeScaling::kNone: return "none";
    case RopeScaling::kLinear: return "linear x" + std::to_string(c.rope_factor);
    case RopeScaling::kLlama3: return "llama3 x" + std::to_string(c.rope_factor);
  }
  return "?";
}

int info(const std::string& path, const std::string& output) {
  auto model = load_model(path);
  if (!model) return fail("info", model.message());
  const ModelConfig& c = (*model)->config;
  const ModelWeights& w = (*model)->weights;
  std::map<std::string, int> formats;
  auto count = [&](const Weight& x) {
    if (!x.empty()) formats[std::string(weight_format_name(x))]++;
  };
  count(w.embed);
  count(w.final_norm);
  if (w.lm_head.data != w.embed.data) count(w.lm_head);
  for (const auto& l : w.layers)
    for (const Weight* x : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv, &l.q_norm, &l.k_norm,
                            &l.ffn_norm, &l.w_gate, &l.w_up, &l.w_down})
      count(*x);
  auto tok = Tokenizer::load(path);
  nlohmann::json j = {
      {"path", path},
      {"architecture", c.arch_name},
      {"family", std::string(arch_name(c.arch))},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_layers", c.num_layers},
      {"num_heads", c.num_heads},
      {"num_kv_heads", c.num_kv_heads},
      {"head_dim", c.head_dim},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rope_theta", c.rope_theta},
      {"rope_scaling", rope_name(c)},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"eos_token_ids", c.eos_token_ids},
      {"weight_bytes", w.total_bytes()},
      {"tensor_formats", formats},
      {"tokenizer", tok.is_ok() ? nlohmann::json("yes") : nlohmann::json(tok.message())},
      {"chat_template", tok.is_ok() && (*tok)->chat_template().has_value()},
  };
  if (output == "json") {
    std::printf("%s\n", j.dump(1).c_str());
    return 0;
  }
  for (auto& [k, v] : j.items()) std::printf("%-24s %s\n", k.c_str(), v.is_string() ? v.get<std::string>().c_str() : v.dump().c_str());
  return 0;
}

}  // namespace
}  // namespace kiln::cli

KILN_VERB(info) {
  using namespace kiln::cli;
  static std::string path, output = "text";
  auto* cmd = app.add_subcommand("info", "Describe a model directory, .gguf file or engine");
  cmd->add_option("MODEL", path, "HF model directory, .gguf file or engine directory")->required();
  add_flag(*cmd, "output", output, "text | json");
  cmd->callback([] {
    if (int rc = info(path, output)) throw CLI::RuntimeError(rc);
  });
}
