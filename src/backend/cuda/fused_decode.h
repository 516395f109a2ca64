// Batch-1 decode of a whole FP8 model in one persistent kernel (fused_decode.cu).
//
// Op by op, a one-token step is ~6 kernels a layer, and each boundary leaves the HBM idle while
// the last blocks of one kernel drain and the next one's first weight bytes arrive (the fold's norm
// tail, the ramps and tails of four GEMVs, the attention's round trips: ~17 us a layer on the H100,
// docs/PERF_fp8_gpu.md, session 5). Weights do not depend on the activations, so here one block an
// SM streams its share of every layer's weights through a ring of shared-memory stages (a producer
// warp with bulk copies, never waiting for activations), while 8 consumer warps compute each phase
// (qkv, attention, o + residual, gate/up + silu, down) as the grid reaches it (a grid-wide barrier
// between phases). The stream runs ahead across the barriers by the ring's size, so the HBM is
// busy through the dependencies instead of idling at every kernel boundary.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "backend/cuda/kernels.h"
#include "core/status.h"

namespace kiln::cuda {

// One FP8 E4M3 matrix, row-major [rows, K], real = fp8 * rs[row]; in: the static activation scale
// (device [1]), read only without dynamic activations.
struct FusedMat {
  const uint8_t* w;
  const float *rs, *in;
};

// One layer's device pointers.
struct FusedLayer {
  // in the order the kernel streams them: qkv [q_dim + 2 kv_dim, H] (q rows, k rows, v rows),
  // o [H, q_dim], gate|up [2 I, H] (gate rows, then up rows), down [H, I]
  FusedMat mat[4];
  const float *attn_norm, *ffn_norm;  // [H]
  void *k_cache, *v_cache;            // FP8 [num_blocks, n_kv, block_size, 128]
  float k_scale, v_scale;
};

struct FusedDecodeShape {
  int32_t num_layers = 0, H = 0, I = 0, n_heads = 0, n_kv = 0, head_dim = 0;
};

// What one step needs besides the weights (the metadata of its one sequence, the buffers).
struct FusedDecodeStep {
  float eps = 0.0f, scale = 0.0f;  // RMS norm epsilon; attention scale
  int32_t rope = 1;                // 1: half-split pairs, 2: interleaved pairs
  const float* inv_freq = nullptr;  // [64]
  bool dynamic = false;  // activations quantized with amax / 448 of each input vector (else static)
  const TokenMeta* tokens = nullptr;
  const SeqMeta* seqs = nullptr;
  const int32_t* tables = nullptr;
  int32_t block_size = 16;
  float* residual = nullptr;           // [H] f32: after the embedding on entry, after the last layer on exit
  const float* final_norm = nullptr;   // [H]
  bf16_t* out = nullptr;               // [H]: rms_norm(residual) * final_norm
};

// Why this device or shape cannot take the fused decode ("" when it can): sm_90 (bulk copies),
// head_dim 128, H, q_dim and I / split multiples of 1024, one resident block an SM.
std::string fused_decode_unsupported(const FusedDecodeShape& s);

class FusedDecode {
 public:
  FusedDecode() = default;
  FusedDecode(const FusedDecode&) = delete;
  FusedDecode& operator=(const FusedDecode&) = delete;
  ~FusedDecode();
  // Uploads the layer table and allocates the scratch (synchronous: not while capturing a graph).
  [[nodiscard]] Status init(const FusedDecodeShape& s, const std::vector<FusedLayer>& layers);
  bool ready() const { return layers_ != nullptr; }
  // Enqueues the step's kernel (capturable: no allocation, no synchronization).
  void launch(const FusedDecodeStep& step, cudaStream_t s) const;

 private:
  size_t carve(uint8_t* base, void* params) const;
  void print_profile() const;
  FusedDecodeShape shape_;
  FusedLayer* layers_ = nullptr;
  void* scratch_ = nullptr;
  unsigned long long* prof_ = nullptr;
  int32_t grid_ = 0, stages_ = 0, smem_ = 0, down_split_ = 1, max_splits_ = 1, inflight_ = 4;
  bool evict_first_ = true;
};

}  // namespace kiln::cuda
