// Launchers for the CUDA backend's kernels (kernels.cu, attention.cu). Framework-free: raw device
// pointers plus sizes; every launcher enqueues on `stream` and never synchronizes, so a whole step
// can be captured in a CUDA graph. bf16 activations, f32 residual stream, f32 norm weights/biases.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace kiln::cuda {

using bf16_t = uint16_t;  // __nv_bfloat16 storage; the .cu files reinterpret

// Per-token step metadata, packed by the host once per step (STYLE.md #7).
struct TokenMeta {
  int32_t id;    // token id
  int32_t pos;   // absolute position in its sequence
  int32_t slot;  // physical KV slot: block * block_size + pos % block_size; -1 = padding (no write)
  int32_t seq;   // sequence index in the step
};
// Per-sequence step metadata.
struct SeqMeta {
  int32_t q_start;       // first token row of the sequence in the step
  int32_t q_len;         // tokens this step (1 for decode)
  int32_t ctx_len;       // tokens in the cache after this step (0 = padding sequence)
  int32_t table_stride;  // columns of the block table rows (the step's max_blocks_per_seq)
};

struct AttnParams {
  const bf16_t* q;  // [T, ldq] with head h at column h * head_dim
  int64_t ldq;
  // [num_blocks, n_kv, block_size, head_dim] bf16, or FP8 E4M3 (1 byte) when kv_fp8 with
  // real = fp8 * k_scale (v_scale); the kernels fold the scales into the q scale and the output.
  const void* k_cache;
  const void* v_cache;
  bool kv_fp8;
  float k_scale, v_scale;
  bf16_t* out;  // [T, ldo]
  int64_t ldo;
  const TokenMeta* tokens;
  const SeqMeta* seqs;
  const int32_t* block_tables;  // [num_seqs, table_stride]
  int32_t num_seqs, n_heads, n_kv, head_dim, block_size;
  float scale;
  // prefill: tiles of up to 64 query rows, (seq, first row within the sequence) pairs
  const int32_t* tiles;
  int32_t num_tiles;
  // mean context (tokens) of the step's prefill sequences: short prompts stay on v2 (attention_wgmma.h)
  int32_t prefill_mean_ctx;
  // tiles of sequences whose whole context is in this step (a fresh prompt: ctx_len == q_len), the
  // first num_fresh_tiles of tiles. With an FP8 cache and k_new / v_new set, those attend to their own
  // bf16 rows instead of the cache (one launch), the other tiles to the cache (a second launch).
  int32_t num_fresh_tiles;
  // set by the prefill launcher: 0 = K/V from the cache for every sequence; 1 = only fresh sequences,
  // K/V from the step's rows k_cache / v_cache ([T, ldk] / [T, ldv] bf16); 2 = only the others
  int32_t prefill_kv_rows;
  // decode: KV split count and the partial-result scratch [num_seqs, n_heads, splits, head_dim + 2]
  // (blocks: num_seqs x n_heads / decode_heads_per_block x splits)
  int32_t splits;
  // resident decode blocks the GPU holds at once (4 an SM): the launcher's measure of a full grid
  int32_t target_blocks;
  float* partials;
  // [num_seqs, n_heads] zeros: the last block of each (sequence, head unit) to finish merges the
  // splits (no second kernel) and puts its counter back to 0.
  int32_t* counters;
  // Decode with the rotary embedding and KV write fused in (0: q and the cache are ready): q and the
  // step's k, v rows are raw projections; rope 1 = half-split pairs, 2 = interleaved pairs. Prefill:
  // k_new / v_new are the step's roped k and v rows (num_fresh_tiles).
  int32_t rope;
  const float* inv_freq;  // [head_dim / 2]
  const bf16_t* k_new;    // [T, ldk]
  const bf16_t* v_new;    // [T, ldv]
  int64_t ldk, ldv;
};

bool attention_supports_head_dim(int32_t head_dim);
// Query heads one decode-attention block computes from one read of their KV head's cache.
int32_t decode_heads_per_block(int32_t n_heads, int32_t n_kv);
// Causal attention of every query row over its sequence's cache (any q_len; flash-style tiles,
// tensor cores through wmma).
void launch_prefill_attention(const AttnParams& p, cudaStream_t stream);
// One query row per sequence (q_len == 1 everywhere): split over the KV length, then reduce.
void launch_decode_attention(const AttnParams& p, cudaStream_t stream);

// out[t] = f32(table[tokens[t].id])                                       table: [V, H] bf16
void launch_embed(const bf16_t* table, const TokenMeta* tokens, int32_t T, int32_t H, float* out, cudaStream_t s);
// out = rms_norm(x) * w; x f32 or bf16 rows of stride ldx; out bf16 rows of stride ldo
void launch_rms_norm(const void* x, bool x_f32, int64_t ldx, const float* w, int32_t n, int32_t dim, float eps,
                     bf16_t* out, int64_t ldo, cudaStream_t s);
// residual += delta; out = rms_norm(residual) * w. delta null: the residual as it is (not written).
void launch_add_rms_norm(float* residual, const bf16_t* delta, int64_t ld_delta, const float* w, int32_t n, int32_t dim,
                         float eps, bf16_t* out, int64_t ldo, cudaStream_t s);
// in place over each head of each row
void launch_head_rms_norm(bf16_t* x, int64_t ldx, int32_t n, int32_t heads, int32_t head_dim, const float* w, float eps,
                          cudaStream_t s);
void launch_rope(bf16_t* q, int64_t ldq, bf16_t* k, int64_t ldk, const TokenMeta* tokens, int32_t T, const float* inv_freq,
                 int32_t n_heads, int32_t n_kv, int32_t head_dim, bool interleaved, cudaStream_t s);
// k, v rows [T, ld] -> caches at tokens[t].slot ([num_blocks, n_kv, block_size, head_dim])
void launch_kv_write(const bf16_t* k, int64_t ldk, const bf16_t* v, int64_t ldv, const TokenMeta* tokens, int32_t T,
                     bf16_t* k_cache, bf16_t* v_cache, int32_t n_kv, int32_t head_dim, int32_t block_size, cudaStream_t s);
// The same into an FP8 E4M3 cache (attention.cu): stored = saturate(fp8(x / scale)), per layer scales.
void launch_kv_write_fp8(const bf16_t* k, int64_t ldk, const bf16_t* v, int64_t ldv, const TokenMeta* tokens, int32_t T,
                         void* k_cache, void* v_cache, int32_t n_kv, int32_t head_dim, int32_t block_size, float k_scale,
                         float v_scale, cudaStream_t s);
void launch_silu_mul(const bf16_t* gate, int64_t ld_gate, const bf16_t* up, int64_t ld_up, bf16_t* out, int64_t ldo,
                     int32_t n, int32_t dim, cudaStream_t s);
void launch_gather_rows(const bf16_t* x, int64_t ldx, const int32_t* rows, int32_t L, int32_t dim, bf16_t* out,
                        cudaStream_t s);
void launch_add_bias(void* y, bool y_f32, int64_t ldy, const float* bias, int32_t n, int32_t N, cudaStream_t s);
// ids[r] = argmax(logits[r, :]) (first maximum), r < L                  logits: [L, V] f32
// scratch: argmax_scratch_bytes(L) of device memory, zero before the first launch (every launch
// leaves it zero again); one launch at a time per scratch.
size_t argmax_scratch_bytes(int32_t L);
void launch_argmax(const float* logits, int32_t L, int32_t V, int32_t* ids, void* scratch, cudaStream_t s);

// How an FP8 GEMV treats its bf16 input (fp8.h Fp8Act, plus weight-only). kNone: the activations
// stay bf16 and the weights are widened (the CUDA-core kernel in kernels.cu). The others quantize x
// to E4M3 inside the kernel exactly as launch_quantize_fp8 and the CPU emulation do (static
// input_scale, amax / 448 over all n rows, or per row) and run the dot on the tensor cores
// (gemv_fp8.cu): y = (x_q . w_q) * s_x * s_w.
enum class GemvAct : uint8_t { kNone, kStatic, kDynamicTensor, kDynamicToken };

// A decode weight [N, K] row-major: bf16, or FP8 E4M3 with a per-tensor dequantization scale or
// device per-row scales (real = fp8 * scale).
struct GemvW {
  const void* data = nullptr;
  bool fp8 = false;
  float scale = 1.0f;
  const float* row_scales = nullptr;  // device [N] (fp8 only; for the silu pair: [2 I]); replaces scale
  GemvAct act = GemvAct::kNone;       // fp8 only
  const float* input_scale = nullptr;  // device [1] (GemvAct::kStatic)
  const void* tiled = nullptr;  // fp8: the decode GEMV's tiled copy (gemv_fp8.h, launch_tile_fp8) or null
};
// Whether the model's FP8 decode linears take the tensor-core GEMV (CudaOps::gemv_weight fills
// GemvW::act only then): KILN_FP8_GEMV=mma | cvt (A/B), the build's default otherwise, never
// before sm_89 (gemv_fp8.cu).
bool gemv_fp8_mma_enabled();

// y[n, N] = x[n, K] W[N, K]^T for n <= 4 (decode); y bf16 or f32 rows of stride ldy. x and the
// weight 16-byte aligned, K % 8 == 0 (bf16) or K % 16 == 0 (fp8). Returns false (nothing launched)
// for shapes it does not take.
bool launch_gemv(const bf16_t* x, int64_t ldx, int32_t n, const GemvW& w, int32_t N, int32_t K, void* y, int64_t ldy,
                 bool y_f32, cudaStream_t s);
// y[n, I] = silu(x W_gate^T) * (x W_up^T) for n <= 4, w_gate_up: [2 I, K] (gate rows, then up rows).
// Returns false (nothing launched) for shapes it does not take.
bool launch_gemv_silu(const bf16_t* x, int64_t ldx, int32_t n, const GemvW& w_gate_up, int32_t I, int32_t K, bf16_t* y,
                      int64_t ldy, cudaStream_t s);
// Decode fold of linear + add_rms_norm (n <= 4): y = x W^T (bf16, W: [N, K]), residual[n, N] += y,
// out = rms_norm(residual) * norm_w. `counter` is a device word at 0 (left at 0). Returns false
// (nothing launched) for shapes it does not take.
bool launch_gemv_add_rms_norm(const bf16_t* x, int64_t ldx, int32_t n, const GemvW& w, int32_t N, int32_t K, bf16_t* y,
                              int64_t ldy, float* residual, const float* norm_w, float eps, bf16_t* out, int64_t ldo,
                              unsigned int* counter, cudaStream_t s);
// BF16 weights: the same three entry points (GemvW{w}).
bool launch_gemv(const bf16_t* x, int64_t ldx, int32_t n, const bf16_t* w, int32_t N, int32_t K, void* y, int64_t ldy,
                 bool y_f32, cudaStream_t s);
bool launch_gemv_silu(const bf16_t* x, int64_t ldx, int32_t n, const bf16_t* w_gate_up, int32_t I, int32_t K,
                      bf16_t* y, int64_t ldy, cudaStream_t s);
bool launch_gemv_add_rms_norm(const bf16_t* x, int64_t ldx, int32_t n, const bf16_t* w, int32_t N, int32_t K, bf16_t* y,
                              int64_t ldy, float* residual, const float* norm_w, float eps, bf16_t* out, int64_t ldo,
                              unsigned int* counter, cudaStream_t s);

// Fills for dummy weights generated on the device: uniform in [-a, a] from a counter hash.
void launch_fill_uniform_bf16(bf16_t* p, int64_t n, uint64_t seed, float a, cudaStream_t s);
void launch_fill_f32(float* p, int64_t n, float value, cudaStream_t s);
// Conversions for tests and uploads.
void launch_f32_to_bf16(const float* in, bf16_t* out, int64_t n, cudaStream_t s);
void launch_bf16_to_f32(const bf16_t* in, float* out, int64_t n, cudaStream_t s);
// Read-only streaming kernel: sums n 16-byte words into *sink (roofline for memory-bound steps).
void launch_read_bandwidth(const void* p, int64_t bytes, float* sink, cudaStream_t s);

}  // namespace kiln::cuda
