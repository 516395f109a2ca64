// BF16 GEMMs through cuBLASLt, loaded with dlopen at run time so the kiln binary starts (and serves
// on the CPU) on machines without the CUDA libraries; a missing library is a clear error.
//
// Algorithm choice: by default the heuristic's first algorithm. An engine's plan.json carries a
// table of algorithms chosen by timing on the GPU (src/backend/cuda/gemm_plan.h); a Gemm with a
// table uses the table's algorithm for a planned shape, the nearest planned M of the same weight
// shape otherwise, and the heuristic when cublasLtMatmulAlgoCheck rejects either.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <cuda_runtime_api.h>
#include <nlohmann/json.hpp>

#include "core/status.h"

namespace kiln::cuda {

// Which cuBLASLt matmul: bf16 x bf16 -> bf16, bf16 x bf16 -> f32 (lm_head), FP8 E4M3 -> bf16, FP8
// E4M3 added into f32 (C = D = y, beta = 1: linear_fp8_accumulate, o_proj / down_proj into the
// residual).
enum class GemmKind : uint8_t { kBf16, kBf16F32Out, kFp8, kFp8Acc };
std::string_view gemm_kind_name(GemmKind k);  // "bf16" | "bf16_f32out" | "fp8" | "fp8_acc"
inline bool gemm_kind_fp8(GemmKind k) { return k == GemmKind::kFp8 || k == GemmKind::kFp8Acc; }
inline bool gemm_kind_f32_out(GemmKind k) { return k == GemmKind::kBf16F32Out || k == GemmKind::kFp8Acc; }
inline size_t gemm_elem_bytes(GemmKind k) { return gemm_kind_fp8(k) ? 1 : 2; }  // x and W
inline size_t gemm_out_bytes(GemmKind k) { return gemm_kind_f32_out(k) ? 4 : 2; }  // y
std::optional<GemmKind> gemm_kind_from_name(std::string_view s);

// One GEMM as the table knows it: y[n, N] = x[n, K] @ W[N, K]^T; outer_vec: FP8 with per-row
// (token) and per-channel scales through cuBLASLt's outer-vector scale mode.
struct GemmKey {
  GemmKind kind = GemmKind::kBf16;
  int64_t n = 0, N = 0, K = 0;
  bool outer_vec = false;
  auto operator<=>(const GemmKey&) const = default;
};
std::string gemm_key_string(const GemmKey& k);  // "fp8 n=512 N=6144 K=4096 outer_vec" for logs

// cublasLtMatmulAlgo_t's 64 opaque bytes, as plan.json stores them (hex). Only meaningful to the
// cuBLASLt version and GPU that produced them: GemmAlgoTable records both.
struct GemmAlgo {
  std::array<uint64_t, 8> data{};
  bool operator==(const GemmAlgo&) const = default;
};
std::string gemm_algo_hex(const GemmAlgo& a);  // 128 lowercase hex digits, bytes in memory order
Result<GemmAlgo> gemm_algo_from_hex(std::string_view hex);

// The configuration fields of an algorithm (cuBLASLt's CUBLASLT_ALGO_CONFIG_*), for tables and logs.
struct GemmAlgoConfig {
  int32_t id = -1;            // algorithm id (cublasLtMatmulAlgoGetIds)
  uint32_t tile = 0;          // cublasLtMatmulTile_t
  uint32_t stages = 0;        // cublasLtMatmulStages_t
  int32_t split_k = 1;        // K splits (1: none)
  uint32_t reduction = 0;     // cublasLtReductionScheme_t of the split-K partial sums
  uint32_t swizzle = 0;       // CTA swizzling
  uint32_t custom = 0;        // custom option
  uint16_t cluster = 0;       // cublasLtClusterShape_t (0: auto)
};
// Reads the configuration out of `algo` (all defaults when the library cannot be loaded).
GemmAlgoConfig gemm_algo_config(const GemmAlgo& algo);
std::string gemm_algo_config_string(const GemmAlgoConfig& c);  // "id 66 tile 20 stages 8 splitK 4/2 ..."

struct GemmAlgoTable {
  size_t cublaslt_version = 0;  // cublasLtGetVersion() of the planner
  std::string device_name;      // cudaDeviceProp::name of the planner's GPU
  std::map<GemmKey, GemmAlgo> algos;
};
// plan.json's "gemm_algorithms" (docs/engine-format.md) -> table; errors name the entry and field.
Result<GemmAlgoTable> gemm_table_from_json(const nlohmann::json& j);
// "" when a table made with (version, device) may be used here; else why not, for a warning.
std::string gemm_table_mismatch(const GemmAlgoTable& t, size_t cublaslt_version, const std::string& device_name);

// The loaded library's cublasLtGetVersion(); 0 when it cannot be loaded.
size_t cublaslt_version();

// The table every Gemm::init() of this process starts with: the engine's plan, set by the CLI
// before executors are made (one table serves every rank: keys hold rank-local shapes). nullptr: none.
void set_process_gemm_table(std::shared_ptr<const GemmAlgoTable> table);
std::shared_ptr<const GemmAlgoTable> process_gemm_table();

class Gemm {
 public:
  ~Gemm();
  // Loads libcublasLt and creates the handle and workspace; takes the process table.
  [[nodiscard]] Status init(size_t workspace_bytes = size_t(32) << 20);
  // y[n, N] (row stride ldy, bf16 or f32) = x[n, K] (row stride ldx, bf16) @ W^T, W: [N, K] bf16
  // rows contiguous. f32 accumulate. Enqueues only (graph-capturable once the shape was seen).
  void linear(const void* x, int64_t n, int64_t ldx, const void* w, int64_t N, int64_t K, void* y, int64_t ldy,
              bool y_f32, cudaStream_t stream);
  // FP8 E4M3: y[n, N] bf16 (row stride ldy) = (xq[n, K] . wq[N, K]^T) * x_scale * w_scale, f32
  // accumulate. Scales are device pointers: x_scales [1] or [n] (per token), w_scales [1] or [N]
  // (per channel). Vector scales go to cuBLASLt's outer-vector scale mode where the library takes
  // it, else to a small epilogue kernel. K and the row strides must be multiples of 16.
  void linear_fp8(const void* xq, int64_t n, int64_t ldx, const float* x_scales, bool x_per_row, const void* wq,
                  int64_t N, int64_t K, const float* w_scales, bool w_per_row, void* y, int64_t ldy,
                  cudaStream_t stream);
  // FP8 E4M3 accumulated into f32: y[n, N] (f32, row stride ldy) += (xq[n, K] . wq[N, K]^T) * x_scale
  // * w_scale, through cuBLASLt's C = D = y and beta = 1 (the prefill residual add of o_proj and
  // down_proj in the GEMM's epilogue). Scales both per tensor or both vectors (outer-vector mode);
  // the table's algorithm for kind fp8_acc, else the heuristic's. fp8_accumulate_ok() first: false where
  // the library has no algorithm for the shape or the scales are mixed (then call nothing).
  bool fp8_accumulate_ok(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool x_per_row, bool w_per_row);
  void linear_fp8_accumulate(const void* xq, int64_t n, int64_t ldx, const float* x_scales, bool x_per_row,
                             const void* wq, int64_t N, int64_t K, const float* w_scales, bool w_per_row, float* y,
                             int64_t ldy, cudaStream_t stream);
  // Where the library was found, for logs.
  const std::string& library() const { return lib_path_; }
  // Up to this many rows go to kiln's streaming GEMV instead of cuBLASLt (KILN_GEMV_MAX_M; 0 = never).
  void set_gemv_max_m(int m) { gemv_max_m_ = m; }
  int gemv_max_m() const { return gemv_max_m_; }

  // Planned algorithms (replaces the process table for this Gemm); call before the shapes are first
  // used: plans already made keep their algorithm.
  void set_algorithm_table(std::shared_ptr<const GemmAlgoTable> table) { table_ = std::move(table); }
  // How each shape's algorithm was chosen (one count per shape, not per call).
  struct Stats {
    int64_t table = 0;      // the table's entry for this exact n
    int64_t nearest = 0;    // the table's entry for the nearest planned n of the same weight shape
    int64_t heuristic = 0;  // no entry (or none accepted): the heuristic's first
    int64_t rejected = 0;   // table entries refused by cublasLtMatmulAlgoCheck (then heuristic)
    double heuristic_s = 0;  // host time in cublasLtMatmulAlgoGetHeuristic for those
  };
  const Stats& stats() const { return stats_; }

  // For the planner and tests. x, y contiguous (ldx = K, ldy = N).
  // The heuristic's algorithms for `key`, best first, at most max_count.
  std::vector<GemmAlgo> heuristic_algorithms(const GemmKey& key, int max_count);
  // True if cuBLASLt accepts `algo` for `key` within this Gemm's workspace.
  bool algorithm_ok(const GemmKey& key, const GemmAlgo& algo);
  // Split-K variants of `algo` for `key`: for each count in `splits` (> 1) that the algorithm's caps
  // allow, the variant with f32 partial sums in the workspace (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  // in place in the output when that is the only scheme offered; never bf16 partial sums), kept
  // only when cublasLtMatmulAlgoCheck accepts it within this Gemm's workspace.
  // `why` (optional) gets the reason when no variant comes back, for logs and the planner's table.
  std::vector<GemmAlgo> split_k_variants(const GemmKey& key, const GemmAlgo& algo, const std::vector<int>& splits,
                                         std::string* why = nullptr);
  // Every (algorithm id, tile, stages, cluster shape) the library lists for key's data types that
  // cublasLtMatmulAlgoCheck accepts for `key` (no split-K), at most max_count: the configurations
  // the heuristic did not return, for a wider search. The heuristic's algorithm id starts from its
  // first result (custom option, inner shape kept); other ids from cublasLtMatmulAlgoInit.
  // `why` (optional) gets a count of what was listed, tried and refused.
  std::vector<GemmAlgo> enumerated_algorithms(const GemmKey& key, int max_count, std::string* why = nullptr);
  // The algorithms of `algos` that cublasLtMatmulAlgoCheck accepts for `key` within the workspace.
  std::vector<GemmAlgo> accepted_algorithms(const GemmKey& key, const std::vector<GemmAlgo>& algos);
  // One GEMM with `algo` (not checked: call algorithm_ok first). FP8 scales: x_scales [n] and
  // w_scales [N] when key.outer_vec, else [1] each. fp8_acc adds into y (f32). Enqueues only.
  [[nodiscard]] Status run_algorithm(const GemmKey& key, const GemmAlgo& algo, const void* x, const float* x_scales,
                                     const void* w, const float* w_scales, void* y, cudaStream_t stream);
  // The algorithm a call of this shape would use (contiguous x and y), after table and checks.
  GemmAlgo chosen_algorithm(const GemmKey& key);

 private:
  struct Plan;
  Plan* make_plan(const GemmKey& key, int64_t ldx, int64_t ldy);
  bool check(Plan* p, const GemmAlgo& algo);
  // The table's algorithm for key (exact M, else the nearest planned M) if the library accepts it,
  // else the heuristic's first.
  void choose(Plan* p, const GemmKey& key);
  const Plan& plan_for(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool y_f32);
  // FP8 plans by (n, ldx, N, K, ldy, vector scales); null algorithm = the library has none.
  // f32_acc: into f32 C = D (linear_fp8_accumulate: kind fp8_acc).
  Plan* plan_fp8(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool outer_vec, bool f32_acc = false);
  // The cached plan of key's kind with contiguous x and y (run_algorithm, chosen_algorithm).
  Plan* plan_of(const GemmKey& key);
  // One FP8 cuBLASLt call on plan p: D = C = y, y = (A scale a_scale, B scale b_scale) product + beta y.
  // A failure is fatal, naming `what`.
  void run_fp8(Plan* p, const float* a_scale, const float* b_scale, float beta, const void* wq, const void* xq,
               void* y, cudaStream_t stream, const char* what);
  void ensure_one();
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, bool>, Plan*> plans_fp8_, plans_fp8_acc_;
  float* d_one_ = nullptr;  // device 1.0f: the unit scale of the epilogue fallback
  bool fast_accum_ = true;
  void* handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::string lib_path_;
  int gemv_max_m_ = 4;
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, bool>, Plan*> plans_;
  std::shared_ptr<const GemmAlgoTable> table_;
  Stats stats_;
};

}  // namespace kiln::cuda
