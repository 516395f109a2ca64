// The GEMM planner of `kiln build` (and of a re-plan at load on another GPU): for every GEMM the
// forward pass issues (fused qkv, o, gate_up, down; lm_head) and every M bucket (CUDA-graph decode
// sizes above the GEMV threshold, prefill chunk sizes), times the cuBLASLt heuristic's candidates
// on this GPU (at M <= 512 also their split-K variants and a wider search over the configurations
// cuBLASLt lists: FP8 8B decode GEMMs up to -30% on an H100, docs/PERF_cuda.md) and records the
// fastest in plan.json's gemm_algorithms (docs/engine-format.md).
// Gemm (gemm.h) reads the table back at run time.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <nlohmann/json.hpp>

#include "backend/cuda/gemm.h"
#include "build/build.h"  // EnginePlan (header-only use: this library does not link kiln_build)
#include "core/status.h"
#include "model/engine_dir.h"

namespace kiln::cuda {

// Visible GPUs (0 without a driver or device) and a GPU's name ("NVIDIA H100 80GB HBM3").
int gpu_count();
Result<std::string> gpu_name(int device);
// sm_89 or newer: FP8 tensor cores.
bool gpu_has_fp8(int device);

struct GemmPlanShape {
  std::string name;  // "qkv" | "o" | "gate_up" | "down" | "o_acc" | "down_acc" | "lm_head"
  GemmKey key;
};
// The GEMMs to time for a model: rank-local weight shapes (tp_size) x M buckets. Linears are FP8
// when `fp8` (then outer_vec when weight scales are per channel or activations per token); lm_head
// is bf16 with f32 output and only decode buckets (it sees one row per sequence). FP8 o / down are
// planned twice: bf16 out (fp8) and into the f32 residual (fp8_acc, "o_acc" / "down_acc"). M <=
// gemv_max_m goes to kiln's GEMV and is not planned.
std::vector<GemmPlanShape> gemm_plan_shapes(const KilnDirInfo& info, bool fp8, const std::vector<int32_t>& graph_sizes,
                                            int32_t max_num_tokens, int gemv_max_m);

// Device buffers to time GEMMs over: random x and weights, unit scales, and enough weight copies
// (rotated per repetition) that a weight is never served from L2.
class GemmBench {
 public:
  ~GemmBench();
  [[nodiscard]] Status init(int device);
  Gemm& gemm() { return gemm_; }
  // Median microseconds of one call of `algo` over `reps` repetitions after `warmup`.
  Result<double> time_us(const GemmKey& key, const GemmAlgo& algo, int warmup, int reps);
  // Gemm::enumerated_algorithms for key's weight shape (listed once per (kind, N, K, outer_vec) and
  // cached: listing checks ~20k configurations), filtered by cublasLtMatmulAlgoCheck for key.n.
  std::vector<GemmAlgo> listed_algorithms(const GemmKey& key, double* list_seconds = nullptr);
  // One call on the first weight copy; `y` (host) gets the output as f32 [n, N].
  [[nodiscard]] Status run_to_host(const GemmKey& key, const GemmAlgo& algo, std::vector<float>* y);

 private:
  [[nodiscard]] Status prepare(const GemmKey& key);
  [[nodiscard]] Status grow(void** p, size_t* have, size_t want, const char* what);
  Gemm gemm_;
  cudaStream_t stream_ = nullptr;
  size_t l2_bytes_ = 0;
  void* x_ = nullptr;
  size_t x_bytes_ = 0;
  void* y_ = nullptr;
  size_t y_bytes_ = 0;
  void* w_ = nullptr;  // weight pool: copies at a stride of one weight
  size_t w_bytes_ = 0;
  float* ones_ = nullptr;
  size_t ones_bytes_ = 0;
  GemmKind filled_kind_ = GemmKind::kBf16;
  size_t x_filled_ = 0, w_filled_ = 0;
  std::vector<cudaEvent_t> events_;
  std::map<GemmKey, std::vector<GemmAlgo>> listed_;  // key.n = 0
};

struct GemmPlanOptions {
  int device = 0;
  int warmup = 3;
  int reps = 10;
  int max_algos = 8;
  // Another candidate replaces the heuristic's first only when faster by more than this fraction:
  // a 1% "win" is timing noise and would make plans differ from run to run.
  double min_gain = 0.02;
  // Split-K variants of every heuristic candidate (cuBLASLt's CUBLASLT_ALGO_CONFIG_SPLITK_NUM, f32
  // partial sums) are timed too for M <= split_k_max_m: at decode sizes a 128-wide tile grid has
  // N/128 CTAs for 132 SMs, each walking all of K. Empty: none.
  std::vector<int> split_k = {2, 3, 4, 6, 8};
  int64_t split_k_max_m = 512;
  // At the same M, beyond the heuristic's list: every (algorithm id, tile, stages, cluster shape)
  // cuBLASLt accepts (Gemm::enumerated_algorithms), timed briefly (median of search_reps), the
  // search_finalists fastest and their split-K variants then timed as candidates. bf16 and fp8
  // only (lm_head's vocab-wide N fills the GPU with any tile). Measured on the H100: FP8 o/down at
  // M = 256 -21%/-24% (64x128 tiles, smaller clusters), where the heuristic offers one candidate.
  bool search = true;
  int search_reps = 3;
  int search_finalists = 4;
};

// One GEMM's planning result.
struct GemmPlanResult {
  GemmAlgo algo;              // the chosen algorithm
  GemmAlgo heuristic;         // the heuristic's first
  double us = 0;              // chosen, median
  double heuristic_us = -1;   // the heuristic's first, median (-1: it did not run)
  int heuristic_rank = 0;     // the chosen algorithm's (or its unsplit base's) rank in the heuristic's list; -1: the wider search
  int split_k = 1;            // the chosen algorithm's K splits
  int candidates = 0;         // configurations timed
  int split_k_candidates = 0; // of which split-K variants
  int searched = 0;           // configurations of the wider search timed briefly (search)
  double search_seconds = 0;  // wall time of the wider search (listing included)
  double list_seconds = 0;    // of which listing (once per weight shape)
  std::string split_k_why;    // why the heuristic's first gave no split-K variant ("" if it gave some)
};
// Times the heuristic's candidates for `key` (and their split-K variants, per `o`) on `bench`'s GPU
// and picks the fastest; another than the heuristic's first only when faster by more than o.min_gain
// on a second, interleaved measurement of both (a single median of the first candidate timed can
// catch the clocks ramping up).
Result<GemmPlanResult> plan_gemm(GemmBench& bench, const GemmKey& key, const GemmPlanOptions& o);

// Fills plan->gemm_algorithms for `info` on GPU o.device: {cublaslt_version, device_name,
// planner: {...}, entries: [{shape, kind, M, N, K, outer_vec, algo, us, heuristic_us, heuristic_rank,
// split_k, candidates}]}.
[[nodiscard]] Status plan_gemm_algorithms(const KilnDirInfo& info, EnginePlan* plan, const GemmPlanOptions& o = {});

// plan.json's gemm_algorithms as a table usable on GPU `device`, or an error saying why not
// (malformed, other cuBLASLt version, other GPU): the caller re-plans.
Result<std::shared_ptr<const GemmAlgoTable>> usable_gemm_table(const nlohmann::json& gemm_algorithms, int device);

}  // namespace kiln::cuda
