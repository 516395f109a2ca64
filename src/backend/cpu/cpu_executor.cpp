#include "backend/cpu/cpu_executor.h"

#include <algorithm>
#include <cstdlib>

#include "backend/cpu/sampler.h"
#include "core/log.h"

namespace kiln {

Result<bool> resolve_kv_cache_fp8(const std::string& dtype, bool checkpoint_fp8) {
  std::string d = dtype.empty() ? "auto" : dtype;
  std::string from = "--kv_cache_dtype";
  if (d == "auto")
    if (const char* e = std::getenv("KILN_KV_CACHE_DTYPE"); e && *e) d = e, from = "KILN_KV_CACHE_DTYPE";
  if (d == "auto") return checkpoint_fp8;
  if (d == "fp8") return true;
  if (d == "bf16") return false;
  return Status::error(from + " '" + d + "': expected auto, fp8 or bf16");
}

CpuExecutor::CpuExecutor(std::shared_ptr<const Model> model, const LoadOptions& opts) : model_(std::move(model)) {
  const ModelConfig& c = model_->config;
  int32_t max_seq = opts.max_seq_len > 0 ? opts.max_seq_len : c.max_position_embeddings;
  int32_t blocks = opts.kv_cache_blocks;
  if (blocks <= 0) {
    size_t per = CpuKvCache::bytes_per_block(c, opts.block_size);
    blocks = int32_t(std::max<size_t>(1, opts.kv_cache_memory_bytes / per));
  }
  kv_.init(c, blocks, opts.block_size);
  Result<bool> fp8 = resolve_kv_cache_fp8(opts.kv_cache_dtype, model_->weights.fp8_kv_cache);
  if (!fp8) log_warn(fp8.message() + "; using the checkpoint's KV cache type");  // a constructor: no status to return
  if (fp8 ? *fp8 : model_->weights.fp8_kv_cache) {
    std::vector<float> ks, vs;
    for (const LayerWeights& l : model_->weights.layers) {
      ks.push_back(l.k_scale);
      vs.push_back(l.v_scale);
    }
    kv_.set_fp8(std::move(ks), std::move(vs));
  }
  ops_ = std::make_unique<CpuOps>(model_->config, &kv_);
  info_.vocab_size = c.vocab_size;
  info_.block_size = opts.block_size;
  info_.num_kv_blocks = blocks;
  info_.max_seq_len = max_seq;
  info_.eos_ids = c.eos_token_ids;
  info_.device = "cpu";
}

Status CpuExecutor::execute(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                            std::vector<SampledToken>* out) {
  std::vector<TokenLogprob> none;
  return execute_with_prompt_logprobs(batch, sampling, out, &none);
}

Status CpuExecutor::execute_with_prompt_logprobs(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                                                 std::vector<SampledToken>* out,
                                                 std::vector<TokenLogprob>* prompt_out) {
  if (sampling.size() + batch.prompt_logprob_rows.size() != batch.logits_rows.size())
    return Status::error("internal: " + std::to_string(sampling.size()) + " sampling entries and " +
                         std::to_string(batch.prompt_logprob_rows.size()) + " prompt logprob rows for " +
                         std::to_string(batch.logits_rows.size()) + " logits rows");
  for (int32_t id : batch.token_ids)
    if (id < 0 || id >= info_.vocab_size)
      return Status::error("token id " + std::to_string(id) + " is outside the vocabulary (" +
                           std::to_string(info_.vocab_size) + ")");
  forward(model_->config, model_->weights, *ops_, batch);
  out->resize(sampling.size());
  const float* logits = ops_->logits();
  const int32_t V = info_.vocab_size;
  for (size_t i = 0; i < sampling.size(); ++i) (*out)[i] = sample_token(logits + i * size_t(V), V, sampling[i]);
  prompt_out->clear();
  for (size_t j = 0; j < batch.prompt_logprob_rows.size(); ++j) {
    const StepBatch::PromptLogprobRow& p = batch.prompt_logprob_rows[j];
    prompt_out->push_back(token_logprob(logits + (sampling.size() + j) * size_t(V), V, p.target_id, p.top_k));
  }
  return Status::ok();
}

std::unique_ptr<CpuExecutor> make_cpu_executor(std::shared_ptr<const Model> model, const LoadOptions& opts) {
  return std::make_unique<CpuExecutor>(std::move(model), opts);
}

Result<std::unique_ptr<ModelExecutor>> load_cpu_executor(const std::string& model_path, const LoadOptions& opts) {
  if (opts.device != "cpu")
    return Status::error("device '" + opts.device + "' is not available in this build (cpu is)");
  KILN_ASSIGN_OR_RETURN(auto model, load_model(model_path));
  KILN_RETURN_IF_ERROR(resolve_kv_cache_fp8(opts.kv_cache_dtype, model->weights.fp8_kv_cache).status());
  std::unique_ptr<ModelExecutor> ex = make_cpu_executor(std::move(model), opts);
  return ex;
}

}  // namespace kiln
