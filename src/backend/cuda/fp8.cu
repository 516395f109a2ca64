// FP8 E4M3 activation quantization, scale epilogue and dummy-weight fill (fp8.h). The conversions
// use cuda_fp8.h's saturating round-to-nearest-even, the same rounding as torch's float8_e4m3fn
// cast and kiln's CPU emulation (model/fp8.cpp): x is divided by the scale (ScaleDiv: the IEEE quotient
// from a reciprocal made once), never multiplied by an inexact 1/s.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cstdlib>

#include "backend/cuda/activation.cuh"
#include "backend/cuda/fp8.h"
#include "backend/cuda/fp8_mma.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/norm.cuh"

namespace kiln::cuda {
namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ uint8_t to_fp8(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float from_fp8(uint8_t b) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(b, __NV_E4M3);
  return __half2float(__half(h));
}

__device__ __forceinline__ float block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = 0.0f;
  for (int i = 0; i < nw; ++i) m = fmaxf(m, red[i]);
  return m;
}

// Row amax over K (8 bf16 per 16-byte load when aligned).
__device__ float row_amax(const bf16* x, int32_t K, float* red) {
  float m = 0.0f;
  if ((K & 7) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0) {
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    for (int i = threadIdx.x; i < K / 8; i += blockDim.x) m = amax8(xv[i], m);
  } else {
    for (int i = threadIdx.x; i < K; i += blockDim.x) m = fmaxf(m, fabsf(__bfloat162float(x[i])));
  }
  return block_max(m, red);
}

// Loads before stores: q may alias x as far as the compiler knows, so a loop that loads, converts
// and stores one vector at a time keeps one load a thread in flight; kRowLoads are issued together.
constexpr int kRowLoads = 4;

__device__ void quantize_row(const bf16* x, int32_t K, float scale, uint8_t* q) {
  const ScaleDiv div(scale);
  if ((K & 7) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 && (reinterpret_cast<uintptr_t>(q) & 7) == 0) {
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const int nv = K / 8;
    for (int i0 = threadIdx.x; i0 < nv; i0 += kRowLoads * blockDim.x) {
      uint4 u[kRowLoads];
#pragma unroll
      for (int j = 0; j < kRowLoads; ++j) {
        const int i = i0 + j * int(blockDim.x);
        if (i < nv) u[j] = xv[i];
      }
#pragma unroll
      for (int j = 0; j < kRowLoads; ++j) {
        const int i = i0 + j * int(blockDim.x);
        if (i >= nv) continue;
        const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&u[j]);
        uint8_t o[8];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const float2 f = __bfloat1622float2(p[t]);
          o[2 * t] = to_fp8(div(f.x));
          o[2 * t + 1] = to_fp8(div(f.y));
        }
        *reinterpret_cast<uint2*>(q + 8 * int64_t(i)) = *reinterpret_cast<const uint2*>(o);
      }
    }
  } else {
    for (int i = threadIdx.x; i < K; i += blockDim.x) q[i] = to_fp8(div(__bfloat162float(x[i])));
  }
}

// One block per row. kDynamicToken: amax then quantize; kStatic / kDynamicTensor: the scale is
// already in *scale_in (the tensor amax as float bits when `from_amax`).
__global__ void quantize_rows_kernel(const bf16* x, int64_t ldx, int32_t K, int mode, const float* scale_in,
                                     const unsigned int* amax_bits, uint8_t* xq, float* scales_out,
                                     bool scales_per_row) {
  __shared__ float red[32];
  pdl_trigger();
  pdl_wait();  // x is the previous kernel's output
  const int64_t r = blockIdx.x;
  const bf16* xr = x + r * ldx;
  float s;
  if (mode == int(Fp8Act::kDynamicToken)) {
    s = scale_for_amax(row_amax(xr, K, red));
    if (threadIdx.x == 0) scales_out[r] = s;
  } else if (mode == int(Fp8Act::kDynamicTensor)) {
    s = scale_for_amax(__uint_as_float(*amax_bits));
  } else {
    s = *scale_in;
  }
  if (mode != int(Fp8Act::kDynamicToken) && threadIdx.x == 0 && (scales_per_row || r == 0))
    scales_out[scales_per_row ? r : 0] = s;
  quantize_row(xr, K, s, xq + r * int64_t(K));
}

// Tensor amax: per-row block maxima folded with atomicMax on the float's bits (non-negative floats
// order like their bit patterns).
__global__ void amax_rows_kernel(const bf16* x, int64_t ldx, int32_t K, unsigned int* amax_bits) {
  __shared__ float red[32];
  pdl_trigger();
  pdl_wait();
  const float m = row_amax(x + int64_t(blockIdx.x) * ldx, K, red);
  if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(m));
}

__global__ void scale_outer_kernel(bf16* y, int64_t ldy, int32_t n, int32_t N, const float* a, bool a_per_row, const float* b,
                                   bool b_per_col) {
  for (int64_t m = blockIdx.y; m < n; m += gridDim.y) {
    const float am = a[a_per_row ? m : 0];
    bf16* row = y + m * ldy;
    for (int32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < N; j += gridDim.x * blockDim.x)
      row[j] = __float2bfloat16(__bfloat162float(row[j]) * am * b[b_per_col ? j : 0]);
  }
}

// silu(g) * u rounded to bf16, the expression of kernels.cu's silu_mul_kernel (same operations in
// the same order, so the same bits; FusedSiluQuant tests hold the two together).
__device__ __forceinline__ float silu_mul_bf16(bf16 g, bf16 u, bf16* o) {
  const float gv = __bfloat162float(g);
  *o = __float2bfloat16(silu(gv) * __bfloat162float(u));
  return __bfloat162float(*o);
}

// grid (column chunks, rows): kVec: 8 columns per thread with 16-byte loads (every row pointer
// aligned, dim % 8 == 0), else one column per thread.
template <bool kVec, bool kOut>
__global__ void silu_mul_quantize_kernel(const bf16* gate, int64_t ldg, const bf16* up, int64_t ldu, int32_t n,
                                         int32_t dim, const float* scale, uint8_t* xq, float* scales_out,
                                         bool per_row, bf16* out, int64_t ldo) {
  pdl_trigger();
  pdl_wait();  // gate / up are the previous kernel's output
  const float s = *scale;
  const ScaleDiv div(s);
  const int32_t cols = kVec ? dim / 8 : dim;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
    if (blockIdx.x == 0 && threadIdx.x == 0 && (per_row || r == 0)) scales_out[per_row ? r : 0] = s;
    const bf16* gr = gate + r * ldg;
    const bf16* ur = up + r * ldu;
    uint8_t* qr = xq + r * int64_t(dim);
    if constexpr (kVec) {
      // kRowLoads vectors of gate and of up a thread, all loaded before the first store (see
      // quantize_row); streaming loads: gate / up are read again only if a skipped bf16 product
      // is ever asked for (CudaOps::touch).
      const int32_t step = int32_t(gridDim.x * blockDim.x);
      for (int32_t c0 = int32_t(blockIdx.x * blockDim.x + threadIdx.x); c0 < cols; c0 += kRowLoads * step) {
        uint4 gv[kRowLoads], uv[kRowLoads];
#pragma unroll
        for (int j = 0; j < kRowLoads; ++j) {
          const int32_t c = c0 + j * step;
          if (c < cols) {
            gv[j] = __ldcs(reinterpret_cast<const uint4*>(gr) + c);
            uv[j] = __ldcs(reinterpret_cast<const uint4*>(ur) + c);
          }
        }
#pragma unroll
        for (int j = 0; j < kRowLoads; ++j) {
          const int32_t c = c0 + j * step;
          if (c >= cols) continue;
          const bf16* g = reinterpret_cast<const bf16*>(&gv[j]);
          const bf16* u = reinterpret_cast<const bf16*>(&uv[j]);
          uint4 ov;
          bf16* o = reinterpret_cast<bf16*>(&ov);
          uint8_t q[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) q[e] = to_fp8(div(silu_mul_bf16(g[e], u[e], &o[e])));
          *reinterpret_cast<uint2*>(qr + 8 * int64_t(c)) = *reinterpret_cast<const uint2*>(q);
          if (kOut) reinterpret_cast<uint4*>(out + r * ldo)[c] = ov;
        }
      }
    } else {
      for (int32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        bf16 o;
        qr[c] = to_fp8(div(silu_mul_bf16(gr[c], ur[c], &o)));
        if (kOut) out[r * ldo + c] = o;
      }
    }
  }
}

// kernels.cu's add_rms_norm_kernel (the same add_rms_row, then the same bf16 rounding) plus the FP8
// codes of its output. One block per row.
__global__ void add_rms_norm_quantize_kernel(float* residual, const bf16* delta, int64_t ld_delta, const float* w,
                                             int32_t dim, float eps, bf16* out, int64_t ldo, const float* scale,
                                             uint8_t* xq, float* scales_out, bool per_row) {
  pdl_trigger();
  pdl_wait();
  __shared__ float red[32];
  float* r = residual + int64_t(blockIdx.x) * dim;
  const float inv = add_rms_row(r, delta ? delta + int64_t(blockIdx.x) * ld_delta : nullptr, dim, eps, red);
  const float s = *scale;
  const ScaleDiv div(s);
  if (threadIdx.x == 0 && (per_row || blockIdx.x == 0)) scales_out[per_row ? blockIdx.x : 0] = s;
  bf16* o = out ? out + int64_t(blockIdx.x) * ldo : nullptr;
  uint8_t* q = xq + int64_t(blockIdx.x) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const bf16 b = __float2bfloat16(w[i] * (r[i] * inv));
    if (o) o[i] = b;
    q[i] = to_fp8(div(__bfloat162float(b)));
  }
}

// The same with the vector row (norm.cuh), as kernels.cu's add_rms_norm_vec_kernel.
template <int kV>
__global__ void __launch_bounds__(kNormThreads)
    add_rms_norm_quantize_vec_kernel(float* residual, const bf16* delta, int64_t ld_delta, const float* w, int32_t dim,
                                     float eps, bf16* out, int64_t ldo, const float* scale, uint8_t* xq,
                                     float* scales_out, bool per_row) {
  pdl_trigger();
  pdl_wait();
  __shared__ float red[32];
  const float s = *scale;
  const ScaleDiv div(s);
  if (threadIdx.x == 0 && (per_row || blockIdx.x == 0)) scales_out[per_row ? blockIdx.x : 0] = s;
  uint2* o = out ? reinterpret_cast<uint2*>(out + int64_t(blockIdx.x) * ldo) : nullptr;
  uint32_t* q = reinterpret_cast<uint32_t*>(xq + int64_t(blockIdx.x) * dim);
  const bf16* d = delta ? delta + int64_t(blockIdx.x) * ld_delta : nullptr;  // null: no add
  add_rms_row_vec<kV>(residual + int64_t(blockIdx.x) * dim, d, w, dim, eps, red,
                      [&](int idx, const float4& y) {
                        const uint2 b = bf16x4(y);
                        if (o) o[idx] = b;
                        const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&b.x));
                        const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&b.y));
                        q[idx] = uint32_t(to_fp8(div(lo.x))) | uint32_t(to_fp8(div(lo.y))) << 8 |
                                 uint32_t(to_fp8(div(hi.x))) << 16 | uint32_t(to_fp8(div(hi.y))) << 24;
                      });
}

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__global__ void fill_uniform_fp8_kernel(uint8_t* p, int64_t n, uint64_t seed, float a, float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = mix64(seed ^ mix64(uint64_t(i)));
    const float u = float(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    p[i] = to_fp8((2.0f * u - 1.0f) * a / scale);
  }
}

__global__ void fp8_to_bf16_kernel(const uint8_t* in, bf16* out, int64_t n, float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(from_fp8(in[i]) * scale);
}

// launch_scale_div_check: grid.y walks the scales.
__global__ void scale_div_check_kernel(const float* x, int64_t n, const float* scales, unsigned long long* mismatches,
                                       float* first) {
  const float s = scales[blockIdx.y];
  const ScaleDiv div(s);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float got = div(x[i]), want = __fdiv_rn(x[i], s);
    // The E4M3 code always; the quotient itself wherever that code could depend on its last bit
    // (and nothing under- or overflows): 2^-10 <= |x / s| <= 2^100.
    const bool same_code = to_fp8(got) == to_fp8(want);
    const bool in_range = fabsf(want) >= 0x1p-10f && fabsf(want) <= 0x1p100f;
    const bool same = __float_as_uint(got) == __float_as_uint(want) || (isnan(got) && isnan(want));
    if (same_code && (same || !in_range)) continue;
    if (atomicAdd(mismatches, 1ull) == 0ull) {
      first[0] = x[i];
      first[1] = s;
      first[2] = got;
      first[3] = want;
    }
  }
}

int grid_for(int64_t n, int block) {
  const int64_t g = (n + block - 1) / block;
  return int(g < 65536 ? (g > 0 ? g : 1) : 65536);
}

}  // namespace

void launch_quantize_fp8(const bf16_t* x, int64_t ldx, int32_t n, int32_t K, Fp8Act mode, const float* static_scale,
                         uint8_t* xq, float* scales_out, bool scales_per_row, unsigned int* amax_scratch,
                         cudaStream_t s) {
  if (n <= 0) return;
  const bf16* xb = reinterpret_cast<const bf16*>(x);
  if (mode == Fp8Act::kDynamicTensor) {
    cudaMemsetAsync(amax_scratch, 0, sizeof(unsigned int), s);
    amax_rows_kernel<<<n, 256, 0, s>>>(xb, ldx, K, amax_scratch);
  }
  // With programmatic dependent launch, as every kernel around it: the quantizer sits between a
  // PDL kernel and the GEMM once per FP8 linear, and a plain launch boundary costs a few us each
  // (KILN_FP8_QUANT_PDL=0: plain launch, for A/B).
  static const bool pdl = [] {
    const char* e = std::getenv("KILN_FP8_QUANT_PDL");
    return !(e && e[0] == '0');
  }();
  const bool per_row = scales_per_row || mode == Fp8Act::kDynamicToken;
  if (pdl)
    launch_pdl(quantize_rows_kernel, dim3(n), dim3(256), 0, s, xb, ldx, K, int(mode), static_scale,
               static_cast<const unsigned int*>(amax_scratch), xq, scales_out, per_row);
  else
    quantize_rows_kernel<<<n, 256, 0, s>>>(xb, ldx, K, int(mode), static_scale, amax_scratch, xq, scales_out, per_row);
}

void launch_silu_mul_quantize_fp8(const bf16_t* gate, int64_t ldg, const bf16_t* up, int64_t ldu, int32_t n,
                                  int32_t dim, const float* static_scale, uint8_t* xq, float* scales_out,
                                  bool scales_per_row, bf16_t* out, int64_t ldo, cudaStream_t s) {
  if (n <= 0 || dim <= 0) return;
  auto a16 = [](const void* p, int64_t ld) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0 && (ld & 7) == 0; };
  const bool vec = (dim & 7) == 0 && a16(gate, ldg) && a16(up, ldu) && (reinterpret_cast<uintptr_t>(xq) & 7) == 0 &&
                   (!out || a16(out, ldo));
  const int32_t cols = vec ? dim / 8 : dim;
  const int32_t per_block = vec ? 256 * kRowLoads : 256;
  const dim3 grid((cols + per_block - 1) / per_block, n < 65535 ? n : 65535);
  const bf16* g = reinterpret_cast<const bf16*>(gate);
  const bf16* u = reinterpret_cast<const bf16*>(up);
  bf16* o = reinterpret_cast<bf16*>(out);
  auto go = [&](auto kernel) {
    launch_pdl(kernel, grid, dim3(256), 0, s, g, ldg, u, ldu, n, dim, static_scale, xq, scales_out, scales_per_row, o,
               ldo);
  };
  if (vec)
    out ? go(silu_mul_quantize_kernel<true, true>) : go(silu_mul_quantize_kernel<true, false>);
  else
    out ? go(silu_mul_quantize_kernel<false, true>) : go(silu_mul_quantize_kernel<false, false>);
}

void launch_add_rms_norm_quantize_fp8(float* residual, const bf16_t* delta, int64_t ld_delta, const float* w,
                                      int32_t n, int32_t dim, float eps, bf16_t* out, int64_t ldo,
                                      const float* static_scale, uint8_t* xq, float* scales_out, bool scales_per_row,
                                      cudaStream_t s) {
  if (n <= 0) return;
  const bf16* d = reinterpret_cast<const bf16*>(delta);
  bf16* o = reinterpret_cast<bf16*>(out);
  // The same choice of form as kernels.cu's launch_add_rms_norm, so the bf16 outputs agree bit for bit.
  auto vec = [&](auto kernel) {
    launch_pdl(kernel, dim3(n), dim3(kNormThreads), 0, s, residual, d, ld_delta, w, dim, eps, o, ldo, static_scale, xq,
               scales_out, scales_per_row);
  };
  switch (reinterpret_cast<uintptr_t>(xq) % 4 == 0 ? norm_row_vectors(dim, ld_delta, ldo, residual, d, o, w) : 0) {
    case 1: return vec(add_rms_norm_quantize_vec_kernel<1>);
    case 2: return vec(add_rms_norm_quantize_vec_kernel<2>);
    case 4: return vec(add_rms_norm_quantize_vec_kernel<4>);
    case 8: return vec(add_rms_norm_quantize_vec_kernel<8>);
    default: break;
  }
  const int threads = dim >= 1024 ? 1024 : dim >= 256 ? 256 : 128;  // kernels.cu threads_for
  launch_pdl(add_rms_norm_quantize_kernel, dim3(n), dim3(threads), 0, s, residual, d, ld_delta, w, dim, eps, o, ldo,
             static_scale, xq, scales_out, scales_per_row);
}

void launch_scale_outer(bf16_t* y, int64_t ldy, int32_t n, int32_t N, const float* a, bool a_per_row, const float* b,
                        bool b_per_col, cudaStream_t s) {
  if (n <= 0 || N <= 0) return;
  const int bx = (N + 255) / 256 < 64 ? (N + 255) / 256 : 64;
  scale_outer_kernel<<<dim3(bx, n < 65535 ? n : 65535), 256, 0, s>>>(reinterpret_cast<bf16*>(y), ldy, n, N, a, a_per_row,
                                                                     b, b_per_col);
}

void launch_fill_uniform_fp8(uint8_t* p, int64_t n, uint64_t seed, float a, float scale, cudaStream_t s) {
  fill_uniform_fp8_kernel<<<grid_for(n, 256), 256, 0, s>>>(p, n, seed, a, scale);
}

void launch_fp8_to_bf16(const uint8_t* in, bf16_t* out, int64_t n, float scale, cudaStream_t s) {
  fp8_to_bf16_kernel<<<grid_for(n, 256), 256, 0, s>>>(in, reinterpret_cast<bf16*>(out), n, scale);
}

void launch_scale_div_check(const float* x, int64_t n, const float* scales, int32_t n_scales,
                            unsigned long long* mismatches, float* first, cudaStream_t s) {
  if (n <= 0 || n_scales <= 0) return;
  scale_div_check_kernel<<<dim3(grid_for(n, 256) < 1024 ? grid_for(n, 256) : 1024, n_scales), 256, 0, s>>>(
      x, n, scales, mismatches, first);
}

}  // namespace kiln::cuda
