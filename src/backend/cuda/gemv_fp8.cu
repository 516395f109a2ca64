// Decode GEMV for FP8 E4M3 weights on the tensor cores (gemv_fp8.h). The CUDA-core FP8 GEMV
// (kernels.cu, kFp8) widens every weight byte to f32 (F2FP unpack + HADD2.F32 + FFMA per weight,
// ~2.5x the instructions per byte of the bf16 kernel) and ran at 1.4-2.6 TB/s; here each weight
// byte goes straight from memory into mma.sync.m16n8k32.e4m3 as the A operand, against the
// activations quantized once per block into shared memory (B, n of its 8 columns used).
//
// Layout. A block owns a tile of 16 weight rows (for the silu pair: 16 gate rows and the 16 up rows
// pair_off below, or at n <= 2 (4 with a tiled copy) one 16-row tile of 8 gate rows and their 8 up
// rows, see kPair8) over all of K; its 8 warps split K into 64-wide chunks, interleaved (warp w
// takes chunks w, w + 8, ...: the block streams each row front to back). In a chunk, lane (g = lane / 4,
// t = lane % 4) loads the 16 bytes at k = 64 c + 16 t of rows g and g + 8, and the 16 bytes of x_q
// column g at the same k from shared memory; bytes [0, 8) feed one mma and [8, 16) the next. The
// mma's own k order (a0..a3: row g, k 4t..4t+3; a8..a11: row g, k 16+4t..; b0..b3 / b4..b7 likewise
// for column g) is thus permuted, but A and B use the same permutation (logical k 4t+j <-> byte j,
// 16+4t+j <-> byte 4+j of the lane's 8), so the sum over k is the dot (IntegerInputsAreExact).
// Partial sums (one 16 x 8 C fragment per warp) are added across warps in shared memory.
// With a tiled copy (launch_tile_fp8: [tile][K / 64][16][64]) the same lanes read the same bytes from
// one contiguous range per block: 8 KB a step instead of 16 rows x 512 bytes, which the H100 streams
// faster (batch-1 8B step 3.40 -> 3.25 ms, s17 run 5; a timing-only version of the same reads first
// said so in runs 1-4, where reading 4 rows x 128 bytes a warp load or shifting each row's k did not).
//
// Activation quantization matches launch_quantize_fp8 and the CPU emulation bit for bit: fp8(x / s)
// with IEEE division and saturating round-to-nearest-even, s = input_scale (static), amax / 448
// over all n rows (dynamic per tensor), or per row (dynamic per token); y = acc * s_x * s_w(row).
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "backend/cuda/activation.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/fp8_mma.cuh"
#include "backend/cuda/fold_tail.cuh"
#include "backend/cuda/gemv_fp8.h"
#include "backend/cuda/launch.cuh"

namespace kiln::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kChunk = 64;  // K per warp step: 4 lanes x 16 bytes
constexpr int kMaxN = 8;    // columns of the mma's B
// The model's FP8 decode linears take this kernel unless KILN_FP8_GEMV=cvt (gemv_fp8_mma_enabled).
constexpr bool kMmaDefault = true;

struct Params {
  const bf16* x;  // [n, ldx]
  int64_t ldx;
  int32_t n;
  const uint8_t* w;  // [N (x2 for the silu pair), K]
  int32_t N, K;
  int64_t pair_off;
  void* y;  // [n, ldy] bf16 or f32
  int64_t ldy;
  bool y_f32;
  float wscale;
  const float* row_scales;  // [N] or null (then wscale)
  int act;                  // GemvAct
  const float* input_scale;
  int32_t kp;  // row stride (bytes) of x_q in shared memory
  bool interleave;
  GemvFold fold;
  const uint8_t* wt;  // the tiled copy (launch_tile_fp8; one-tile kernels only) or null: w as stored
};

__device__ __forceinline__ float block_reduce(float v, float* red, bool is_max) {
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, u) : v + u;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // red may be in use by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = is_max ? red[0] : 0.0f;
  for (int i = is_max ? 1 : 0; i < kWarps; ++i) r = is_max ? fmaxf(r, red[i]) : r + red[i];
  return r;
}

// kL: chunks in flight per warp (each 2 x 16 bytes per lane and row tile). Slot j is refilled with
// chunk c + kL as soon as chunk c has gone into the mma, so a warp keeps kL chunks outstanding.
// kPair8 (silu only): a block owns 8 gate rows and their 8 up rows as one 16-row tile (rows g and
// g + 8 of the mma pair up, as in fused_decode.cu), so one set of buffers serves both: 80 registers
// and 3 blocks an SM against 124 and 2, twice the blocks. On the H100 (docs/PERF_fp8_gpu.md, session
// 14) it takes the 8B batch-1 step from 3.63 to 3.55 ms and batch 2 from 3.99 to 3.88, but batch 3
// and 4 lose 3-5 % reading the matrix as stored (presumably because every block quantizes all n rows
// of x: twice the blocks, twice that work; not profiled); reading a tiled copy they gain 2-4 %
// (session 17), so the tile runs at n <= 4 where gate|up has one.
template <bool kSilu, bool kNorm, int kL, int kMinBlocks, bool kPair8 = false>
__global__ void __launch_bounds__(kThreads, kMinBlocks) gemv_fp8_mma_kernel(const Params p) {
  extern __shared__ __align__(16) uint8_t smem[];  // x_q [n, kp]; after the loop, the partial sums
  __shared__ float sx[kMaxN];                      // dynamic activation scales
  __shared__ float red_s[32];
  // One row (batch-1 decode): the next kernel launches only once x is quantized (below), so its
  // blocks' early weight loads do not queue ahead of x's (s15 run 12: -1.0 % at batch 1; at batch 4,
  // whose quantization takes longer, +0.9 %, so two or more rows trigger at the top, here).
  const bool late_trigger = p.n == 1;
  if (!late_trigger) pdl_trigger();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  static_assert(!kPair8 || kSilu, "the 8 + 8 tile is the silu pair's");
  constexpr int kR = kSilu && !kPair8 ? 2 : 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int K = p.K, N = p.N, n = p.n;
  // The warp's chunks: base + i * stride for i < cnt. Interleaved (stride 8, the default): at any
  // moment the block's 8 warps read adjacent 64-byte pieces of each row, 512 contiguous bytes per
  // row and step; contiguous (KILN_FP8_GEMV_ILV=0, K / 8 per warp: 8 streams 1/8 of K apart) ran the
  // decode step at 4.00 ms against 3.88.
  const int chunks = (K + kChunk - 1) / kChunk;
  int base, stride, cnt;
  if (p.interleave) {
    base = warp;
    stride = kWarps;
    cnt = warp < chunks ? (chunks - warp + kWarps - 1) / kWarps : 0;
  } else {
    const int per = (chunks + kWarps - 1) / kWarps;
    base = min(chunks, warp * per);
    stride = 1;
    cnt = min(chunks, base + per) - base;
  }
  const int row0 = blockIdx.x * (kPair8 ? 8 : 16);

  // Rows past N read row N - 1 (finite; their outputs are not written).
  const uint8_t* wp[kR][2];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = kPair8 ? int64_t(min(row0 + g, N - 1)) + (h ? p.pair_off : 0)
                                 : int64_t(min(row0 + g + 8 * h, N - 1)) + (r ? p.pair_off : 0);
      wp[r][h] = p.w + row * K + 16 * t;
      // The tiled copy stores this block's 16 rows chunk by chunk ([tile][K / 64][16][64]): chunk c
      // of tile row g + 8 h is at (c * 16 + g + 8 h) * 64.
      if (kR == 1 && p.wt) wp[r][h] = p.wt + int64_t(blockIdx.x) * 16 * K + (g + 8 * h) * kChunk + 16 * t;
    }
  const int64_t cstride = kR == 1 && p.wt ? 16 * kChunk : kChunk;  // bytes from chunk c to c + 1 of a row
  uint4 buf[kR][2][kL];
  auto load = [&](int j, int i) {
    const int c = base + i * stride;
    const bool ok = i < cnt && c * kChunk + 16 * t < K;  // K % 16 == 0: a lane's 16 bytes are all in or out
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        buf[r][h][j] = ok ? __ldcs(reinterpret_cast<const uint4*>(wp[r][h] + int64_t(c) * cstride))
                          : make_uint4(0u, 0u, 0u, 0u);
  };
  // Weights do not depend on the previous kernel: their first loads overlap its tail.
#pragma unroll
  for (int j = 0; j < kL; ++j) load(j, j);

  // The epilogue thread (row tid % 16, column tid / 16) and its row scales.
  // kPair8: rows er < 8 only, each reading its gate (er) and up (er + 8) sums.
  const int er = threadIdx.x & 15, em = threadIdx.x >> 4, erow = row0 + er;
  const bool epi = em < n && erow < N && (!kPair8 || er < 8);
  constexpr int kS = kSilu ? 2 : 1;  // row scales: gate and up for the silu pair
  float rs[kS];
#pragma unroll
  for (int r = 0; r < kS; ++r) rs[r] = p.wscale;
  if (p.row_scales && epi)
#pragma unroll
    for (int r = 0; r < kS; ++r) rs[r] = __ldg(p.row_scales + erow + r * p.pair_off);

  pdl_wait();  // x and the residual are earlier kernels' outputs
  float res = 0.0f;
  if (kNorm && epi) res = p.fold.residual[int64_t(em) * N + erow];

  // Activation scales. Static (the fast path): no block barrier before the loop.
  float s_static = 1.0f;
  const bool dynamic = p.act != int(GemvAct::kStatic);
  if (!dynamic) {
    s_static = __ldg(p.input_scale);
  } else {
    for (int m = 0; m < n; ++m) {
      const uint4* xr = reinterpret_cast<const uint4*>(p.x + m * p.ldx);
      float a = 0.0f;
      for (int i = threadIdx.x; i < K / 8; i += kThreads) a = amax8(__ldg(xr + i), a);
      a = block_reduce(a, red_s, true);
      if (threadIdx.x == 0) sx[m] = a;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      if (p.act == int(GemvAct::kDynamicTensor)) {
        float a = 0.0f;
        for (int m = 0; m < n; ++m) a = fmaxf(a, sx[m]);
        for (int m = 0; m < n; ++m) sx[m] = scale_for_amax(a);
      } else {
        for (int m = 0; m < n; ++m) sx[m] = scale_for_amax(sx[m]);
      }
    }
    __syncthreads();
  }

  // Each warp quantizes the chunks it reads (no block barrier: its lanes alone use them), kQ x
  // loads per lane in flight (one L2 round trip per kQ instead of per vector: the weights already
  // in flight wait for this).
  constexpr int kQ = 4;
  const int nvec = cnt * (kChunk / 8);  // 16-byte x vectors per row
  for (int m = 0; m < n; ++m) {
    const float s = dynamic ? sx[m] : s_static;
    const uint4* xr = reinterpret_cast<const uint4*>(p.x + m * p.ldx);
    for (int v0 = 0; v0 < nvec; v0 += 32 * kQ) {
      uint4 xv[kQ];
      int kq[kQ];
#pragma unroll
      for (int u = 0; u < kQ; ++u) {
        const int v = v0 + u * 32 + lane;
        kq[u] = v < nvec ? (base + (v >> 3) * stride) * kChunk + (v & 7) * 8 : K;
        xv[u] = kq[u] < K ? __ldg(xr + kq[u] / 8) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int u = 0; u < kQ; ++u)
        if (kq[u] < K) *reinterpret_cast<uint2*>(smem + m * p.kp + kq[u]) = quantize8(xv[u], s);
    }
  }
  __syncwarp();
  if (late_trigger) pdl_trigger();

  float acc[kR][2][4];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][h][i] = 0.0f;
  const uint8_t* xb = smem + g * p.kp + 16 * t;
  const bool bcol = g < n;
  for (int i0 = 0; i0 < cnt; i0 += kL) {
#pragma unroll
    for (int j = 0; j < kL; ++j) {
      const int i = i0 + j, c = base + i * stride;
      if (i < cnt) {  // warp-uniform
        uint4 b = make_uint4(0u, 0u, 0u, 0u);
        if (bcol && c * kChunk + 16 * t < K) b = *reinterpret_cast<const uint4*>(xb + c * kChunk);
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          const uint4 lo = buf[r][0][j], hi = buf[r][1][j];
          mma_e4m3(acc[r][0], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
          mma_e4m3(acc[r][1], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
        }
      }
      load(j, i + kL);
    }
  }

  // C fragment: c0, c1 = (row g, columns 2t, 2t + 1); c2, c3 = (row g + 8, the same columns).
  __syncthreads();  // every warp is done with x_q: the region now holds the partial sums
  float* red = reinterpret_cast<float*>(smem);  // [kWarps][kR][16][8]
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    float* o = red + (warp * kR + r) * 128;
    o[g * 8 + 2 * t] = acc[r][0][0] + acc[r][1][0];
    o[g * 8 + 2 * t + 1] = acc[r][0][1] + acc[r][1][1];
    o[(g + 8) * 8 + 2 * t] = acc[r][0][2] + acc[r][1][2];
    o[(g + 8) * 8 + 2 * t + 1] = acc[r][0][3] + acc[r][1][3];
  }
  __syncthreads();
  if (epi) {
    const float s = dynamic ? sx[em] : s_static;
    float v[kS];
#pragma unroll
    for (int r = 0; r < kS; ++r) {
      // The pair's up sums: the second tile (kR = 2) or rows 8..15 of the one tile (kPair8).
      const int base = kPair8 ? (er + 8 * r) * 8 + em : r * 128 + er * 8 + em;
      float a = 0.0f;
#pragma unroll
      for (int q = 0; q < kWarps; ++q) a += red[q * kR * 128 + base];
      v[r] = a * (s * rs[r]);
    }
    float out = v[0];
    if constexpr (kSilu) out = silu(out) * v[kS - 1];
    if (p.y_f32) {
      static_cast<float*>(p.y)[em * p.ldy + erow] = out;
    } else {
      const bf16 ob = __float2bfloat16(out);
      static_cast<bf16*>(p.y)[em * p.ldy + erow] = ob;
      if constexpr (kNorm) p.fold.residual[int64_t(em) * N + erow] = res + __bfloat162float(ob);
    }
  }
  if constexpr (kNorm) fold_norm_tail(p.fold, n, N);
#endif
}

bool device_has_fp8_mma() { return device_cc() >= 89; }

int max_smem() {
  static const int v = [] {
    int dev = 0, b = 48 << 10;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&b, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    return b - 1024;  // the static arrays
  }();
  return v;
}

template <bool kSilu, bool kNorm, int kL, int kMinBlocks, bool kPair8 = false>
void launch(const Params& p, int grid, int smem, cudaStream_t s) {
  auto* k = gemv_fp8_mma_kernel<kSilu, kNorm, kL, kMinBlocks, kPair8>;
  // More than 48 KB of x_q (n * K bytes) only after raising the limit; once per instantiation.
  // KILN_FP8_GEMV_CARVEOUT: preferred shared-memory carveout in percent (experiment; -1 = driver's).
  static const bool raised = [k] {
    const int carve = env_int("KILN_FP8_GEMV_CARVEOUT", -1);
    if (carve >= 0) cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, carve);
    return cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem()) == cudaSuccess;
  }();
  (void)raised;
  launch_pdl(k, dim3(grid), dim3(kThreads), size_t(smem), s, p);
}

// One 16-byte piece of the tiled copy per thread: piece i of out is byte 16 (i % 4) of chunk c of
// tile row r of tile b, i / 4 = (b * chunks + c) * 16 + r; tile row r is w's row 16 b + r, or for
// the silu pair the gate row 8 b + r (r < 8) and the up row pair_off + 8 b + r - 8.
__global__ void tile_fp8_kernel(const uint8_t* w, int64_t K, int64_t pair_off, int64_t pieces, uint8_t* out) {
  const int64_t chunks = K / kChunk;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pieces; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = i / 4, r = q % 16, c = (q / 16) % chunks, b = q / 16 / chunks;
    const int64_t row = pair_off ? (r < 8 ? 8 * b + r : pair_off + 8 * b + r - 8) : 16 * b + r;
    reinterpret_cast<uint4*>(out)[i] =
        *reinterpret_cast<const uint4*>(w + row * K + c * kChunk + 16 * (i % 4));
  }
}

}  // namespace

bool fp8_tiled_shape_ok(int64_t N, int64_t K, bool pair) {
  return N > 0 && K > 0 && K % kChunk == 0 && N % (pair ? 8 : 16) == 0;
}

bool launch_tile_fp8(const void* w, int64_t N, int64_t K, bool pair, void* out, cudaStream_t s) {
  if (!fp8_tiled_shape_ok(N, K, pair) || reinterpret_cast<uintptr_t>(w) % 16 || reinterpret_cast<uintptr_t>(out) % 16)
    return false;
  const int64_t pieces = (pair ? 2 * N : N) * K / 16;
  const int grid = int(std::min<int64_t>((pieces + 255) / 256, 132 * 16));
  tile_fp8_kernel<<<grid, 256, 0, s>>>(static_cast<const uint8_t*>(w), K, pair ? N : 0, pieces,
                                       static_cast<uint8_t*>(out));
  return cudaGetLastError() == cudaSuccess;
}

bool gemv_fp8_mma_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_FP8_GEMV");
    const std::string v = e ? e : "";
    return (v == "mma" || (v != "cvt" && kMmaDefault)) && device_has_fp8_mma();
  }();
  return on;
}

bool launch_gemv_fp8_mma(const bf16_t* x, int64_t ldx, int32_t n, const GemvW& w, int32_t N, int32_t K, int64_t pair_off,
                         bool silu, void* y, int64_t ldy, bool y_f32, const GemvFold* fold, cudaStream_t s) {
  if (!w.fp8 || w.act == GemvAct::kNone || !w.data || !device_has_fp8_mma()) return false;
  if (n < 1 || n > kMaxN || N < 1 || K < 16 || K % 16 || ldx % 8) return false;
  if (reinterpret_cast<uintptr_t>(w.data) % 16 || reinterpret_cast<uintptr_t>(x) % 16) return false;
  if (w.act == GemvAct::kStatic && !w.input_scale) return false;
  if (fold && (silu || y_f32 || N % 4 || N > 4096 || fold->ldo % 4 || reinterpret_cast<uintptr_t>(fold->w) % 16))
    return false;
  Params p{};
  p.x = reinterpret_cast<const bf16*>(x);
  p.ldx = ldx;
  p.n = n;
  p.w = static_cast<const uint8_t*>(w.data);
  p.N = N;
  p.K = K;
  p.pair_off = pair_off;
  p.y = y;
  p.ldy = ldy;
  p.y_f32 = y_f32;
  p.wscale = w.scale;
  p.row_scales = w.row_scales;
  p.act = int(w.act);
  p.input_scale = w.input_scale;
  // Row stride of x_q: 64 mod 128 bytes, so the two columns a quarter-warp reads hit different banks.
  p.kp = (K + 127) / 128 * 128 + 64;
  if (fold) p.fold = *fold;
  static const bool interleave = env_int("KILN_FP8_GEMV_ILV", 1) != 0;
  p.interleave = interleave;
  // The silu pair's 8 + 8 tile up to this many rows (KILN_FP8_GEMV_PAIR8_MAX_N; 0: never; default below).
  // With the tiled copy the 8 + 8 tile wins at 4 rows as well (s17 run 6, batch 4: 4.50 -> 4.38 ms),
  // where reading the matrix as stored it lost (session 14); so up to 4 rows with a copy, else 2.
  static const int pair8_max_n = env_int("KILN_FP8_GEMV_PAIR8_MAX_N", -1);
  const bool has_tiled_pair = w.tiled && fp8_tiled_shape_ok(N, K, true) && pair_off == N;
  const bool pair8 = silu && n <= (pair8_max_n >= 0 ? pair8_max_n : has_tiled_pair ? 4 : 2);
  const int grid = pair8 ? (N + 7) / 8 : (N + 15) / 16;
  // x_q, then the warps' partial sums: one 16 x 8 f32 fragment a warp and row tile (the 16 + 16 silu
  // pair has two tiles, the 8 + 8 one).
  const int smem = std::max(n * p.kp, kWarps * (silu && !pair8 ? 2 : 1) * 128 * 4);
  if (smem > max_smem()) return false;
  // The tiled copy serves the one-tile kernels (plain, fold, the 8 + 8 silu pair) in the shapes it
  // was made for (fp8_tiled_shape_ok); the 16 + 16 silu pair reads w as stored.
  p.wt = (silu ? pair8 && has_tiled_pair : w.tiled && fp8_tiled_shape_ok(N, K, false))
             ? static_cast<const uint8_t*>(w.tiled)
             : nullptr;
  // Chunks in flight per warp (H100, batch 1, docs/PERF_fp8_gpu.md): 4 (80 registers, 3 blocks per
  // SM) puts qkv's 384 tiles in one wave (11.2 us against 14.8 with 8) and won the decode step
  // (3.74-3.78 ms against 3.88 with 8). The fold GEMVs (o_proj, down_proj: 256 tiles at the 8B's
  // hidden 4096, one wave at 2 an SM either way) take 8 (115 registers): o_proj's whole rows are
  // then loaded before pdl_wait, during the attention. Session 15 (block timestamps): o_proj 12.8 ->
  // 9.0 us in the step, down_proj 28.9 -> 27.7; the batch-1 step -0.9 % (3.576 / 3.580 -> 3.543 /
  // 3.550 ms; 8 for every GEMV lost: qkv's second wave). KILN_FP8_GEMV_LOADS / _FOLD_LOADS = 4 or 8
  // for A/B. Tried and not kept (no gain in the step): 12-warp blocks for the 256-tile shapes, a
  // persistent grid walking tiles, cp.async stages in shared memory (again in session 15 as extra
  // chunks copied before the wait: slower, the shared memory costs early-resident blocks).
  static const int loads = env_int("KILN_FP8_GEMV_LOADS", 4);
  static const int fold_loads = env_int("KILN_FP8_GEMV_FOLD_LOADS", 8);
  // (The silu pair holds two tiles' chunks: 4 of them already take 124 registers.)
  if (pair8) launch<true, false, 4, 3, true>(p, grid, smem, s);
  else if (silu) launch<true, false, 4, 2>(p, grid, smem, s);
  else if (fold) fold_loads == 8 ? launch<false, true, 8, 2>(p, grid, smem, s) : launch<false, true, 4, 3>(p, grid, smem, s);
  else loads == 8 ? launch<false, false, 8, 2>(p, grid, smem, s) : launch<false, false, 4, 3>(p, grid, smem, s);
  return true;
}

}  // namespace kiln::cuda
