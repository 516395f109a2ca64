// ModelExecutor on one CUDA device: bf16 (or FP8 E4M3, sm_89+) weights uploaded once, a paged bf16 KV cache sized from a
// memory fraction or a block count, step metadata uploaded once per step, decode steps replayed
// from CUDA graphs per batch-size bucket, sampling on the device with the host sampler's semantics
// and RNG (cuda/sampler.h; rows that ask for logprobs are read back and sampled on the host).
// No CUDA header here: the CLI includes this in builds where the binary may run without a GPU.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/cpu/cpu_executor.h"  // LoadOptions
#include "model/executor.h"
#include "model/weights.h"

namespace kiln {

// path: an HF directory, .gguf file or engine dir; opts.device "cuda" or "cuda:N". Weights are
// converted to bf16 on upload (GGUF quantized rows are dequantized on the host row by row first),
// except FP8 matrices, which stay FP8 where the GPU has FP8 tensor cores (LoadOptions::quantization).
Result<std::unique_ptr<ModelExecutor>> load_cuda_executor(const std::string& path, const LoadOptions& opts);
// Random weights generated on the device (8B-scale benchmarks with no host copy): bf16, or FP8
// linears with opts.quantization == "fp8".
Result<std::unique_ptr<ModelExecutor>> make_cuda_executor_dummy(const ModelConfig& c, const LoadOptions& opts,
                                                                 uint64_t seed);

namespace cuda {

// False (with the reason) when no CUDA device can be used: no driver, no GPU.
bool device_available(std::string* why);

class CudaOps;
class DeviceSampler;
class Gemm;
struct DeviceKv;
struct Fp8Weight;

// Dummy FP8 weights' activation quantization (KILN_FP8_ACT: static | dynamic_per_tensor |
// dynamic_per_token). Static by default, as NVIDIA's calibrated FP8 checkpoints are.
ActQuant dummy_fp8_activations();

class CudaExecutor final : public ModelExecutor {
 public:
  ~CudaExecutor() override;
  static Result<std::unique_ptr<CudaExecutor>> create(std::shared_ptr<const Model> host_model, const LoadOptions& opts);
  static Result<std::unique_ptr<CudaExecutor>> create_dummy(const ModelConfig& c, const LoadOptions& opts,
                                                            uint64_t seed);

  const ExecutorInfo& info() const override { return info_; }
  Status execute(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                 std::vector<SampledToken>* out) override;
  Status execute_with_prompt_logprobs(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                                      std::vector<SampledToken>* out, std::vector<TokenLogprob>* prompt_out) override;

  // The last step's logits, [logits_rows, vocab] (tests, golden comparisons).
  [[nodiscard]] Status last_logits(std::vector<float>* out);
  const ModelConfig& config() const { return config_; }
  // Decode graphs on/off (on by default; KILN_CUDA_GRAPHS=0 turns them off).
  void set_use_graphs(bool on) { use_graphs_ = on; }
  int32_t num_graphs() const { return int32_t(graphs_.size()); }
  // Bytes a decode step must stream per token at batch 1: every linear weight and the lm_head.
  size_t weight_bytes_per_token() const { return weight_bytes_per_token_; }
  size_t kv_bytes_per_token() const;

  // Measurements in the same process (bench): best streaming-read rate over `bytes` (GB/s), and
  // the median time of one bf16 GEMM y[M,N] = x[M,K] W[N,K]^T through the same cuBLASLt path.
  [[nodiscard]] Result<double> bench_read_bandwidth(size_t bytes, int reps);
  // cublas_only: bypass kiln's small-M GEMV (to compare the two). fp8: E4M3 weights (and inputs
  // for cuBLASLt), unit scales.
  [[nodiscard]] Result<double> bench_gemm_seconds(int64_t M, int64_t N, int64_t K, int reps, bool cublas_only = false,
                                                  bool fp8 = false);
  // Whether any linear runs in FP8 on this GPU.
  bool weights_fp8() const;
  // Bytes of the decode GEMV's tiled FP8 copies (LoadOptions::max_batch_size; 0: none made).
  size_t tiled_bytes() const { return tiled_bytes_; }
  // Steps whose layers ran as one kernel (CudaOps::all_layers; a replayed graph counts at capture).
  uint64_t fused_decode_calls() const;
  // The last replayed decode graph launched `reps` times back to back with nothing from the host in
  // between (it rewrites the last step's KV slots and outputs): seconds of GPU time per step. Set
  // against the measured step, the difference is the time each step's GPU waits on the host
  // (validation, packing, upload, launch, the read-back and its sync).
  [[nodiscard]] Result<double> bench_graph_replay(int reps);

 private:
  CudaExecutor() = default;
  Status init_common(const LoadOptions& opts);
  Status build_weights(const ModelWeights* host, uint64_t seed, const LoadOptions& opts);
  Status finish_init(const LoadOptions& opts);
  // How run_forward ran a step: eager, replayed from a decode bucket's graph, or (a bucket's first
  // step) eager, then captured and instantiated.
  enum class StepPath { kEager = 0, kGraphReplay = 1, kGraphCapture = 2 };
  Status run_forward(const StepBatch& b, StepPath* path);
  Status reserve_ids(int32_t rows);
  void clear_graphs();
  // The decode GEMV's tiled copies of the FP8 matrices (LoadOptions::max_batch_size), into
  // fp8_regs_ before CudaOps sees them.
  Status make_tiled_copies(const LoadOptions& opts);

  ModelConfig config_;
  ModelWeights dw_;  // Weight::data are device pointers
  std::vector<void*> allocations_;
  std::vector<std::pair<const void*, cuda::Fp8Weight>> fp8_regs_;  // FP8 matrices, for CudaOps
  ExecutorInfo info_;
  int device_ = 0;
  void* stream_ = nullptr;  // cudaStream_t
  std::unique_ptr<Gemm> gemm_;
  std::unique_ptr<CudaOps> ops_;
  std::unique_ptr<DeviceKv> kv_;
  std::unique_ptr<DeviceSampler> sampler_;
  bool device_sampling_ = true;  // KILN_DEVICE_SAMPLING=0: every non-greedy row on the host sampler
  void* kv_base_ = nullptr;
  size_t weight_bytes_per_token_ = 0;
  size_t tiled_bytes_ = 0;
  bool use_graphs_ = true;
  std::map<int32_t, void*> graphs_;  // bucket -> cudaGraphExec_t
  StepBatch pad_;
  int32_t* d_ids_ = nullptr;
  void* d_argmax_ = nullptr;  // launch_argmax scratch for ids_cap_ rows (zero between launches)
  int32_t* h_ids_ = nullptr;
  int32_t ids_cap_ = 0;  // rows d_ids_ / h_ids_ hold
  int32_t last_bucket_ = 0;  // the bucket of the last graph-replayed decode step
  float* h_logits_ = nullptr;
  size_t h_logits_rows_ = 0;
  int32_t last_rows_ = 0;
  // KILN_STEP_TIMING=1: per kind of step (eager, graph replay, a decode bucket's first step: eager,
  // then captured and instantiated), the host's time to enqueue a step (execute() up to the wait for
  // its tokens) against the step's wall time, printed when the executor goes away. A step whose
  // enqueue takes most of its wall time is paced by the host.
  struct StepTiming {
    int64_t steps = 0;
    double enqueue_s = 0, wall_s = 0;
  };
  bool step_timing_ = false;
  StepTiming timing_[3];  // [StepPath]
};

}  // namespace cuda
}  // namespace kiln
