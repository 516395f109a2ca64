// Batch-1 FP8 decode in one persistent kernel (fused_decode.h says why).
//
// Grid: one block an SM (cooperative launch, so all are resident), 9 warps. Warp 8 is the producer:
// it walks the block's tiles of every layer in the order the consumers use them (qkv, o, gate/up,
// down) and copies each 16-row x 1024-byte stage into a ring of shared-memory stages with bulk
// copies (cp.async.bulk, an mbarrier a stage for "full" and one for "empty"). It never waits for
// activations, only for a free stage, so the weight stream runs ahead through the grid barriers by
// the ring's size (11 stages, ~190 KB an SM on the H100: ~8 us of the SM's share of the HBM rate).
// Warps 0-7 are the consumers: per layer
//   A  x = residual (+ the previous down_proj's two K halves), rms_norm -> quantize -> x_q in shared
//      memory; q|k|v tiles -> qkv (bf16, global)                                   | grid barrier
//   B  attention, an item (KV head, split of the context) a block: rope of q and the new k, the new
//      k/v into the FP8 cache, online softmax over the split, the splits merged by the last block
//      of each KV head -> attn (bf16)                                            | grid barrier
//   C  x_q = attn; o tiles -> residual += bf16(o) (with the pending down halves)   | grid barrier
//   D  x_q = rms_norm(residual); gate/up tiles (8 gate rows + the 8 matching up rows, so one
//      mma's rows g and g + 8 pair up) -> silu(gate) * up (bf16, global)          | grid barrier
//   E  x_q = that; down tiles over a K half each -> two f32 partial sums           | grid barrier
// and at the end block 0 writes out = final_norm(residual). Tiles are dealt round robin over the
// blocks, continuing from matrix to matrix and layer to layer, so no block is always the last.
//
// What the H100 showed (docs/PERF_fp8_gpu.md, session 11; KILN_FUSED_DECODE_PROFILE=1 prints a
// step's phases): the weight phases stream at the HBM rate (gate/up 40 us for 117 MB), but every
// dependent load after a barrier (norm weights, scales, the KV cache, the partial sums) waited
// behind the stream. The weight copies therefore carry an L2 evict-first policy (4.80 -> 4.03 ms a
// step: the rest stays in L2), and the constants of a phase are loaded before its barrier. What is
// left is ~35 us a layer of barriers, phase inputs and attention that the ring (~8 us) cannot
// cover: 3.84 ms a step against 3.61 op by op, so the path is opt-in (KILN_FUSED_DECODE=1).
//
// The GEMV arithmetic is gemv_fp8.cu's: x quantized as fp8(x / s) (static input scale, or amax /
// 448 of the vector), mma.sync.m16n8k32 e4m3 with the same k permutation on A and B, y = acc * s_x
// * s_w(row); the norms and rounding to bf16 between ops follow the op-by-op path, so both compute
// the same function up to summation order (CudaFusedDecode tests that).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "backend/cuda/activation.cuh"
#include "backend/cuda/async_copy.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/fp8_mma.cuh"
#include "backend/cuda/fused_decode.h"
#include "backend/cuda/launch.cuh"

namespace kiln::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kKc = 1024;            // K bytes of a stage's row
constexpr int kPitch = kKc + 64;     // shared row pitch: 64 mod 128, so rows g and g + 1 of a quarter warp share no bank
constexpr int kStageB = 16 * kPitch;
constexpr int kCW = 8, kCT = 32 * kCW, kThreads = kCT + 32;  // consumer warps, threads; + the producer warp
constexpr int kD = 128;                                       // head_dim
constexpr int kMaxG = 8;                                      // query heads per KV head
constexpr int kMaxH = 4096;  // hidden size (registers: a consumer thread holds 1/256 of the vector)
constexpr int kPart = kD + 2;  // an attention split's partial: m, l, o[128]

struct Params {
  const FusedLayer* layers;
  int32_t num_layers, H, I, n_heads, n_kv, q_dim, kv_dim;
  int32_t down_split, max_splits, stages;
  // stages the producer keeps in flight at most (the rest of the ring holds landed ones): a
  // shallower HBM queue for everyone's dependent loads; weights_evict_first: the weight copies
  // leave L2 to the activations, scales, norms and the KV cache
  int32_t inflight;
  bool weights_evict_first;
  FusedDecodeStep st;
  bf16* qkv;        // [q_dim + 2 kv_dim]
  bf16* attn;       // [q_dim]
  bf16* act;        // [I] silu(gate) * up
  float* down;      // [down_split, H] partial sums
  float* part;      // [n_kv, max_splits, G, kPart]
  int32_t* cnt;     // [n_kv] arrivals of a KV head's splits (left at 0)
  unsigned* bar;    // grid barrier word
  // KILN_FUSED_DECODE_PROFILE=1: [layer][phase A..E][block][4] ns stamps of thread 0 (phase start,
  // input ready, phase done) and the producer's ns waiting for free stages in that matrix
  unsigned long long* prof;
};

// ---- device helpers ----

__device__ __forceinline__ uint4 lds128(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t a, uint32_t bytes) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(a), "r"(bytes)
               : "memory");
}
// bytes (a multiple of 16) from global to shared, completing on the mbarrier's transaction count;
// with an L2 policy (createpolicy) when policy != 0
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t mbar,
                                          uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (policy)
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::"r"(
            dst),
        "l"(src), "r"(bytes), "r"(mbar), "l"(policy)
        : "memory");
  else
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(mbar)
                 : "memory");
#endif
}
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
  return p;
}

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// The consumers' own barrier (named barrier 1: the producer warp never joins).
__device__ __forceinline__ void cbar() { asm volatile("bar.sync 1, %0;\n" ::"n"(kCT) : "memory"); }

// All consumers of all blocks. Self-resetting: block 0 adds 2^31 - (n - 1), the others 1, so the
// word's top bit flips once per barrier and its low bits come back to where they were.
__device__ __forceinline__ void grid_sync(unsigned* bar) {
  cbar();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned inc = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
    const unsigned old = atomicAdd(bar, inc);
    unsigned cur;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(cur) : "l"(bar) : "memory");
    } while (((old ^ cur) & 0x80000000u) == 0u);
  }
  cbar();
}

// Sum / max over the consumers (256 threads) through red[kCW].
template <bool kMax>
__device__ __forceinline__ float creduce(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, u) : v + u;
  }
  cbar();  // red may be in use by the previous call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  cbar();
  float r = red[0];
  for (int i = 1; i < kCW; ++i) r = kMax ? fmaxf(r, red[i]) : r + red[i];
  return r;
}

__device__ __forceinline__ float bf16r(float x) { return __bfloat162float(__float2bfloat16(x)); }

__device__ __forceinline__ uint8_t fp8_of(float a, float s) {
  return __nv_cvt_float_to_fp8(__fdiv_rn(a, s), __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ float2 fp8x2_to_f2(uint32_t x) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(x & 0xffffu), __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// The weight matrices of a layer (FusedLayer::mat), in the order the producer streams them.
enum Mat { kQkv = 0, kO = 1, kGu = 2, kDown = 3 };

struct Tiling {
  int tiles[4], kst[4], per_layer;
  __device__ Tiling(const Params& p) {
    tiles[kQkv] = (p.q_dim + 2 * p.kv_dim) / 16;
    tiles[kO] = p.H / 16;
    tiles[kGu] = p.I / 8;
    tiles[kDown] = p.H / 16 * p.down_split;
    kst[kQkv] = p.H / kKc;
    kst[kO] = p.q_dim / kKc;
    kst[kGu] = p.H / kKc;
    kst[kDown] = p.I / p.down_split / kKc;
    per_layer = tiles[0] + tiles[1] + tiles[2] + tiles[3];
  }
  // The block's first tile of matrix m of layer l (tiles dealt round robin from the step's start).
  __device__ int first(int l, int m) const {
    int before = l * per_layer;
    for (int i = 0; i < m; ++i) before += tiles[i];
    const int G = int(gridDim.x), rot = int(unsigned(before) % unsigned(G));
    return (int(blockIdx.x) - rot + G) % G;
  }
};

// Row r (0..15) of tile t of matrix m, at the stage's K offset.
__device__ __forceinline__ const uint8_t* tile_row(const Params& p, const FusedLayer& L, int m, int t, int r, int ks) {
  const uint8_t* w = L.mat[m].w + ks * kKc;
  switch (m) {
    case kQkv: return w + int64_t(16 * t + r) * p.H;
    case kO: return w + int64_t(16 * t + r) * p.q_dim;
    case kGu: return w + (int64_t(8 * t + (r & 7)) + (r < 8 ? 0 : p.I)) * p.H;
    default: {
      const int rt = t % (p.H / 16), kp = t / (p.H / 16);
      return w + int64_t(16 * rt + r) * p.I + int64_t(kp) * (p.I / p.down_split);
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) fused_decode_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) uint8_t smem[];
  const int NS = p.stages;
  uint8_t* ring = smem;
  uint8_t* u = smem + size_t(NS) * kStageB;  // x_q, or the attention's scratch
  __shared__ float red_t[2][kCW * 16];       // a tile's per-warp sums (two: tiles alternate)
  __shared__ float red_s[kCW * kMaxG];
  __shared__ int s_last;
  __shared__ int64_t s_row[kCT];  // cache rows of an attention pass
  __shared__ __align__(8) uint64_t bars[2 * 16];  // full[NS], empty[NS] (NS <= 16)
  const uint32_t ring_a = uint32_t(__cvta_generic_to_shared(ring)), u_a = uint32_t(__cvta_generic_to_shared(u));
  const uint32_t full_a = uint32_t(__cvta_generic_to_shared(bars)), empty_a = full_a + 8u * 16u;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  if (tid == 0) {
    for (int s = 0; s < NS; ++s) {
      mbar_init(full_a + 8u * s, 1);
      mbar_init(empty_a + 8u * s, kCW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();  // the last block-wide barrier: from here on the roles part
  const Tiling tl(p);
  const int G = int(gridDim.x);

  if (warp == kCW) {  // ---- producer ----
    const uint64_t policy = p.weights_evict_first ? evict_first_policy() : 0ull;
    const uint32_t inflight = uint32_t(p.inflight);
    uint32_t it = 0;
    for (int l = 0; l < p.num_layers; ++l) {
      const FusedLayer L = p.layers[l];
      for (int m = 0; m < 4; ++m) {
        unsigned long long stall = 0;
        for (int t = tl.first(l, m); t < tl.tiles[m]; t += G)
          for (int ks = 0; ks < tl.kst[m]; ++ks, ++it) {
            const int s = int(it % unsigned(NS));
            if (it >= unsigned(NS)) {
              const unsigned long long t0 = p.prof ? now_ns() : 0ull;
              mbar_wait(empty_a + 8u * s, ((it / NS) - 1) & 1u);
              if (p.prof) stall += now_ns() - t0;
            }
            if (it >= inflight) {  // stage it - inflight has landed
              const uint32_t j = it - inflight;
              mbar_wait(full_a + 8u * (j % unsigned(NS)), (j / NS) & 1u);
            }
            if (lane == 0) mbar_expect_tx(full_a + 8u * s, 16u * kKc);
            __syncwarp();
            if (lane < 16)
              bulk_copy(ring_a + uint32_t(s * kStageB + lane * kPitch), tile_row(p, L, m, t, lane, ks), kKc,
                        full_a + 8u * s, policy);
          }
        if (p.prof && lane == 0) p.prof[((size_t(l) * 5 + (m == 0 ? 0 : m + 1)) * G + blockIdx.x) * 4 + 3] = stall;
      }
    }
    return;
  }

  // ---- consumers ----
  const int g = lane >> 2, t4 = lane & 3;
  const int H = p.H, Gq = p.n_heads / p.n_kv;
  uint32_t it = 0;
  int tile_par = 0;
  float sx = 1.0f;  // the phase's activation scale

  // x_q <- bf16 vector src[n] quantized (static scale in_s, or dynamic). n % 8 == 0.
  auto prep_bf16 = [&](const bf16* src, int n, float in_s) {
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    if (p.st.dynamic) {
      float a = 0.0f;
      for (int i = tid; i < n / 8; i += kCT) a = amax8(__ldcg(s4 + i), a);
      sx = scale_for_amax(creduce<true>(a, red_s));
    } else {
      sx = in_s;
    }
    for (int i = tid; i < n / 8; i += kCT) *reinterpret_cast<uint2*>(u + 8 * i) = quantize8(__ldcg(s4 + i), sx);
    cbar();
  };

  // The norm weights (and static scales) do not depend on the step: each phase loads its own before
  // the grid barrier that precedes it, so only the residual's round trip follows the barrier.
  constexpr int kV = kMaxH / 4 / kCT;
  float4 nw[kV];
  auto load_norm = [&](const float* w) {
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      const int i = tid + j * kCT;
      if (i < H / 4) nw[j] = __ldg(reinterpret_cast<const float4*>(w) + i);
    }
  };
  auto load_scale = [&](const float* in) { return p.st.dynamic ? 1.0f : __ldg(in); };

  // x = residual (+ bf16 of the pending down halves); rms_norm(x) * nw rounded to bf16; -> x_q
  // (static scale in_s, or dynamic) or out (bf16, the final norm). with_down: the previous
  // layer's down_proj is pending.
  auto prep_norm = [&](bool with_down, float in_s, bf16* out, bool write_residual) {
    float4 x[kV];
    float ss = 0.0f;
    const float4* r4 = reinterpret_cast<const float4*>(p.st.residual);
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      const int i = tid + j * kCT;
      if (i < H / 4) {
        float4 v = __ldcg(r4 + i);
        if (with_down) {
          float4 d = __ldcg(reinterpret_cast<const float4*>(p.down) + i);
          for (int k = 1; k < p.down_split; ++k) {
            const float4 e = __ldcg(reinterpret_cast<const float4*>(p.down + int64_t(k) * H) + i);
            d.x += e.x, d.y += e.y, d.z += e.z, d.w += e.w;
          }
          v.x += bf16r(d.x), v.y += bf16r(d.y), v.z += bf16r(d.z), v.w += bf16r(d.w);
        }
        x[j] = v;
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
    }
    const float inv = rsqrtf(creduce<false>(ss, red_s) / float(H) + p.st.eps);
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      const int i = tid + j * kCT;
      if (i < H / 4) {
        const float4 gw = nw[j];
        if (write_residual) reinterpret_cast<float4*>(p.st.residual)[i] = x[j];
        x[j] = make_float4(bf16r(gw.x * (x[j].x * inv)), bf16r(gw.y * (x[j].y * inv)), bf16r(gw.z * (x[j].z * inv)),
                           bf16r(gw.w * (x[j].w * inv)));
        amax = fmaxf(amax, fmaxf(fmaxf(fabsf(x[j].x), fabsf(x[j].y)), fmaxf(fabsf(x[j].z), fabsf(x[j].w))));
      }
    }
    if (out) {
#pragma unroll
      for (int j = 0; j < kV; ++j) {
        const int i = tid + j * kCT;
        if (i < H / 4) {
          __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(out) + 2 * i;
          o2[0] = __floats2bfloat162_rn(x[j].x, x[j].y);
          o2[1] = __floats2bfloat162_rn(x[j].z, x[j].w);
        }
      }
      return;
    }
    sx = p.st.dynamic ? scale_for_amax(creduce<true>(amax, red_s)) : in_s;
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      const int i = tid + j * kCT;
      if (i < H / 4) *reinterpret_cast<uint32_t*>(u + 4 * i) = fp8x2(x[j].x, x[j].y, sx) | (fp8x2(x[j].z, x[j].w, sx) << 16);
    }
    cbar();
  };

  // The block's tiles of matrix m of layer l against x_q; epi(t, r, per-warp sums, rs) by threads
  // r < 16, rs: the row's dequantization scale (for gate/up rows r < 8: gate's and up's), loaded
  // when the tile starts.
  auto consume = [&](int l, int m, auto&& epi) {
    const float* row_scales = p.layers[l].mat[m].rs;
    const int kb_step = m == kDown ? p.I / p.down_split : 0;
    for (int t = tl.first(l, m); t < tl.tiles[m]; t += G) {
      float a0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, a1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      float2 rs = make_float2(0.0f, 0.0f);
      if (tid < 16) {
        if (m == kGu) {
          if (tid < 8) rs = make_float2(__ldg(row_scales + 8 * t + tid), __ldg(row_scales + p.I + 8 * t + tid));
        } else {
          rs.x = __ldg(row_scales + 16 * (m == kDown ? t % (H / 16) : t) + tid);
        }
      }
      const uint32_t xb = u_a + uint32_t(m == kDown ? (t / (H / 16)) * kb_step : 0);
      for (int ks = 0; ks < tl.kst[m]; ++ks, ++it) {
        const int s = int(it % unsigned(NS));
        mbar_wait(full_a + 8u * s, (it / NS) & 1u);
        const uint32_t sa = ring_a + uint32_t(s * kStageB);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int kk = (2 * warp + c) * 64 + 16 * t4;
          const uint4 lo = lds128(sa + uint32_t(g * kPitch + kk)), hi = lds128(sa + uint32_t((g + 8) * kPitch + kk));
          const uint4 b = g == 0 ? lds128(xb + uint32_t(ks * kKc + kk)) : make_uint4(0u, 0u, 0u, 0u);
          mma_e4m3(a0, lo.x, hi.x, lo.y, hi.y, b.x, b.y);
          mma_e4m3(a1, lo.z, hi.z, lo.w, hi.w, b.z, b.w);
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty_a + 8u * s);
      }
      // column 0 of the C fragment: c0 (row g) and c2 (row g + 8) of the lanes with t4 == 0
      float* rt = red_t[tile_par];
      tile_par ^= 1;
      if (t4 == 0) {
        rt[warp * 16 + g] = a0[0] + a1[0];
        rt[warp * 16 + g + 8] = a0[2] + a1[2];
      }
      cbar();
      if (tid < 16) epi(t, tid, rt, rs);
    }
  };
  auto row_sum = [](const float* rt, int r) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kCW; ++w) v += rt[w * 16 + r];
    return v;
  };

  auto stamp = [&](int l, int ph, int k) {
    if (p.prof && tid == 0) p.prof[((size_t(l) * 5 + ph) * G + blockIdx.x) * 4 + k] = now_ns();
  };

  const TokenMeta tm = p.st.tokens[0];
  const SeqMeta sm = p.st.seqs[0];
  const int ctx = sm.ctx_len;
  const int splits = ctx > 0 ? min(p.max_splits, (ctx + 63) / 64) : 1;
  const int per = (max(ctx, 1) + splits - 1) / splits;

  for (int l = 0; l < p.num_layers; ++l) {
    const FusedLayer& L = p.layers[l];
    // ---- A: qkv ----
    load_norm(L.attn_norm);
    float in_s = load_scale(L.mat[kQkv].in);
    if (l > 0) grid_sync(p.bar);
    stamp(l, 0, 0);
    prep_norm(l > 0, in_s, nullptr, false);
    stamp(l, 0, 1);
    consume(l, kQkv, [&](int t, int r, const float* rt, float2 rs) {
      p.qkv[16 * t + r] = __float2bfloat16(row_sum(rt, r) * (sx * rs.x));
    });
    stamp(l, 0, 2);
    grid_sync(p.bar);
    stamp(l, 1, 0);
    stamp(l, 1, 1);  // (blocks with an item stamp again once their q is ready)

    // ---- B: attention ----
    if (int(blockIdx.x) < p.n_kv * splits) {  // an item: (KV head, split of the context)
      const int kvh = blockIdx.x / splits, sp = blockIdx.x % splits;
      const int j0 = sp * per, j1 = min(ctx, j0 + per);
      const bool writer = tm.slot >= 0 && ctx > 0 && (ctx - 1) / per == sp;
      float* sq = reinterpret_cast<float*>(u);  // [Gq][128] roped q, bf16-rounded
      float* sp_ = sq + kMaxG * kD;             // [Gq][kCT] probabilities of a pass
      int64_t* srow = s_row;                    // [kCT] cache rows of the pass
      float* ored = sp_ + kMaxG * kCT;          // [kCW][Gq][128]
      uint8_t* kc = static_cast<uint8_t*>(L.k_cache);
      uint8_t* vc = static_cast<uint8_t*>(L.v_cache);
      const int bs = p.st.block_size;
      const int32_t* table = p.st.tables;
      auto cache_row = [&](int j) { return ((int64_t(__ldg(table + j / bs)) * p.n_kv + kvh) * bs + j % bs) * kD; };
      {  // rope (the rope kernel's arithmetic) and the new token's k, v into the cache
        const int i = tid % (kD / 2);
        float sn, cs;
        sincosf(float(tm.pos) * __ldg(p.st.inv_freq + i), &sn, &cs);
        const int a = p.st.rope == 2 ? 2 * i : i, b = p.st.rope == 2 ? 2 * i + 1 : i + kD / 2;
        const int64_t dst =
            writer ? ((int64_t(tm.slot / bs) * p.n_kv + kvh) * bs + tm.slot % bs) * kD : 0;
        for (int h = tid / (kD / 2); h <= Gq; h += kCT / (kD / 2)) {
          if (h == Gq && !writer) break;
          const bf16* x = h < Gq ? p.qkv + (kvh * Gq + h) * kD : p.qkv + p.q_dim + kvh * kD;
          const float x0 = __bfloat162float(__ldcg(x + a)), x1 = __bfloat162float(__ldcg(x + b));
          const float r0 = bf16r(x0 * cs - x1 * sn), r1 = bf16r(x1 * cs + x0 * sn);
          if (h < Gq) {
            sq[h * kD + a] = r0;
            sq[h * kD + b] = r1;
          } else {
            kc[dst + a] = fp8_of(r0, L.k_scale);
            kc[dst + b] = fp8_of(r1, L.k_scale);
          }
        }
        if (writer && tid < kD)
          vc[dst + tid] = fp8_of(__bfloat162float(__ldcg(p.qkv + p.q_dim + p.kv_dim + kvh * kD + tid)), L.v_scale);
      }
      cbar();  // sq ready; the new row's writes visible to the block
      stamp(l, 1, 1);
      const float qks = p.st.scale * L.k_scale * 1.4426950408889634f;
      float lt[kMaxG], o[kMaxG][4];
#pragma unroll
      for (int h = 0; h < kMaxG; ++h) lt[h] = o[h][0] = o[h][1] = o[h][2] = o[h][3] = 0.0f;
      float mh[kMaxG];  // running maxima: the same in every thread (block-wide)
#pragma unroll
      for (int h = 0; h < kMaxG; ++h) mh[h] = -INFINITY;
      for (int jc = j0; jc < j1; jc += kCT) {
        const int j = jc + tid;
        const bool ok = j < j1;
        float s[kMaxG];
#pragma unroll
        for (int h = 0; h < kMaxG; ++h) s[h] = 0.0f;
        const int64_t row = ok ? cache_row(j) : 0;
        srow[tid] = row;  // for the P.V pass (read after the barriers below)
        if (ok) {
          const uint4* kr = reinterpret_cast<const uint4*>(kc + row);
          uint4 kv[kD / 16];
#pragma unroll
          for (int c = 0; c < kD / 16; ++c) kv[c] = __ldcg(kr + c);
#pragma unroll
          for (int c = 0; c < kD / 16; ++c) {
            const uint32_t w4[4] = {kv[c].x, kv[c].y, kv[c].z, kv[c].w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float2 f0 = fp8x2_to_f2(w4[e]), f1 = fp8x2_to_f2(w4[e] >> 16);
              const int d = c * 16 + e * 4;
#pragma unroll
              for (int h = 0; h < kMaxG; ++h)
                if (h < Gq) {
                  const float4 qv = *reinterpret_cast<const float4*>(sq + h * kD + d);
                  s[h] += qv.x * f0.x + qv.y * f0.y + qv.z * f1.x + qv.w * f1.y;
                }
            }
          }
        }
#pragma unroll
        for (int h = 0; h < kMaxG; ++h) {
          s[h] = ok ? s[h] * qks : -INFINITY;
          float v = s[h];
          for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
          if (h < Gq && lane == 0) red_s[warp * kMaxG + h] = v;
        }
        cbar();
        float alpha[kMaxG];
#pragma unroll
        for (int h = 0; h < kMaxG; ++h) {
          alpha[h] = 1.0f;
          if (h >= Gq) continue;
          float cm = red_s[h];
          for (int w = 1; w < kCW; ++w) cm = fmaxf(cm, red_s[w * kMaxG + h]);
          const float mn = fmaxf(mh[h], cm);
          alpha[h] = mn == -INFINITY ? 1.0f : exp2f(mh[h] - mn);
          mh[h] = mn;
          const float pr = ok ? exp2f(s[h] - mn) : 0.0f;
          sp_[h * kCT + tid] = pr;
          lt[h] = lt[h] * alpha[h] + pr;
#pragma unroll
          for (int c = 0; c < 4; ++c) o[h][c] *= alpha[h];
        }
        cbar();
        const int n = min(kCT, j1 - jc);
#pragma unroll 4
        for (int jj = warp; jj < n; jj += kCW) {
          const uint32_t vv = __ldcg(reinterpret_cast<const uint32_t*>(vc + srow[jj]) + lane);
          const float2 v0 = fp8x2_to_f2(vv), v1 = fp8x2_to_f2(vv >> 16);
#pragma unroll
          for (int h = 0; h < kMaxG; ++h)
            if (h < Gq) {
              const float pr = sp_[h * kCT + jj];
              o[h][0] += pr * v0.x;
              o[h][1] += pr * v0.y;
              o[h][2] += pr * v1.x;
              o[h][3] += pr * v1.y;
            }
        }
        cbar();  // sp_, srow and red_s are rewritten by the next pass
      }
      // across warps: o through shared memory, l through red_s
#pragma unroll
      for (int h = 0; h < kMaxG; ++h)
        if (h < Gq) {
          *reinterpret_cast<float4*>(ored + (warp * Gq + h) * kD + 4 * lane) = make_float4(o[h][0], o[h][1], o[h][2], o[h][3]);
          float v = lt[h];
          for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
          if (lane == 0) red_s[warp * kMaxG + h] = v;
        }
      cbar();
      const float vs = L.v_scale;
      for (int idx = tid; idx < Gq * kD; idx += kCT) {
        const int h = idx / kD, d = idx % kD;
        float os = 0.0f, ls = 0.0f;
        for (int w = 0; w < kCW; ++w) {
          os += ored[(w * Gq + h) * kD + d];
          ls += red_s[w * kMaxG + h];
        }
        if (splits == 1) {
          p.attn[(kvh * Gq + h) * kD + d] = __float2bfloat16(ls > 0.0f ? os / ls * vs : 0.0f);
        } else {
          float* pp = p.part + ((int64_t(kvh) * p.max_splits + sp) * Gq + h) * kPart;
          pp[2 + d] = os;
          if (d == 0) {
            pp[0] = mh[h];
            pp[1] = ls;
          }
        }
      }
      if (splits > 1) {  // the last split of this KV head to finish merges them all
        __threadfence();
        cbar();
        if (tid == 0) s_last = atomicAdd(p.cnt + kvh, 1) == splits - 1;
        cbar();
        if (s_last) {
          __threadfence();
          for (int idx = tid; idx < Gq * kD; idx += kCT) {
            const int h = idx / kD, d = idx % kD;
            float M = -INFINITY;
            for (int q = 0; q < splits; ++q)
              M = fmaxf(M, __ldcg(p.part + ((int64_t(kvh) * p.max_splits + q) * Gq + h) * kPart));
            float ls = 0.0f, os = 0.0f;
            if (M != -INFINITY)
              for (int q = 0; q < splits; ++q) {
                const float* pp = p.part + ((int64_t(kvh) * p.max_splits + q) * Gq + h) * kPart;
                const float f = exp2f(__ldcg(pp) - M);
                ls += __ldcg(pp + 1) * f;
                os += __ldcg(pp + 2 + d) * f;
              }
            p.attn[(kvh * Gq + h) * kD + d] = __float2bfloat16(ls > 0.0f ? os / ls * vs : 0.0f);
          }
          if (tid == 0) p.cnt[kvh] = 0;
        }
      }
    }
    stamp(l, 1, 2);
    in_s = load_scale(L.mat[kO].in);
    grid_sync(p.bar);

    // ---- C: o_proj + residual ----
    stamp(l, 2, 0);
    prep_bf16(p.attn, p.q_dim, in_s);
    stamp(l, 2, 1);
    consume(l, kO, [&](int t, int r, const float* rt, float2 rs) {
      const int row = 16 * t + r;
      float x = __ldcg(p.st.residual + row);
      if (l > 0) {
        float d = 0.0f;
        for (int k = 0; k < p.down_split; ++k) d += __ldcg(p.down + int64_t(k) * H + row);
        x += bf16r(d);
      }
      p.st.residual[row] = x + bf16r(row_sum(rt, r) * (sx * rs.x));
    });
    stamp(l, 2, 2);
    load_norm(L.ffn_norm);
    in_s = load_scale(L.mat[kGu].in);
    grid_sync(p.bar);

    // ---- D: gate/up + silu ----
    stamp(l, 3, 0);
    prep_norm(false, in_s, nullptr, false);
    stamp(l, 3, 1);
    consume(l, kGu, [&](int t, int r, const float* rt, float2 rs) {
      if (r >= 8) return;
      const float gt = row_sum(rt, r) * (sx * rs.x), up = row_sum(rt, r + 8) * (sx * rs.y);
      p.act[8 * t + r] = __float2bfloat16(silu(gt) * up);
    });
    stamp(l, 3, 2);
    in_s = load_scale(L.mat[kDown].in);
    grid_sync(p.bar);

    // ---- E: down_proj (K halves) ----
    stamp(l, 4, 0);
    prep_bf16(p.act, p.I, in_s);
    stamp(l, 4, 1);
    consume(l, kDown, [&](int t, int r, const float* rt, float2 rs) {
      const int kp = t / (H / 16), row = 16 * (t % (H / 16)) + r;
      p.down[int64_t(kp) * H + row] = row_sum(rt, r) * (sx * rs.x);
    });
    stamp(l, 4, 2);
  }
  load_norm(p.st.final_norm);
  grid_sync(p.bar);
  if (blockIdx.x == 0) prep_norm(true, 1.0f, reinterpret_cast<bf16*>(p.st.out), true);
#endif
}

bool device_ok(std::string* why) {
  if (device_cc() < 90) {
    *why = "needs sm_90 (bulk copies); this GPU is sm_" + std::to_string(device_cc());
    return false;
  }
  cudaFuncAttributes fa{};
  if (cudaFuncGetAttributes(&fa, fused_decode_kernel) != cudaSuccess || fa.binaryVersion < 90) {
    cudaGetLastError();
    *why = "this build has no sm_90 code for the fused decode kernel";
    return false;
  }
  return true;
}

// Context splits of a KV head at most (an item a block): KILN_FUSED_DECODE_SPLITS caps it (tests).
int32_t max_splits_for(int32_t grid, int32_t n_kv) {
  const int env = env_int("KILN_FUSED_DECODE_SPLITS", 0);
  const int32_t cap = std::max(1, std::min(16, grid / n_kv));
  return env > 0 ? std::min(env, cap) : cap;
}

}  // namespace

std::string fused_decode_unsupported(const FusedDecodeShape& s) {
  std::string why;
  if (!device_ok(&why)) return why;
  const int32_t G = s.n_kv > 0 ? s.n_heads / s.n_kv : 0;
  if (s.head_dim != kD) return "head_dim " + std::to_string(s.head_dim) + " (needs 128)";
  if (s.n_kv < 1 || G < 1 || G * s.n_kv != s.n_heads || G > kMaxG)
    return "heads " + std::to_string(s.n_heads) + " / KV heads " + std::to_string(s.n_kv);
  if (s.H % kKc || s.H > kMaxH) return "hidden size " + std::to_string(s.H) + " (needs a multiple of 1024, <= 4096)";
  if ((s.n_heads * kD) % kKc) return "q_dim not a multiple of 1024";
  if (s.I % kKc || s.I % 8) return "intermediate size " + std::to_string(s.I) + " (needs a multiple of 1024)";
  return "";
}

FusedDecode::~FusedDecode() {
  if (prof_) {
    print_profile();
    cudaFree(prof_);
  }
  if (layers_) cudaFree(layers_);
  if (scratch_) cudaFree(scratch_);
}

Status FusedDecode::init(const FusedDecodeShape& s, const std::vector<FusedLayer>& layers) {
  const std::string why = fused_decode_unsupported(s);
  if (!why.empty()) return Status::error("fused decode: " + why);
  if (layers.size() != size_t(s.num_layers)) return Status::error("fused decode: layer table size");
  shape_ = s;
  int dev = 0, sms = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  const int32_t G = s.n_heads / s.n_kv, q_dim = s.n_heads * kD;
  // down_proj in K halves (when they stay multiples of 1024): twice the tiles, each about a GEMV
  // tile of the other matrices, so the last blocks of the phase wait less
  down_split_ = s.I % (2 * kKc) == 0 ? 2 : 1;
  const size_t attn_b = sizeof(float) * (size_t(kMaxG) * kD + size_t(kMaxG) * kCT + size_t(kCW) * G * kD);
  const size_t u_b = (std::max<size_t>({size_t(s.H), size_t(q_dim), size_t(s.I), attn_b}) + 127) / 128 * 128;
  cudaFuncAttributes fa{};
  cudaFuncGetAttributes(&fa, fused_decode_kernel);
  const int64_t room = int64_t(optin) - int64_t(fa.sharedSizeBytes) - int64_t(u_b);
  stages_ = int32_t(std::min<int64_t>(16, room / kStageB));
  if (stages_ < 4) return Status::error("fused decode: " + std::to_string(room) + " bytes of shared memory left for the stage ring");
  smem_ = int32_t(size_t(stages_) * kStageB + u_b);
  if (!cuda_ok(cudaFuncSetAttribute(fused_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_),
               "fused decode smem"))
    return Status::error("fused decode: cannot raise the shared memory to " + std::to_string(smem_) + " bytes");
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_decode_kernel, kThreads, size_t(smem_));
  if (per_sm < 1) return Status::error("fused decode: the kernel does not fit an SM");
  grid_ = sms;
  max_splits_ = max_splits_for(grid_, s.n_kv);
  inflight_ = std::max(1, env_int("KILN_FUSED_DECODE_INFLIGHT", 4));
  evict_first_ = env_int("KILN_FUSED_DECODE_EVICT_FIRST", 1) != 0;
  KILN_RETURN_IF_ERROR(device_alloc(reinterpret_cast<void**>(&layers_), layers.size() * sizeof(FusedLayer),
                                    "the fused decode's layer table"));
  KILN_RETURN_IF_ERROR(cuda_status(
      cudaMemcpy(layers_, layers.data(), layers.size() * sizeof(FusedLayer), cudaMemcpyHostToDevice), "layer table"));
  Params p{};
  const size_t bytes = carve(nullptr, &p);
  KILN_RETURN_IF_ERROR(device_alloc(&scratch_, bytes, "the fused decode's scratch"));
  if (env_int("KILN_FUSED_DECODE_PROFILE", 0)) {
    const size_t pb = size_t(s.num_layers) * 5 * grid_ * 4 * 8;
    KILN_RETURN_IF_ERROR(device_alloc(reinterpret_cast<void**>(&prof_), pb, "the fused decode's profile"));
    cudaMemset(prof_, 0, pb);
  }
  return cuda_status(cudaMemset(scratch_, 0, bytes), "fused decode scratch");
}

// The scratch's pieces from base (256-byte aligned); returns the bytes. base null: only measures.
size_t FusedDecode::carve(uint8_t* base, void* params) const {
  Params& p = *static_cast<Params*>(params);
  const FusedDecodeShape& sh = shape_;
  const size_t G = size_t(sh.n_heads / sh.n_kv), q_dim = size_t(sh.n_heads) * kD, kv_dim = size_t(sh.n_kv) * kD;
  size_t off = 0;
  auto take = [&](size_t b) {
    uint8_t* r = base ? base + off : nullptr;
    off += (b + 255) / 256 * 256;
    return r;
  };
  p.bar = reinterpret_cast<unsigned*>(take(64));
  p.cnt = reinterpret_cast<int32_t*>(take(4 * size_t(sh.n_kv)));
  p.qkv = reinterpret_cast<bf16*>(take(2 * (q_dim + 2 * kv_dim)));
  p.attn = reinterpret_cast<bf16*>(take(2 * q_dim));
  p.act = reinterpret_cast<bf16*>(take(2 * size_t(sh.I)));
  p.down = reinterpret_cast<float*>(take(4 * size_t(down_split_) * sh.H));
  p.part = reinterpret_cast<float*>(take(4 * size_t(sh.n_kv) * max_splits_ * G * kPart));
  return off;
}

// The last step's phases (KILN_FUSED_DECODE_PROFILE=1), means over layers of the slowest block's
// times, to stderr when the executor goes away.
void FusedDecode::print_profile() const {
  const int L = shape_.num_layers, G = grid_;
  std::vector<unsigned long long> h(size_t(L) * 5 * G * 4);
  cudaDeviceSynchronize();
  if (cudaMemcpy(h.data(), prof_, h.size() * 8, cudaMemcpyDeviceToHost) != cudaSuccess) return;
  auto at = [&](int l, int ph, int b, int k) { return h[((size_t(l) * 5 + ph) * G + b) * 4 + k]; };
  unsigned long long t0 = ~0ull, t1 = 0;
  for (int b = 0; b < G; ++b) {
    t0 = std::min(t0, at(0, 0, b, 0));
    t1 = std::max(t1, at(L - 1, 4, b, 2));
  }
  const char* names[5] = {"A qkv", "B attention", "C o_proj", "D gate/up", "E down"};
  std::fprintf(stderr, "[fused decode profile] last step: %.1f us from the first block's start to the last block's "
                       "last phase; per layer (means over layers, us):\n", (t1 - t0) / 1e3);
  std::fprintf(stderr, "  phase         barrier  input   work(max) work(mean)  producer waiting(mean, max)\n");
  for (int ph = 0; ph < 5; ++ph) {
    double bar = 0, in = 0, wmax = 0, wmean = 0, st_mean = 0, st_max = 0;
    int nb = 0;
    for (int l = 0; l < L; ++l) {
      unsigned long long s_max = 0, i_max = 0, e_max = 0, prev_e = 0;
      double e_sum = 0, stl = 0, stm = 0;
      for (int b = 0; b < G; ++b) {
        s_max = std::max(s_max, at(l, ph, b, 0));
        i_max = std::max(i_max, at(l, ph, b, 1));
        e_max = std::max(e_max, at(l, ph, b, 2));
        e_sum += double(at(l, ph, b, 2) - at(l, ph, b, 1));
        stl += double(at(l, ph, b, 3));
        stm = std::max(stm, double(at(l, ph, b, 3)));
        const int pl = ph == 0 ? l - 1 : l, pp = ph == 0 ? 4 : ph - 1;
        if (pl >= 0) prev_e = std::max(prev_e, at(pl, pp, b, 2));
      }
      if (ph > 0 || l > 0) {
        bar += double(s_max - prev_e);
        ++nb;
      }
      in += double(i_max - s_max);
      wmax += double(e_max - i_max);
      wmean += e_sum / G;
      st_mean += stl / G;
      st_max += stm;
    }
    std::fprintf(stderr, "  %-12s %7.2f %7.2f %9.2f %9.2f   %7.2f %7.2f\n", names[ph], nb ? bar / nb / 1e3 : 0.0,
                 in / L / 1e3, wmax / L / 1e3, wmean / L / 1e3, st_mean / L / 1e3, st_max / L / 1e3);
  }
}

void FusedDecode::launch(const FusedDecodeStep& step, cudaStream_t s) const {
  const FusedDecodeShape& sh = shape_;
  Params p{};
  p.layers = layers_;
  p.num_layers = sh.num_layers;
  p.H = sh.H;
  p.I = sh.I;
  p.n_heads = sh.n_heads;
  p.n_kv = sh.n_kv;
  p.q_dim = sh.n_heads * kD;
  p.kv_dim = sh.n_kv * kD;
  p.down_split = down_split_;
  p.max_splits = max_splits_;
  p.stages = stages_;
  p.inflight = std::min(inflight_, stages_);
  p.weights_evict_first = evict_first_;
  p.st = step;
  carve(static_cast<uint8_t*>(scratch_), &p);
  p.prof = prof_;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(grid_));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = size_t(smem_);
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, fused_decode_kernel, p);
}

}  // namespace kiln::cuda
