// Element-wise, normalization, rotary, KV-write, gather and argmax kernels. Each is memory-bound:
// 16-byte accesses where rows allow it, one block per row for reductions.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "backend/cuda/activation.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/fold_tail.cuh"
#include "backend/cuda/gemv_fp8.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/norm.cuh"

namespace kiln::cuda {
namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float ld_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld_f(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }

__global__ void embed_kernel(const bf16* table, const TokenMeta* tokens, int32_t H, float* out) {
  pdl_trigger();
  pdl_wait();
  const int t = blockIdx.x;
  const bf16* row = table + int64_t(tokens[t].id) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) out[int64_t(t) * H + i] = __bfloat162float(row[i]);
}

// One block per row. The row is read twice (sum of squares, then scale): the second read hits L1/L2.
template <class TIn>
__global__ void rms_norm_kernel(const TIn* x, int64_t ldx, const float* w, int32_t dim, float eps, bf16* out,
                                int64_t ldo) {
  pdl_trigger();
  pdl_wait();
  __shared__ float red[32];
  const TIn* xr = x + int64_t(blockIdx.x) * ldx;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = ld_f(xr, i);
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float inv = rsqrtf(ss / float(dim) + eps);
  bf16* o = out + int64_t(blockIdx.x) * ldo;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __float2bfloat16(w[i] * (ld_f(xr, i) * inv));
}

__global__ void add_rms_norm_kernel(float* residual, const bf16* delta, int64_t ld_delta, const float* w, int32_t dim,
                                    float eps, bf16* out, int64_t ldo) {
  pdl_trigger();
  pdl_wait();
  __shared__ float red[32];
  float* r = residual + int64_t(blockIdx.x) * dim;
  const float inv = add_rms_row(r, delta ? delta + int64_t(blockIdx.x) * ld_delta : nullptr, dim, eps, red);
  bf16* o = out + int64_t(blockIdx.x) * ldo;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __float2bfloat16(w[i] * (r[i] * inv));
}

// The same with the vector row (norm.cuh: norm_row_vectors said kV).
template <int kV>
__global__ void __launch_bounds__(kNormThreads) add_rms_norm_vec_kernel(float* residual, const bf16* delta,
                                                                       int64_t ld_delta, const float* w, int32_t dim,
                                                                       float eps, bf16* out, int64_t ldo) {
  pdl_trigger();
  pdl_wait();
  __shared__ float red[32];
  uint2* o = reinterpret_cast<uint2*>(out + int64_t(blockIdx.x) * ldo);
  const bf16* d = delta ? delta + int64_t(blockIdx.x) * ld_delta : nullptr;  // null: no add
  add_rms_row_vec<kV>(residual + int64_t(blockIdx.x) * dim, d, w, dim, eps, red,
                      [&](int idx, const float4& y) { o[idx] = bf16x4(y); });
}

// One warp per (row, head).
__global__ void head_rms_norm_kernel(bf16* x, int64_t ldx, int32_t n, int32_t heads, int32_t hd, const float* w,
                                     float eps) {
  pdl_trigger();
  pdl_wait();
  const int64_t gw = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (gw >= int64_t(n) * heads) return;
  bf16* p = x + (gw / heads) * ldx + (gw % heads) * hd;
  float ss = 0.0f;
  for (int i = lane; i < hd; i += 32) {
    float v = __bfloat162float(p[i]);
    ss += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  const float inv = rsqrtf(ss / float(hd) + eps);
  for (int i = lane; i < hd; i += 32) p[i] = __float2bfloat16(w[i] * (__bfloat162float(p[i]) * inv));
}

constexpr int kMaxHeadDim = 512;  // ModelConfig validation's limit (the CUDA attention takes <= 128)

// One block per token; threads over (head, pair). sincosf (not the fast intrinsics): positions reach
// 131072 and the angle must match transformers' float32 math. The angles depend on the pair only,
// so each is computed once per token into shared memory, not once per head (40x fewer sincosf at
// Llama-8B shapes). kVec (head_dim % 16 == 0, 16-byte aligned rows): a thread rotates 8 pairs with
// 16-byte loads and stores (the scalar loop was a chain of 2-byte round trips, 122 us for 8192
// tokens at Llama-8B shapes); the arithmetic per element is the same.
template <bool kVec>
__global__ void rope_kernel(bf16* q, int64_t ldq, bf16* k, int64_t ldk, const TokenMeta* tokens, const float* inv_freq,
                            int32_t n_heads, int32_t n_kv, int32_t hd, bool interleaved) {
  __shared__ float s_sin[kMaxHeadDim / 2], s_cos[kMaxHeadDim / 2];
  pdl_trigger();
  pdl_wait();
  const int t = blockIdx.x;
  const float pos = float(tokens[t].pos);
  const int half = hd / 2;
  for (int i = threadIdx.x; i < half; i += blockDim.x) sincosf(pos * inv_freq[i], &s_sin[i], &s_cos[i]);
  __syncthreads();
  auto head = [&](int h) {
    return h < n_heads ? q + int64_t(t) * ldq + int64_t(h) * hd : k + int64_t(t) * ldk + int64_t(h - n_heads) * hd;
  };
  if constexpr (kVec) {
    const int groups = half / 8, total = (n_heads + n_kv) * groups;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
      const int h = idx / groups, i0 = 8 * (idx % groups);
      bf16* base = head(h);
      // non-interleaved: x0 = [i0, i0 + 8), x1 = the same pairs' second halves; interleaved: the 16
      // elements 2 i0 .. 2 i0 + 15, pairs adjacent
      uint4* p0 = reinterpret_cast<uint4*>(base + (interleaved ? 2 * i0 : i0));
      uint4* p1 = interleaved ? p0 + 1 : reinterpret_cast<uint4*>(base + half + i0);
      uint4 a = *p0, b = *p1;
      bf16* av = reinterpret_cast<bf16*>(&a);
      bf16* bv = reinterpret_cast<bf16*>(&b);
      auto rot = [&](bf16& e0, bf16& e1, int j) {
        const float sn = s_sin[i0 + j], cs = s_cos[i0 + j];
        const float x0 = __bfloat162float(e0), x1 = __bfloat162float(e1);
        e0 = __float2bfloat16(x0 * cs - x1 * sn);
        e1 = __float2bfloat16(x1 * cs + x0 * sn);
      };
      if (interleaved) {  // pair j = elements (2j, 2j + 1) of a, then of b
#pragma unroll
        for (int j = 0; j < 4; ++j) rot(av[2 * j], av[2 * j + 1], j);
#pragma unroll
        for (int j = 0; j < 4; ++j) rot(bv[2 * j], bv[2 * j + 1], 4 + j);
      } else {  // pair j = (a[j], b[j])
#pragma unroll
        for (int j = 0; j < 8; ++j) rot(av[j], bv[j], j);
      }
      *p0 = a;
      *p1 = b;
    }
  } else {
    const int total = (n_heads + n_kv) * half;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
      const int h = idx / half, i = idx % half;
      bf16* base = head(h);
      const float sn = s_sin[i], cs = s_cos[i];
      const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
      const float x0 = __bfloat162float(base[a]), x1 = __bfloat162float(base[b]);
      base[a] = __float2bfloat16(x0 * cs - x1 * sn);
      base[b] = __float2bfloat16(x1 * cs + x0 * sn);
    }
  }
}

// One block per token; 16-byte copies of each head row into its slot.
__global__ void kv_write_kernel(const bf16* k, int64_t ldk, const bf16* v, int64_t ldv, const TokenMeta* tokens,
                                bf16* kc, bf16* vc, int32_t n_kv, int32_t hd, int32_t bs) {
  pdl_trigger();
  pdl_wait();
  const int t = blockIdx.x;
  const int32_t slot = tokens[t].slot;
  if (slot < 0) return;
  const int64_t block = slot / bs, off = slot % bs;
  const int vecs = hd / 8;  // hd % 8 == 0 is checked at load
  for (int idx = threadIdx.x; idx < n_kv * vecs; idx += blockDim.x) {
    const int h = idx / vecs, c = idx % vecs;
    const int64_t dst = ((block * n_kv + h) * bs + off) * hd + c * 8;
    reinterpret_cast<uint4*>(kc + dst)[0] = reinterpret_cast<const uint4*>(k + int64_t(t) * ldk + int64_t(h) * hd + c * 8)[0];
    reinterpret_cast<uint4*>(vc + dst)[0] = reinterpret_cast<const uint4*>(v + int64_t(t) * ldv + int64_t(h) * hd + c * 8)[0];
  }
}

__global__ void silu_mul_kernel(const bf16* gate, int64_t ldg, const bf16* up, int64_t ldu, bf16* out, int64_t ldo,
                                int32_t dim) {
  pdl_trigger();
  pdl_wait();
  const int64_t r = blockIdx.y;
  const int vecs = dim / 8;
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < vecs; c += gridDim.x * blockDim.x) {
    uint4 gr = reinterpret_cast<const uint4*>(gate + r * ldg)[c];
    uint4 ur = reinterpret_cast<const uint4*>(up + r * ldu)[c];
    const bf16* g = reinterpret_cast<const bf16*>(&gr);
    const bf16* u = reinterpret_cast<const bf16*>(&ur);
    uint4 orr;
    bf16* o = reinterpret_cast<bf16*>(&orr);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float gv = __bfloat162float(g[j]);
      o[j] = __float2bfloat16(silu(gv) * __bfloat162float(u[j]));
    }
    reinterpret_cast<uint4*>(out + r * ldo)[c] = orr;
  }
}

__global__ void gather_rows_kernel(const bf16* x, int64_t ldx, const int32_t* rows, int32_t dim, bf16* out) {
  pdl_trigger();
  pdl_wait();
  const bf16* src = x + int64_t(rows[blockIdx.x]) * ldx;
  bf16* dst = out + int64_t(blockIdx.x) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
}

template <class T>
__global__ void add_bias_kernel(T* y, int64_t ldy, const float* bias, int32_t N) {
  pdl_trigger();
  pdl_wait();
  T* row = y + int64_t(blockIdx.x) * ldy;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    if constexpr (sizeof(T) == 4) row[i] += bias[i];
    else row[i] = __float2bfloat16(__bfloat162float(row[i]) + bias[i]);
  }
}

// First maximum (ties -> lowest id), as std::max_element on the host; NaN and -inf never win (a row
// of them gives id 0). Blocks (chunk, row) each reduce kArgmaxSpan logits, all their loads in flight
// at once, to a key (the value's order-preserving bits, then the inverted id) merged into keys[row]
// with a 64-bit atomicMax; the last block of a row to count writes the id and puts the key and the
// count back to 0 for the next launch. (One 1024-thread block a row, a loop of dependent L2 reads,
// took ~45 us of each batch-1 step for the 128k vocabulary.)
constexpr int kArgmaxThreads = 256, kArgmaxPer = 16, kArgmaxSpan = kArgmaxThreads * kArgmaxPer;

__device__ __forceinline__ unsigned long long argmax_key(float v, int32_t i) {
  const uint32_t u = __float_as_uint(v + 0.0f);  // -0 -> +0: equal values tie on the id
  const uint32_t o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(o) << 32) | (0xffffffffu - uint32_t(i));
}

// scratch: per row, the key and (in the next 8 bytes) the count of blocks done.
__global__ void __launch_bounds__(kArgmaxThreads) argmax_kernel(const float* logits, int32_t V, int32_t* ids,
                                                                 unsigned long long* scratch) {
  pdl_trigger();
  pdl_wait();
  const int r = blockIdx.y;
  const float* row = logits + int64_t(r) * V;
  const int base = blockIdx.x * kArgmaxSpan + threadIdx.x;
  float v[kArgmaxPer];
#pragma unroll
  for (int k = 0; k < kArgmaxPer; ++k) {
    const int i = base + k * kArgmaxThreads;
    v[k] = i < V ? __ldg(row + i) : -INFINITY;
  }
  unsigned long long best = 0;
#pragma unroll
  for (int k = 0; k < kArgmaxPer; ++k)
    if (v[k] > -INFINITY) {  // false for NaN and -inf
      const unsigned long long key = argmax_key(v[k], base + k * kArgmaxThreads);
      best = key > best ? key : best;
    }
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
    best = other > best ? other : best;
  }
  __shared__ unsigned long long warp_best[kArgmaxThreads / 32];
  __shared__ bool last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxThreads / 32; ++w) best = warp_best[w] > best ? warp_best[w] : best;
    unsigned long long* key = scratch + 2 * r;
    unsigned int* count = reinterpret_cast<unsigned int*>(key + 1);
    if (best) atomicMax(key, best);
    __threadfence();
    last = atomicAdd(count, 1u) == gridDim.x - 1;
    if (last) {
      __threadfence();
      const unsigned long long k = atomicExch(key, 0ull);
      ids[r] = k ? int32_t(0xffffffffu - uint32_t(k & 0xffffffffu)) : 0;
      *count = 0u;
    }
  }
}

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__global__ void fill_uniform_bf16_kernel(bf16* p, int64_t n, uint64_t seed, float a) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = mix64(seed ^ mix64(uint64_t(i)));
    const float u = float(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    p[i] = __float2bfloat16((2.0f * u - 1.0f) * a);
  }
}

__global__ void fill_f32_kernel(float* p, int64_t n, float v) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) p[i] = v;
}

__global__ void f32_to_bf16_kernel(const float* in, bf16* out, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(in[i]);
}

__global__ void bf16_to_f32_kernel(const bf16* in, float* out, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

// Four independent 16-byte loads in flight per thread per iteration.
__global__ void read_bandwidth_kernel(const uint4* p, int64_t n, float* sink) {
  uint32_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride), c = __ldcs(p + i + 2 * stride), d = __ldcs(p + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    uint4 a = __ldcs(p + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x12345678u) sink[0] = float(acc);  // keeps the loads; practically never written
}

// Epilogue of the decode GEMV that replaces linear + add_rms_norm (o_proj, down_proj): each output
// element is added (rounded to bf16 first, as the unfused path stores the projection) into the f32
// residual by the warp that owns it; the last block to finish (atomic counter, reset by that block so
// graph replays find it at 0) reads the whole residual back from L2 and writes rms_norm(residual) * w.
// Saves a kernel and its launch boundary per fold (two per layer).
struct NormEpi {
  float* residual;  // [n, N] dense
  const float* w;   // [N]
  bf16* out;        // [n, ldo]
  int64_t ldo;
  float eps;
  unsigned int* counter;
};

// Small-M GEMM (decode): warps stream weight rows with 16-byte loads, kL in flight per lane; the
// M activation rows come through L1. kSplit warps share a row (each a contiguous K range, summed
// through shared memory) so that small-N shapes (o: 4096 rows) still put ~2 waves of warps on the
// chip: with one warp per row, o and qkv ran at 1.65-1.85 TB/s against 2.8-3.1 for the large shapes
// (docs/PERF_cuda.md). kSilu: the weight is [gate; up] (pair_off rows apart) and each warp computes
// both rows of output i and writes silu(gate) * up, so decode needs no separate silu_mul kernel.
// kFp8: the weight is FP8 E4M3 (one 16-byte vector = 16 weights, so the same four loads per lane
// carry twice the K range); weights are widened in registers, the dot runs in f32 against the bf16
// activations and is multiplied once by its row's dequantization scale (row_scales, or wscale).
// The first weight loads are issued before pdl_wait(): they overlap the previous kernel's tail.
template <int M, int kSplit, bool kSilu, int kMinBlocks, bool kNorm, bool kPersist, bool kFp8, int kL = 4>
__global__ void __launch_bounds__(256, kMinBlocks)
    gemv_kernel(const bf16* x, int64_t ldx, int32_t n, const void* w, int32_t N, int32_t K, int64_t pair_off, void* y,
                int64_t ldy, bool y_f32, NormEpi ne, float wscale, const float* row_scales) {
  constexpr int kRows = 8 / kSplit, kR = kSilu ? 2 : 1;
  constexpr int kPerVec = kFp8 ? 16 : 8;  // weights per 16-byte vector
  __shared__ float red[8][kR][M];
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, part = warp % kSplit;
  const int vecs = K / kPerVec, per = (vecs + kSplit - 1) / kSplit;
  const int v0 = part * per, v1 = min(vecs, v0 + per);
  // kPersist: the grid is what the chip holds at once and each block walks tiles (kRows rows) with a
  // grid stride; the next tile's first four loads are issued before this tile's reduction and store,
  // so a block's epilogue overlaps weight traffic instead of leaving its SM slot idle once per wave.
  const int ntiles = (N + kRows - 1) / kRows;
  int tile = blockIdx.x;
  auto row_of = [&](int t) { return int64_t(t) * kRows + warp / kSplit; };
  auto wrow = [&](int64_t row, bool act, const uint4* (&wr)[kR]) {
    wr[0] = reinterpret_cast<const uint4*>(static_cast<const char*>(w) + (act ? row : 0) * K * (kFp8 ? 1 : 2));
    if (kSilu) wr[kR - 1] = wr[0] + pair_off * (K / kPerVec);
  };
  int64_t row = row_of(tile);
  bool active = row < N;
  const uint4* wr[kR];
  wrow(row, active, wr);
  static_assert(kL == 4 || kL == 8, "4 or 8 loads per lane");
  constexpr int kSpan = 32 * kL;  // vectors per warp round
  uint4 b0[kR], b1[kR], b2[kR], b3[kR], b4[kR], b5[kR], b6[kR], b7[kR];  // b4..b7: kL == 8 only
  // Issues the round of kL loads per lane starting at vector i.
  auto load_round = [&](int i) {
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      b0[r] = __ldcs(wr[r] + i);
      b1[r] = __ldcs(wr[r] + i + 32);
      b2[r] = __ldcs(wr[r] + i + 64);
      b3[r] = __ldcs(wr[r] + i + 96);
      if constexpr (kL == 8) {
        b4[r] = __ldcs(wr[r] + i + 128);
        b5[r] = __ldcs(wr[r] + i + 160);
        b6[r] = __ldcs(wr[r] + i + 192);
        b7[r] = __ldcs(wr[r] + i + 224);
      }
    }
  };

  int i = v0 + lane;
  bool full = active && i + kSpan - 32 < v1;
  if (full) load_round(i);
  pdl_wait();  // x is the previous kernel's output
  for (;;) {
    float acc[kR][M];
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
    // One weight vector (per row r) against the matching K range of each activation row.
    auto fma8 = [&](const uint4 (&wv)[kR], int i) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (m < n) {
          if constexpr (kFp8) {
            // One x vector (8 activations) per half of the weight vector: fewer live registers under
            // the 32-register cap than loading both first.
            const uint4* xr = reinterpret_cast<const uint4*>(x + m * ldx) + 2 * i;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint4 xv = __ldg(xr + h);
              const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&xv);
#pragma unroll
              for (int r = 0; r < kR; ++r) {
                const __nv_fp8x2_storage_t* wp = reinterpret_cast<const __nv_fp8x2_storage_t*>(&wv[r]) + 4 * h;
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                  const float2 wf = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(wp[t], __NV_E4M3)));
                  const float2 xf = __bfloat1622float2(xp[t]);
                  acc[r][m] = fmaf(wf.x, xf.x, fmaf(wf.y, xf.y, acc[r][m]));
                }
              }
            }
          } else {
            const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + m * ldx) + i);
            const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&xv);
#pragma unroll
            for (int r = 0; r < kR; ++r) {
              const __nv_bfloat162* wp = reinterpret_cast<const __nv_bfloat162*>(&wv[r]);
#pragma unroll
              for (int t = 0; t < 4; ++t) {
                const float2 xf = __bfloat1622float2(xp[t]), wf = __bfloat1622float2(wp[t]);
                acc[r][m] = fmaf(wf.x, xf.x, fmaf(wf.y, xf.y, acc[r][m]));
              }
            }
          }
        }
      }
    };
    // kNorm: the residual element this warp adds to, loaded now so the epilogue does not wait for it
    // (a dependent load in the epilogue cost ~8 us per GEMV, PERF_cuda.md pass 3); same for the FP8
    // row scales.
    float res[M];
    if (kNorm && active && lane == 0 && part == 0)
#pragma unroll
      for (int m = 0; m < M; ++m) res[m] = m < n ? ne.residual[int64_t(m) * N + row] : 0.0f;
    float rs[kR];
    if constexpr (kFp8) {
#pragma unroll
      for (int r = 0; r < kR; ++r) rs[r] = wscale;
      if (row_scales && active && lane == 0 && part == 0)
#pragma unroll
        for (int r = 0; r < kR; ++r) rs[r] = __ldg(row_scales + row + r * pair_off);
    }
    while (full) {
      fma8(b0, i);
      fma8(b1, i + 32);
      fma8(b2, i + 64);
      fma8(b3, i + 96);
      if constexpr (kL == 8) {
        fma8(b4, i + 128);
        fma8(b5, i + 160);
        fma8(b6, i + 192);
        fma8(b7, i + 224);
      }
      i += kSpan;
      full = i + kSpan - 32 < v1;
      if (full) load_round(i);
    }
    if constexpr (kL == 8) {
      // What is left of the range: a round of 4 loads, then single vectors.
      if (active && i + 96 < v1) {
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          b0[r] = __ldcs(wr[r] + i);
          b1[r] = __ldcs(wr[r] + i + 32);
          b2[r] = __ldcs(wr[r] + i + 64);
          b3[r] = __ldcs(wr[r] + i + 96);
        }
        fma8(b0, i);
        fma8(b1, i + 32);
        fma8(b2, i + 64);
        fma8(b3, i + 96);
        i += 128;
      }
    }
    for (; active && i < v1; i += 32) {
#pragma unroll
      for (int r = 0; r < kR; ++r) b0[r] = __ldcs(wr[r] + i);
      fma8(b0, i);
    }
    // Next tile's first loads, in flight during this tile's reduction and store.
    const int64_t cur_row = row;
    const bool cur_active = active;
    bool more = false;
    if constexpr (kPersist) {
      tile += gridDim.x;
      more = tile < ntiles;  // block-uniform
      if (more) {
        row = row_of(tile);
        active = row < N;
        wrow(row, active, wr);
        i = v0 + lane;
        full = active && i + kSpan - 32 < v1;
        if (full) load_round(i);
      }
    }
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float v = acc[r][m];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        acc[r][m] = v;
        if (kSplit > 1 && lane == 0) red[warp][r][m] = v;
      }
    // No early returns: the kNorm tail needs every thread of the block.
    bool writer = cur_active && lane == 0;
    if (kSplit > 1) {
      __syncthreads();
      writer = writer && part == 0;
      if (part == 0)
#pragma unroll
        for (int r = 0; r < kR; ++r)
#pragma unroll
          for (int m = 0; m < M; ++m) {
            float v = 0.0f;
#pragma unroll
            for (int q = 0; q < kSplit; ++q) v += red[warp + q][r][m];
            acc[r][m] = v;
          }
      if (kPersist) __syncthreads();  // red is rewritten by the next tile
    }
    if (writer)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (m >= n) break;
        float v = acc[0][m];
        if constexpr (kFp8) v *= rs[0];
        if (kSilu) {
          float u = acc[kR - 1][m];
          if constexpr (kFp8) u *= rs[kR - 1];
          v = silu(v) * u;
        }
        if (y_f32) {
          static_cast<float*>(y)[m * ldy + cur_row] = v;
        } else {
          const bf16 vb = __float2bfloat16(v);
          static_cast<bf16*>(y)[m * ldy + cur_row] = vb;
          if (kNorm) ne.residual[int64_t(m) * N + cur_row] = res[m] + __bfloat162float(vb);
        }
      }
    if (!more) break;
  }
  if constexpr (kNorm) fold_norm_tail(ne, n, N);
}

// Tuning knobs, read once per process (docs/PERF_cuda.md, decode pass 3): KILN_GEMV_SPLIT_TARGET is the
// warp count below which rows are split over more warps; KILN_GEMV_OCC=0 keeps the compiler's register
// choice (6 blocks/SM for M=1) instead of capping it so that 8 blocks (64 warps) fit on an SM.
int gemv_split_target() {
  static const int v = env_int("KILN_GEMV_SPLIT_TARGET", 12288);
  return v;
}
bool gemv_high_occupancy() {
  static const bool v = env_int("KILN_GEMV_OCC", 1) != 0;
  return v;
}

// Loads in flight per lane for the M = 1 plain and fold GEMVs (PERF_cuda.md, decode pass 5): 8 (one
// row per warp, 48-register cap = 5 blocks/SM, 160 KB of weights in flight per SM against 128 KB)
// streams the lm_head at 3.11 TB/s instead of 2.89 (337 vs 363 us), but costs the 4096-row shapes
// (down 43.8 -> 50.6 us, o 17.0 -> 17.7: fewer resident warps for short rows), so it is used from
// kGemvLoads8MinN rows and two full rounds (512 vectors) per row up, the shape it was measured on.
// KILN_GEMV_LOADS=4 or 8 forces one everywhere.
constexpr int32_t kGemvLoads8MinN = 65536;
int gemv_loads(int32_t N, int32_t row_vecs) {
  static const int v = env_int("KILN_GEMV_LOADS", 0);
  return v == 4 || v == 8 ? v : N >= kGemvLoads8MinN && row_vecs >= 512 ? 8 : 4;
}

// KILN_GEMV_PERSISTENT=1: grid = SMs x resident blocks per SM, blocks walk tiles (docs/PERF_cuda.md,
// decode pass 4).
bool gemv_persistent() {
  static const bool v = env_int("KILN_GEMV_PERSISTENT", 0) != 0;
  return v;
}

// Everything a launch passes down unchanged (shapes, pointers, epilogue, stream).
struct GemvArgs {
  const bf16* x;
  int64_t ldx;
  int32_t n;
  GemvW w;
  int32_t N, K;
  int64_t pair_off;
  void* y;
  int64_t ldy;
  bool y_f32;
  NormEpi ne;
  cudaStream_t s;
};

template <int M, int kSplit, bool kSilu, int kMinBlocks, bool kNorm, bool kFp8, int kL>
void gemv_launch_split(const GemvArgs& a) {
  const int tiles = (a.N * kSplit + 7) / 8;
  const float* rows = kFp8 ? a.w.row_scales : nullptr;
  if constexpr (kL == 4) {
    if (gemv_persistent()) {
      // Resident blocks of this instantiation, computed once (host-only queries, fine during capture).
      static const int resident = [] {
        int dev = 0, sms = 132, per_sm = 1;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm,
                                                      gemv_kernel<M, kSplit, kSilu, kMinBlocks, kNorm, true, kFp8>, 256, 0);
        // KILN_GEMV_PERSIST_SLACK blocks per SM left free for the next kernel's PDL blocks.
        const int keep = per_sm - env_int("KILN_GEMV_PERSIST_SLACK", 0);
        return sms * (keep < 1 ? 1 : keep);
      }();
      launch_pdl(gemv_kernel<M, kSplit, kSilu, kMinBlocks, kNorm, true, kFp8>, dim3(tiles < resident ? tiles : resident),
                 dim3(256), 0, a.s, a.x, a.ldx, a.n, a.w.data, a.N, a.K, a.pair_off, a.y, a.ldy, a.y_f32, a.ne,
                 a.w.scale, rows);
      return;
    }
  }
  launch_pdl(gemv_kernel<M, kSplit, kSilu, kMinBlocks, kNorm, false, kFp8, kL>, dim3(tiles), dim3(256), 0, a.s, a.x,
             a.ldx, a.n, a.w.data, a.N, a.K, a.pair_off, a.y, a.ldy, a.y_f32, a.ne, a.w.scale, rows);
}

template <int M, bool kSilu, int kMinBlocks, bool kNorm, bool kFp8, int kL = 4>
void gemv_launch_mb(int split, const GemvArgs& a) {
  if (split == 1) gemv_launch_split<M, 1, kSilu, kMinBlocks, kNorm, kFp8, kL>(a);
  else if (split == 2) gemv_launch_split<M, 2, kSilu, kMinBlocks, kNorm, kFp8, kL>(a);
  else gemv_launch_split<M, 4, kSilu, kMinBlocks, kNorm, kFp8, kL>(a);
}

// Batch-1 decode (M = 1) gets the register cap that fits 8 blocks per SM when KILN_GEMV_OCC allows it
// (5 for the silu pair and for 8 loads per lane, which hold twice the weight registers).
template <int M, bool kSilu, bool kNorm, bool kFp8>
void gemv_launch(int split, const GemvArgs& a) {
  if constexpr (M == 1 && !kSilu) {
    if (gemv_loads(a.N, a.K / (kFp8 ? 16 : 8)) == 8) {
      if (gemv_high_occupancy()) gemv_launch_mb<M, kSilu, 5, kNorm, kFp8, 8>(split, a);
      else gemv_launch_mb<M, kSilu, 1, kNorm, kFp8, 8>(split, a);
      return;
    }
  }
  if (M == 1 && gemv_high_occupancy()) gemv_launch_mb<M, kSilu, kSilu ? 5 : 8, kNorm, kFp8>(split, a);
  else gemv_launch_mb<M, kSilu, 1, kNorm, kFp8>(split, a);
}

template <bool kSilu, bool kNorm, bool kFp8>
void gemv_launch_n(int split, const GemvArgs& a) {
  if (a.n == 1) gemv_launch<1, kSilu, kNorm, kFp8>(split, a);
  else if (a.n == 2) gemv_launch<2, kSilu, kNorm, kFp8>(split, a);
  else gemv_launch<4, kSilu, kNorm, kFp8>(split, a);
}

template <bool kSilu, bool kNorm = false>
bool gemv_dispatch(const bf16_t* x, int64_t ldx, int32_t n, const GemvW& w, int32_t N, int32_t K, int64_t pair_off,
                   void* y, int64_t ldy, bool y_f32, cudaStream_t s, const NormEpi& ne = {}) {
  // FP8 weights with activation quantization take the tensor-core GEMV (gemv_fp8.cu); it declines
  // weight-only GemvWs, KILN_FP8_GEMV=cvt and pre-sm_89 devices, which take the widening kernel below.
  if (w.fp8) {
    const GemvFold fold{ne.residual, ne.w, reinterpret_cast<bf16_t*>(ne.out), ne.ldo, ne.eps, ne.counter};
    if (launch_gemv_fp8_mma(x, ldx, n, w, N, K, pair_off, kSilu, y, ldy, y_f32, kNorm ? &fold : nullptr, s)) return true;
  }
  const int per_vec = w.fp8 ? 16 : 8;  // weights per 16-byte load: rows must start 16-byte aligned
  if (!w.data || K % per_vec || ldx % 8 || n < 1 || n > 4 || N < 1) return false;
  if (reinterpret_cast<uintptr_t>(w.data) % 16 || reinterpret_cast<uintptr_t>(x) % 16) return false;
  if (kNorm && (N % 4 || N > 4096 || ne.ldo % 4 || reinterpret_cast<uintptr_t>(ne.w) % 16)) return false;
  // Enough warps for ~1.5 waves of 8-warp blocks (132 SMs x 8), while each warp keeps >= 64
  // 16-byte vectors of K; pair mode already streams two rows per warp.
  // With 8 loads per lane (KILN_GEMV_LOADS) a warp keeps at least one full round of 256 vectors.
  const int min_per_warp = !kSilu && n == 1 && gemv_loads(N, K / per_vec) == 8 ? 256 : 64;
  int split = 1;
  if (!kSilu)
    while (split < 4 && int64_t(N) * split < gemv_split_target() && K / per_vec / (split * 2) >= min_per_warp)
      split *= 2;
  const GemvArgs a{reinterpret_cast<const bf16*>(x), ldx, n, w, N, K, pair_off, y, ldy, y_f32, ne, s};
  if (w.fp8) gemv_launch_n<kSilu, kNorm, true>(split, a);
  else gemv_launch_n<kSilu, kNorm, false>(split, a);
  return true;
}

int grid_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  return int(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

int threads_for(int dim) { return dim >= 1024 ? 1024 : dim >= 256 ? 256 : 128; }

}  // namespace

void launch_embed(const bf16_t* table, const TokenMeta* tokens, int32_t T, int32_t H, float* out, cudaStream_t s) {
  if (T == 0) return;
  launch_pdl(embed_kernel, dim3(T), dim3(256), 0, s, reinterpret_cast<const bf16*>(table), tokens, H, out);
}

void launch_rms_norm(const void* x, bool x_f32, int64_t ldx, const float* w, int32_t n, int32_t dim, float eps,
                     bf16_t* out, int64_t ldo, cudaStream_t s) {
  if (n == 0) return;
  const int th = threads_for(dim);
  if (x_f32)
    launch_pdl(rms_norm_kernel<float>, dim3(n), dim3(th), 0, s, static_cast<const float*>(x), ldx, w, dim, eps,
                                            reinterpret_cast<bf16*>(out), ldo);
  else
    launch_pdl(rms_norm_kernel<bf16>, dim3(n), dim3(th), 0, s, static_cast<const bf16*>(x), ldx, w, dim, eps,
                                           reinterpret_cast<bf16*>(out), ldo);
}

void launch_add_rms_norm(float* residual, const bf16_t* delta, int64_t ld_delta, const float* w, int32_t n, int32_t dim,
                         float eps, bf16_t* out, int64_t ldo, cudaStream_t s) {
  if (n == 0) return;
  const bf16* d = reinterpret_cast<const bf16*>(delta);
  bf16* o = reinterpret_cast<bf16*>(out);
  switch (norm_row_vectors(dim, ld_delta, ldo, residual, d, o, w)) {
    case 1: return launch_pdl(add_rms_norm_vec_kernel<1>, dim3(n), dim3(kNormThreads), 0, s, residual, d, ld_delta, w, dim, eps, o, ldo);
    case 2: return launch_pdl(add_rms_norm_vec_kernel<2>, dim3(n), dim3(kNormThreads), 0, s, residual, d, ld_delta, w, dim, eps, o, ldo);
    case 4: return launch_pdl(add_rms_norm_vec_kernel<4>, dim3(n), dim3(kNormThreads), 0, s, residual, d, ld_delta, w, dim, eps, o, ldo);
    case 8: return launch_pdl(add_rms_norm_vec_kernel<8>, dim3(n), dim3(kNormThreads), 0, s, residual, d, ld_delta, w, dim, eps, o, ldo);
    default: launch_pdl(add_rms_norm_kernel, dim3(n), dim3(threads_for(dim)), 0, s, residual, d, ld_delta, w, dim, eps, o, ldo);
  }
}

void launch_head_rms_norm(bf16_t* x, int64_t ldx, int32_t n, int32_t heads, int32_t head_dim, const float* w, float eps,
                          cudaStream_t s) {
  const int64_t warps = int64_t(n) * heads;
  if (warps == 0) return;
  launch_pdl(head_rms_norm_kernel, dim3(int((warps + 7) / 8)), dim3(256), 0, s, reinterpret_cast<bf16*>(x), ldx, n, heads, head_dim, w, eps);
}

void launch_rope(bf16_t* q, int64_t ldq, bf16_t* k, int64_t ldk, const TokenMeta* tokens, int32_t T, const float* inv_freq,
                 int32_t n_heads, int32_t n_kv, int32_t head_dim, bool interleaved, cudaStream_t s) {
  if (T == 0) return;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = head_dim % 16 == 0 && ldq % 8 == 0 && ldk % 8 == 0 && aligned(q) && aligned(k);
  launch_pdl(vec ? rope_kernel<true> : rope_kernel<false>, dim3(T), dim3(256), 0, s, reinterpret_cast<bf16*>(q), ldq,
             reinterpret_cast<bf16*>(k), ldk, tokens, inv_freq, n_heads, n_kv, head_dim, interleaved);
}

void launch_kv_write(const bf16_t* k, int64_t ldk, const bf16_t* v, int64_t ldv, const TokenMeta* tokens, int32_t T,
                     bf16_t* k_cache, bf16_t* v_cache, int32_t n_kv, int32_t head_dim, int32_t block_size,
                     cudaStream_t s) {
  if (T == 0) return;
  launch_pdl(kv_write_kernel, dim3(T), dim3(128), 0, s, reinterpret_cast<const bf16*>(k), ldk, reinterpret_cast<const bf16*>(v), ldv, tokens,
                                    reinterpret_cast<bf16*>(k_cache), reinterpret_cast<bf16*>(v_cache), n_kv, head_dim,
                                    block_size);
}

void launch_silu_mul(const bf16_t* gate, int64_t ld_gate, const bf16_t* up, int64_t ld_up, bf16_t* out, int64_t ldo,
                     int32_t n, int32_t dim, cudaStream_t s) {
  if (n == 0) return;
  const int vecs = dim / 8;  // dim % 8 == 0 is checked at load
  dim3 grid((vecs + 255) / 256, n);
  launch_pdl(silu_mul_kernel, dim3(grid), dim3(256), 0, s, reinterpret_cast<const bf16*>(gate), ld_gate, reinterpret_cast<const bf16*>(up),
                                       ld_up, reinterpret_cast<bf16*>(out), ldo, dim);
}

void launch_gather_rows(const bf16_t* x, int64_t ldx, const int32_t* rows, int32_t L, int32_t dim, bf16_t* out,
                        cudaStream_t s) {
  if (L == 0) return;
  launch_pdl(gather_rows_kernel, dim3(L), dim3(256), 0, s, reinterpret_cast<const bf16*>(x), ldx, rows, dim, reinterpret_cast<bf16*>(out));
}

void launch_add_bias(void* y, bool y_f32, int64_t ldy, const float* bias, int32_t n, int32_t N, cudaStream_t s) {
  if (n == 0) return;
  if (y_f32) launch_pdl(add_bias_kernel<float>, dim3(n), dim3(256), 0, s, static_cast<float*>(y), ldy, bias, N);
  else launch_pdl(add_bias_kernel<bf16>, dim3(n), dim3(256), 0, s, static_cast<bf16*>(y), ldy, bias, N);
}

size_t argmax_scratch_bytes(int32_t L) { return size_t(L) * 2 * sizeof(unsigned long long); }

void launch_argmax(const float* logits, int32_t L, int32_t V, int32_t* ids, void* scratch, cudaStream_t s) {
  if (L == 0) return;
  launch_pdl(argmax_kernel, dim3((V + kArgmaxSpan - 1) / kArgmaxSpan, L), dim3(kArgmaxThreads), 0, s, logits, V, ids,
             static_cast<unsigned long long*>(scratch));
}

void launch_fill_uniform_bf16(bf16_t* p, int64_t n, uint64_t seed, float a, cudaStream_t s) {
  fill_uniform_bf16_kernel<<<grid_for(n, 256), 256, 0, s>>>(reinterpret_cast<bf16*>(p), n, seed, a);
}

void launch_fill_f32(float* p, int64_t n, float value, cudaStream_t s) {
  fill_f32_kernel<<<grid_for(n, 256), 256, 0, s>>>(p, n, value);
}

void launch_f32_to_bf16(const float* in, bf16_t* out, int64_t n, cudaStream_t s) {
  f32_to_bf16_kernel<<<grid_for(n, 256), 256, 0, s>>>(in, reinterpret_cast<bf16*>(out), n);
}

void launch_bf16_to_f32(const bf16_t* in, float* out, int64_t n, cudaStream_t s) {
  bf16_to_f32_kernel<<<grid_for(n, 256), 256, 0, s>>>(reinterpret_cast<const bf16*>(in), out, n);
}

void launch_read_bandwidth(const void* p, int64_t bytes, float* sink, cudaStream_t s) {
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  read_bandwidth_kernel<<<sms * 8, 512, 0, s>>>(static_cast<const uint4*>(p), bytes / 16, sink);
}

bool launch_gemv(const bf16_t* x, int64_t ldx, int32_t n, const GemvW& w, int32_t N, int32_t K, void* y, int64_t ldy,
                 bool y_f32, cudaStream_t s) {
  return gemv_dispatch<false>(x, ldx, n, w, N, K, 0, y, ldy, y_f32, s);
}

bool launch_gemv_silu(const bf16_t* x, int64_t ldx, int32_t n, const GemvW& w_gate_up, int32_t I, int32_t K, bf16_t* y,
                      int64_t ldy, cudaStream_t s) {
  return gemv_dispatch<true>(x, ldx, n, w_gate_up, I, K, I, y, ldy, false, s);
}

bool launch_gemv_add_rms_norm(const bf16_t* x, int64_t ldx, int32_t n, const GemvW& w, int32_t N, int32_t K, bf16_t* y,
                              int64_t ldy, float* residual, const float* norm_w, float eps, bf16_t* out, int64_t ldo,
                              unsigned int* counter, cudaStream_t s) {
  const NormEpi ne{residual, norm_w, reinterpret_cast<bf16*>(out), ldo, eps, counter};
  return gemv_dispatch<false, true>(x, ldx, n, w, N, K, 0, y, ldy, false, s, ne);
}

bool launch_gemv(const bf16_t* x, int64_t ldx, int32_t n, const bf16_t* w, int32_t N, int32_t K, void* y, int64_t ldy,
                 bool y_f32, cudaStream_t s) {
  return launch_gemv(x, ldx, n, GemvW{w}, N, K, y, ldy, y_f32, s);
}

bool launch_gemv_silu(const bf16_t* x, int64_t ldx, int32_t n, const bf16_t* w_gate_up, int32_t I, int32_t K,
                      bf16_t* y, int64_t ldy, cudaStream_t s) {
  return launch_gemv_silu(x, ldx, n, GemvW{w_gate_up}, I, K, y, ldy, s);
}

bool launch_gemv_add_rms_norm(const bf16_t* x, int64_t ldx, int32_t n, const bf16_t* w, int32_t N, int32_t K, bf16_t* y,
                              int64_t ldy, float* residual, const float* norm_w, float eps, bf16_t* out, int64_t ldo,
                              unsigned int* counter, cudaStream_t s) {
  return launch_gemv_add_rms_norm(x, ldx, n, GemvW{w}, N, K, y, ldy, residual, norm_w, eps, out, ldo, counter, s);
}

bool pdl_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_PDL");
    if (e && std::string(e) == "0") return false;
    return device_cc() >= 90;
  }();
  return on;
}

}  // namespace kiln::cuda
