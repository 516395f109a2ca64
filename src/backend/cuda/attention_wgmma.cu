// Prefill attention through Hopper's warpgroup MMA (wgmma.mma_async, sm_90a): FlashAttention-3's
// arithmetic without its warp specialization. mma.sync (attention.cu's prefill v2) tops out near
// 200 TFLOP/s on the H100 at 2,048-token prompts, where cuDNN's wgmma kernels reach ~400
// (../shared/HARDWARE.md).
//
// A block is 2 warpgroups = 128 mma rows: 128 / G query positions x the G query heads of one KV head
// (GQA: K/V read once for the group). Warpgroup w holds rows 64 w .. 64 w + 63 (row m: head m / P,
// position m % P, P = 128 / G). Per 128-token K/V tile:
//   S = Q K^T   8 x wgmma m64n128k16, A = q and B = K from shared memory (both K-major);
//   softmax     online, on S's accumulator fragments (thread: rows g and g + 8 of its warp's 16,
//               32 columns each), log2 units, one max and one rescale per tile;
//   O += P V    8 x wgmma m64n128k16, A = P from registers (the accumulator layout of S is the
//               register-A layout of the next product, as with mma.sync), B = V from shared memory,
//               MN-major (V's rows are tokens: the instruction's transpose flag).
// Tiles live in shared memory as two 64-column halves, each [rows][128 bytes] with the 128-byte
// swizzle (16-byte chunk c of row r at chunk c ^ (r % 8)), the layout the SW128 descriptors name.
// K/V tiles are double-buffered and loaded by every thread with cp.async: tile it + 1 streams in
// while tile it is multiplied. q, K[2], V[2]: 5 x 32 KB, one block an SM.
// Sources: K/V from the step's bf16 rows (a fresh prompt, AttnParams::prefill_kv_rows == 1) or a
// bf16 paged cache; an FP8 cache stays on v2 (its tiles are converted on the way in).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "backend/cuda/async_copy.cuh"
#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/attention_wgmma.h"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/launch.cuh"

namespace kiln::cuda {
namespace {

using bf16 = __nv_bfloat16;

// Built only where the build carries sm_90a (CMakeLists.txt); elsewhere launch_prefill_wgmma says no.
#if defined(KILN_CUDA_SM90A)
constexpr int kD = 128;             // head dim
constexpr int kBM = 128;            // mma rows a block (2 warpgroups x 64)
constexpr int kBN = 128;            // K/V tokens a tile
constexpr int kThreads = 384;       // warpgroup 0 loads, 1 and 2 compute
constexpr int kHalf = 128 * 128;    // bytes of a 64-column half of a 128-row tile
constexpr int kTileB = 2 * kHalf;   // a 128 x 128 16-bit tile
constexpr int kRawB = kBN * kD;     // a 128 x 128 FP8 tile as loaded
// K/V tiles in shared memory: 3; 2 from an FP8 cache, whose raw tiles (K and V, 2 in flight) also
// need room. q, K[], V[] (, raw[2][K, V]), and slack to align the base to 1,024: 225 KB either way.
template <bool kF16>
constexpr int stages() {
  return kF16 ? 2 : 3;
}
template <bool kF16>
constexpr int smem_bytes() {
  return (1 + 2 * stages<kF16>()) * kTileB + (kF16 ? 4 * kRawB : 0) + 1024;
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Byte offset of 16-byte chunk c16 (0..15) of row r in a swizzled tile.
__device__ __forceinline__ uint32_t sw_off(int r, int c16) {
  return uint32_t((c16 >> 3) * kHalf + r * 128 + (((c16 & 7) ^ (r & 7)) << 4));
}

// wgmma shared-memory descriptor, 128-byte swizzle: start address, leading and stride byte offsets
// (16-byte units). K-major: sbo = 1,024 (the next 8 rows), lbo unused. MN-major: lbo = the next 64
// columns (the other half), sbo = the next 8 rows of K.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((saddr >> 4) & 0x3FFF) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Pins registers an in-flight wgmma reads or writes: no instruction touching them moves across.
__device__ __forceinline__ void reg_fence(float (&r)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void reg_fence(uint32_t (&r)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// The 64 f32 accumulators of an m64n128 product: in the instruction text, and as operands.
#define KILN_WG_D "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define KILN_WG_ACC "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// kF16: f16 operands (the FP8 cache's path: E4M3 -> f16 is exact, as in v2), else bf16.
// D (64 x 128 f32) = A B (+ D when scale_d): A, B in shared memory, both K-major.
template <bool kF16>
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (kF16)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " KILN_WG_D ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : KILN_WG_ACC
                 : "l"(da), "l"(db), "r"(scale_d));
  else
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " KILN_WG_D ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : KILN_WG_ACC
                 : "l"(da), "l"(db), "r"(scale_d));
}

// D += A B: A (64 x 16) from registers, B (16 x 128) in shared memory, MN-major.
template <bool kF16>
__device__ __forceinline__ void wgmma_rs_tb(float (&d)[64], const uint32_t* a, uint64_t db) {
  if constexpr (kF16)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " KILN_WG_D ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : KILN_WG_ACC
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
  else
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " KILN_WG_D ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : KILN_WG_ACC
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
#undef KILN_WG_D
#undef KILN_WG_ACC

// mbarriers (async_copy.cuh): K/V stage full (the loaders' cp.async landed) and empty (both compute
// warpgroups are done with it). This one arrives once this thread's earlier cp.async have landed.
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t a) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(a) : "memory");
}
// Named barriers 1 and 2: the compute warpgroups' turns at the tensor cores (256 threads: one
// warpgroup syncs, the other arrives); 3 and 4: one warpgroup alone.
__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void st_shared16(uint32_t a, uint32_t x, uint32_t y, uint32_t z, uint32_t w) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(x), "r"(y), "r"(z), "r"(w) : "memory");
}
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Four E4M3 codes -> two f16x2, exact.
__device__ __forceinline__ uint2 fp8x4_to_f16x4(uint32_t x) { return make_uint2(fp8x2_to_f16x2(x), fp8x2_to_f16x2(x >> 16)); }
#endif

template <int G, bool kF16>
__global__ void __launch_bounds__(kThreads, 1) prefill_wgmma_kernel(const AttnParams p) {
  pdl_trigger();
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kStages = stages<kF16>();
  constexpr int kP = kBM / G;     // query positions a block
  constexpr int kSubs = 64 / kP;  // blocks a 64-row tile of AttnParams::tiles
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw), base = (raw + 1023u) & ~1023u;
  const uint32_t sq = base;
  auto sk = [&](int b) { return base + uint32_t(1 + b) * kTileB; };
  auto sv = [&](int b) { return base + uint32_t(1 + kStages + b) * kTileB; };
  // FP8: raw tile i % 2 as loaded, K then V ([128 rows][128 bytes] each)
  auto sraw = [&](int i, int kv) { return base + uint32_t(1 + 2 * kStages) * kTileB + uint32_t(2 * (i & 1) + kv) * kRawB; };
  __shared__ __align__(8) uint64_t bars[2 * kStages];  // full[s], then empty[s]
  const uint32_t full0 = smem_addr(&bars[0]), empty0 = smem_addr(&bars[kStages]);
  pdl_wait();

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // Block order: the last rows of a sequence (the longest) first, all KV heads' before the next rows'
  // (KV head after KV head: 1.5-3.5 % slower at 4 x 2,048 tokens, H100 s10 run 4).
  const int n_y = p.n_heads / G, bx = p.num_tiles * kSubs - 1 - int(blockIdx.x) / n_y;
  const int tile = bx / kSubs, sub = bx % kSubs;
  const int seq = p.tiles[2 * tile], r0 = p.tiles[2 * tile + 1] + sub * kP;
  const SeqMeta sm = p.seqs[seq];
  if (r0 >= sm.q_len) return;
  const bool rows_kv = p.prefill_kv_rows == 1;  // K/V from the step's rows: fresh sequences only
  if (p.prefill_kv_rows != 0 && (sm.ctx_len == sm.q_len) != rows_kv) return;  // not this launch's kind (guard)
  const int rows = min(kP, sm.q_len - r0);
  const int head0 = (int(blockIdx.x) % n_y) * G, kvh = head0 / (p.n_heads / p.n_kv);
  const int64_t qrow0 = int64_t(sm.q_start) + r0;

  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbar_init(full0 + 8 * i, 128);   // every loader thread, once its copies land
      mbar_init(empty0 + 8 * i, 256);  // every compute thread
    }
  }
  // K/V extent: each warp reduces the block's positions itself (one block barrier, not three)
  int maxpos = -1;
  for (int r = lane; r < rows; r += 32) maxpos = max(maxpos, p.tokens[qrow0 + r].pos);
  maxpos = __reduce_max_sync(0xffffffffu, maxpos);
  const int kv_len = min(maxpos + 1, sm.ctx_len);
  const int n_tiles = kv_len > 0 ? (kv_len + kBN - 1) / kBN : 0;
  __syncthreads();  // the barriers initialized

  if (wg == 0) {
    // Loader: tile it into stage it % kStages once both compute warpgroups released the tile
    // kStages before it. Thread tid moves 16-byte chunk tid % 16 of rows tid / 16 + 8 i, i < 16; rows
    // past kv_len read the last valid row (finite; masked), never unwritten cache slots.
    // registers: 128 x 40 + 256 x 232 (FP8: 128 x 56 + 256 x 224) <= 64 K
    if constexpr (kF16) asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
    else asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    const int32_t* table = p.block_tables + int64_t(seq) * sm.table_stride;
    const int bs = p.block_size, bs_shift = __ffs(bs) - 1;
    const bool bs_pow2 = (bs & (bs - 1)) == 0;
    // Element offsets of rows r0 + dr i (i < N) of tile it in the paged K (and V: the same layout),
    // rows past kv_len clamped to the last. The block-table loads are all issued before the first use
    // (one round trip a batch, not one a row: the paged loads were latency-bound). The step's rows
    // (bf16 only) take no table.
    auto row_offs = [&](auto n, int it, int r0, int dr, int64_t* off) {
      constexpr int N = decltype(n)::value;
      int j[N], blk[N];
#pragma unroll
      for (int i = 0; i < N; ++i) {
        j[i] = min(it * kBN + r0 + dr * i, kv_len - 1);
        blk[i] = table[bs_pow2 ? j[i] >> bs_shift : j[i] / bs];
      }
#pragma unroll
      for (int i = 0; i < N; ++i)
        off[i] = ((int64_t(blk[i]) * p.n_kv + kvh) * bs + (bs_pow2 ? j[i] & (bs - 1) : j[i] % bs)) * kD;
    };
    if constexpr (!kF16) {
      const bf16* kc = static_cast<const bf16*>(p.k_cache);
      const bf16* vc = static_cast<const bf16*>(p.v_cache);
      const int c16 = tid & 15, rbase = tid >> 4;
      for (int it = 0; it < n_tiles; ++it) {
        const int st = it % kStages;
        if (it >= kStages) mbar_wait(empty0 + 8 * st, uint32_t((it / kStages - 1) & 1));
        if (rows_kv) {  // the step's rows: no table (batching them cost the fresh path ~7 %, s7 run 10)
#pragma unroll 4
          for (int i = 0; i < 16; ++i) {
            const int r = rbase + 8 * i;
            const int64_t row = int64_t(sm.q_start) + min(it * kBN + r, kv_len - 1);
            cp_async16(sk(st) + sw_off(r, c16), kc + row * p.ldk + int64_t(kvh) * kD + c16 * 8);
            cp_async16(sv(st) + sw_off(r, c16), vc + row * p.ldv + int64_t(kvh) * kD + c16 * 8);
          }
        } else {
#pragma unroll
          for (int h = 0; h < 4; ++h) {  // rows rbase + 8 i, 4 at a time
            int64_t off[4];
            row_offs(std::integral_constant<int, 4>{}, it, rbase + 32 * h, 8, off);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int r = rbase + 32 * h + 8 * i;
              cp_async16(sk(st) + sw_off(r, c16), kc + off[i] + c16 * 8);
              cp_async16(sv(st) + sw_off(r, c16), vc + off[i] + c16 * 8);
            }
          }
        }
        mbar_arrive_cp_async(full0 + 8 * st);
      }
    } else {
      // FP8 cache: tile it + 2's codes stream into raw buffer it % 2 while tile it is converted to
      // f16 into its stage. A thread converts exactly the 16-byte pieces it loaded (16 codes of rows
      // tid / 8 + 16 i, i < 8, at byte 16 (tid % 8)), so its own cp.async wait suffices.
      const uint8_t* kc = static_cast<const uint8_t*>(p.k_cache);
      const uint8_t* vc = static_cast<const uint8_t*>(p.v_cache);
      const int cc = tid & 7, rbase = tid >> 3;
      auto load_raw = [&](int it) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // rows rbase + 16 i: i < 4, then 4 <= i < 8
          int64_t off[4];
          row_offs(std::integral_constant<int, 4>{}, it, rbase + 64 * h, 16, off);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = rbase + 64 * h + 16 * i;
            cp_async16(sraw(it, 0) + r * 128 + cc * 16, kc + off[i] + cc * 16);
            cp_async16(sraw(it, 1) + r * 128 + cc * 16, vc + off[i] + cc * 16);
          }
        }
      };
      if (n_tiles > 0) load_raw(0);
      cp_async_commit();
      if (n_tiles > 1) load_raw(1);
      cp_async_commit();
      for (int it = 0; it < n_tiles; ++it) {
        const int st = it % kStages;
        if (it >= kStages) mbar_wait(empty0 + 8 * st, uint32_t((it / kStages - 1) & 1));
        cp_async_wait<1>();  // tile it's codes (tile it + 1's may still be in flight)
#pragma unroll
        for (int kv = 0; kv < 2; ++kv)
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int r = rbase + 16 * i;
            uint4 c;
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(c.x), "=r"(c.y), "=r"(c.z), "=r"(c.w)
                         : "r"(sraw(it, kv) + r * 128 + cc * 16));
            const uint2 h0 = fp8x4_to_f16x4(c.x), h1 = fp8x4_to_f16x4(c.y), h2 = fp8x4_to_f16x4(c.z),
                        h3 = fp8x4_to_f16x4(c.w);
            const uint32_t dst = (kv ? sv(st) : sk(st));
            st_shared16(dst + sw_off(r, 2 * cc), h0.x, h0.y, h1.x, h1.y);
            st_shared16(dst + sw_off(r, 2 * cc + 1), h2.x, h2.y, h3.x, h3.y);
          }
        fence_async_smem();  // these generic-proxy stores -> the compute warpgroups' wgmma reads
        mbar_arrive(full0 + 8 * st);
        if (it + 2 < n_tiles) load_raw(it + 2);  // into the raw buffer just converted
        cp_async_commit();
      }
    }
    return;
  }
  if constexpr (kF16) asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
  else asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int cw = wg - 1;  // compute warpgroup 0 or 1: rows 64 cw .. 64 cw + 63

  // This thread's two rows (g and g + 8 of its warp's 16): head, position, last visible column.
  int rh[2], rr[2], lim[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = 64 * cw + 16 * warp + g + 8 * i;
    rh[i] = m / kP;
    rr[i] = m % kP;
    lim[i] = rr[i] < rows ? min(p.tokens[qrow0 + rr[i]].pos, kv_len - 1) : -1;
  }
  const int lim_min = rr[0] < rows && rr[1] < rows ? min(lim[0], lim[1]) : max(lim[0], lim[1]);

  // q: each compute warpgroup its own 64 rows (rows past the block's read its last row; not written)
  {
    const bf16* q = reinterpret_cast<const bf16*>(p.q);
    const int c16 = tid & 15;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int m = 64 * cw + ((tid & 127) >> 4) + 8 * i, r = min(m % kP, rows - 1);
      const bf16* src = q + (qrow0 + r) * p.ldq + int64_t(head0 + m / kP) * kD + c16 * 8;
      if constexpr (kF16) {  // q in f16 for the f16 products
        const uint4 u = *reinterpret_cast<const uint4*>(src);
        const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&u);
        uint32_t h[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = __bfloat1622float2(b2[e]);
          h[e] = pack2<true>(f.x, f.y);
        }
        st_shared16(sq + sw_off(m, c16), h[0], h[1], h[2], h[3]);
      } else {
        cp_async16(sq + sw_off(m, c16), src);
      }
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_smem();
    bar_sync(3 + cw, 128);
  }

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  uint32_t pa[32];  // P of the previous tile, in the register-A layout
#pragma unroll
  for (int i = 0; i < 32; ++i) pa[i] = 0u;
  float s[64];  // S of the current tile: written by its first product (scale-d 0)
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
  // log2 units; an FP8 cache's scales: k_scale here, v_scale in the output's normalization
  const float qk_scale = (kF16 ? p.scale * p.k_scale : p.scale) * 1.4426950408889634f;
  const float v_scale = kF16 ? p.v_scale : 1.0f;
  const uint32_t qa = sq + uint32_t(cw) * 64 * 128;       // this warpgroup's 64 rows of each half

  // Phase it issues O += P(it - 1) V(it - 1) and S = Q K(it)^T together, on this warpgroup's turn
  // (named barrier 1 + cw), then hands the turn over: the other warpgroup's products run on the
  // tensor cores while this one does its softmax (FlashAttention-3's ping-pong). Phase n_tiles
  // issues only the last PV.
  // Each issue sequence is straight-line code (fence, products, commit): a branch between the fence
  // and a product makes ptxas insert its own fence there and serialize the products (C7520).
  auto products = [&](auto pv, auto qk, int st, int prev) {
    reg_fence(o);
    reg_fence(pa);
    wgmma_fence();
    if constexpr (decltype(pv)::value) {
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_rs_tb<kF16>(o, pa + 4 * kk, sw128_desc(sv(prev) + uint32_t(kk) * 2048, kHalf, 1024));
    }
    if constexpr (decltype(qk)::value) {
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        const uint32_t koff = uint32_t(ks >> 2) * kHalf + uint32_t(ks & 3) * 32;
        wgmma_ss<kF16>(s, sw128_desc(qa + koff, 16, 1024), sw128_desc(sk(st) + koff, 16, 1024), ks > 0);
      }
    }
    wgmma_commit();
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (n_tiles > 0 && cw == 1) bar_arrive(1, 256);  // warpgroup 0 goes first
  for (int it = 0; it <= n_tiles && n_tiles > 0; ++it) {
    const int st = it % kStages, prev = (it + kStages - 1) % kStages;
    if (it < n_tiles) {
      mbar_wait(full0 + 8 * st, uint32_t((it / kStages) & 1));
      fence_async_smem();  // the loaders' cp.async writes -> this warpgroup's wgmma reads
    }
    bar_sync(1 + cw, 256);
    reg_fence(s);
    if (it == 0) products(no{}, yes{}, st, prev);
    else if (it < n_tiles) products(yes{}, yes{}, st, prev);
    else products(yes{}, no{}, st, prev);
    if (!(cw == 1 && it == n_tiles)) bar_arrive(2 - cw, 256);  // the other warpgroup's turn
    wgmma_wait0();
    reg_fence(s);
    reg_fence(o);
    reg_fence(pa);
    if (it > 0) mbar_arrive(empty0 + 8 * prev);  // V(it - 1) read: the stage may be refilled
    if (it == n_tiles) break;
    const int kv0 = it * kBN;

    // Online softmax on this thread's 2 rows x 32 columns: s[4 j + e] is (row e / 2, column
    // kv0 + 8 j + 2 t + e % 2). The max is taken before scaling (qk_scale > 0), so each P element is
    // one FFMA and one EX2. This is the warpgroup's critical path between its products (one warp a
    // scheduler runs it, nothing hides its latencies): the causal mask is a separate pass that only
    // diagonal tiles take (warp-uniform branch), and the max and sum run as 4 independent chains a row.
    if (__any_sync(0xffffffffu, kv0 + kBN - 1 > lim_min)) {
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (kv0 + 8 * j + 2 * t + (e & 1) > lim[e >> 1]) s[4 * j + e] = -INFINITY;
    }
    float mx4[2][4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      mx4[0][c] = fmaxf(s[4 * c], s[4 * c + 1]);
      mx4[1][c] = fmaxf(s[4 * c + 2], s[4 * c + 3]);
    }
#pragma unroll
    for (int j = 4; j < 16; ++j) {
      mx4[0][j & 3] = fmaxf(mx4[0][j & 3], fmaxf(s[4 * j], s[4 * j + 1]));
      mx4[1][j & 3] = fmaxf(mx4[1][j & 3], fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    float al[2], mu[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = fmaxf(fmaxf(mx4[i][0], mx4[i][1]), fmaxf(mx4[i][2], mx4[i][3]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(mrow[i], mx * qk_scale);
      mu[i] = mn == -INFINITY ? 0.0f : mn;  // nothing visible yet: exp2(-inf - 0) = 0, no NaN
      al[i] = fast_exp2(mrow[i] - mu[i]);
      mrow[i] = mn;
    }
    // P in the register-A layout: for tokens 16 kk .. 16 kk + 15, {row g, row g + 8} x {k 2t, k 8 + 2t}.
    float sum4[2][4] = {};
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float p0 = fast_exp2(fmaf(s[4 * j], qk_scale, -mu[0])), p1 = fast_exp2(fmaf(s[4 * j + 1], qk_scale, -mu[0]));
      const float p2 = fast_exp2(fmaf(s[4 * j + 2], qk_scale, -mu[1])), p3 = fast_exp2(fmaf(s[4 * j + 3], qk_scale, -mu[1]));
      sum4[0][j & 3] += p0 + p1;
      sum4[1][j & 3] += p2 + p3;
      pa[4 * (j >> 1) + 2 * (j & 1)] = pack2<kF16>(p0, p1);
      pa[4 * (j >> 1) + 2 * (j & 1) + 1] = pack2<kF16>(p2, p3);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) lrow[i] = lrow[i] * al[i] + ((sum4[i][0] + sum4[i][1]) + (sum4[i][2] + sum4[i][3]));
    // O's rescale, skipped by warps whose rows all kept their max (al = exp2(0) = 1 exactly)
    if (__any_sync(0xffffffffu, al[0] != 1.0f || al[1] != 1.0f)) {
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        o[4 * j] *= al[0];
        o[4 * j + 1] *= al[0];
        o[4 * j + 2] *= al[1];
        o[4 * j + 3] *= al[1];
      }
    }
  }

  bf16* out = reinterpret_cast<bf16*>(p.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = lrow[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.0f ? v_scale / l : 0.0f;
    if (rr[i] >= rows) continue;
    bf16* orow = out + (qrow0 + rr[i]) * p.ldo + int64_t(head0 + rh[i]) * kD + 2 * t;
#pragma unroll
    for (int j = 0; j < 16; ++j)
      *reinterpret_cast<__nv_bfloat162*>(orow + 8 * j) =
          __floats2bfloat162_rn(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // launched only where the sm_90a code exists (launch_prefill_wgmma)
#endif
}

// Mean prefill context (tokens) from which the kernel pays, bf16 K/V (H100 s7 run 4, v2 -> wgmma,
// KV write + kernel: 32 x 256 FP8-fresh 164 -> 170 us, 16 x 512 231 -> 211, 4 x 2,048 643 -> 467).
int min_ctx() {
  static const int v = env_int("KILN_PREFILL_WGMMA_MIN_CTX", 384);
  return v;
}

template <int G, bool kF16>
void launch(const AttnParams& p, cudaStream_t s) {
  constexpr int kSmem = smem_bytes<kF16>();
  static const bool configured = cudaFuncSetAttribute(prefill_wgmma_kernel<G, kF16>,
                                                      cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) == cudaSuccess;
  (void)configured;
  // each 64-row tile of AttnParams.tiles becomes 64 / (128 / G) blocks of each KV head's G heads
  launch_pdl(prefill_wgmma_kernel<G, kF16>, dim3(p.num_tiles * (64 / (kBM / G)) * (p.n_heads / G)), dim3(kThreads),
             size_t(kSmem), s, p);
}

template <bool kF16>
bool launch_g(const AttnParams& p, int G, cudaStream_t s) {
  switch (G) {
    case 2: launch<2, kF16>(p, s); return true;
    case 4: launch<4, kF16>(p, s); return true;
    case 8: launch<8, kF16>(p, s); return true;
    default: return false;
  }
}

// KILN_PREFILL_WGMMA_FP8=0: an FP8 cache stays on v2.
bool fp8_enabled() {
  static const bool v = [] {
    const char* e = std::getenv("KILN_PREFILL_WGMMA_FP8");
    return !(e && std::string(e) == "0");
  }();
  return v;
}

#endif  // KILN_CUDA_SM90A
}  // namespace

bool launch_prefill_wgmma(const AttnParams& p, int G, cudaStream_t s) {
#if defined(KILN_CUDA_SM90A)
  // An FP8 cache pays from longer contexts (its loader converts every tile): H100 s7 run 5, cache path,
  // v2 -> wgmma: 16 x 512 315 -> 338 us, 8 x 1,024 532 -> 494, 4 x 2,048 961 -> 788.
  const int min = p.kv_fp8 ? 2 * min_ctx() : min_ctx();
  if (p.head_dim != kD || (p.kv_fp8 && !fp8_enabled()) || p.prefill_mean_ctx < min || device_cc() != 90) return false;
  return p.kv_fp8 ? launch_g<true>(p, G, s) : launch_g<false>(p, G, s);
#else
  (void)p, (void)G, (void)s;
  return false;
#endif
}

}  // namespace kiln::cuda
