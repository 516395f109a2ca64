// The Ops interface on one CUDA device: bf16 activations, an f32 residual stream, bf16 weights,
// f32 norm weights and biases; Weight::data points at device memory (the executor uploads).
// Every op only enqueues on the stream, so a decode step can be captured in a CUDA graph.
//
// q/k/v are column slices of one [T, q_dim + 2 kv_dim] buffer and gate/up of one [T, 2 I] buffer,
// so when the executor uploaded wq|wk|wv (and w_gate|w_up) back to back, linear() on wq runs one
// fused GEMM for all three and the wk/wv calls that follow are no-ops (register_fused): decode
// streams each weight byte once at the GEMM's best rate instead of three small GEMMs.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include <memory>

#include "backend/cuda/fp8.h"
#include "backend/cuda/fused_decode.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"
#include "model/ops.h"

namespace kiln::cuda {

// Paged KV cache on the device: per layer [num_blocks, n_kv, block_size, head_dim] bf16, or FP8
// E4M3 (1 byte per element) with per-layer scales, real = fp8 * scale (ModelOpt's convention).
struct DeviceKv {
  int32_t num_blocks = 0, block_size = 16;
  bool fp8 = false;
  std::vector<void*> k, v;
  std::vector<float> k_scale, v_scale;  // [layers], with fp8
  size_t elem_bytes() const { return fp8 ? 1 : 2; }
};

// An FP8 E4M3 weight on the device (the executor registers one per FP8 matrix, keyed by its data
// pointer; fused members point into their head's rows). real = fp8 * scale.
struct Fp8Weight {
  float scale = 1.0f;                    // per tensor (the GEMVs take it by value)
  const float* d_scale = nullptr;        // device [1]: the same
  const float* d_row_scales = nullptr;   // device [rows]: per channel, or the tensor scale repeated
  bool per_channel = false;              // rows differ in scale (d_row_scales is the truth)
  Fp8Act act = Fp8Act::kDynamicToken;    // how the GEMM path quantizes the input
  const float* d_input_scale = nullptr;  // device [1] (Fp8Act::kStatic)
  const void* tiled = nullptr;  // the decode GEMV's tiled copy (gemv_fp8.h), or null
};

struct StepCaps {
  int32_t tokens = 0, seqs = 0, logit_rows = 0, table_ints = 0;
};

class CudaOps final : public Ops {
 public:
  CudaOps(const ModelConfig& c, Gemm* gemm, cudaStream_t stream);
  ~CudaOps() override;

  // Activation and metadata buffers for steps up to caps (reallocates when larger; out of memory
  // is an error naming the sizes).
  [[nodiscard]] Status reserve(const StepCaps& caps);
  const StepCaps& caps() const { return caps_; }
  // Counts reallocations: a captured graph holds the buffer addresses of the generation it saw.
  uint64_t generation() const { return generation_; }
  size_t reserved_bytes() const { return reserved_bytes_; }
  void set_kv(DeviceKv* kv) { kv_ = kv; }
  // Fused projections: `head` (wq or w_gate) computes all `rows` output columns into `out`'s slot;
  // the members (wk, wv or w_up) write nothing of their own. Pointers are device weight data.
  void register_fused(const void* head, int64_t rows, Buf out, std::vector<std::pair<const void*, Buf>> members);
  // Marks a weight as FP8: linear() runs it through the FP8 GEMV (decode) or quantizes the input
  // and runs cuBLASLt's FP8 GEMM.
  void register_fp8(const void* data, const Fp8Weight& w) { fp8_[data] = w; }

  // Host side of begin_step: validate-free packing of the metadata into pinned memory.
  void pack_step(const StepBatch& b);
  // One host-to-device copy of the packed metadata.
  void upload_step();
  // While set, begin_step() only packs (the executor uploads before replaying a graph).
  void set_external_upload(bool on) { external_upload_ = on; }
  bool step_is_decode() const { return n_prefill_tiles_ == 0; }
  int32_t step_tokens() const { return T_; }
  int32_t step_logit_rows() const { return L_; }

  void begin_step(const StepBatch& batch) override;
  Act buffer(Buf which) override;
  void embed(const Weight& table, Act out) override;
  void rms_norm(Act x, const Weight& w, int64_t n, int64_t dim, float eps, Act out) override;
  void add_rms_norm(Act residual, Act delta, const Weight& w, int64_t n, int64_t dim, float eps, Act out) override;
  void linear(Act x, int64_t n, const Weight& w, const Weight* bias, Act y) override;
  void linear_gate_up_silu(Act x, int64_t n, const LayerWeights& l, Act gate, Act up) override;
  void head_rms_norm(Act x, int64_t n, int64_t heads, int64_t head_dim, const Weight& w, float eps) override;
  void rope(Act q, Act k, const ModelConfig& c) override;
  void attention(int32_t layer, Act q, Act k, Act v, const ModelConfig& c, Act out) override;
  void rope_attention(int32_t layer, Act q, Act k, Act v, const ModelConfig& c, Act out) override;
  void silu_mul(Act gate, Act up, int64_t n, int64_t dim, Act out) override;
  void gather_logit_rows(Act x, int64_t dim, Act out) override;
  // With KILN_FUSED_DECODE=1, a one-token step of an FP8 model with an FP8 KV cache runs every
  // layer in one persistent kernel (fused_decode.h) where the device and shapes allow it. Off by
  // default: on the H100 it is still slower than op by op (docs/PERF_fp8_gpu.md, session 11).
  bool all_layers(const ModelConfig& c, const ModelWeights& w, Act x, Act h) override;
  // Host calls that took the one-kernel path (a graph replay counts once, at its capture).
  uint64_t fused_decode_calls() const { return fused_decode_calls_; }

  const float* logits() const { return static_cast<const float*>(bufs_[size_t(Buf::kLogits)]); }  // device [L, V]
  cudaStream_t stream() const { return stream_; }

  // Tests: copy host f32 [rows, cols] into a buffer (converted to its dtype, at its row stride),
  // and back.
  void write_buffer(Buf b, const float* host, int64_t rows, int64_t cols);
  std::vector<float> read_buffer(Buf b, int64_t rows, int64_t cols);

 private:
  struct ProfScope;
  struct View {
    void* ptr;
    int64_t ld;  // 0: dense (the op's own dim)
    bool f32;
  };
  View view(Act p, int64_t dense_ld) const;
  AttnParams attn_params(int32_t layer, Act q, Act out, const ModelConfig& c) const;
  // Fold of linear(x -> kProj) + add_rms_norm(residual, kProj): linear() only records the
  // projection (pending_); add_rms_norm() then launches, at decode, one GEMV that also adds and
  // normalizes (kernels.h, launch_gemv_add_rms_norm; KILN_FUSED_NORM=0: off), or, for FP8 weights
  // and more rows, the GEMM accumulating into the f32 residual (matmul_into_residual; kProj is then
  // not written; KILN_FP8_FUSE_RESIDUAL=0: off). Every other entry point launches a recorded
  // projection first, so the ops keep their meaning in any order.
  void flush_pending();
  // Every projection goes through here: bf16 -> Gemm::linear (GEMV or cuBLASLt); FP8 -> GEMV for
  // small n, else quantize x then Gemm::linear_fp8.
  void matmul(const void* x, int64_t ldx, int64_t n, const void* w, int64_t rows, int64_t cols, void* y, int64_t ldy,
              bool y_f32);
  GemvW gemv_weight(const void* w) const;
  // Prefill FP8 down_proj: silu_mul() only records (silu_); the next op launches it. When that op
  // is linear(out, w) on a static-scale FP8 weight taking the GEMM path, one kernel writes the FP8
  // codes of the product into xq_ (launch_silu_mul_quantize_fp8) and matmul() skips its quantize
  // pass (xq_holds_); by default the bf16 product is then not written at all (silu_lazy_): any
  // later op that reads or partly writes gate/up or the product computes it first (touch), and a
  // full rewrite of [gate | up] ends the record. KILN_FP8_FUSE_QUANT=0: separate kernels; =2: the
  // fused kernel also writes the bf16 product (measured slower: 137.2 ms vs 134.5-134.9 for the 8B
  // 4 x 2048 FP8 prefill). H100, 8192 tokens: silu_mul 234 us + quantize ~117 us -> 239 us a layer.
  struct SiluRec {
    bool on = false;
    const void* gate = nullptr;
    const void* up = nullptr;
    void* out = nullptr;
    int64_t ldg = 0, ldu = 0, ldo = 0, n = 0, dim = 0;
  };
  void flush_silu();
  bool take_silu_quant(const View& xv, int64_t n, const Weight& w);
  void touch(const void* p);
  void gate_up_rewritten(const void* gate, int64_t n);
  SiluRec silu_, silu_lazy_;
  // Prefill add_rms_norm is deferred the same way: fused with the quantization of the next
  // linear's input (q|k|v or gate|up) when that is a static-scale FP8 GEMM. The bf16 output is then
  // not written either (norm_lazy_; 67 MB at 8192 tokens of 8B, a sixth of the pass's bytes): an op
  // that reads it computes it first from the residual (touch: add_rms_norm's loops with no delta,
  // the same bytes), an op about to change the residual does the same, and a rewrite of the output
  // by the next add_rms_norm / rms_norm ends the record. KILN_FP8_FUSE_NORM=0: separate kernels; =2: the
  // fused kernel also writes the bf16 output. H100, 8192 tokens: norm 187 us + quantize -> 210 us,
  // ~20 us a projection saved (s3-fuseq-run2).
  struct NormRec {
    bool on = false;
    float* residual = nullptr;
    const void* delta = nullptr;
    const float* w = nullptr;
    void* out = nullptr;
    int64_t ld_delta = 0, ldo = 0, n = 0, dim = 0;
    float eps = 0.0f;
  };
  void flush_norm();
  bool take_norm_quant(const View& xv, int64_t n, const Weight& w);
  // The next op writes `out` rows 0..n (a skipped bf16 norm output there is dead) and may change
  // the residual (anything still skipped is computed first).
  void norm_out_rewritten(const void* out, int64_t n);
  NormRec norm_, norm_lazy_;
  struct {
    const void* x = nullptr;
    int64_t ldx = 0, n = 0, cols = 0;
    const float* scale = nullptr;
    bool per_row = false;
  } xq_holds_;  // xq_ = quantize(x [n, cols], *scale) already (x_scales_ written per_row or not)

  struct Fused {
    const void* head;
    int64_t rows;
    Buf out;
    bool is_head;
  };

  const ModelConfig& c_;
  Gemm* gemm_;
  cudaStream_t stream_;
  // a mixed step's decode attention runs here beside its prefill attention (made on first use)
  cudaStream_t side_ = nullptr;
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
  DeviceKv* kv_ = nullptr;
  StepCaps caps_;
  size_t reserved_bytes_ = 0;
  uint64_t generation_ = 0;
  void* bufs_[size_t(Buf::kLogits) + 1] = {};
  void* qkv_ = nullptr;  // [T, q_dim + 2 kv_dim]
  void* gate_up_ = nullptr;  // [T, 2 I]
  float* inv_freq_ = nullptr;
  float* partials_ = nullptr;
  int32_t* counters_ = nullptr;  // [seqs, n_heads] split counters of the decode attention (kept at 0)
  size_t partial_floats_ = 0;
  int32_t target_blocks_ = 264;
  // metadata: pinned host mirror and device copy, same packed layout
  int32_t* h_meta_ = nullptr;
  int32_t* d_meta_ = nullptr;
  size_t meta_ints_ = 0, meta_used_ = 0;
  const TokenMeta* d_tokens_ = nullptr;
  const SeqMeta* d_seqs_ = nullptr;
  const int32_t* d_rows_ = nullptr;
  const int32_t* d_tiles_ = nullptr;
  const int32_t* d_tables_ = nullptr;
  int32_t T_ = 0, S_ = 0, L_ = 0, n_prefill_tiles_ = 0, n_fresh_tiles_ = 0, n_decode_seqs_ = 0,
          prefill_mean_ctx_ = 0;
  bool external_upload_ = false;
  std::unordered_map<const void*, Fused> fused_;
  std::unordered_map<const void*, Fp8Weight> fp8_;
  uint8_t* xq_ = nullptr;          // [T, max(hidden, inter, q_dim)] quantized GEMM inputs
  float* x_scales_ = nullptr;      // [T]
  unsigned int* amax_ = nullptr;   // dynamic per-tensor amax word
  int64_t fp8_cols_ = 0;
  // A projection into kProj that linear() recorded for the add_rms_norm after it: the decode fold
  // (GEMV + add + norm in one kernel) or, at prefill with FP8 weights, the GEMM accumulating into
  // the residual (matmul_into_residual). Any other op launches it as it was (flush_pending).
  struct Pending {
    bool on = false;
    const void* x = nullptr;
    int64_t ldx = 0, n = 0;
    const void* w = nullptr;
    int64_t rows = 0, cols = 0;
    void* y = nullptr;
    int64_t ldy = 0;
  };
  Pending pending_;
  // The FP8 GEMM input: x quantized into xq_ / x_scales_ unless xq_holds_ says it is there already.
  // Returns whether the scales are vectors (per token / per channel).
  bool quantize_input(const void* x, int64_t ldx, int64_t n, int64_t cols, const Fp8Weight& q);
  // residual[n, rows] (dense f32) += the recorded FP8 projection, in the GEMM's epilogue; false
  // (nothing launched) where that path does not apply.
  bool matmul_into_residual(const Pending& pd, float* residual);
  unsigned int* norm_counter_ = nullptr;  // device word of the fused-norm GEMV (kept at 0)
  // The one-kernel decode: built at the first eligible step (not while capturing); why_not_ says
  // why it never will be (logged once).
  Status build_fused_decode(const ModelWeights& w);
  std::unique_ptr<FusedDecode> fused_decode_;
  std::string fused_decode_why_not_;
  uint64_t fused_decode_calls_ = 0;
  bool fused_decode_on_ = false;  // KILN_FUSED_DECODE, read when the ops are made
  bool dynamic_act_ = false;     // the FP8 activations' scales: amax / 448 (else static)
  struct {
    const void* head = nullptr;
    const void* x = nullptr;
    int64_t n = -1;
  } last_fused_;
};

}  // namespace kiln::cuda
