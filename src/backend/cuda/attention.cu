// Paged attention. KV cache per layer: [num_blocks, n_kv, block_size, head_dim] bf16, so one
// head's block is contiguous.
//  - prefill (q_len > 1): one block per (query rows, KV head) computing all the query heads of the
//    group from one pass over K/V; 32- or 64-token K/V tiles double-buffered in shared memory;
//    S = QK^T and O += PV through mma.sync with P in registers, online softmax per tile (prefill
//    v2 below; v1, wmma and one block per query head, under KILN_PREFILL_ATTN=v1). On sm_90 at
//    head_dim 128 with GQA groups 2-8 and long enough prompts: the wgmma kernel (attention_wgmma.cu).
//  - decode (q_len == 1 everywhere): one block per (sequence, KV head, KV split) computing all the
//    query heads of the KV head's group, so each K/V byte is read once, not once per query head
//    (4x fewer bytes for Llama-3-8B's GQA); each warp takes 16-32 tokens at a time through
//    tensor-core QK^T and PV products (decode v2 below; v3, v2's math fed by a cp.async pipeline of
//    64-token K/V stages, where a block streams many stages; v5, v3 with a warp per KV head and 4
//    KV heads a block, at large batches); splits are merged by the last block to finish
//    (flash-decoding), so batch 1 still fills the GPU.
// FP8 KV cache (p.kv_fp8): the same kernels instantiated on __nv_fp8_e4m3 cache elements (half the
// bytes streamed). E4M3 values are all exact in f16 (and bf16), so prefill converts the fp8 tiles
// to f16 on their way into shared memory (f16 mma; v1: bf16, wmma) and decode converts in
// registers; real = fp8 * scale, and the scales are folded where they cost nothing: k_scale into the
// softmax scale, v_scale into the output's final normalization.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <mma.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "backend/cuda/async_copy.cuh"
#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/attention_wgmma.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/launch.cuh"

namespace kiln::cuda {
namespace {

using bf16 = __nv_bfloat16;
using fp8 = __nv_fp8_e4m3;
namespace wmma = nvcuda::wmma;

// Eight consecutive cache elements of one lane: 16 bytes of bf16 or 8 bytes of fp8.
template <typename C>
struct Vec8 {
  using T = uint4;
};
template <>
struct Vec8<fp8> {
  using T = uint2;
};

__device__ __forceinline__ void to_float8(const uint4& r, float (&x)[8]) {
  const bf16* b = reinterpret_cast<const bf16*>(&r);
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = __bfloat162float(b[i]);
}

// fp8x2 -> f16x2 is one instruction on sm_89+ and exact; f16 -> f32 is exact too.
__device__ __forceinline__ void to_float8(const uint2& r, float (&x)[8]) {
  const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3)));
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// Eight cache elements as eight bf16 (exact for fp8) in one 16-byte word, for the wmma tiles.
__device__ __forceinline__ uint4 load_bf16x8(const bf16* src) { return *reinterpret_cast<const uint4*>(src); }
__device__ __forceinline__ uint4 load_bf16x8(const fp8* src) {
  float x[8];
  to_float8(*reinterpret_cast<const uint2*>(src), x);
  uint4 r;
  __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
  return r;
}

// fp8(x / scale), saturated to +-448 as torch's float8_e4m3fn cast (and the CPU emulation, which
// divides too: kv_fp8_store in cpu_ops.h) does. __fdiv_rn: IEEE division even under fast math, so
// the stored codes match the CPU's bit for bit.
__device__ __forceinline__ uint2 to_fp8x8(const float (&x)[8], float scale) {
  uint2 r;
  fp8* o = reinterpret_cast<fp8*>(&r);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = fp8(__fdiv_rn(x[i], scale));
  return r;
}

// k, v rows [T, ld] bf16 -> FP8 caches at tokens[t].slot; one block per token, one thread per 8 values.
__global__ void kv_write_fp8_kernel(const bf16* k, int64_t ldk, const bf16* v, int64_t ldv, const TokenMeta* tokens,
                                    fp8* kc, fp8* vc, int32_t n_kv, int32_t hd, int32_t bs, float k_scale,
                                    float v_scale) {
  pdl_trigger();
  pdl_wait();
  const int t = blockIdx.x;
  const int32_t slot = tokens[t].slot;
  if (slot < 0) return;
  const int64_t block = slot / bs, off = slot % bs;
  const int vecs = hd / 8;
  for (int idx = threadIdx.x; idx < n_kv * vecs; idx += blockDim.x) {
    const int h = idx / vecs, c = idx % vecs;
    const int64_t dst = ((block * n_kv + h) * bs + off) * hd + c * 8;
    float x[8];
    to_float8(*reinterpret_cast<const uint4*>(k + int64_t(t) * ldk + int64_t(h) * hd + c * 8), x);
    *reinterpret_cast<uint2*>(kc + dst) = to_fp8x8(x, k_scale);
    to_float8(*reinterpret_cast<const uint4*>(v + int64_t(t) * ldv + int64_t(h) * hd + c * 8), x);
    *reinterpret_cast<uint2*>(vc + dst) = to_fp8x8(x, v_scale);
  }
}

constexpr int kBM = 64, kBN = 64, kWarps = 4;

template <int D>
struct PrefillSmem {
  static constexpr int kLdq = D + 8, kLdp = kBN + 8;
  static constexpr size_t kQ = size_t(kBM) * kLdq * 2, kK = size_t(kBN) * kLdq * 2;
  static constexpr size_t kP = size_t(kWarps) * 16 * kLdp * 2;
  static constexpr size_t kBytes = kQ + 2 * kK + kP + kBM * 4;
};

// S and O stay in registers as wmma accumulator fragments. Element j of a 16x16 float
// accumulator held by lane l sits at row l/4 + 8*((j>>1)&1), column 2*(l%4) + (j&1) + 8*(j>>2)
// (two m16n8 mma tiles; sm_80 and later), so the online-softmax rescale touches registers only:
// no S or O round trip through shared memory, and 3 blocks per SM instead of 2 at head_dim 128.
template <int D, typename C>
__global__ void __launch_bounds__(128) prefill_kernel(AttnParams p) {
  using S = PrefillSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);
  bf16* sK = reinterpret_cast<bf16*>(smem + S::kQ);
  bf16* sV = reinterpret_cast<bf16*>(smem + S::kQ + S::kK);
  bf16* sP = reinterpret_cast<bf16*>(smem + S::kQ + 2 * S::kK);
  int32_t* sPos = reinterpret_cast<int32_t*>(smem + S::kQ + 2 * S::kK + S::kP);
  pdl_trigger();
  pdl_wait();

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int seq = p.tiles[2 * blockIdx.x], q0 = p.tiles[2 * blockIdx.x + 1];
  const int head = blockIdx.y, kvh = head / (p.n_heads / p.n_kv);
  const SeqMeta sm = p.seqs[seq];
  const int rows = min(kBM, sm.q_len - q0);
  const int32_t* table = p.block_tables + int64_t(seq) * sm.table_stride;
  const bf16* q = reinterpret_cast<const bf16*>(p.q);
  const C* kc = static_cast<const C*>(p.k_cache);
  const C* vc = static_cast<const C*>(p.v_cache);
  constexpr bool kFp8 = std::is_same<C, fp8>::value;
  const float qk_scale = kFp8 ? p.scale * p.k_scale : p.scale;
  const float v_scale = kFp8 ? p.v_scale : 1.0f;
  constexpr int kVecs = D / 8;

  for (int i = tid; i < kBM * kVecs; i += 128) {
    const int r = i / kVecs, c = i % kVecs;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < rows) val = *reinterpret_cast<const uint4*>(q + int64_t(sm.q_start + q0 + r) * p.ldq + int64_t(head) * D + c * 8);
    *reinterpret_cast<uint4*>(sQ + r * S::kLdq + c * 8) = val;
  }
  for (int r = tid; r < kBM; r += 128) sPos[r] = r < rows ? p.tokens[sm.q_start + q0 + r].pos : -1;
  __syncthreads();
  int max_pos = -1;
  for (int r = 0; r < rows; ++r) max_pos = max(max_pos, sPos[r]);
  const int kv_len = min(max_pos + 1, sm.ctx_len);

  const int ra = lane >> 2, cb = (lane & 3) * 2;  // this lane's rows ra, ra + 8 and column base
  const int pos_a = sPos[warp * 16 + ra], pos_b = sPos[warp * 16 + ra + 8];
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
  bf16* sPw = sP + warp * 16 * S::kLdp;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(o[n], 0.0f);

  for (int kv0 = 0; kv0 < kv_len; kv0 += kBN) {
    __syncthreads();  // the previous tile's K/V are no longer read
#pragma unroll 4
    for (int i = tid; i < kBN * kVecs; i += 128) {
      const int r = i / kVecs, c = i % kVecs, j = kv0 + r;
      uint4 kval = make_uint4(0, 0, 0, 0), vval = make_uint4(0, 0, 0, 0);
      if (j < kv_len) {
        const int64_t base = ((int64_t(table[j / p.block_size]) * p.n_kv + kvh) * p.block_size + j % p.block_size) * D + c * 8;
        kval = load_bf16x8(kc + base);
        vval = load_bf16x8(vc + base);
      }
      *reinterpret_cast<uint4*>(sK + r * S::kLdq + c * 8) = kval;
      *reinterpret_cast<uint4*>(sV + r * S::kLdq + c * 8) = vval;
    }
    __syncthreads();

    // S_w[16, 64] = Q_w[16, D] K^T, in registers
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf[kBN / 16];
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n) {
      wmma::fill_fragment(sf[n], 0.0f);
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
        wmma::load_matrix_sync(a, sQ + warp * 16 * S::kLdq + k * 16, S::kLdq);
        wmma::load_matrix_sync(b, sK + n * 16 * S::kLdq + k * 16, S::kLdq);
        wmma::mma_sync(sf[n], a, b, sf[n]);
      }
    }
    // Online softmax on the fragments: rows a (j&2 == 0) and b; a row's 4 lanes share lane>>2.
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = kv0 + n * 16 + cb + (j & 1) + 8 * (j >> 2);
        const bool row_b = (j >> 1) & 1;
        float s = sf[n].x[j] * qk_scale;
        if (col >= kv_len || col > (row_b ? pos_b : pos_a)) s = -INFINITY;
        sf[n].x[j] = s;
        if (row_b) mx_b = fmaxf(mx_b, s);
        else mx_a = fmaxf(mx_a, s);
      }
#pragma unroll
    for (int o2 = 1; o2 <= 2; o2 <<= 1) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, o2));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, o2));
    }
    const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
    const float al_a = mn_a == -INFINITY ? 1.0f : __expf(m_a - mn_a);
    const float al_b = mn_b == -INFINITY ? 1.0f : __expf(m_b - mn_b);
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const bool row_b = (j >> 1) & 1;
        const float mn = row_b ? mn_b : mn_a;
        const float e = mn == -INFINITY ? 0.0f : __expf(sf[n].x[j] - mn);
        if (row_b) sum_b += e;
        else sum_a += e;
        sPw[(ra + 8 * row_b) * S::kLdp + n * 16 + cb + (j & 1) + 8 * (j >> 2)] = __float2bfloat16(e);
      }
#pragma unroll
    for (int o2 = 1; o2 <= 2; o2 <<= 1) {
      sum_a += __shfl_xor_sync(0xffffffffu, sum_a, o2);
      sum_b += __shfl_xor_sync(0xffffffffu, sum_b, o2);
    }
    l_a = l_a * al_a + sum_a;
    l_b = l_b * al_b + sum_b;
    m_a = mn_a;
    m_b = mn_b;
#pragma unroll
    for (int n = 0; n < D / 16; ++n)
#pragma unroll
      for (int j = 0; j < 8; ++j) o[n].x[j] *= ((j >> 1) & 1) ? al_b : al_a;
    __syncwarp();

    // O_w[16, D] += P_w[16, 64] V[64, D]
#pragma unroll
    for (int k = 0; k < kBN / 16; ++k) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
      wmma::load_matrix_sync(a, sPw + k * 16, S::kLdp);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
        wmma::load_matrix_sync(b, sV + k * 16 * S::kLdq + n * 16, S::kLdq);
        wmma::mma_sync(o[n], a, b, o[n]);
      }
    }
    __syncwarp();
  }

  const float inv_a = l_a > 0.0f ? v_scale / l_a : 0.0f, inv_b = l_b > 0.0f ? v_scale / l_b : 0.0f;
  bf16* out = reinterpret_cast<bf16*>(p.out);
#pragma unroll
  for (int n = 0; n < D / 16; ++n)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const bool row_b = (j >> 1) & 1;
      const int r = warp * 16 + ra + 8 * row_b;
      if (r < rows)
        out[int64_t(sm.q_start + q0 + r) * p.ldo + int64_t(head) * D + n * 16 + cb + (j & 1) + 8 * (j >> 2)] =
            __float2bfloat16(o[n].x[j] * (row_b ? inv_b : inv_a));
    }
}

// The end of a split decode block, shared by both decode kernels (v2, v3): once its partials ([acc
// (D), l, m] per head) are written, the last block of the (sequence, head group) to count
// (p.counters, put back to 0 by that block for the next launch) merges the splits: every (split,
// head) m and l loaded at once into shared memory, the split weights 2^(m - M) / L computed once (m
// is kept in log2 units), then each output a dot over the splits (loads in flight, never a serial
// chain of L2 round trips on the step's critical path). s_m and s_l hold 32 G floats, s_ml 2 G; the
// block is 128 threads; `out` is the sequence's output row.
template <int D, int G>
__device__ __forceinline__ void merge_splits(const AttnParams& p, int seq, int head0, int n_eff, float v_scale, bf16* out,
                                             float* s_m, float* s_l, float* s_ml, bool& s_last) {
  const int tid = threadIdx.x;
  __syncthreads();  // the block's partials, then its arrival (launch.cuh, atomic_add_acq_rel_gpu)
  if (tid == 0) {
    int32_t* cnt = p.counters + int64_t(seq) * p.n_heads + blockIdx.y;
    s_last = atomic_add_acq_rel_gpu(cnt, 1) == n_eff - 1;
    if (s_last) *cnt = 0;  // every other split has counted: ready for the next launch
  }
  __syncthreads();
  if (!s_last) return;
  const float* part0 = p.partials + (int64_t(seq) * p.n_heads + head0) * p.splits * (D + 2);
  // Up to kRegSplits splits (batch-1 contexts up to 64 kRegSplits tokens): each thread owns kPer
  // consecutive outputs of one head and loads their partials with every split's m and l at once
  // (one L2 round trip on the step's critical path instead of two); same arithmetic and order.
  constexpr int kPer = G * D / 128, kRegSplits = 8;
  if constexpr (kPer >= 2 && kPer <= 8 && kPer % 2 == 0 && D % (kPer > 0 ? kPer : 1) == 0) {
    if (n_eff <= kRegSplits) {
      const int o0 = tid * kPer, h = o0 / D, d0 = o0 % D;
      const float* ph = part0 + int64_t(h) * p.splits * (D + 2);
      float m[kRegSplits], l[kRegSplits], v[kRegSplits][kPer];
#pragma unroll
      for (int sp = 0; sp < kRegSplits; ++sp) {
        if (sp >= n_eff) break;
        const float* ps = ph + sp * (D + 2);
        m[sp] = __ldcg(ps + D + 1);
        l[sp] = __ldcg(ps + D);
#pragma unroll
        for (int j = 0; j < kPer / 2; ++j) {
          const float2 f = __ldcg(reinterpret_cast<const float2*>(ps + d0) + j);
          v[sp][2 * j] = f.x;
          v[sp][2 * j + 1] = f.y;
        }
      }
      float M = -INFINITY, L = 0.0f;
#pragma unroll
      for (int sp = 0; sp < kRegSplits; ++sp)
        if (sp < n_eff) M = fmaxf(M, m[sp]);
#pragma unroll
      for (int sp = 0; sp < kRegSplits; ++sp)
        if (sp < n_eff) L += m[sp] == -INFINITY ? 0.0f : l[sp] * fast_exp2(m[sp] - M);
      float o[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) o[j] = 0.0f;
#pragma unroll
      for (int sp = 0; sp < kRegSplits; ++sp) {
        if (sp >= n_eff) break;
        const float wt = m[sp] == -INFINITY || L <= 0.0f ? 0.0f : fast_exp2(m[sp] - M) / L;
#pragma unroll
        for (int j = 0; j < kPer; ++j) o[j] += v[sp][j] * wt;
      }
#pragma unroll
      for (int j = 0; j < kPer; ++j) out[int64_t(head0 + h) * D + d0 + j] = __float2bfloat16(o[j] * v_scale);
      return;
    }
  }
  for (int idx = tid; idx < n_eff * G; idx += 128) {
    const int sp = idx / G, h = idx % G;
    const float* ph = part0 + (int64_t(h) * p.splits + sp) * (D + 2);
    s_m[idx] = __ldcg(ph + D + 1);
    s_l[idx] = __ldcg(ph + D);
  }
  __syncthreads();
  if (tid < G) {
    float M = -INFINITY, L = 0.0f;
    for (int sp = 0; sp < n_eff; ++sp) M = fmaxf(M, s_m[sp * G + tid]);
    for (int sp = 0; sp < n_eff; ++sp)
      L += s_m[sp * G + tid] == -INFINITY ? 0.0f : s_l[sp * G + tid] * fast_exp2(s_m[sp * G + tid] - M);
    s_ml[2 * tid] = M;
    s_ml[2 * tid + 1] = L;
  }
  __syncthreads();
  for (int idx = tid; idx < n_eff * G; idx += 128) {
    const int h = idx % G;
    const float M = s_ml[2 * h], L = s_ml[2 * h + 1];
    s_m[idx] = s_m[idx] == -INFINITY || L <= 0.0f ? 0.0f : fast_exp2(s_m[idx] - M) / L;
  }
  __syncthreads();
  for (int idx = tid; idx < G * D; idx += 128) {
    const int h = idx / D, d = idx % D;
    const float* ph = part0 + int64_t(h) * p.splits * (D + 2) + d;
    float o = 0.0f;
#pragma unroll 8
    for (int sp = 0; sp < n_eff; ++sp) o += __ldcg(ph + sp * (D + 2)) * s_m[sp * G + h];
    out[int64_t(head0 + h) * D + d] = __float2bfloat16(o * v_scale);
  }
}

// ---- decode v2: tensor cores (mma.sync m16n8k16), the default ----
// v1 (a CUDA-core kernel, since removed) spent ~20 instructions per (token, head) on its per-token
// online softmax (a 4-step shuffle, two exps by all 16 lanes, an accumulator rescale): instruction-bound at large batch (batch 256 x
// ctx 1000, Llama-3.1-8B: 22.7 ms a step with an FP8 cache vs 8.1 ms of bytes). v2 makes the
// per-token work two tensor-core products: a warp takes 32 tokens at a time, S = Q K^T with the G
// query heads as the rows of a 16-row A operand (rows >= G are zero), one max and one rescale per
// tile, P in registers as the A operand of O += P V (the C layout of S is the A layout of P).
// bf16 cache: bf16 mma. FP8 cache: f16 mma (e4m3x2 -> f16x2 is one exact instruction; q is f16).
//
// Operand layouts come straight from the cache rows, no shared memory: a dot product does not care
// in which order its k index runs, so each lane of the QK product loads one token's contiguous
// D/4 elements (16-byte pieces, the 4 lanes of a token covering it) and q's fragment is built with
// the same permutation (kphys); for PV each lane loads contiguous D/8 elements of the 4 tokens its
// B fragment needs and pairs tokens with a byte permute; the output's column permutation (vphys)
// is undone when the warps merge through shared memory.
template <typename C>
struct DecodeMma;
template <>
struct DecodeMma<bf16> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) { return pack2<false>(a, b); }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};
template <>
struct DecodeMma<fp8> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) { return pack2<true>(a, b); }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <int kBytes>
__device__ __forceinline__ void load_raw(const void* src, uint32_t* w) {
  if constexpr (kBytes == 16) {
    const uint4 r = *reinterpret_cast<const uint4*>(src);
    w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
  } else if constexpr (kBytes == 8) {
    const uint2 r = *reinterpret_cast<const uint2*>(src);
    w[0] = r.x, w[1] = r.y;
  } else if constexpr (kBytes == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(src);
  } else {
    static_assert(kBytes == 2, "piece size");
    w[0] = *reinterpret_cast<const uint16_t*>(src);
  }
}

template <int D, typename C>
struct DecodeLayout {
  static constexpr int kEsz = int(sizeof(C));
  // QK: lane t (= lane % 4) of a token holds D / 4 elements in pieces of kWK; element e -> dim
  static constexpr int kWK = D / 4 < 16 / kEsz ? D / 4 : 16 / kEsz;
  static __device__ __forceinline__ int kphys(int e, int t) { return (e / kWK) * 4 * kWK + t * kWK + e % kWK; }
  static constexpr int kKW = D / 4 * kEsz / 4;  // words of one token's K slice
  // PV: lane g (= lane / 4) holds D / 8 elements of a token in pieces of kWV; element e -> dim
  static constexpr int kWV = D / 8 < 16 / kEsz ? D / 8 : 16 / kEsz;
  static __device__ __forceinline__ int vphys(int e, int g) { return (e / kWV) * 8 * kWV + g * kWV + e % kWV; }
  static constexpr int kVW = D / 8 * kEsz / 4 > 0 ? D / 8 * kEsz / 4 : 1;
};

// Tokens per warp iteration by default: up to 8 KB of K + V in flight per warp (bf16 at head_dim
// 128 with 32 tokens needs 255 registers and spills; 16 keep 3 blocks an SM).
template <int D, typename C>
constexpr int decode_tile() {
  return D * sizeof(C) >= 256 ? 16 : 32;
}

// The fused decode prologue's pieces, shared by the mma kernels (v2, v3). One rotary pair (a, b)
// of query head h < G (into sq) or, h == G, of the new token's key (into the cache at dst), with the
// rope kernel's arithmetic and bf16 rounding (kernels.cu), so fused and unfused paths store the
// same values.
template <int D, int G, typename C>
__device__ __forceinline__ void decode_rope_pair(const AttnParams& p, float (*sq)[D], const bf16* qrow, const bf16* kn,
                                                 C* kc, int64_t dst, int h, int a, int b, float sn, float cs,
                                                 C* k_copy = nullptr) {
  const bf16* x = h < G ? qrow + h * D : kn;
  const float x0 = __bfloat162float(x[a]), x1 = __bfloat162float(x[b]);
  const float r0 = __bfloat162float(__float2bfloat16(x0 * cs - x1 * sn));
  const float r1 = __bfloat162float(__float2bfloat16(x1 * cs + x0 * sn));
  if (h < G) {
    sq[h][a] = r0;
    sq[h][b] = r1;
    return;
  }
  C ca, cb;
  if constexpr (std::is_same<C, fp8>::value) {
    ca = fp8(__fdiv_rn(r0, p.k_scale));
    cb = fp8(__fdiv_rn(r1, p.k_scale));
  } else {
    ca = __float2bfloat16(r0);
    cb = __float2bfloat16(r1);
  }
  kc[dst + a] = ca;
  kc[dst + b] = cb;
  if (k_copy) {  // what the cache row now holds, for the block's own reads (shared memory)
    k_copy[a] = ca;
    k_copy[b] = cb;
  }
}

// The new token's v (vn: its bf16 row, global or shared) into the cache row at dst (the whole
// block); with v_copy, also what the cache row now holds, for the block's own reads.
template <int D, typename C>
__device__ __forceinline__ void decode_store_new_v(const AttnParams& p, C* vc, int64_t dst, const bf16* vn,
                                                   C* v_copy = nullptr) {
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    C cv;
    if constexpr (std::is_same<C, fp8>::value) cv = fp8(__fdiv_rn(__bfloat162float(vn[d]), p.v_scale));
    else cv = vn[d];
    vc[dst + d] = cv;
    if (v_copy) v_copy[d] = cv;
  }
}

// q's A fragments from the (roped) rows in shared memory: rows g < G, k permuted as the K slices.
template <int D, int G, typename C>
__device__ __forceinline__ void decode_q_fragments(const float (*sq)[D], uint32_t (&qa)[D / 16][2]) {
  using L = DecodeLayout<D, C>;
  using M = DecodeMma<C>;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int d = L::kphys(4 * ks, t);
    qa[ks][0] = g < G ? M::pack(sq[g][d], sq[g][d + 1]) : 0u;
    qa[ks][1] = g < G ? M::pack(sq[g][d + 2], sq[g][d + 3]) : 0u;
  }
}

// One warp's tile of kN tokens, shared by the mma decode kernels (v2 loads the fragments from
// global memory, v3 from its shared-memory stages): S = Q K^T from the K fragments kw (this lane:
// row g, tokens nt * 8 + 2t, + 1), the online softmax update (one max and one rescale per tile and
// row, one exp per (token, head)), then O^T += V^T P^T from the V fragments vw. Tokens at or past
// j1 are masked; token jt is in the split.
template <int D, typename C, int kN>
__device__ __forceinline__ void decode_tile_math(const uint32_t (&kw)[kN / 8][DecodeLayout<D, C>::kKW],
                                                 const uint32_t (&vw)[kN / 16][4][DecodeLayout<D, C>::kVW],
                                                 const uint32_t (&qa)[D / 16][2], int jt, int j1, float qk_scale,
                                                 float (&o)[D / 16][4], float& m_run, float& l_run) {
  using M = DecodeMma<C>;
  constexpr bool kFp8 = std::is_same<C, fp8>::value;
  constexpr int kKs = D / 16, kMt = D / 16;
  const int t = threadIdx.x & 3;
  // S = Q K^T: this lane holds row g, tokens nt * 8 + 2t, + 1
  float s[kN / 8][2];
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) {
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int ks = 0; ks < kKs; ++ks) {
      uint32_t b0, b1;
      if constexpr (kFp8) {
        b0 = fp8x2_to_f16x2(kw[nt][ks]);
        b1 = fp8x2_to_f16x2(kw[nt][ks] >> 16);
      } else {
        b0 = kw[nt][2 * ks];
        b1 = kw[nt][2 * ks + 1];
      }
      M::mma(c, qa[ks][0], 0u, qa[ks][1], 0u, b0, b1);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) s[nt][i] = jt + nt * 8 + 2 * t + i < j1 ? c[i] * qk_scale : -INFINITY;
  }
  // One max, one rescale per tile and row; one exp per (token, head).
  float mx = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][0], s[nt][1]));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(m_run, mx);  // finite: token jt is in the split
  const float alpha = fast_exp2(m_run - m_new);
  m_run = m_new;
  l_run *= alpha;
  // this lane's accumulators are heads 2t, 2t + 1; their rows' alphas live in lanes 8t, 8t + 4
  const float al0 = __shfl_sync(0xffffffffu, alpha, 8 * t), al1 = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
#pragma unroll
  for (int i = 0; i < kMt; ++i) {
    o[i][0] *= al0;
    o[i][1] *= al1;
    o[i][2] *= al0;
    o[i][3] *= al1;
  }
  uint32_t pa[kN / 16][2];
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) {
    const float p0 = fast_exp2(s[nt][0] - m_new), p1 = fast_exp2(s[nt][1] - m_new);
    l_run += p0 + p1;
    pa[nt / 2][nt & 1] = M::pack(p0, p1);
  }
  // O^T += V^T P^T (dims as the 16 rows, so all four accumulators of a lane are used): A
  // fragment of m-tile i = this lane's elements 2i (row g) and 2i + 1 (row g + 8) of tokens
  // (2t, 2t + 1) and (2t + 8, 2t + 9), paired by a byte permute; B = P^T is S's C layout as is.
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
    for (int i = 0; i < kMt; ++i) {
      uint32_t a0, a1, a2, a3;
      if constexpr (kFp8) {
        // codes 2i, 2i + 1 of the token pair interleaved: (a_2i, b_2i, a_2i+1, b_2i+1) -> two f16x2
        const int w = i / 2;
        const uint32_t sel = (i & 1) ? 0x7362u : 0x5140u;
        const uint32_t lo = __byte_perm(vw[kk][0][w], vw[kk][1][w], sel);
        const uint32_t hi = __byte_perm(vw[kk][2][w], vw[kk][3][w], sel);
        a0 = fp8x2_to_f16x2(lo);
        a1 = fp8x2_to_f16x2(lo >> 16);
        a2 = fp8x2_to_f16x2(hi);
        a3 = fp8x2_to_f16x2(hi >> 16);
      } else {
        a0 = __byte_perm(vw[kk][0][i], vw[kk][1][i], 0x5410u);
        a1 = __byte_perm(vw[kk][0][i], vw[kk][1][i], 0x7632u);
        a2 = __byte_perm(vw[kk][2][i], vw[kk][3][i], 0x5410u);
        a3 = __byte_perm(vw[kk][2][i], vw[kk][3][i], 0x7632u);
      }
      M::mma(o[i], a0, a1, a2, a3, pa[kk][0], pa[kk][1]);
    }
}

// The end of both mma decode kernels (v2, v3): each warp's O^T accumulators and running max / sum
// into red, the warps merged, then the output (one split) or this split's partials and the last
// block's merge of the splits.
// One warp's O^T accumulators (heads 2t, 2t + 1; the output's column permutation undone), running
// max and sum (over the row's 4 lanes) into red[warp]: [G][D] outputs, then m, l.
template <int D, int G, typename C>
__device__ __forceinline__ void decode_warp_to_smem(float (*red)[G][D + 2], const float (&o)[D / 16][4], float m_run,
                                                    float l_run) {
  using L = DecodeLayout<D, C>;
  constexpr int kMt = D / 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
#pragma unroll
  for (int i = 0; i < kMt; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int h = 2 * t + (r & 1);
      if (h < G) red[warp][h][L::vphys(2 * i + (r >> 1), g)] = o[i][r];
    }
  if (g < G && t == 0) {
    red[warp][g][D] = m_run;
    red[warp][g][D + 1] = l_run;
  }
}

template <int D, int G, typename C>
__device__ __forceinline__ void decode_finish(const AttnParams& p, float (*red)[G][D + 2], const float (&o)[D / 16][4],
                                              float m_run, float l_run, int seq, int head0, int split, int n_eff,
                                              float v_scale, int q_start, float* s_m, float* s_l, float* s_ml,
                                              bool& s_last) {
  constexpr int kWarps = 4;
  const int tid = threadIdx.x;
  decode_warp_to_smem<D, G, C>(red, o, m_run, l_run);
  __syncthreads();
  // Merge the warps, then (splits > 1) write partials; the last block merges the splits.
  bf16* out = reinterpret_cast<bf16*>(p.out) + int64_t(q_start) * p.ldo;
  for (int idx = tid; idx < G * (D + 1); idx += 128) {
    const int h = idx / (D + 1), d = idx % (D + 1);
    float Mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) Mx = fmaxf(Mx, red[w][h][D]);
    float sum = 0.0f, Ls = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = red[w][h][D] == -INFINITY ? 0.0f : fast_exp2(red[w][h][D] - Mx);
      sum += (d < D ? red[w][h][d] : red[w][h][D + 1]) * wt;
      Ls += red[w][h][D + 1] * wt;
    }
    if (n_eff == 1) {
      if (d < D) out[int64_t(head0 + h) * D + d] = __float2bfloat16(Ls > 0.0f ? sum / Ls * v_scale : 0.0f);
    } else {
      float* part = p.partials + ((int64_t(seq) * p.n_heads + head0 + h) * p.splits + split) * (D + 2);
      part[d] = sum;  // d == D: the merged l
      if (d == 0) part[D + 1] = Mx;
    }
  }
  if (n_eff == 1) return;
  merge_splits<D, G>(p, seq, head0, n_eff, v_scale, out, s_m, s_l, s_ml, s_last);
}

template <int D, int G, typename C, int kN = decode_tile<D, C>(), int kMinBlocks = 3>
__global__ void __launch_bounds__(128, kMinBlocks) decode_kernel(AttnParams p) {
  constexpr int kWarps = 4;
  constexpr int kKs = D / 16, kMt = D / 16;
  using L = DecodeLayout<D, C>;
  using M = DecodeMma<C>;
  constexpr bool kFp8 = std::is_same<C, fp8>::value;
  __shared__ float sq[G][D];
  __shared__ float red[kWarps][G][D + 2];
  __shared__ float s_m[32 * G], s_l[32 * G], s_ml[2 * G];  // the split merge (splits <= 32)
  __shared__ bool s_last;
  __shared__ float2 s_sc[D / 2];                     // (sin, cos) of the new token's rotary pairs
  __shared__ __align__(16) bf16 s_new[(G + 2) * D];  // q rows of the group, the new k and v
  __shared__ __align__(16) C s_kv[2][D];             // the new token's cache rows (k roped), as stored
  // Before pdl_wait() this kernel reads only what no kernel of this step writes: the step metadata
  // (uploaded before the step), rope frequencies, and the cache rows of earlier tokens (written by
  // earlier steps; this step writes only each sequence's new row, below). At batch 1 the kernel is
  // a chain of dependent memory round trips between the qkv GEMV and o_proj; this moves the
  // metadata, the block table and the first tile's K/V loads ahead of the wait.
  const int seq = blockIdx.x, head0 = blockIdx.y * G, split = blockIdx.z;
  const int kvh = head0 / (p.n_heads / p.n_kv);
  const SeqMeta sm = p.seqs[seq];
  if (sm.q_len != 1) return;  // a prefill sequence of a mixed step: the prefill kernel's
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int ctx = sm.ctx_len;
  // Splits are fixed when a graph is captured, the context is not: a split takes at least one tile
  // per warp (64 tokens with a bf16 cache, 128 with FP8, whose tiles are 32 tokens; it was 64 for
  // both, which left two of the four warps idle on FP8 splits: session 15, ctx 2,048 batch 1
  // -4.4 %, batch 4 -4.5 %, ctx 128 unchanged); splits past the context exit at once.
  constexpr int kMinPer = kWarps * kN;
  const int per = (max((ctx + p.splits - 1) / p.splits, kMinPer) + kN - 1) / kN * kN;
  const int n_eff = max(1, (ctx + per - 1) / per);
  if (split >= n_eff) return;
  const int j0 = split * per, j1 = min(ctx, j0 + per);
  const int32_t* table = p.block_tables + int64_t(seq) * sm.table_stride;
  C* kc = static_cast<C*>(const_cast<void*>(p.k_cache));
  C* vc = static_cast<C*>(const_cast<void*>(p.v_cache));
  // log2 units: exp(x) = 2^(x log2 e)
  const float qk_scale = (kFp8 ? p.scale * p.k_scale : p.scale) * 1.4426950408889634f;
  const float v_scale = kFp8 ? p.v_scale : 1.0f;
  const TokenMeta tm = p.tokens[sm.q_start];
  const bool write = p.rope && tm.slot >= 0 && ctx > 0 && (ctx - 1) / per == split;
  if (p.rope) {
    const float pos = float(tm.pos);
    for (int i = tid; i < D / 2; i += 128) {
      float sn, cs;
      sincosf(pos * p.inv_freq[i], &sn, &cs);
      s_sc[i] = make_float2(sn, cs);
    }
  }

  // Lane l finds token jt + l's cache row (one division per token); the others get it by shuffle.
  // Tokens past the split read the last valid row and are masked. The block-table read for the next
  // tile is issued a tile ahead, so an iteration waits on one memory round trip, not two.
  auto cache_row = [&](int jt) -> int32_t {
    const int jl = min(jt + lane, j1 - 1);
    return (table[jl / p.block_size] * p.n_kv + kvh) * p.block_size + jl % p.block_size;
  };
  uint32_t kw[kN / 8][L::kKW];
  uint32_t vw[kN / 16][4][L::kVW];  // tokens 2t, 2t + 1, 2t + 8, 2t + 9 of each 16
  auto load_tile = [&](int32_t row_l) {
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
      const C* src = kc + int64_t(__shfl_sync(0xffffffffu, row_l, nt * 8 + g)) * D + t * L::kWK;
#pragma unroll
      for (int pc = 0; pc < D / 4 / L::kWK; ++pc)
        load_raw<L::kWK * L::kEsz>(src + pc * 4 * L::kWK, &kw[nt][pc * L::kWK * L::kEsz / 4]);
    }
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tok = kk * 16 + 2 * t + (i & 1) + 8 * (i >> 1);
        const C* src = vc + int64_t(__shfl_sync(0xffffffffu, row_l, tok)) * D + g * L::kWV;
#pragma unroll
        for (int pc = 0; pc < D / 8 / L::kWV; ++pc)
          load_raw<L::kWV * L::kEsz>(src + pc * 8 * L::kWV, &vw[kk][i][pc * L::kWV * L::kEsz / 4]);
      }
  };
  int jt = j0 + warp * kN;
  int32_t row_l = jt < j1 ? cache_row(jt) : 0;
  if (jt < j1) load_tile(row_l);  // the new token's row, if in this tile, is replaced after its write
  int32_t row_next = jt + kWarps * kN < j1 ? cache_row(jt + kWarps * kN) : 0;

  pdl_wait();  // q, k, v are the qkv GEMV's output
  const bf16* qrow = reinterpret_cast<const bf16*>(p.q) + int64_t(sm.q_start) * p.ldq + int64_t(head0) * D;
  const bf16* kn = reinterpret_cast<const bf16*>(p.k_new) + int64_t(sm.q_start) * p.ldk + int64_t(kvh) * D;
  const bf16* vn = reinterpret_cast<const bf16*>(p.v_new) + int64_t(sm.q_start) * p.ldv + int64_t(kvh) * D;
  // q, k and v rows in one round of 16-byte loads (rows are 16-byte aligned: ld and D multiples of 8)
  for (int i = tid; i < (G + 2) * D / 8; i += 128) {
    const int r = i / (D / 8), c = i % (D / 8);
    const bf16* src = r < G ? qrow + r * D : r == G ? kn : vn;
    if (r < G || write) reinterpret_cast<uint4*>(s_new)[i] = *reinterpret_cast<const uint4*>(src + c * 8);
  }
  __syncthreads();
  // The next kernel (o_proj's GEMV) may launch only now: its blocks load their weights before their
  // own wait, and that flood, issued at this kernel's top, slowed the round trips above (session 15
  // traces: 6.1 us from the wait to the tile math's end, 2.8 without o_proj's early loads). Triggered
  // here: batch-1 FP8 decode -0.9 %, ctx 2,048 -1.1 %, batch 4 unchanged (s15 run 12).
  pdl_trigger();

  // q (roped with p.rope, rounded to bf16 as the unfused path stores it) -> sq; the new token's
  // roped k and its v -> the cache, by the block whose split holds it. The rope arithmetic is the
  // rope kernel's (kernels.cu), so the fused and unfused paths store the same values.
  if (p.rope) {
    const bool inter = p.rope == 2;
    const int64_t dst = write ? ((int64_t(tm.slot / p.block_size) * p.n_kv + kvh) * p.block_size +
                                 tm.slot % p.block_size) * D
                              : 0;
    for (int idx = tid; idx < (G + 1) * (D / 2); idx += 128) {
      const int h = idx / (D / 2), i = idx % (D / 2);
      if (h == G && !write) break;
      const float2 sc = s_sc[i];
      const int a = inter ? 2 * i : i, b = inter ? 2 * i + 1 : i + D / 2;
      decode_rope_pair<D, G>(p, sq, s_new, s_new + G * D, kc, dst, h, a, b, sc.x, sc.y, s_kv[0]);
    }
    if (write) decode_store_new_v<D>(p, vc, dst, s_new + (G + 1) * D, s_kv[1]);
  } else {
    for (int idx = tid; idx < G * D; idx += 128) sq[idx / D][idx % D] = __bfloat162float(s_new[idx]);
  }
  __syncthreads();  // sq ready; the new token's global writes visible to this block's threads
  // The newest token's row was written this step: its fragments in the first tile (loaded before
  // the wait) come from the block's shared copy (fused), or the tile is loaded again (the unfused
  // path's KV-write kernel wrote it before the wait).
  if (jt < j1 && ctx - 1 >= jt && ctx - 1 < jt + kN) {
    const int nt_tok = ctx - 1 - jt;
    if (write) {
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
        if (nt * 8 + g == nt_tok)
#pragma unroll
          for (int pc = 0; pc < D / 4 / L::kWK; ++pc)
            load_raw<L::kWK * L::kEsz>(&s_kv[0][t * L::kWK + pc * 4 * L::kWK], &kw[nt][pc * L::kWK * L::kEsz / 4]);
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (kk * 16 + 2 * t + (i & 1) + 8 * (i >> 1) == nt_tok)
#pragma unroll
            for (int pc = 0; pc < D / 8 / L::kWV; ++pc)
              load_raw<L::kWV * L::kEsz>(&s_kv[1][g * L::kWV + pc * 8 * L::kWV], &vw[kk][i][pc * L::kWV * L::kEsz / 4]);
    } else if (!p.rope) {
      load_tile(row_l);
    }
  }

  uint32_t qa[kKs][2];  // A fragments of q: rows g < G, k permuted as the K slices (kphys)
  decode_q_fragments<D, G, C>(sq, qa);

  float o[kMt][4];  // O^T: dims vphys(2i, g) (o[i][0..1]) and vphys(2i + 1, g) (o[i][2..3]), heads 2t, 2t + 1
#pragma unroll
  for (int i = 0; i < kMt; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_run = -INFINITY, l_run = 0.0f;  // row g; l over this lane's columns, summed at the end
  while (jt < j1) {
    decode_tile_math<D, C, kN>(kw, vw, qa, jt, j1, qk_scale, o, m_run, l_run);
    jt += kWarps * kN;
    if (jt < j1) {
      row_l = row_next;
      if (jt + kWarps * kN < j1) row_next = cache_row(jt + kWarps * kN);
      load_tile(row_l);
    }
  }
  decode_finish<D, G, C>(p, red, o, m_run, l_run, seq, head0, split, n_eff, v_scale, sm.q_start, s_m, s_l, s_ml, s_last);
}

// ---- decode v3: v2's math fed by a multi-stage cp.async pipeline, the default at head_dim 64/128 ----
// v2 loads each warp's K/V straight into registers and only then multiplies: a warp has its 8 KB
// in flight during the load and nothing during the math, so at batch 256 x ctx 1000 (FP8 cache) the
// SMs held too few bytes in flight and the kernel streamed at ~66 % of DRAM bandwidth (ncu, s2-attn
// run 3; 168 registers with spills, 3 blocks an SM). v3 copies 64-token K/V stages (4 warps x 16
// tokens) into shared memory with cp.async, kS stages deep: while a stage is multiplied the next
// kS - 1 are in flight (FP8 at head_dim 128: 2 x 16 KB a block, 4 blocks an SM; Little's law asks
// ~3 TB/s x ~1 us / 132 SMs ~ 24-32 KB an SM). Each thread copies fixed 16-byte chunks of a stage's
// rows (row = one token of one KV head, contiguous in the paged cache; any block_size), reading the
// block table one stage ahead of its copies; rows past the split are zero-filled (no DRAM read).
// Chunks are XOR-swizzled within a row so that the fragment reads below (v2's layouts: K by token
// row, 16-byte pieces at 64-byte stride; V 4 token rows a piece) hit distinct banks.
// The new token (p.rope): stages that do not hold it are issued before the rope arithmetic, the one
// that does only after the block has written it (generic stores, then a barrier: cp.async reads
// through L2 like a load).
template <int D, typename C>
struct DecodePipe {
  static constexpr int kEsz = int(sizeof(C));
  static constexpr int kTok = 64;                 // tokens a stage: 4 warps x 16
  static constexpr int kRowB = D * kEsz;          // bytes of one token's K (or V) row
  static constexpr int kCpr = kRowB / 16;         // 16-byte chunks a row
  static constexpr int kTileB = kTok * kRowB;     // K (or V) bytes a stage
  static constexpr int kStageB = 2 * kTileB;      // [K tile][V tile]
  static constexpr int kPerThr = kTok * kCpr / 128;  // chunks a thread copies per tile
  static constexpr int kRowStep = 128 / kCpr;        // rows between a thread's chunks
  // 3 stages (2 in flight while one is read): FP8 at head_dim 128 3 x 16 KB, 4 blocks an SM (126
  // registers, no spill); bf16 at 128 3 x 32 KB, 2 blocks (179 registers). Blocks an SM beat depth
  // (s3-dattn run 1, batch 256 x ctx 1000 FP8 step: 4 stages / 3 blocks 12.19 ms, 3 / 4 11.74 ms,
  // 6 / 2 13.22 ms).
  static constexpr int kStages = 3;
  static constexpr int kMinBlocks = kStageB >= 32768 ? 2 : 4;
  static_assert(kCpr >= 4 && 128 % kCpr == 0 && (kTok * kCpr) % 128 == 0, "head_dim 64 or 128");
  // row r's logical chunk c sits at c ^ swz(r): rows 2k and 2k + 1 differ in bit 2, the 4 even (odd)
  // rows of 8 in bits 1-2, so K's 2-rows-a-phase and V's 4-rows-a-phase reads are conflict-free
  static __device__ __forceinline__ int swz(int r) { return ((((r >> 1) & 3) << 1) ^ ((r & 1) << 2)) & (kCpr - 1); }
  // shared-memory byte offset of logical byte o (a piece never crosses a 16-byte chunk) of row r
  static __device__ __forceinline__ int at(int r, int o) { return r * kRowB + ((((o >> 4) ^ swz(r))) << 4) + (o & 15); }
};

__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void pipe_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void pipe_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <int kBytes>
__device__ __forceinline__ void lds_raw(uint32_t addr, uint32_t* w) {
  if constexpr (kBytes == 16) {
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                 : "r"(addr));
  } else {
    static_assert(kBytes == 8, "piece size");
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(w[0]), "=r"(w[1]) : "r"(addr));
  }
}

template <int D, int G, typename C>
__global__ void __launch_bounds__(128, DecodePipe<D, C>::kMinBlocks) decode_kernel_v3(AttnParams p) {
  constexpr int kWarps = 4, kN = 16;
  constexpr int kKs = D / 16, kMt = D / 16;
  using L = DecodeLayout<D, C>;
  using M = DecodeMma<C>;
  using P = DecodePipe<D, C>;
  constexpr int kS = P::kStages;
  constexpr bool kFp8 = std::is_same<C, fp8>::value;
  static_assert(L::kWK * L::kEsz == 16, "K pieces of 16 bytes");
  static_assert(kS >= 3, "at least two stages in flight");
  extern __shared__ __align__(128) unsigned char smem[];
  // after the loop the stages hold the warps' partial results; before it the last stage holds q
  float(*red)[G][D + 2] = reinterpret_cast<float(*)[G][D + 2]>(smem);
  float(*sq)[D] = reinterpret_cast<float(*)[D]>(smem + size_t(kS - 1) * P::kStageB);
  static_assert(sizeof(float) * kWarps * G * (D + 2) <= size_t(kS) * P::kStageB && sizeof(float) * G * D <= P::kStageB,
                "smem");
  __shared__ float s_m[32 * G], s_l[32 * G], s_ml[2 * G];  // the split merge (splits <= 32)
  __shared__ bool s_last;
  pdl_trigger();
  pdl_wait();
  const int seq = blockIdx.x, head0 = blockIdx.y * G, split = blockIdx.z;
  const int kvh = head0 / (p.n_heads / p.n_kv);
  const SeqMeta sm = p.seqs[seq];
  if (sm.q_len != 1) return;  // a prefill sequence of a mixed step: the prefill kernel's
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int ctx = sm.ctx_len;
  // Splits are fixed when a graph is captured, the context is not: a split takes at least one stage
  // of tokens, and splits past the context exit at once.
  const int per = (max((ctx + p.splits - 1) / p.splits, P::kTok) + P::kTok - 1) / P::kTok * P::kTok;
  const int n_eff = max(1, (ctx + per - 1) / per);
  if (split >= n_eff) return;
  const int j0 = split * per, j1 = min(ctx, j0 + per);
  const int n_st = (j1 - j0 + P::kTok - 1) / P::kTok;
  const int32_t* table = p.block_tables + int64_t(seq) * sm.table_stride;
  C* kc = static_cast<C*>(const_cast<void*>(p.k_cache));
  C* vc = static_cast<C*>(const_cast<void*>(p.v_cache));
  const float qk_scale = (kFp8 ? p.scale * p.k_scale : p.scale) * 1.4426950408889634f;  // log2 units
  const float v_scale = kFp8 ? p.v_scale : 1.0f;
  const bf16* qrow = reinterpret_cast<const bf16*>(p.q) + int64_t(sm.q_start) * p.ldq + int64_t(head0) * D;
  const uint32_t sbase = uint32_t(__cvta_generic_to_shared(smem));

  // The copy side: this thread's chunk c0 of rows r0 + k kRowStep of every stage.
  const int bs = p.block_size;
  const bool bs_pow2 = (bs & (bs - 1)) == 0;
  const int bs_shift = __ffs(bs) - 1;
  const int c0 = tid % P::kCpr, r0 = tid / P::kCpr;
  auto block_of = [&](int j) { return bs_pow2 ? j >> bs_shift : j / bs; };
  // table entries of a stage's rows (rows past the split: any valid entry, the copy zero-fills)
  auto load_tbl = [&](int st, int32_t (&tb)[P::kPerThr]) {
#pragma unroll
    for (int k = 0; k < P::kPerThr; ++k) {
      const int j = min(j0 + st * P::kTok + r0 + k * P::kRowStep, j1 - 1);
      tb[k] = st < n_st ? __ldg(table + block_of(j)) : 0;
    }
  };
  auto issue = [&](int st, const int32_t (&tb)[P::kPerThr]) {
    if (st < n_st) {
      const uint32_t dst = sbase + uint32_t((st % kS) * P::kStageB);
#pragma unroll
      for (int k = 0; k < P::kPerThr; ++k) {
        const int r = r0 + k * P::kRowStep, j = j0 + st * P::kTok + r;
        const int off = bs_pow2 ? j & (bs - 1) : j % bs;
        const int64_t row = (int64_t(tb[k]) * p.n_kv + kvh) * bs + off;
        const bool ok = j < j1;
        const int64_t e = ok ? row * D + c0 * (16 / P::kEsz) : 0;
        const uint32_t o = uint32_t(P::at(r, c0 * 16));
        cp_async16_zfill(dst + o, kc + e, ok);
        cp_async16_zfill(dst + P::kTileB + o, vc + e, ok);
      }
    }
    pipe_commit();  // one group a stage, empty past the split: the wait counts stay uniform
  };

  const TokenMeta tm = p.rope ? p.tokens[sm.q_start] : TokenMeta{};
  const bool write = p.rope && tm.slot >= 0 && ctx > 0 && (ctx - 1) / per == split;
  // stages issued before the rope: all but the one holding the new token (and those after it)
  const int n_pre = write ? min(kS - 1, (ctx - 1 - j0) / P::kTok) : kS - 1;
  int32_t tbp[kS - 1][P::kPerThr];
#pragma unroll
  for (int st = 0; st < kS - 1; ++st) load_tbl(st, tbp[st]);
#pragma unroll
  for (int st = 0; st < kS - 1; ++st)
    if (st < n_pre) issue(st, tbp[st]);

  // q (roped with p.rope, rounded to bf16 as the unfused path stores it) -> sq; the new token's
  // roped k and its v -> the cache, by the block whose split holds it. The rope arithmetic is the
  // rope kernel's (kernels.cu), so the fused and unfused paths store the same values. One sincos
  // a thread: pair i for heads h = hg, hg + kHg, ... (and the new k as head G).
  if (p.rope) {
    const float pos = float(tm.pos);
    const bool inter = p.rope == 2;
    const int64_t dst = write ? ((int64_t(tm.slot / p.block_size) * p.n_kv + kvh) * p.block_size +
                                 tm.slot % p.block_size) * D
                              : 0;
    const bf16* kn = reinterpret_cast<const bf16*>(p.k_new) + int64_t(sm.q_start) * p.ldk + int64_t(kvh) * D;
    constexpr int kHg = 128 / (D / 2);
    const int i = tid % (D / 2);
    float sn, cs;
    sincosf(pos * p.inv_freq[i], &sn, &cs);
    const int a = inter ? 2 * i : i, b = inter ? 2 * i + 1 : i + D / 2;
    for (int h = tid / (D / 2); h <= G; h += kHg) {
      if (h == G && !write) break;
      decode_rope_pair<D, G>(p, sq, qrow, kn, kc, dst, h, a, b, sn, cs);
    }
    if (write)
      decode_store_new_v<D>(p, vc, dst,
                            reinterpret_cast<const bf16*>(p.v_new) + int64_t(sm.q_start) * p.ldv + int64_t(kvh) * D);
  } else {
    for (int idx = tid; idx < G * D; idx += 128) sq[idx / D][idx % D] = __bfloat162float(qrow[(idx / D) * D + idx % D]);
  }
  __syncthreads();  // sq ready; the new token's global writes visible to this block's copies
#pragma unroll
  for (int st = 0; st < kS - 1; ++st)
    if (st >= n_pre) issue(st, tbp[st]);
  int32_t tb[P::kPerThr];
  load_tbl(kS - 1, tb);

  uint32_t qa[kKs][2];  // A fragments of q: rows g < G, k permuted as the K slices (kphys)
  decode_q_fragments<D, G, C>(sq, qa);

  // This lane's fragment pieces, as byte offsets in a stage (v2's layouts, rows of the warp's 16).
  uint32_t koff[kN / 8][D / 4 / L::kWK];
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
    for (int pc = 0; pc < D / 4 / L::kWK; ++pc)
      koff[nt][pc] = uint32_t(P::at(warp * kN + nt * 8 + g, (t + pc * 4) * 16));
  uint32_t voff[4][D / 8 / L::kWV];  // tokens 2t, 2t + 1, 2t + 8, 2t + 9
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int pc = 0; pc < D / 8 / L::kWV; ++pc)
      voff[i][pc] = uint32_t(P::at(warp * kN + 2 * t + (i & 1) + 8 * (i >> 1), (g + pc * 8) * L::kWV * L::kEsz)) + P::kTileB;

  float o[kMt][4];  // O^T: dims vphys(2i, g) (o[i][0..1]) and vphys(2i + 1, g) (o[i][2..3]), heads 2t, 2t + 1
#pragma unroll
  for (int i = 0; i < kMt; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_run = -INFINITY, l_run = 0.0f;  // row g; l over this lane's columns, summed at the end
  for (int st = 0; st < n_st; ++st) {
    pipe_wait<kS - 2>();  // this thread's copies of stage st have landed
    __syncthreads();          // everyone's have; everyone is done reading stage st - 1's buffer
    issue(st + kS - 1, tb);   // into stage st - 1's buffer
    load_tbl(st + kS, tb);    // a stage ahead: its latency hides behind this stage's math
    const int jt = j0 + st * P::kTok + warp * kN;
    if (jt >= j1) continue;  // the split's last stage: this warp's tokens are all past it
    const uint32_t sb = sbase + uint32_t((st % kS) * P::kStageB);
    uint32_t kw[kN / 8][L::kKW];
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
      for (int pc = 0; pc < D / 4 / L::kWK; ++pc) lds_raw<16>(sb + koff[nt][pc], &kw[nt][pc * 4]);
    uint32_t vw[kN / 16][4][L::kVW];  // kN == 16: tokens 2t, 2t + 1, 2t + 8, 2t + 9
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int pc = 0; pc < D / 8 / L::kWV; ++pc)
        lds_raw<L::kWV * L::kEsz>(sb + voff[i][pc], &vw[0][i][pc * L::kWV * L::kEsz / 4]);

    decode_tile_math<D, C, kN>(kw, vw, qa, jt, j1, qk_scale, o, m_run, l_run);
  }
  pipe_wait<0>();  // (only empty groups can be pending) the stages become red
  __syncthreads();
  decode_finish<D, G, C>(p, red, o, m_run, l_run, seq, head0, split, n_eff, v_scale, sm.q_start, s_m, s_l, s_ml, s_last);
}

// ---- decode v5: v3 with one KV head a warp, for large batches ----
// v3 gives a block one (sequence, KV head) and its 4 warps 16 tokens each of every 64-token stage. At
// batch 1,024 x ctx 192 (128/128 at max batch 1,024) such a block streams 3 stages, and its fixed
// costs (the metadata -> block table -> first bytes round trips, the new token's write before its
// stage, the warps' merge) are most of its life: 64-65 % of the read rate (s5 op timing; 92 % at ctx
// 1,500). v5 gives a block 4 KV heads of one sequence and each warp one of them over the whole
// context: a stage is the same 64 rows (16 tokens x 4 heads, copied by the same code, one block-table
// entry per token for the 4 heads), so a block streams 4x the stages for the same fixed costs and its
// warps need no merge. Only where there is no split (each warp ends with its heads' outputs) and the
// grid, a quarter of v3's, still fills the GPU: the launcher picks it.
template <int D, int G, typename C>
__global__ void __launch_bounds__(128, DecodePipe<D, C>::kMinBlocks) decode_kernel_v5(AttnParams p) {
  constexpr int kWarps = 4, kN = 16;
  constexpr int kKs = D / 16, kMt = D / 16;
  using L = DecodeLayout<D, C>;
  using P = DecodePipe<D, C>;
  constexpr int kS = P::kStages;
  constexpr bool kFp8 = std::is_same<C, fp8>::value;
  static_assert(P::kTok == kWarps * kN, "a stage is kN tokens of each warp's head");
  // a thread's rows r0 + k kRowStep: one token (one table entry) for all k when kRowStep is a multiple of kN
  constexpr int kTbl = P::kRowStep % kN == 0 ? 1 : P::kPerThr;
  extern __shared__ __align__(128) unsigned char smem[];
  // after the loop the stages hold the warps' results; before it the last stage holds q (4 G heads)
  float(*red)[G][D + 2] = reinterpret_cast<float(*)[G][D + 2]>(smem);
  float(*sq)[D] = reinterpret_cast<float(*)[D]>(smem + size_t(kS - 1) * P::kStageB);
  static_assert(sizeof(float) * kWarps * G * (D + 2) <= size_t(kS) * P::kStageB &&
                    sizeof(float) * kWarps * G * D <= P::kStageB,
                "smem");
  pdl_trigger();
  pdl_wait();
  const int seq = blockIdx.x, kvh0 = blockIdx.y * kWarps, head0 = kvh0 * G;
  const SeqMeta sm = p.seqs[seq];
  if (sm.q_len != 1) return;  // a prefill sequence of a mixed step: the prefill kernel's
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int ctx = sm.ctx_len;
  const int n_st = (ctx + kN - 1) / kN;
  const int32_t* table = p.block_tables + int64_t(seq) * sm.table_stride;
  C* kc = static_cast<C*>(const_cast<void*>(p.k_cache));
  C* vc = static_cast<C*>(const_cast<void*>(p.v_cache));
  const float qk_scale = (kFp8 ? p.scale * p.k_scale : p.scale) * 1.4426950408889634f;  // log2 units
  const float v_scale = kFp8 ? p.v_scale : 1.0f;
  const bf16* qrow = reinterpret_cast<const bf16*>(p.q) + int64_t(sm.q_start) * p.ldq + int64_t(head0) * D;
  const uint32_t sbase = uint32_t(__cvta_generic_to_shared(smem));

  // The copy side: this thread's chunk c0 of rows r0 + k kRowStep of every stage; row r is token
  // st kN + r % kN of KV head kvh0 + r / kN.
  const int bs = p.block_size;
  const bool bs_pow2 = (bs & (bs - 1)) == 0;
  const int bs_shift = __ffs(bs) - 1;
  const int c0 = tid % P::kCpr, r0 = tid / P::kCpr;
  auto block_of = [&](int j) { return bs_pow2 ? j >> bs_shift : j / bs; };
  auto load_tbl = [&](int st, int32_t (&tb)[kTbl]) {
#pragma unroll
    for (int k = 0; k < kTbl; ++k) {
      const int j = min(st * kN + (r0 + k * P::kRowStep) % kN, ctx - 1);
      tb[k] = st < n_st ? __ldg(table + block_of(j)) : 0;
    }
  };
  auto issue = [&](int st, const int32_t (&tb)[kTbl]) {
    if (st < n_st) {
      const uint32_t dst = sbase + uint32_t((st % kS) * P::kStageB);
#pragma unroll
      for (int k = 0; k < P::kPerThr; ++k) {
        const int r = r0 + k * P::kRowStep, j = st * kN + r % kN;
        const int off = bs_pow2 ? j & (bs - 1) : j % bs;
        const int64_t row = (int64_t(tb[kTbl == 1 ? 0 : k]) * p.n_kv + kvh0 + r / kN) * bs + off;
        const bool ok = j < ctx;
        const int64_t e = ok ? row * D + c0 * (16 / P::kEsz) : 0;
        const uint32_t o = uint32_t(P::at(r, c0 * 16));
        cp_async16_zfill(dst + o, kc + e, ok);
        cp_async16_zfill(dst + P::kTileB + o, vc + e, ok);
      }
    }
    pipe_commit();  // one group a stage, empty past the context: the wait counts stay uniform
  };

  const TokenMeta tm = p.rope ? p.tokens[sm.q_start] : TokenMeta{};
  const bool write = p.rope && tm.slot >= 0 && ctx > 0;
  // stages issued before the rope: all but the one holding the new token (the last)
  const int n_pre = write ? min(kS - 1, (ctx - 1) / kN) : kS - 1;
  int32_t tbp[kS - 1][kTbl];
#pragma unroll
  for (int st = 0; st < kS - 1; ++st) load_tbl(st, tbp[st]);
#pragma unroll
  for (int st = 0; st < kS - 1; ++st)
    if (st < n_pre) issue(st, tbp[st]);

  // q of the 4 G heads (roped with p.rope, rounded to bf16 as the unfused path stores it) -> sq; the
  // new token's roped k and its v of the 4 KV heads -> the cache (v3's arithmetic, decode_rope_pair).
  if (p.rope) {
    const float pos = float(tm.pos);
    const bool inter = p.rope == 2;
    const int64_t dst0 = write ? (int64_t(tm.slot / bs) * p.n_kv + kvh0) * bs + tm.slot % bs : 0;  // row of kvh0
    const bf16* kn0 = reinterpret_cast<const bf16*>(p.k_new) + int64_t(sm.q_start) * p.ldk + int64_t(kvh0) * D;
    constexpr int kHg = 128 / (D / 2), kQh = kWarps * G;
    const int i = tid % (D / 2);
    float sn, cs;
    sincosf(pos * p.inv_freq[i], &sn, &cs);
    const int a = inter ? 2 * i : i, b = inter ? 2 * i + 1 : i + D / 2;
    for (int h = tid / (D / 2); h < kQh + kWarps; h += kHg) {
      if (h < kQh) {
        decode_rope_pair<D, kQh>(p, sq, qrow, kn0, kc, 0, h, a, b, sn, cs);
      } else if (write) {  // head kvh0 + w's new key: the cache rows of one slot are bs rows apart
        const int w = h - kQh;
        decode_rope_pair<D, kQh>(p, sq, qrow, kn0 + w * D, kc, (dst0 + int64_t(w) * bs) * D, kQh, a, b, sn, cs);
      }
    }
    if (write) {
      const bf16* vn0 = reinterpret_cast<const bf16*>(p.v_new) + int64_t(sm.q_start) * p.ldv + int64_t(kvh0) * D;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) decode_store_new_v<D>(p, vc, (dst0 + int64_t(w) * bs) * D, vn0 + w * D);
    }
  } else {
    for (int idx = tid; idx < kWarps * G * D; idx += 128) sq[idx / D][idx % D] = __bfloat162float(qrow[idx]);
  }
  __syncthreads();  // sq ready; the new token's global writes visible to this block's copies
#pragma unroll
  for (int st = 0; st < kS - 1; ++st)
    if (st >= n_pre) issue(st, tbp[st]);
  int32_t tb[kTbl];
  load_tbl(kS - 1, tb);

  uint32_t qa[kKs][2];  // this warp's heads: rows g < G of its KV head's group
  decode_q_fragments<D, G, C>(sq + warp * G, qa);

  // This lane's fragment pieces, as byte offsets in a stage (v3's: rows of the warp's 16).
  uint32_t koff[kN / 8][D / 4 / L::kWK];
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
    for (int pc = 0; pc < D / 4 / L::kWK; ++pc)
      koff[nt][pc] = uint32_t(P::at(warp * kN + nt * 8 + g, (t + pc * 4) * 16));
  uint32_t voff[4][D / 8 / L::kWV];  // tokens 2t, 2t + 1, 2t + 8, 2t + 9
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int pc = 0; pc < D / 8 / L::kWV; ++pc)
      voff[i][pc] = uint32_t(P::at(warp * kN + 2 * t + (i & 1) + 8 * (i >> 1), (g + pc * 8) * L::kWV * L::kEsz)) + P::kTileB;

  float o[kMt][4];
#pragma unroll
  for (int i = 0; i < kMt; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_run = -INFINITY, l_run = 0.0f;
  for (int st = 0; st < n_st; ++st) {
    pipe_wait<kS - 2>();  // this thread's copies of stage st have landed
    __syncthreads();          // everyone's have; everyone is done reading stage st - 1's buffer
    issue(st + kS - 1, tb);   // into stage st - 1's buffer
    load_tbl(st + kS, tb);    // a stage ahead: its latency hides behind this stage's math
    const uint32_t sb = sbase + uint32_t((st % kS) * P::kStageB);
    uint32_t kw[kN / 8][L::kKW];
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
      for (int pc = 0; pc < D / 4 / L::kWK; ++pc) lds_raw<16>(sb + koff[nt][pc], &kw[nt][pc * 4]);
    uint32_t vw[kN / 16][4][L::kVW];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int pc = 0; pc < D / 8 / L::kWV; ++pc)
        lds_raw<L::kWV * L::kEsz>(sb + voff[i][pc], &vw[0][i][pc * L::kWV * L::kEsz / 4]);
    decode_tile_math<D, C, kN>(kw, vw, qa, st * kN, ctx, qk_scale, o, m_run, l_run);
  }
  pipe_wait<0>();  // (only empty groups can be pending) the stages become red
  __syncthreads();
  decode_warp_to_smem<D, G, C>(red, o, m_run, l_run);
  __syncthreads();
  bf16* out = reinterpret_cast<bf16*>(p.out) + int64_t(sm.q_start) * p.ldo + int64_t(head0) * D;
  for (int idx = tid; idx < kWarps * G * D; idx += 128) {
    const int w = idx / (G * D), h = idx / D % G, d = idx % D;
    const float l = red[w][h][D + 1];
    out[idx] = __float2bfloat16(l > 0.0f ? red[w][h][d] / l * v_scale : 0.0f);
  }
}

// ---- prefill v2: tensor cores through mma.sync m16n8k16, the default ----
// v1 (KILN_PREFILL_ATTN=v1) ran one block per (64-row query tile, query head), gathered each K/V
// tile into shared memory with plain loads before any math (no overlap inside a block), went
// through wmma with P round-tripping shared memory, and read each KV head's tiles once per query
// head of its GQA group. v2: one block per (64 / G query rows, KV head) computing all G query heads
// of the group from one pass over K/V (64 mma rows = G heads x 64 / G rows); the next K/V tile is
// in flight while the current one is multiplied (cp.async for a bf16 cache; for FP8, loads into
// registers, converted to f16 after the math: e4m3 -> f16 is exact, so the f16 mma sees the cached
// values); K and V fragments come from shared memory through ldmatrix (V transposed), P stays in
// registers (the C layout of S is the A layout of P); one max and one rescale per 64-token tile;
// causal: tiles past the block's last position are never loaded, and a warp skips the math of a
// tile all of whose columns its rows mask.
// KV tokens per tile: 64, or 32 where a warp holds 32 mma rows at head_dim 128 (registers).
template <int D, int kMt>
struct PrefillSmemV2 {
  static constexpr int kBN = kMt == 2 && D == 128 ? 32 : 64;
  static constexpr int kRows = 64 * kMt;  // mma rows of a block: 4 warps x 16 kMt
  static constexpr int kLd = D + 8;       // elements per row: 16 bytes of pad keep ldmatrix conflict-free
  static constexpr size_t kTile = size_t(kBN) * kLd * 2;
  // [2 buffers][K, V][kBN, kLd] 16-bit, then q [kRows, kLd] when it is re-read every tile (kMt > 1;
  // with kMt == 1 q's fragments stay in registers and q is staged in buffer 1's K before the loop)
  static constexpr size_t kBytes = 4 * kTile + (kMt > 1 ? size_t(kRows) * kLd * 2 : 0);
  static_assert(kMt > 1 || kRows <= kBN, "q staging fits a K tile");
};

__device__ __forceinline__ void ldsm_x4(const void* p, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_t(const void* p, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(s));
}

// 3 blocks an SM fit the shared memory at every head dim; at head_dim 128 the 168-register cap of 3
// spills 88 bytes (bf16) or 264 bytes (FP8: the next tile's registers), so FP8 takes 2 there.
template <int D, typename C>
constexpr int prefill_min_blocks() {
  return D == 128 && std::is_same<C, fp8>::value ? 2 : 3;
}

// kMt: m16 tiles per warp. 2 = FlashAttention-2's 32 rows a warp: each K/V fragment read from
// shared memory feeds two mmas, halving the ldmatrix bytes per mma (at kMt 1 they equal the tensor
// time); needs G >= 2 (a block is 128 mma rows = G heads x 128 / G query rows of one 64-row tile).
template <int D, int G, typename C, int kMt = 1, int kMinBlocks = prefill_min_blocks<D, C>()>
__global__ void __launch_bounds__(128, kMinBlocks) prefill_kernel_v2(AttnParams p) {
  using S = PrefillSmemV2<D, kMt>;
  using M = DecodeMma<C>;
  constexpr bool kFp8 = std::is_same<C, fp8>::value;
  constexpr int kBN = S::kBN, kLd = S::kLd, kR = S::kRows / G, kChunks = D / 8, kPer = kBN * kChunks / 128;
  constexpr int kKs = D / 16, kNt = kBN / 8, kNr = 2 * kMt;  // kNr: rows of this lane
  static_assert(G >= kMt, "a block's rows come from one 64-row tile");
  extern __shared__ __align__(128) unsigned char smem[];
  uint16_t* sbuf = reinterpret_cast<uint16_t*>(smem);  // bf16 or f16 bits
  auto sk = [&](int b) { return sbuf + size_t(2 * b) * kBN * kLd; };
  auto sv = [&](int b) { return sbuf + size_t(2 * b + 1) * kBN * kLd; };
  __shared__ int s_maxpos;
  pdl_trigger();
  pdl_wait();

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  constexpr int kSubs = G / kMt;                        // blocks per 64-row tile
  const int bx = int(gridDim.x) - 1 - int(blockIdx.x);  // the last rows of a sequence (longest) first
  const int tile = bx / kSubs, sub = bx % kSubs;
  const int seq = p.tiles[2 * tile], r0 = p.tiles[2 * tile + 1] + sub * kR;
  const SeqMeta sm = p.seqs[seq];
  if (r0 >= sm.q_len) return;
  const bool rows_kv = p.prefill_kv_rows == 1;  // K/V from the step's rows: fresh sequences only
  if (p.prefill_kv_rows != 0 && (sm.ctx_len == sm.q_len) != rows_kv) return;  // not this launch's kind (guard)
  const int rows = min(kR, sm.q_len - r0);
  const int head0 = blockIdx.y * G, kvh = head0 / (p.n_heads / p.n_kv);
  const int32_t* table = p.block_tables + int64_t(seq) * sm.table_stride;
  const C* kc = static_cast<const C*>(p.k_cache);
  const C* vc = static_cast<const C*>(p.v_cache);
  const float qk_scale = (kFp8 ? p.scale * p.k_scale : p.scale) * 1.4426950408889634f;  // log2 units
  const float v_scale = kFp8 ? p.v_scale : 1.0f;
  const int64_t qrow0 = int64_t(sm.q_start) + r0;

  if (tid == 0) s_maxpos = -1;
  __syncthreads();
  if (tid < rows) atomicMax(&s_maxpos, p.tokens[qrow0 + tid].pos);
  __syncthreads();
  const int kv_len = min(s_maxpos + 1, sm.ctx_len);
  const int n_tiles = kv_len > 0 ? (kv_len + kBN - 1) / kBN : 0;

  // This lane's mma rows i (i = 2 mt + half): m = warp 16 kMt + 16 mt + g + 8 half, which is
  // (head m / kR, query row m % kR); lim: the last column the row sees (-1: an unused row).
  int rh[kNr], rr[kNr], lim[kNr];
  int wmin = INT_MAX, wmax = -1;
#pragma unroll
  for (int i = 0; i < kNr; ++i) {
    const int m = warp * 16 * kMt + 16 * (i / 2) + g + 8 * (i & 1);
    rh[i] = m / kR;
    rr[i] = m % kR;
    lim[i] = rr[i] < rows ? min(p.tokens[qrow0 + rr[i]].pos, kv_len - 1) : -1;
    if (rr[i] < rows) wmin = min(wmin, lim[i]);
    wmax = max(wmax, lim[i]);
  }
#pragma unroll
  for (int o2 = 1; o2 < 32; o2 <<= 1) {
    wmin = min(wmin, __shfl_xor_sync(0xffffffffu, wmin, o2));
    wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, o2));
  }

  // K/V tile loads: thread tid moves chunks idx = tid + 128 i (row idx / kChunks, 8 elements each).
  // Rows past kv_len read the last valid row (finite; masked), never unwritten cache slots.
  auto row_off = [&](int j, int64_t ld) -> int64_t {
    j = min(j, kv_len - 1);
    if (rows_kv) return (int64_t(sm.q_start) + j) * ld + int64_t(kvh) * D;
    return ((int64_t(table[j / p.block_size]) * p.n_kv + kvh) * p.block_size + j % p.block_size) * D;
  };
  uint2 kst[kFp8 ? kPer : 1], vst[kFp8 ? kPer : 1];  // FP8: the next tile in flight in registers
  auto issue = [&](int it, int b) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + 128 * i, r = idx / kChunks, c = idx % kChunks;
      const int64_t koff = row_off(it * kBN + r, p.ldk) + c * 8, voff = row_off(it * kBN + r, p.ldv) + c * 8;
      if constexpr (kFp8) {
        kst[i] = *reinterpret_cast<const uint2*>(kc + koff);
        vst[i] = *reinterpret_cast<const uint2*>(vc + voff);
      } else {
        cp_async16(sk(b) + r * kLd + c * 8, kc + koff);
        cp_async16(sv(b) + r * kLd + c * 8, vc + voff);
      }
    }
    if constexpr (!kFp8) cp_async_commit();
  };
  auto store_fp8 = [&](int b) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + 128 * i, r = idx / kChunks, c = idx % kChunks;
      uint4 kh, vh;
      kh.x = fp8x2_to_f16x2(kst[i].x), kh.y = fp8x2_to_f16x2(kst[i].x >> 16);
      kh.z = fp8x2_to_f16x2(kst[i].y), kh.w = fp8x2_to_f16x2(kst[i].y >> 16);
      vh.x = fp8x2_to_f16x2(vst[i].x), vh.y = fp8x2_to_f16x2(vst[i].x >> 16);
      vh.z = fp8x2_to_f16x2(vst[i].y), vh.w = fp8x2_to_f16x2(vst[i].y >> 16);
      *reinterpret_cast<uint4*>(sk(b) + r * kLd + c * 8) = kh;
      *reinterpret_cast<uint4*>(sv(b) + r * kLd + c * 8) = vh;
    }
  };
  if (n_tiles > 0) issue(0, 0);

  // q (bf16, or f16 for the FP8 cache's f16 mma) -> shared memory, up to 8 loads a thread in flight
  // (one at a time, the staging of a short prompt's block was a chain of ~16 global latencies). The
  // first K/V tile's loads above are in flight meanwhile; FP8 stores them after.
  uint16_t* sq = kMt > 1 ? sbuf + 4 * size_t(kBN) * kLd : sk(1);
  const bf16* q = reinterpret_cast<const bf16*>(p.q);
  constexpr int kQIter = S::kRows * kChunks / 128, kQB = kQIter < 8 ? kQIter : 8;
  static_assert(S::kRows * kChunks % 128 == 0 && kQIter % kQB == 0, "q staging: whole rounds");
#pragma unroll
  for (int i0 = 0; i0 < kQIter; i0 += kQB) {
    uint4 w[kQB];
#pragma unroll
    for (int j = 0; j < kQB; ++j) {
      const int idx = tid + 128 * (i0 + j), m = idx / kChunks, c = idx % kChunks, h = m / kR, r = m % kR;
      w[j] = r < rows ? *reinterpret_cast<const uint4*>(q + (qrow0 + r) * p.ldq + int64_t(head0 + h) * D + c * 8)
                      : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < kQB; ++j) {
      const int idx = tid + 128 * (i0 + j), m = idx / kChunks, c = idx % kChunks;
      float x[8];
      to_float8(w[j], x);
      w[j].x = M::pack(x[0], x[1]), w[j].y = M::pack(x[2], x[3]), w[j].z = M::pack(x[4], x[5]),
      w[j].w = M::pack(x[6], x[7]);
      *reinterpret_cast<uint4*>(sq + m * kLd + c * 8) = w[j];
    }
  }
  if constexpr (kFp8) {
    if (n_tiles > 0) store_fp8(0);
  }
  __syncthreads();
  // A fragments of q: in registers for kMt == 1; re-read each tile (ldmatrix) for kMt > 1
  const uint16_t* sq_lane = sq + (warp * 16 * kMt + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + (lane >> 4) * 8;
  uint32_t qa1[kMt == 1 ? kKs : 1][4];
  if constexpr (kMt == 1) {
#pragma unroll
    for (int ks = 0; ks < kKs; ++ks) ldsm_x4(sq_lane + ks * 16, qa1[ks][0], qa1[ks][1], qa1[ks][2], qa1[ks][3]);
  }

  float o[kMt][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
  float mrow[kNr], lrow[kNr];
#pragma unroll
  for (int i = 0; i < kNr; ++i) mrow[i] = -INFINITY, lrow[i] = 0.0f;

  for (int it = 0; it < n_tiles; ++it) {
    const int b = it & 1, kv0 = it * kBN;
    __syncthreads();  // buffer b ^ 1 (q at it == 0 when kMt == 1) is no longer read; FP8: tile it's stores visible
    const bool next = it + 1 < n_tiles;
    if (next) issue(it + 1, b ^ 1);
    if constexpr (!kFp8) {
      if (next) cp_async_wait<1>();
      else cp_async_wait<0>();
      __syncthreads();  // tile it landed for every thread
    }
    if (kv0 <= wmax) {  // else every column of this tile is masked for all the warp's rows
      const uint16_t* kb = sk(b);
      const uint16_t* vb = sv(b);
      float s[kMt][kNt][4];
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
        for (int n = 0; n < kNt; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kKs; ++ks) {
        uint32_t qa[kMt][4];
#pragma unroll
        for (int mt = 0; mt < kMt; ++mt) {
          if constexpr (kMt == 1) {
#pragma unroll
            for (int j = 0; j < 4; ++j) qa[mt][j] = qa1[ks][j];
          } else {
            ldsm_x4(sq_lane + mt * 16 * kLd + ks * 16, qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3]);
          }
        }
#pragma unroll
        for (int np = 0; np < kNt / 2; ++np) {
          uint32_t b0, b1, b2, b3;
          ldsm_x4(kb + (16 * np + (lane & 7) + ((lane >> 4) << 3)) * kLd + ks * 16 + ((lane >> 3) & 1) * 8, b0, b1, b2,
                  b3);
#pragma unroll
          for (int mt = 0; mt < kMt; ++mt) {
            M::mma(s[mt][2 * np], qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3], b0, b1);
            M::mma(s[mt][2 * np + 1], qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3], b2, b3);
          }
        }
      }
      const bool mask = kv0 + kBN - 1 > wmin;
      uint32_t pa[kMt][kNt / 2][4];
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < kNt; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[mt][n][e] * qk_scale;
            if (mask && kv0 + 8 * n + 2 * t + (e & 1) > lim[2 * mt + e / 2]) x = -INFINITY;
            s[mt][n][e] = x;
            mx[e / 2] = fmaxf(mx[e / 2], x);
          }
        float al[2], mu[2];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
          mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
          const float mn = fmaxf(mrow[2 * mt + hf], mx[hf]);
          // a row with nothing visible yet keeps max -inf: subtract 0 instead (exp2(-inf) = 0, no NaN)
          mu[hf] = mn == -INFINITY ? 0.0f : mn;
          al[hf] = fast_exp2(mrow[2 * mt + hf] - mu[hf]);
          mrow[2 * mt + hf] = mn;
        }
        float sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int n = 0; n < kNt; ++n) {
          const float p0 = fast_exp2(s[mt][n][0] - mu[0]), p1 = fast_exp2(s[mt][n][1] - mu[0]);
          const float p2 = fast_exp2(s[mt][n][2] - mu[1]), p3 = fast_exp2(s[mt][n][3] - mu[1]);
          sum[0] += p0 + p1;
          sum[1] += p2 + p3;
          pa[mt][n / 2][(n & 1) * 2] = M::pack(p0, p1);
          pa[mt][n / 2][(n & 1) * 2 + 1] = M::pack(p2, p3);
        }
        lrow[2 * mt] = lrow[2 * mt] * al[0] + sum[0];
        lrow[2 * mt + 1] = lrow[2 * mt + 1] * al[1] + sum[1];
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          o[mt][n][0] *= al[0];
          o[mt][n][1] *= al[0];
          o[mt][n][2] *= al[1];
          o[mt][n][3] *= al[1];
        }
      }
      // O += P V: B fragments of V^T by a transposing ldmatrix (tokens are V's rows)
#pragma unroll
      for (int kk = 0; kk < kNt / 2; ++kk)
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b0, b1, b2, b3;
          ldsm_x4_t(vb + (16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + 16 * dp + (lane >> 4) * 8, b0, b1, b2,
                    b3);
#pragma unroll
          for (int mt = 0; mt < kMt; ++mt) {
            M::mma(o[mt][2 * dp], pa[mt][kk][0], pa[mt][kk][1], pa[mt][kk][2], pa[mt][kk][3], b0, b1);
            M::mma(o[mt][2 * dp + 1], pa[mt][kk][0], pa[mt][kk][1], pa[mt][kk][2], pa[mt][kk][3], b2, b3);
          }
        }
    }
    if constexpr (kFp8) {
      if (next) store_fp8(b ^ 1);  // buffer b ^ 1 was last read in iteration it - 1 (barrier above)
    }
  }

  bf16* out = reinterpret_cast<bf16*>(p.out);
#pragma unroll
  for (int i = 0; i < kNr; ++i) {
    float l = lrow[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.0f ? v_scale / l : 0.0f;
    if (rr[i] >= rows) continue;
    bf16* orow = out + (qrow0 + rr[i]) * p.ldo + int64_t(head0 + rh[i]) * D + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<__nv_bfloat162*>(orow + 8 * n) =
          __floats2bfloat162_rn(o[i / 2][n][2 * (i & 1)] * inv, o[i / 2][n][2 * (i & 1) + 1] * inv);
  }
}

// KILN_PREFILL_ATTN: v1 = the wmma kernel (one block per query head), kept to measure against;
// m1 = v2 with 16 rows a warp everywhere (the default takes 32 where the GQA group allows).
// Measured and dropped (s2-pattn run 3, Llama-8B shapes): a 2- or 3-blocks-an-SM register cap for
// both caches at head_dim 128 (3 for FP8 spills: 4x2048 780 -> 930 us; 2 for bf16: 64x128 184 -> 212 us).
// v2 = v2 only (not the wgmma kernel where it applies).
int prefill_attn_variant() {
  static const int v = [] {
    const char* e = std::getenv("KILN_PREFILL_ATTN");
    const std::string s = e ? e : "";
    return s == "v1" ? 1 : s == "m1" ? 2 : s == "v2" ? 3 : 0;
  }();
  return v;
}
bool prefill_attn_v1() { return prefill_attn_variant() == 1; }

template <int D, int G, typename C, int kMt>
void prefill_launch_v2_as(const AttnParams& p, cudaStream_t s) {
  using S = PrefillSmemV2<D, kMt>;
  // 32 rows a warp hold 2x the accumulators: 2 blocks an SM at every head dim
  constexpr int kMinBlocks = kMt == 2 ? 2 : prefill_min_blocks<D, C>();
  static bool configured = false;  // the attribute is per function; set once per process
  if (!configured) {
    cudaFuncSetAttribute(prefill_kernel_v2<D, G, C, kMt, kMinBlocks>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         int(S::kBytes));
    configured = true;
  }
  // each 64-row tile of AttnParams.tiles becomes G / kMt blocks of 64 kMt / G rows (x G heads)
  launch_pdl(prefill_kernel_v2<D, G, C, kMt, kMinBlocks>, dim3(p.num_tiles * (G / kMt), p.n_heads / G), dim3(128),
             S::kBytes, s, p);
}

// 32 rows a warp (kMt 2) where a block of 128 rows fits one 64-row tile (G >= 2): Llama-8B shapes,
// attention alone (KV write + kernel), 4x2048 fp8 KV 780 -> 706 us, bf16 761 -> 666 us; 64x128
// 215 -> 192 / 184 -> 185 us (s2-pattn run 3). Predicted more (half the ldmatrix bytes per mma):
// the short-prompt case is bound by each block's fixed latency, not by shared memory.
template <int D, int G, typename C>
void prefill_launch_v2(const AttnParams& p, cudaStream_t s) {
  if constexpr (G >= 2) {
    if (prefill_attn_variant() != 2) return prefill_launch_v2_as<D, G, C, 2>(p, s);
  }
  prefill_launch_v2_as<D, G, C, 1>(p, s);
}

template <int D, typename C>
void prefill_launch_as(const AttnParams& p, cudaStream_t s) {
  if (!prefill_attn_v1()) {
    // sm_90a: the wgmma kernel (attention_wgmma.cu) at head_dim 128, GQA groups 2-8
    if constexpr (D == 128) {
      if (prefill_attn_variant() == 0 && launch_prefill_wgmma(p, decode_heads_per_block(p.n_heads, p.n_kv), s)) return;
    }
    switch (decode_heads_per_block(p.n_heads, p.n_kv)) {
      case 1: return prefill_launch_v2<D, 1, C>(p, s);
      case 2: return prefill_launch_v2<D, 2, C>(p, s);
      case 4: return prefill_launch_v2<D, 4, C>(p, s);
      default: return prefill_launch_v2<D, 8, C>(p, s);
    }
  }
  static bool configured = false;  // the attribute is per function; set once per process
  if (!configured) {
    cudaFuncSetAttribute(prefill_kernel<D, C>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(PrefillSmem<D>::kBytes));
    configured = true;
  }
  launch_pdl(prefill_kernel<D, C>, dim3(p.num_tiles, p.n_heads), dim3(128), PrefillSmem<D>::kBytes, s, p);
}

template <int D>
void prefill_launch(const AttnParams& p, cudaStream_t s) {
  if (p.kv_fp8) prefill_launch_as<D, fp8>(p, s);
  else prefill_launch_as<D, bf16>(p, s);
}

// KILN_DECODE_ATTN: unset = auto (v5 at large batches, below; v3 where p.splits <=
// KILN_DECODE_V3_MAX_SPLITS, else v2; v2 at head dims 16 and 32); v3 = v3 whenever the head dim has it;
// v5 = v5 wherever it applies (no split, KV heads a multiple of 4); v2old = v2 (registers, no pipeline);
// t16 / b2 = v2 at head_dim 128 with 16 tokens per warp iteration, or 2 blocks an SM.
// Read at every launch (launches are captured once per graph), so a test can switch kernels.
int decode_attn_variant() {
  const char* e = std::getenv("KILN_DECODE_ATTN");
  const std::string s = e ? e : "";
  return s == "t16" ? 2 : s == "b2" ? 3 : s == "v2old" ? 4 : s == "v3" ? 5 : s == "v5" ? 6 : 0;
}

// v5 (a warp per KV head) where there is no split and its grid, num_seqs x n_kv / 4 blocks, fills
// at least KILN_DECODE_V5_MIN_WAVES (default 0.9) x the resident blocks: fewer would leave SMs idle.
// H100, FP8 cache, op timing v3 -> v5 (s6 run 1): batch 1,024 x ctx 192 (3.9 waves) 64.9 -> 79.4 % of
// a streaming read, 512 x 1,500 (1.9) 92.4 -> 93.4 %, 256 x 1,000 (0.97) 87.3 -> 92.2 %, but 64 x
// 2,000 (0.24) 82.5 -> 76.7 %.
double decode_v5_min_waves() {
  static const double v = [] {
    const char* e = std::getenv("KILN_DECODE_V5_MIN_WAVES");
    return e && *e ? std::atof(e) : 0.9;
  }();
  return v;
}

// Auto picks v3 where a block streams many stages (large batches: few splits) and v2 where it has one
// or two 64-token stages (small batches: 8-32 splits), whose step v3 slows: batch 1, FP8 (s3-dattn
// run 2) ctx 128 3.92 -> 4.10 ms, ctx 2048 4.11 -> 4.21 ms a step, the kernel alone 15.1 -> 16.7 us
// and 19.5 -> 20.7 us. There a block holds one stage, so the pipeline has nothing to overlap; where
// the extra time goes is not established.
int decode_v3_max_splits() {
  static const int v = env_int("KILN_DECODE_V3_MAX_SPLITS", 4);
  return v;
}

// A kernel fed by DecodePipe's stages (v3, v5): its kStages x kStageB bytes of dynamic shared memory.
// Measured and dropped (s3-dattn runs 1-2): 4 stages (FP8: 3 blocks an SM, 218 vs 203 us at batch
// 256 x ctx 1000; bf16: 1 block, 458 vs 377 us), 6 stages (FP8 step 13.22 vs 11.74 ms), and a
// max-shared carveout hint (no change: 202.1 vs 202.8 us, batch-1 step 4.098 vs 4.102 ms).
template <int D, typename C, void (*Kernel)(AttnParams)>
void decode_launch_pipe(const AttnParams& p, const dim3& grid, cudaStream_t s) {
  using P = DecodePipe<D, C>;
  constexpr size_t kBytes = size_t(P::kStages) * P::kStageB;
  static bool configured = false;  // the attribute is per function; set once per process (and Kernel)
  if (!configured) {
    cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kBytes));
    configured = true;
  }
  launch_pdl(Kernel, grid, dim3(128), kBytes, s, p);
}

template <int D, int G, typename C>
void decode_launch_g(const AttnParams& p, cudaStream_t s) {
  const dim3 grid(p.num_seqs, p.n_heads / G, p.splits);
  const int v = decode_attn_variant();
  if constexpr (D == 64 || D == 128) {
    if constexpr (4 * G * D * sizeof(float) <= DecodePipe<D, C>::kStageB) {  // q of 4 G heads in a stage
      // v5's warps are whole KV heads: G must be the true group (not 1 for a group of 7)
      const bool v5_ok = p.splits == 1 && p.n_kv % 4 == 0 && p.n_heads == p.n_kv * G;
      const double waves = double(p.num_seqs) * (p.n_kv / 4) / std::max(1, p.target_blocks);
      if (v5_ok && (v == 6 || (v == 0 && waves >= decode_v5_min_waves())))
        return decode_launch_pipe<D, C, decode_kernel_v5<D, G, C>>(p, dim3(p.num_seqs, p.n_kv / 4), s);
    }
  }
  if constexpr (D == 128) {
    if (v == 2) return launch_pdl(decode_kernel<D, G, C, 16>, grid, dim3(128), 0, s, p);
    if (v == 3) return launch_pdl(decode_kernel<D, G, C, decode_tile<D, C>(), 2>, grid, dim3(128), 0, s, p);
  }
  if constexpr (D == 64 || D == 128) {
    if (v == 5 || (v == 0 && p.splits <= decode_v3_max_splits())) return decode_launch_pipe<D, C, decode_kernel_v3<D, G, C>>(p, grid, s);
  }
  launch_pdl(decode_kernel<D, G, C>, grid, dim3(128), 0, s, p);
}

template <int D, typename C>
void decode_launch_as(const AttnParams& p, cudaStream_t s) {
  switch (decode_heads_per_block(p.n_heads, p.n_kv)) {
    case 1: return decode_launch_g<D, 1, C>(p, s);
    case 2: return decode_launch_g<D, 2, C>(p, s);
    case 4: return decode_launch_g<D, 4, C>(p, s);
    default: return decode_launch_g<D, 8, C>(p, s);
  }
}

template <int D>
void decode_launch(const AttnParams& p, cudaStream_t s) {
  if (p.kv_fp8) decode_launch_as<D, fp8>(p, s);
  else decode_launch_as<D, bf16>(p, s);
}

}  // namespace

int32_t decode_heads_per_block(int32_t n_heads, int32_t n_kv) {
  const int32_t g = n_kv > 0 ? n_heads / n_kv : 1;
  return g == 1 || g == 2 || g == 4 || g == 8 ? g : 1;
}

bool attention_supports_head_dim(int32_t d) { return d == 16 || d == 32 || d == 64 || d == 128; }

namespace {
void prefill_launch_dim(const AttnParams& p, cudaStream_t s) {
  switch (p.head_dim) {
    case 16: return prefill_launch<16>(p, s);
    case 32: return prefill_launch<32>(p, s);
    case 64: return prefill_launch<64>(p, s);
    case 128: return prefill_launch<128>(p, s);
  }
}

// KILN_PREFILL_FRESH_KV=0: fresh prompts read the FP8 cache like every other sequence.
bool prefill_fresh_rows() {
  static const bool v = [] {
    const char* e = std::getenv("KILN_PREFILL_FRESH_KV");
    return !(e && std::string(e) == "0");
  }();
  return v;
}
}  // namespace

// With an FP8 cache, a fresh prompt's attention reads its own bf16 k and v rows (the step's, roped)
// through the bf16 kernel, whose tiles go to shared memory by cp.async with no conversion; the cache
// (written beside) serves later steps, as in vLLM. The FP8 kernel, which stages its tiles through
// registers to convert them, is slower at 4 x 2,048 tokens despite half the bytes (s4: 697 vs 618 us).
// Other sequences of the step (chunks after the first, cached prefixes) keep the cache, in a second
// launch; CudaOps::pack_step puts the fresh tiles first, so each launch covers its own range.
void launch_prefill_attention(const AttnParams& p, cudaStream_t s) {
  if (p.num_tiles == 0) return;
  if (p.kv_fp8 && p.num_fresh_tiles > 0 && p.k_new && p.v_new && !prefill_attn_v1() && prefill_fresh_rows()) {
    AttnParams r = p;  // the fresh tiles come first (CudaOps::pack_step)
    r.prefill_kv_rows = 1;
    r.kv_fp8 = false;
    r.k_cache = p.k_new;
    r.v_cache = p.v_new;
    r.k_scale = r.v_scale = 1.0f;
    r.num_tiles = p.num_fresh_tiles;
    prefill_launch_dim(r, s);
    if (p.num_fresh_tiles == p.num_tiles) return;
    AttnParams c = p;
    c.prefill_kv_rows = 2;
    c.tiles = p.tiles + 2 * p.num_fresh_tiles;
    c.num_tiles = p.num_tiles - p.num_fresh_tiles;
    return prefill_launch_dim(c, s);
  }
  prefill_launch_dim(p, s);
}

void launch_kv_write_fp8(const bf16_t* k, int64_t ldk, const bf16_t* v, int64_t ldv, const TokenMeta* tokens, int32_t T,
                         void* k_cache, void* v_cache, int32_t n_kv, int32_t head_dim, int32_t block_size, float k_scale,
                         float v_scale, cudaStream_t s) {
  if (T == 0) return;
  launch_pdl(kv_write_fp8_kernel, dim3(T), dim3(128), 0, s, reinterpret_cast<const bf16*>(k), ldk,
             reinterpret_cast<const bf16*>(v), ldv, tokens, static_cast<fp8*>(k_cache), static_cast<fp8*>(v_cache), n_kv,
             head_dim, block_size, k_scale, v_scale);
}

void launch_decode_attention(const AttnParams& p, cudaStream_t s) {
  if (p.num_seqs == 0) return;
  switch (p.head_dim) {
    case 16: return decode_launch<16>(p, s);
    case 32: return decode_launch<32>(p, s);
    case 64: return decode_launch<64>(p, s);
    case 128: return decode_launch<128>(p, s);
  }
}

}  // namespace kiln::cuda
