// Device pieces of the RMS norms that several kernels must compute bit for bit alike: the block
// sum (kernels.cu's norms, the decode folds' tail, the FP8 quantizing add_rms_norm in fp8.cu) and the
// residual add + sum of squares of add_rms_norm (kernels.cu's kernel and its FP8-quantizing twin in
// fp8.cu write the same bf16 outputs because they share it).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace kiln::cuda {

// Sum of v over the block (any size up to 1024), through red[32] in shared memory.
__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();  // red may be reused from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int i = 0; i < nw; ++i) s += red[i];
  return s;
}

// add_rms_norm's first pass for row r of the block: r += delta (in place), returns 1 / rms(r).
// d null: r as it is (read only), the same sums in the same order as after the add.
__device__ __forceinline__ float add_rms_row(float* r, const __nv_bfloat16* d, int32_t dim, float eps, float* red) {
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = r[i];
    if (d) {
      v += __bfloat162float(d[i]);
      r[i] = v;
    }
    ss += v * v;
  }
  ss = block_sum(ss, red);
  return rsqrtf(ss / float(dim) + eps);
}

// add_rms_norm's vector form, for rows that allow it (norm_row_vectors): a 256-thread block, 4
// floats a vector, each thread's kV vectors loaded at once and kept in registers for the second
// pass (the scalar add_rms_row above is a chain of dependent loads per thread, ~1.7 TB/s at 8192 x
// 4096). r += delta in place (d null: r read only); then emit(idx, y) for every vector idx of the
// row, y = w * (r * inv) in f32 before any rounding.
constexpr int kNormThreads = 256;

// kV for rows of `dim` floats whose delta and output rows start ld_delta / ldo elements apart
// (16-bit elements: 8-byte vectors need multiples of 4, and the pointers aligned), or 0 where the
// scalar form must run.
inline int norm_row_vectors(int32_t dim, int64_t ld_delta, int64_t ldo, const void* residual, const void* delta,
                            const void* out, const void* w) {
  auto aligned = [](const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; };
  if (dim % 4 != 0 || ld_delta % 4 != 0 || ldo % 4 != 0 || !aligned(residual, 16) || !aligned(w, 16) ||
      !aligned(delta, 8) || !aligned(out, 8))
    return 0;
  const int nv = dim / 4;
  return nv <= kNormThreads ? 1 : nv <= 2 * kNormThreads ? 2 : nv <= 4 * kNormThreads ? 4 : nv <= 8 * kNormThreads ? 8 : 0;
}

template <int kV, class Emit>
__device__ __forceinline__ void add_rms_row_vec(float* r, const __nv_bfloat16* d, const float* w, int32_t dim, float eps,
                                                float* red, Emit emit) {
  const int nv = dim / 4;
  float4* rv = reinterpret_cast<float4*>(r);
  const uint2* dv = reinterpret_cast<const uint2*>(d);
  float4 v[kV];
  uint2 dd[kV];
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    const int idx = threadIdx.x + j * kNormThreads;
    if (idx < nv) {
      v[j] = rv[idx];
      if (d) dd[j] = dv[idx];
    }
  }
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    const int idx = threadIdx.x + j * kNormThreads;
    if (idx < nv) {
      if (d) {
        const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&dd[j].x));
        const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&dd[j].y));
        v[j].x += a.x, v[j].y += a.y, v[j].z += b.x, v[j].w += b.y;
        rv[idx] = v[j];
      }
      ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    }
  }
  ss = block_sum(ss, red);
  const float inv = rsqrtf(ss / float(dim) + eps);
  const float4* wv = reinterpret_cast<const float4*>(w);
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    const int idx = threadIdx.x + j * kNormThreads;
    if (idx < nv) {
      const float4 g = __ldg(wv + idx);
      emit(idx, make_float4(g.x * (v[j].x * inv), g.y * (v[j].y * inv), g.z * (v[j].z * inv), g.w * (v[j].w * inv)));
    }
  }
}

// Four f32 -> four bf16 (round to nearest), as 8 bytes.
__device__ __forceinline__ uint2 bf16x4(const float4& y) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(y.x, y.y), hi = __floats2bfloat162_rn(y.z, y.w);
  return make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
}

}  // namespace kiln::cuda
