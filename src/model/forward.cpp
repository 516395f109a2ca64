#include "model/ops.h"

namespace kiln {

void forward(const ModelConfig& c, const ModelWeights& w, Ops& ops, const StepBatch& batch) {
  ops.begin_step(batch);
  const int64_t T = batch.num_tokens(), H = c.hidden_size;
  Act x = ops.buffer(Buf::kResidual);  // [T, H] the residual stream
  Act h = ops.buffer(Buf::kNormed);    // [T, H]
  Act q = ops.buffer(Buf::kQ);         // [T, q_dim]
  Act k = ops.buffer(Buf::kK);         // [T, kv_dim]
  Act v = ops.buffer(Buf::kV);         // [T, kv_dim]
  Act attn = ops.buffer(Buf::kAttn);   // [T, q_dim]
  Act proj = ops.buffer(Buf::kProj);   // [T, H] output of o_proj / down_proj
  Act gate = ops.buffer(Buf::kGate);   // [T, I]
  Act up = ops.buffer(Buf::kUp);       // [T, I]

  ops.embed(w.embed, x);
  if (!ops.all_layers(c, w, x, h)) {
    ops.rms_norm(x, w.layers[0].attn_norm, T, H, c.rms_norm_eps, h);
    for (int32_t i = 0; i < c.num_layers; ++i) {
      const LayerWeights& l = w.layers[size_t(i)];
      ops.linear(h, T, l.wq, l.bq.empty() ? nullptr : &l.bq, q);
      ops.linear(h, T, l.wk, l.bk.empty() ? nullptr : &l.bk, k);
      ops.linear(h, T, l.wv, l.bv.empty() ? nullptr : &l.bv, v);
      if (c.qk_norm) {
        ops.head_rms_norm(q, T, c.num_heads, c.head_dim, l.q_norm, c.rms_norm_eps);
        ops.head_rms_norm(k, T, c.num_kv_heads, c.head_dim, l.k_norm, c.rms_norm_eps);
      }
      ops.rope_attention(i, q, k, v, c, attn);
      ops.linear(attn, T, l.wo, nullptr, proj);
      ops.add_rms_norm(x, proj, l.ffn_norm, T, H, c.rms_norm_eps, h);
      ops.linear_gate_up_silu(h, T, l, gate, up);
      ops.linear(gate, T, l.w_down, nullptr, proj);
      const Weight& next_norm = i + 1 < c.num_layers ? w.layers[size_t(i) + 1].attn_norm : w.final_norm;
      ops.add_rms_norm(x, proj, next_norm, T, H, c.rms_norm_eps, h);
    }
  }
  const int64_t L = int64_t(batch.logits_rows.size());
  if (L == 0) return;
  Act rows = ops.buffer(Buf::kLogitsIn);  // [L, H]
  ops.gather_logit_rows(h, H, rows);
  ops.linear(rows, L, w.lm_head, nullptr, ops.buffer(Buf::kLogits));
}

}  // namespace kiln
