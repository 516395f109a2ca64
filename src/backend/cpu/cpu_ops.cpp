#include "backend/cpu/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "backend/cpu/cpu_fp8.h"
#include "backend/cpu/quant_dot.h"
#include "core/dtype.h"
#include "core/thread_pool.h"
#include "model/fp8.h"

namespace kiln {

std::vector<float> rope_inv_freq(const ModelConfig& c) {
  const int32_t half = c.head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  for (int32_t i = 0; i < half; ++i) {
    float expo = float(2 * i) / float(c.head_dim);
    inv[size_t(i)] = 1.0f / std::pow(c.rope_theta, expo);
  }
  if (c.rope_scaling == RopeScaling::kLinear) {
    for (auto& f : inv) f /= c.rope_factor;
  } else if (c.rope_scaling == RopeScaling::kLlama3) {
    // transformers' _compute_llama3_parameters
    const float old_ctx = float(c.rope_original_max_pos);
    const float low_wavelen = old_ctx / c.rope_low_freq_factor;
    const float high_wavelen = old_ctx / c.rope_high_freq_factor;
    for (auto& f : inv) {
      const float wavelen = 2.0f * float(M_PI) / f;
      float scaled = wavelen > low_wavelen ? f / c.rope_factor : f;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        float smooth = (old_ctx / wavelen - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor);
        scaled = (1.0f - smooth) * scaled / c.rope_factor + smooth * scaled;
      }
      f = scaled;
    }
  }
  return inv;
}

void CpuKvCache::init(const ModelConfig& c, int32_t blocks, int32_t bs) {
  num_blocks = blocks;
  block_size = bs;
  num_kv_heads = c.num_kv_heads;
  head_dim = c.head_dim;
  const size_t per_layer = size_t(blocks) * size_t(bs) * size_t(c.kv_dim());
  k.assign(size_t(c.num_layers), std::vector<float>(per_layer, 0.0f));
  v.assign(size_t(c.num_layers), std::vector<float>(per_layer, 0.0f));
}

void kv_fp8_store(const float* src, int64_t n, float scale, float* dst) {
  // Division, as the GPU's KV write (and torch's (x / scale).to(float8_e4m3fn)) does.
  const float* lut = fp8_decode_table();
  for (int64_t i = 0; i < n; ++i) dst[i] = lut[f32_to_fp8e4m3(src[i] / scale)] * scale;
}

void CpuKvCache::set_fp8(std::vector<float> k_scales, std::vector<float> v_scales) {
  KILN_CHECK(k_scales.size() == k.size() && v_scales.size() == v.size());
  for (auto* s : {&k_scales, &v_scales})
    for (float& x : *s)
      if (!(x > 0.0f && x < 3.0e38f)) x = 1.0f;
  fp8 = true;
  k_scale = std::move(k_scales);
  v_scale = std::move(v_scales);
}

size_t CpuKvCache::bytes() const {
  size_t n = 0;
  for (auto& l : k) n += l.size() * sizeof(float);
  for (auto& l : v) n += l.size() * sizeof(float);
  return n;
}

float cpu_dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float sum = _mm_cvtss_f32(s);
#else
  float sum = 0.0f;
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Rows of W are dequantized in tiles that stay in cache while every activation row passes over
// them; each y[m, r] is one cpu_dot, so its value does not depend on m's batch or the tiling.
void cpu_linear(const float* x, int64_t m, const Weight& w, const float* bias, float* y) {
  if (w.format == WeightFormat::kF8E4M3 && w.act_quant != ActQuant::kNone) {
    cpu_linear_fp8(x, m, w, bias, y);  // FP8 activations too, as the GPU's FP8 GEMM (cpu_fp8.h)
    return;
  }
  const int64_t N = w.rows, K = w.cols;
  constexpr int64_t kTile = 16;
  const int64_t tiles = (N + kTile - 1) / kTile;
  // Fused dequantize-and-dot (default model decode 17.9 -> 54 tok/s), for every step size: a
  // request must round the same way alone and batched (QuantizedBatchedEqualsAloneBitForBit).
  if (w.format == WeightFormat::kGgml && quant_dot_supported(w.ggml_type) && K % 32 == 0) {
    thread_local std::vector<float> xsums;
    xsums.resize(size_t(m * (K / 32)));
    for (int64_t i = 0; i < m; ++i) quant_block_sums(x + i * K, K, xsums.data() + i * (K / 32));
    const float* xs = xsums.data();
    if (m < 8) {
      // Decode-sized steps: fused dot per (token, row); unpacking would cost more than it saves
      // (batch-2 decode 163 -> see PERF.md).
      parallel_for(tiles, [&](int64_t t0, int64_t t1) {
        for (int64_t r = t0 * kTile; r < std::min(N, t1 * kTile); ++r)
          for (int64_t i = 0; i < m; ++i) {
            const float acc = quant_dot(w.ggml_type, w.row_ptr(r), x + i * K, xs + i * (K / 32), K);
            y[i * N + r] = bias ? acc + bias[r] : acc;
          }
      });
      return;
    }
    // Larger steps: tokens in chunks that stay in cache; each weight tile is unpacked once per
    // chunk and then multiplied with quant_dot's exact arithmetic, 4 tokens at a time.
    constexpr int64_t kChunk = 32;
    for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
      const int64_t c1 = std::min(m, c0 + kChunk);
      parallel_for(tiles, [&](int64_t t0, int64_t t1) {
        thread_local std::vector<float> q, d, off;
        q.resize(size_t(kTile * K));
        d.resize(size_t(kTile * K / 32));
        off.resize(size_t(kTile * K / 32));
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = t * kTile, r1 = std::min(N, r0 + kTile);
          for (int64_t r = r0; r < r1; ++r)
            quant_unpack_row(w.ggml_type, w.row_ptr(r), K, q.data() + (r - r0) * K, d.data() + (r - r0) * (K / 32),
                             off.data() + (r - r0) * (K / 32));
          for (int64_t r = r0; r < r1; ++r) {
            const size_t o = size_t(r - r0);
            const float* qr = q.data() + o * K;
            const float* dr = d.data() + o * (K / 32);
            const float* offr = off.data() + o * (K / 32);
            int64_t i = c0;
            for (; i + 4 <= c1; i += 4) {
              const float* xv[4] = {x + i * K, x + (i + 1) * K, x + (i + 2) * K, x + (i + 3) * K};
              const float* sv[4] = {xs + i * (K / 32), xs + (i + 1) * (K / 32), xs + (i + 2) * (K / 32),
                                    xs + (i + 3) * (K / 32)};
              float out[4];
              quant_dot4_tokens(w.ggml_type, qr, dr, offr, xv, sv, K, out);
              for (int j = 0; j < 4; ++j) y[(i + j) * N + r] = bias ? out[j] + bias[r] : out[j];
            }
            for (; i < c1; ++i) {
              const float acc = quant_dot_unpacked(w.ggml_type, qr, dr, offr, x + i * K, xs + i * (K / 32), K);
              y[i * N + r] = bias ? acc + bias[r] : acc;
            }
          }
        }
      });
    }
    return;
  }
  parallel_for(tiles, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> wbuf;
    wbuf.resize(size_t(kTile * K));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kTile, r1 = std::min(N, r0 + kTile);
      const float* rows;
      if (w.format == WeightFormat::kF32) {
        rows = reinterpret_cast<const float*>(w.row_ptr(r0));  // in place; rows contiguous
      } else {
        for (int64_t r = r0; r < r1; ++r) weight_row_to_f32(w, r, wbuf.data() + (r - r0) * K);
        rows = wbuf.data();
      }
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = x + i * K;
        float* yi = y + i * N;
        for (int64_t r = r0; r < r1; ++r) {
          float acc = cpu_dot(xi, rows + (r - r0) * K, K);
          yi[r] = bias ? acc + bias[r] : acc;
        }
      }
    }
  });
}

CpuOps::CpuOps(const ModelConfig& c, CpuKvCache* kv) : c_(c), kv_(kv), inv_freq_(rope_inv_freq(c)) {
  bufs_.resize(size_t(Buf::kLogits) + 1);
}

void CpuOps::begin_step(const StepBatch& batch) {
  batch_ = &batch;
  const size_t T = size_t(batch.num_tokens()), L = batch.logits_rows.size();
  auto need = [&](Buf b, size_t n) {
    auto& v = bufs_[size_t(b)];
    if (v.size() < n) v.resize(n);
  };
  const size_t H = size_t(c_.hidden_size), I = size_t(c_.intermediate_size);
  need(Buf::kResidual, T * H);
  need(Buf::kNormed, T * H);
  need(Buf::kQ, T * size_t(c_.q_dim()));
  need(Buf::kK, T * size_t(c_.kv_dim()));
  need(Buf::kV, T * size_t(c_.kv_dim()));
  need(Buf::kAttn, T * size_t(c_.q_dim()));
  need(Buf::kProj, T * H);
  need(Buf::kGate, T * I);
  need(Buf::kUp, T * I);
  need(Buf::kLogitsIn, L * H);
  need(Buf::kLogits, L * size_t(c_.vocab_size));
}

Act CpuOps::buffer(Buf which) { return bufs_[size_t(which)].data(); }

void CpuOps::embed(const Weight& table, Act out) {
  float* o = static_cast<float*>(out);
  const int64_t H = table.cols;
  const auto& ids = batch_->token_ids;
  parallel_for(int64_t(ids.size()), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) weight_row_to_f32(table, ids[size_t(t)], o + t * H);
  }, 8);
}

static void rms_norm_row(const float* x, const float* w, int64_t dim, float eps, float* out) {
  double ss = 0.0;  // transformers accumulates the mean of squares in float32; double is closer
  for (int64_t i = 0; i < dim; ++i) ss += double(x[i]) * double(x[i]);
  const float inv = 1.0f / std::sqrt(float(ss / double(dim)) + eps);
  for (int64_t i = 0; i < dim; ++i) out[i] = w[i] * (x[i] * inv);
}

void CpuOps::rms_norm(Act x, const Weight& w, int64_t n, int64_t dim, float eps, Act out) {
  const float* xs = static_cast<const float*>(x);
  const float* ws = static_cast<const float*>(w.data);
  float* o = static_cast<float*>(out);
  parallel_for(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) rms_norm_row(xs + i * dim, ws, dim, eps, o + i * dim);
  }, 16);
}

void CpuOps::add_rms_norm(Act residual, Act delta, const Weight& w, int64_t n, int64_t dim, float eps, Act out) {
  float* r = static_cast<float*>(residual);
  const float* d = static_cast<const float*>(delta);
  const float* ws = static_cast<const float*>(w.data);
  float* o = static_cast<float*>(out);
  parallel_for(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      for (int64_t j = 0; j < dim; ++j) r[i * dim + j] += d[i * dim + j];
      rms_norm_row(r + i * dim, ws, dim, eps, o + i * dim);
    }
  }, 16);
}

void CpuOps::linear(Act x, int64_t n, const Weight& w, const Weight* bias, Act y) {
  cpu_linear(static_cast<const float*>(x), n, w, bias ? static_cast<const float*>(bias->data) : nullptr,
             static_cast<float*>(y));
}

void CpuOps::head_rms_norm(Act x, int64_t n, int64_t heads, int64_t head_dim, const Weight& w, float eps) {
  float* xs = static_cast<float*>(x);
  const float* ws = static_cast<const float*>(w.data);
  parallel_for(n * heads, [&](int64_t b, int64_t e) {
    std::vector<float> tmp(static_cast<size_t>(head_dim));
    for (int64_t i = b; i < e; ++i) {
      rms_norm_row(xs + i * head_dim, ws, head_dim, eps, tmp.data());
      std::memcpy(xs + i * head_dim, tmp.data(), size_t(head_dim) * 4);
    }
  }, 16);
}

void CpuOps::rope(Act q, Act k, const ModelConfig& c) {
  float* qs = static_cast<float*>(q);
  float* ks = static_cast<float*>(k);
  const int64_t T = batch_->num_tokens(), hd = c.head_dim, half = hd / 2;
  const bool interleaved = c.rope_style == RopeStyle::kInterleaved;
  parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int64_t t = b; t < e; ++t) {
      const float pos = float(batch_->positions[size_t(t)]);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = pos * inv_freq_[size_t(i)];  // float32 product, as transformers
        cs[size_t(i)] = std::cos(angle);
        sn[size_t(i)] = std::sin(angle);
      }
      auto rotate = [&](float* x) {
        for (int64_t i = 0; i < half; ++i) {
          const int64_t a = interleaved ? 2 * i : i, bb = interleaved ? 2 * i + 1 : i + half;
          const float x0 = x[a], x1 = x[bb];
          x[a] = x0 * cs[size_t(i)] - x1 * sn[size_t(i)];
          x[bb] = x1 * cs[size_t(i)] + x0 * sn[size_t(i)];
        }
      };
      for (int64_t h = 0; h < c.num_heads; ++h) rotate(qs + (t * c.num_heads + h) * hd);
      for (int64_t h = 0; h < c.num_kv_heads; ++h) rotate(ks + (t * c.num_kv_heads + h) * hd);
    }
  }, 4);
}

void CpuOps::attention(int32_t layer, Act q, Act k, Act v, const ModelConfig& c, Act out) {
  const StepBatch& b = *batch_;
  const int64_t hd = c.head_dim, kvd = c.kv_dim(), bs = kv_->block_size;
  float* kc = kv_->k[size_t(layer)].data();  // [num_blocks, block_size, n_kv, hd]
  float* vc = kv_->v[size_t(layer)].data();
  const float* ks = static_cast<const float*>(k);
  const float* vs = static_cast<const float*>(v);
  const float* qs = static_cast<const float*>(q);
  float* os = static_cast<float*>(out);

  // 1. write this step's k, v into their slots
  std::vector<int32_t> seq_of(static_cast<size_t>(b.num_tokens()));
  for (int32_t s = 0; s < b.num_seqs(); ++s)
    for (int32_t t = b.query_start[size_t(s)]; t < b.query_start[size_t(s) + 1]; ++t) seq_of[size_t(t)] = s;
  for (int32_t t = 0; t < b.num_tokens(); ++t) {
    const int32_t pos = b.positions[size_t(t)];
    const int32_t block = b.block_table(seq_of[size_t(t)])[pos / bs];
    const size_t slot = (size_t(block) * size_t(bs) + size_t(pos % bs)) * size_t(kvd);
    if (kv_->fp8) {
      kv_fp8_store(ks + size_t(t) * kvd, kvd, kv_->k_scale[size_t(layer)], kc + slot);
      kv_fp8_store(vs + size_t(t) * kvd, kvd, kv_->v_scale[size_t(layer)], vc + slot);
    } else {
      std::memcpy(kc + slot, ks + size_t(t) * kvd, size_t(kvd) * 4);
      std::memcpy(vc + slot, vs + size_t(t) * kvd, size_t(kvd) * 4);
    }
  }

  // 2. each (token, head): softmax(q . K[0..pos]) V. A fresh prompt (all of its context in this
  // step, more than one token) attends to its own k, v rows, not to the cache's copy: with an FP8
  // cache those are the unquantized values, as the CUDA backend's prefill (and vLLM's) reads them;
  // the cache serves later steps. (With a float cache the two are the same numbers.)
  const int64_t group = c.num_heads / c.num_kv_heads;
  const float scale = 1.0f / std::sqrt(float(hd));
  parallel_for(int64_t(b.num_tokens()) * c.num_heads, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores;
    std::vector<double> acc(static_cast<size_t>(hd));
    for (int64_t idx = lo; idx < hi; ++idx) {
      const int64_t t = idx / c.num_heads, h = idx % c.num_heads, kvh = h / group;
      const int32_t pos = b.positions[size_t(t)], s = seq_of[size_t(t)];
      const int32_t* table = b.block_table(s);
      const int32_t q0 = b.query_start[size_t(s)], q_len = b.query_start[size_t(s) + 1] - q0;
      const bool fresh = q_len > 1 && b.context_lens[size_t(s)] == q_len;  // token j is row q0 + j
      auto kv_row = [&](const float* cache, const float* rows, int64_t j) {
        return fresh ? rows + (q0 + j) * kvd + kvh * hd
                     : cache + (size_t(table[j / bs]) * size_t(bs) + size_t(j % bs)) * size_t(kvd) + kvh * hd;
      };
      const float* qv = qs + (t * c.num_heads + h) * hd;
      const int64_t n = int64_t(pos) + 1;
      scores.resize(size_t(n));
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const float* kj = kv_row(kc, ks, j);
        scores[size_t(j)] = cpu_dot(qv, kj, hd) * scale;
        mx = std::max(mx, scores[size_t(j)]);
      }
      double sum = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        scores[size_t(j)] = std::exp(scores[size_t(j)] - mx);
        sum += scores[size_t(j)];
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j < n; ++j) {
        const float* vj = kv_row(vc, vs, j);
        const double p = scores[size_t(j)];
        for (int64_t d = 0; d < hd; ++d) acc[size_t(d)] += p * vj[d];
      }
      float* o = os + (t * c.num_heads + h) * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] = float(acc[size_t(d)] / sum);
    }
  });
}

void CpuOps::silu_mul(Act gate, Act up, int64_t n, int64_t dim, Act out) {
  const float* g = static_cast<const float*>(gate);
  const float* u = static_cast<const float*>(up);
  float* o = static_cast<float*>(out);
  parallel_for(n * dim, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }, 4096);
}

void CpuOps::gather_logit_rows(Act x, int64_t dim, Act out) {
  const float* xs = static_cast<const float*>(x);
  float* o = static_cast<float*>(out);
  const auto& rows = batch_->logits_rows;
  for (size_t i = 0; i < rows.size(); ++i) std::memcpy(o + i * dim, xs + size_t(rows[i]) * dim, size_t(dim) * 4);
}

}  // namespace kiln
