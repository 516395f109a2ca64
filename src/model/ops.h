// The ops a forward pass is written against (DESIGN.md "Backends"). A backend implements them over
// its own memory: activations are opaque `Act` buffers (f32 on the CPU, bf16 on CUDA) that the
// forward pass only passes around. begin_step() uploads the step's metadata once; every op of
// that step reads it (token ids, positions, block tables), so no op takes it as an argument.
#pragma once
#include <cstdint>

#include "model/config.h"
#include "model/step_batch.h"
#include "model/weights.h"

namespace kiln {

using Act = void*;

// Named scratch buffers, sized by the backend for its largest step.
enum class Buf { kResidual, kNormed, kQ, kK, kV, kAttn, kProj, kGate, kUp, kLogitsIn, kLogits };

class Ops {
 public:
  virtual ~Ops() = default;
  virtual void begin_step(const StepBatch& batch) = 0;
  virtual Act buffer(Buf which) = 0;

  // out[t, :] = table[token_ids[t], :]                                  out: [T, H]
  virtual void embed(const Weight& table, Act out) = 0;
  // out = rms_norm(x) * w over the last dim                              x, out: [n, dim]
  virtual void rms_norm(Act x, const Weight& w, int64_t n, int64_t dim, float eps, Act out) = 0;
  // residual += delta; out = rms_norm(residual) * w (fused)               [n, dim]
  virtual void add_rms_norm(Act residual, Act delta, const Weight& w, int64_t n, int64_t dim, float eps,
                            Act out) = 0;
  // y[n, :] = x[n, :] @ W^T (+ bias)                        x: [n, W.cols], y: [n, W.rows]
  virtual void linear(Act x, int64_t n, const Weight& w, const Weight* bias, Act y) = 0;
  // RMSNorm over each head of size head_dim (Qwen3 q/k norm)            x: [n, heads * head_dim]
  virtual void head_rms_norm(Act x, int64_t n, int64_t heads, int64_t head_dim, const Weight& w, float eps) = 0;
  // Rotary embedding in place at the step's positions.   q: [T, n_heads, hd], k: [T, n_kv, hd]
  virtual void rope(Act q, Act k, const ModelConfig& c) = 0;
  // Writes k, v into the layer's paged cache at the step's slots, then causal GQA attention of q
  // over each sequence's cache.                     q, out: [T, n_heads * hd]; k, v: [T, n_kv * hd]
  virtual void attention(int32_t layer, Act q, Act k, Act v, const ModelConfig& c, Act out) = 0;
  // rope(q, k) then attention(layer, ...): a backend may fuse them (CUDA decode: one kernel).
  virtual void rope_attention(int32_t layer, Act q, Act k, Act v, const ModelConfig& c, Act out) {
    rope(q, k, c);
    attention(layer, q, k, v, c, out);
  }
  // out = silu(gate) * up                                                  [n, dim]
  virtual void silu_mul(Act gate, Act up, int64_t n, int64_t dim, Act out) = 0;
  // gate = silu(x @ w_gate^T) * (x @ w_up^T); `up` is scratch.     x: [n, hidden], gate, up: [n, inter]
  // A backend may fuse the two GEMMs and the activation (CUDA decode: one GEMV, no silu kernel).
  virtual void linear_gate_up_silu(Act x, int64_t n, const LayerWeights& l, Act gate, Act up) {
    linear(x, n, l.w_gate, nullptr, gate);
    linear(x, n, l.w_up, nullptr, up);
    silu_mul(gate, up, n, l.w_gate.rows, gate);
  }
  // out[i, :] = x[step.logits_rows[i], :]                                  x: [T, dim]
  virtual void gather_logit_rows(Act x, int64_t dim, Act out) = 0;
  // Every layer of the step at once, where the backend has such a path for this step (CUDA: a
  // one-token FP8 decode step in one kernel). x holds the embeddings; on true, h holds
  // rms_norm(x after the last layer) * final_norm, as the layer loop leaves it. false: nothing done.
  virtual bool all_layers(const ModelConfig&, const ModelWeights&, Act /*x*/, Act /*h*/) { return false; }
};

// The decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3. On return
// ops.buffer(Buf::kLogits) holds [batch.logits_rows.size(), vocab] logits.
void forward(const ModelConfig& c, const ModelWeights& w, Ops& ops, const StepBatch& batch);

}  // namespace kiln
