// ModelExecutor on the CPU: the model, a host KV cache and the host sampler.
#pragma once
#include <memory>
#include <string>

#include "backend/cpu/cpu_ops.h"
#include "model/executor.h"
#include "model/weights.h"

namespace kiln {

struct LoadOptions {
  std::string device = "cpu";        // "cpu" | "cuda" | "cuda:N"
  int32_t kv_cache_blocks = 0;       // 0: from kv_cache_memory (CPU) or memory fraction (GPU)
  double kv_cache_memory_fraction = 0.9;  // GPU: of free memory after weights
  size_t kv_cache_memory_bytes = size_t(1) << 30;  // CPU default budget: 1 GiB
  int32_t block_size = 16;
  int32_t max_seq_len = 0;           // 0: the model's max_position_embeddings
  // KV cache element type: "auto" (env KILN_KV_CACHE_DTYPE if set, else what the checkpoint says:
  // ModelWeights::fp8_kv_cache), "fp8" (E4M3 with the layers' k_scale/v_scale, 1.0 when the
  // checkpoint has none) or "bf16" (the CPU keeps f32). The CPU stores f32 either way but rounds
  // every k/v value through FP8 as the GPU stores it, so it stays the reference.
  std::string kv_cache_dtype = "auto";
  // Weight precision on the GPU: "auto" keeps FP8 matrices FP8 where the GPU has FP8 tensor cores
  // (sm_89+; else they are dequantized to bf16 on upload), "bf16" always dequantizes, "fp8" also
  // makes dummy weights FP8 (benchmarks). The CPU backend reads weights as they are stored.
  std::string quantization = "auto";
  // The most sequences a step will decode (the engine's max batch size; 0: not known). At 1..4 the
  // GPU decodes with GEMVs only, and an FP8 model gets a tiled copy of each matrix for them
  // (kiln::cuda launch_tile_fp8: ~4-5 % faster batch-1 steps on the H100 for twice the FP8 weight
  // memory; KILN_FP8_TILED=0 turns it off). The CPU ignores it.
  int32_t max_batch_size = 0;
};

// True when the run uses an FP8 KV cache: `dtype` as in LoadOptions::kv_cache_dtype. An unknown
// value is an error naming the accepted ones.
[[nodiscard]] Result<bool> resolve_kv_cache_fp8(const std::string& dtype, bool checkpoint_fp8);

class CpuExecutor final : public ModelExecutor {
 public:
  CpuExecutor(std::shared_ptr<const Model> model, const LoadOptions& opts);
  const ExecutorInfo& info() const override { return info_; }
  Status execute(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                 std::vector<SampledToken>* out) override;
  Status execute_with_prompt_logprobs(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                                      std::vector<SampledToken>* out, std::vector<TokenLogprob>* prompt_out) override;
  // Logits of the last step, [logits_rows, vocab] (tests, golden comparisons).
  const float* last_logits() const { return ops_->logits(); }
  const Model& model() const { return *model_; }

 private:
  std::shared_ptr<const Model> model_;
  CpuKvCache kv_;
  std::unique_ptr<CpuOps> ops_;
  ExecutorInfo info_;
};

Result<std::unique_ptr<ModelExecutor>> load_cpu_executor(const std::string& model_path, const LoadOptions& opts);
std::unique_ptr<CpuExecutor> make_cpu_executor(std::shared_ptr<const Model> model, const LoadOptions& opts);

}  // namespace kiln
