// kiln run MODEL --prompt TEXT | --prompt_ids 1,2,3: one prompt, streamed to the terminal, then
// prompt and decode speed. --output json prints one object instead, for scripts.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <memory>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_executor.h"
#include "cli/cli.h"
#include "cli/executor_factory.h"
#include "tokenizer/tokenizer.h"

namespace kiln::cli {
namespace {

struct RunArgs {
  std::string model, tokenizer, prompt, prompt_ids, output = "text", device = "auto";
  int32_t max_tokens = 128, top_k = 0, max_num_tokens = 512;
  float temperature = 0.0f, top_p = 1.0f, min_p = 0.0f, repetition_penalty = 1.0f;
  int64_t seed = -1;
  bool ignore_eos = false;
};

Result<std::vector<int32_t>> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t pos = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &pos);
    } catch (...) {
      pos = 0;
    }
    if (pos == 0 || pos != item.size() || v < 0 || v > INT32_MAX)
      return Status::error("--prompt_ids: '" + item + "' is not a token id");
    ids.push_back(int32_t(v));
  }
  if (ids.empty()) return Status::error("--prompt_ids: no ids given");
  return ids;
}

int run(const RunArgs& a) {
  using clock = std::chrono::steady_clock;
  if (a.prompt.empty() == a.prompt_ids.empty()) return fail("run", "give exactly one of --prompt and --prompt_ids");
  if (a.max_tokens < 1) return fail("run", "--max_tokens must be at least 1");
  if (a.output != "text" && a.output != "json") return fail("run", "--output must be text or json");

  auto t_load = clock::now();
  auto model = load_model(a.model);
  if (!model) return fail("run", model.message());
  const ModelConfig& c = (*model)->config;

  std::shared_ptr<const Tokenizer> tok;
  std::string tok_path = a.tokenizer.empty() ? a.model : a.tokenizer;
  if (auto t = Tokenizer::load(tok_path)) tok = *t;
  else if (!a.prompt.empty()) return fail("run", "cannot load a tokenizer from " + tok_path + ": " + t.message());

  std::vector<int32_t> prompt;
  if (!a.prompt_ids.empty()) {
    auto ids = parse_ids(a.prompt_ids);
    if (!ids) return fail("run", ids.message());
    prompt = *ids;
  } else {
    prompt = tok->encode(a.prompt, /*add_special_tokens=*/true);
  }
  if (prompt.empty()) return fail("run", "the prompt encodes to no tokens");
  for (int32_t id : prompt)
    if (id >= c.vocab_size)
      return fail("run", "prompt token id " + std::to_string(id) + " is outside the vocabulary (" +
                             std::to_string(c.vocab_size) + ")");
  const int32_t total = int32_t(prompt.size()) + a.max_tokens;
  if (total > c.max_position_embeddings)
    return fail("run", "prompt (" + std::to_string(prompt.size()) + " tokens) + max_tokens (" +
                           std::to_string(a.max_tokens) + ") exceeds the model's context (" +
                           std::to_string(c.max_position_embeddings) + ")");

  LoadOptions opts;
  opts.device = a.device;
  opts.kv_cache_blocks = (total + opts.block_size - 1) / opts.block_size;
  opts.max_batch_size = 1;
  use_engine_plan(a.model, a.device);  // a built engine: re-planned for this device, GEMM table handed over
  auto made = make_executor(*model, opts);
  if (!made) return fail("run", made.message());
  std::unique_ptr<ModelExecutor> ex = std::move(*made);
  const double load_s = std::chrono::duration<double>(clock::now() - t_load).count();

  SamplingParams sp;
  sp.temperature = a.temperature;
  sp.top_p = a.top_p;
  sp.top_k = a.top_k;
  sp.min_p = a.min_p;
  sp.repetition_penalty = a.repetition_penalty;
  sp.seed = a.seed >= 0 ? uint64_t(a.seed) : std::random_device{}();

  StepBatch b;
  std::vector<int32_t> table(size_t(opts.kv_cache_blocks));
  for (size_t i = 0; i < table.size(); ++i) table[i] = int32_t(i);
  std::vector<int32_t> all = prompt, generated;
  std::vector<SampledToken> out;
  std::unique_ptr<IncrementalDecoder> detok;
  if (tok) detok = std::make_unique<IncrementalDecoder>(tok, true);
  std::string text;
  auto emit = [&](const std::string& piece) {
    text += piece;
    if (a.output == "text" && !piece.empty()) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
  };
  const std::vector<int32_t>& eos = tok && !tok->eos_ids().empty() ? tok->eos_ids() : c.eos_token_ids;
  std::string finish = "length";
  int32_t computed = 0;
  auto t0 = clock::now();
  double prefill_s = 0.0;
  while (int32_t(generated.size()) < a.max_tokens) {
    // One step: the rest of the prompt in chunks of max_num_tokens, then one token at a time.
    const int32_t n = std::min<int32_t>(int32_t(all.size()) - computed, std::max(1, a.max_num_tokens));
    b.clear();
    for (int32_t i = 0; i < n; ++i) {
      b.token_ids.push_back(all[size_t(computed + i)]);
      b.positions.push_back(computed + i);
    }
    b.query_start.push_back(n);
    b.context_lens.push_back(computed + n);
    b.max_blocks_per_seq = int32_t(table.size());
    b.block_tables = table;
    const bool samples = computed + n == int32_t(all.size());
    std::vector<SeqSampling> ss;
    if (samples) {
      b.logits_rows.push_back(n - 1);
      SeqSampling s;
      s.params = &sp;
      s.prompt_ids = prompt.data();
      s.num_prompt = int32_t(prompt.size());
      s.output_ids = generated.data();
      s.num_output = int32_t(generated.size());
      ss.push_back(s);
    }
    if (Status st = ex->execute(b, ss, &out); !st) return fail("run", st.message());
    computed += n;
    if (!samples) continue;
    if (generated.empty()) prefill_s = std::chrono::duration<double>(clock::now() - t0).count();
    const int32_t id = out[0].id;
    generated.push_back(id);
    all.push_back(id);
    if (!a.ignore_eos && std::find(eos.begin(), eos.end(), id) != eos.end()) {
      finish = "stop";
      break;
    }
    if (detok) emit(detok->push(id));
    else if (a.output == "text") {
      std::printf("%s%d", generated.size() > 1 ? "," : "", id);
      std::fflush(stdout);
    }
  }
  if (detok) emit(detok->flush());
  const double total_s = std::chrono::duration<double>(clock::now() - t0).count();
  const double decode_s = total_s - prefill_s;
  const double prompt_tps = prefill_s > 0 ? double(prompt.size()) / prefill_s : 0.0;
  const double decode_tps = generated.size() > 1 && decode_s > 0 ? double(generated.size() - 1) / decode_s : 0.0;
  if (a.output == "json") {
    nlohmann::json j;
    j["prompt_ids"] = prompt;
    j["generated_ids"] = generated;
    j["text"] = tok ? nlohmann::json(text) : nlohmann::json(nullptr);
    j["finish_reason"] = finish;
    j["timings"] = {{"load_s", load_s}, {"prefill_s", prefill_s}, {"decode_s", decode_s},
                    {"prompt_tokens_per_s", prompt_tps}, {"decode_tokens_per_s", decode_tps}};
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::fprintf(stderr, "\n\nprompt: %zu tokens, %.1f tokens/s | decode: %zu tokens, %.1f tokens/s | %s\n",
                 prompt.size(), prompt_tps, generated.size(), decode_tps, finish.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace kiln::cli

KILN_VERB(run) {
  using namespace kiln::cli;
  static RunArgs a;
  auto* cmd = app.add_subcommand("run", "Generate from one prompt, streamed to the terminal");
  cmd->add_option("MODEL", a.model, "HF model directory or .gguf file")->required()->envname("KILN_MODEL");
  add_flag(*cmd, "prompt", a.prompt, "prompt text");
  add_flag(*cmd, "prompt_ids", a.prompt_ids, "prompt as comma-separated token ids");
  add_flag(*cmd, "tokenizer", a.tokenizer, "tokenizer dir/file (default: the model's)");
  add_flag(*cmd, "max_tokens", a.max_tokens, "tokens to generate (default 128)");
  add_flag(*cmd, "temperature", a.temperature, "0 = greedy (default 0)");
  add_flag(*cmd, "top_p", a.top_p, "nucleus sampling mass (default 1)");
  add_flag(*cmd, "top_k", a.top_k, "keep the k most likely tokens (0 = off)");
  add_flag(*cmd, "min_p", a.min_p, "drop tokens below min_p x the top probability");
  add_flag(*cmd, "repetition_penalty", a.repetition_penalty, "penalty for repeated tokens (1 = off)");
  add_flag(*cmd, "seed", a.seed, "random seed (default: random)");
  add_flag(*cmd, "max_num_tokens", a.max_num_tokens, "prompt tokens per forward step (default 512)");
  add_flag(*cmd, "output", a.output, "text | json");
  add_flag(*cmd, "device", a.device, "auto (default: the GPU when one answers, else cpu), cpu, cuda or cuda:N");
  add_switch(*cmd, "ignore_eos", a.ignore_eos, "keep generating past end-of-sequence");
  cmd->callback([] {
    if (int rc = run(a)) throw CLI::RuntimeError(rc);
  });
}
