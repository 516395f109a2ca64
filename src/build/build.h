// kiln build: a kiln checkpoint + limits -> an engine directory (docs/engine-format.md): the
// checkpoint's files, config.json with "build_config", and plan.json (device, CUDA-graph batch
// buckets, KV-cache sizing, GEMM algorithm choices). An engine is never refused on another
// device: replan_if_needed() redoes plan.json for the device at hand, with a warning.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.h"
#include "model/engine_dir.h"

namespace kiln {

struct BuildLimits {
  int32_t max_batch_size = 256;
  int32_t max_input_len = 0;    // 0: min(1024, max_seq_len)
  int32_t max_seq_len = 0;       // 0: the model's max_position_embeddings
  int32_t max_num_tokens = 8192;  // tokens per step (prefill chunk budget)
};

struct BuildOptions {
  std::string checkpoint_dir;
  std::string output_dir;
  BuildLimits limits;
  // Accepted for TensorRT-LLM command compatibility; kiln always uses its own GEMM and attention.
  std::string gemm_plugin = "auto";
  std::string gpt_attention_plugin = "auto";
  std::string device_name = "cpu";  // what to plan for: "cpu" or a GPU's name (CUDA side)
};

struct KvSizing {
  int32_t block_size = 16;
  std::string dtype;            // the GPU cache's element type: "fp8_e4m3" | "bfloat16" | ...
  int64_t bytes_per_token = 0;  // all layers, K and V, in `dtype`
  int64_t blocks_for_limits = 0;  // max_batch_size full-length sequences
  int64_t bytes_for_limits = 0;
};

struct EnginePlan {
  std::string device = "cpu";       // "cpu" | "cuda"
  std::string device_name = "cpu";  // "cpu" or the GPU's name ("NVIDIA H100 80GB HBM3")
  std::vector<int32_t> cuda_graph_batch_sizes;  // powers of two up to max_batch_size
  KvSizing kv;
  // GEMM algorithm per (weight shape, M bucket), chosen by timing on the GPU; empty on the CPU.
  nlohmann::json gemm_algorithms = nlohmann::json::object();
  BuildLimits limits;

  nlohmann::json to_json() const;
  static Result<EnginePlan> from_json(const nlohmann::json& j, const std::string& where);
};

// The GPU side installs this to time GEMM algorithms for a plan (fills gemm_algorithms); with
// none installed (CPU build) the field stays empty.
using GemmPlanner = std::function<Status(const KilnDirInfo& info, EnginePlan* plan)>;
void set_gemm_planner(GemmPlanner planner);

// Power-of-two buckets 1, 2, 4, ... up to and including max_batch_size.
std::vector<int32_t> graph_batch_buckets(int32_t max_batch_size);
KvSizing kv_sizing(const KilnDirInfo& info, const BuildLimits& limits, int32_t block_size = 16);
// Validates limits against the model (errors name the flag and both numbers); fills max_seq_len.
Result<BuildLimits> resolve_limits(const ModelConfig& c, BuildLimits limits);
Result<EnginePlan> make_plan(const KilnDirInfo& info, const BuildLimits& limits, const std::string& device_name);

struct BuildResult {
  EnginePlan plan;
  std::vector<std::string> files;
};
Result<BuildResult> build_engine(const BuildOptions& opts);

// Why a plan made for this very device still cannot be used ("" when it can): the CUDA side says
// so when its GEMM algorithms come from another cuBLASLt version or cannot be read.
using PlanCheck = std::function<std::string(const EnginePlan& plan)>;

// The engine's plan for `device_name` ("cpu" or a GPU name). If plan.json was made for another
// device (or `check` finds it stale), or is missing (a plain checkpoint), a new plan is made with a
// warning naming both devices, and written back when the directory is writable. Never refuses to
// run on a different device.
Result<EnginePlan> replan_if_needed(const std::string& engine_dir, const std::string& device_name,
                                    const PlanCheck& check = {});

// What `kiln serve|run|bench ENGINE` does before loading: for a built engine (a kiln directory
// with plan.json) its plan for this device, re-planned when needed (replan_if_needed); nullopt for
// anything else (HF directory, GGUF file, a checkpoint never built), which runs on heuristics.
Result<std::optional<EnginePlan>> engine_plan_for_run(const std::string& path, const std::string& device_name,
                                                      const PlanCheck& check = {});

}  // namespace kiln
