// kiln perplexity MODEL --file TEXT: perplexity of a model on a text, in windows of --ctx tokens
// (each window scored on its own, every token after the window's first), fed --batch tokens per
// step with logits for every row. --output json adds the per-token NLL and argmax, so two models
// (BF16 vs FP8) can be compared token by token (tools/fp8_accuracy.py).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_executor.h"
#include "cli/cli.h"
#include "core/file.h"
#include "tokenizer/tokenizer.h"

namespace kiln::cli {
namespace {

struct PplArgs {
  std::string model, file, tokenizer, output = "text";
  int32_t ctx = 512, batch = 128;
};

int perplexity(const PplArgs& a) {
  using clock = std::chrono::steady_clock;
  if (a.ctx < 2) return fail("perplexity", "--ctx must be at least 2");
  if (a.batch < 1) return fail("perplexity", "--batch must be at least 1");
  if (a.output != "text" && a.output != "json") return fail("perplexity", "--output must be text or json");
  auto text = read_file(a.file);
  if (!text) return fail("perplexity", text.message());
  auto model = load_model(a.model);
  if (!model) return fail("perplexity", model.message());
  std::string tok_path = a.tokenizer;
  if (tok_path.empty()) {
    tok_path = a.model;
    // A checkpoint converted from GGUF keeps its vocabulary in tokenizer.gguf.
    if (is_directory(a.model) && !file_exists(a.model + "/tokenizer.json") && file_exists(a.model + "/tokenizer.gguf"))
      tok_path = a.model + "/tokenizer.gguf";
  }
  auto tok = Tokenizer::load(tok_path);
  if (!tok) return fail("perplexity", "cannot load a tokenizer from " + tok_path + ": " + tok.message());
  const std::vector<int32_t> ids = (*tok)->encode(*text, /*add_special_tokens=*/true);
  if (ids.size() < 2) return fail("perplexity", a.file + ": fewer than 2 tokens");
  const ModelConfig& c = (*model)->config;
  const int32_t ctx = std::min<int32_t>(a.ctx, c.max_position_embeddings);

  LoadOptions opts;
  opts.kv_cache_blocks = (ctx + opts.block_size - 1) / opts.block_size;
  auto ex = make_cpu_executor(*model, opts);
  const int32_t V = c.vocab_size;
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  std::vector<double> nll;
  std::vector<int32_t> argmax;
  std::vector<SampledToken> out;
  auto t0 = clock::now();
  for (size_t w0 = 0; w0 + 1 < ids.size(); w0 += size_t(ctx)) {
    const int32_t n = int32_t(std::min<size_t>(size_t(ctx), ids.size() - w0));
    for (int32_t s0 = 0; s0 < n; s0 += a.batch) {
      const int32_t m = std::min(a.batch, n - s0);
      StepBatch b;
      b.clear();
      std::vector<SeqSampling> ss;
      for (int32_t i = 0; i < m; ++i) {
        b.token_ids.push_back(ids[w0 + size_t(s0 + i)]);
        b.positions.push_back(s0 + i);
        b.logits_rows.push_back(i);
        SeqSampling s;
        s.params = &greedy;
        ss.push_back(s);
      }
      b.query_start.push_back(m);
      b.context_lens.push_back(s0 + m);
      b.max_blocks_per_seq = opts.kv_cache_blocks;
      for (int32_t i = 0; i < opts.kv_cache_blocks; ++i) b.block_tables.push_back(i);
      Status st = ex->execute(b, ss, &out);
      if (!st) return fail("perplexity", st.message());
      const float* logits = static_cast<const CpuExecutor*>(ex.get())->last_logits();
      for (int32_t i = 0; i < m; ++i) {
        const int32_t pos = s0 + i;
        if (pos + 1 >= n) break;  // the window's last token predicts nothing inside it
        const float* row = logits + size_t(i) * size_t(V);
        const float mx = *std::max_element(row, row + V);
        double sum = 0.0;
        for (int32_t v = 0; v < V; ++v) sum += std::exp(double(row[v] - mx));
        const int32_t target = ids[w0 + size_t(pos) + 1];
        nll.push_back(std::log(sum) - double(row[target] - mx));
        argmax.push_back(int32_t(std::max_element(row, row + V) - row));
      }
    }
  }
  const double secs = std::chrono::duration<double>(clock::now() - t0).count();
  double mean = 0.0;
  for (double x : nll) mean += x;
  mean /= double(nll.size());
  const double ppl = std::exp(mean);
  if (a.output == "json") {
    nlohmann::json j = {{"model", a.model},       {"file", a.file},         {"tokens", ids.size()},
                        {"scored", nll.size()},   {"ctx", ctx},             {"mean_nll", mean},
                        {"perplexity", ppl},      {"seconds", secs},        {"nll", nll},
                        {"argmax", argmax}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("perplexity %.4f  (mean NLL %.5f over %zu tokens of %zu, ctx %d, %.1f s)\n", ppl, mean, nll.size(),
                ids.size(), ctx, secs);
  }
  return 0;
}

}  // namespace
}  // namespace kiln::cli

KILN_VERB(perplexity) {
  using namespace kiln::cli;
  static PplArgs a;
  auto* cmd = app.add_subcommand("perplexity", "Perplexity of a model on a text file (CPU)");
  cmd->add_option("MODEL", a.model, "HF model directory, .gguf file, kiln checkpoint or engine")->required();
  add_flag(*cmd, "file", a.file, "UTF-8 text file")->required();
  add_flag(*cmd, "tokenizer", a.tokenizer, "tokenizer (default: the model's)");
  add_flag(*cmd, "ctx", a.ctx, "window length in tokens; windows are scored independently");
  add_flag(*cmd, "batch", a.batch, "tokens per forward step");
  add_flag(*cmd, "output", a.output, "text | json (json adds per-token nll and argmax)");
  cmd->callback([] {
    if (int rc = perplexity(a)) throw CLI::RuntimeError(rc);
  });
}
