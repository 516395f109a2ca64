// Device pieces of FP8 on the GPU (fp8.cu's quantizers, the tensor-core GEMVs gemv_fp8.cu and
// fused_decode.cu): the e4m3 mma, the activation quantizers and the dynamic activation scale, so all
// quantize and multiply alike.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace kiln::cuda {

// d += a (16 x 32, row) * b (32 x 8, col), E4M3 in, f32 accumulators (sm_89+).
__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// x / s rounded exactly as the IEEE division (the quantizers' contract: model/fp8.h divides), from a
// reciprocal made once per scale. Markstein's theorem: with y = RN(1/s) and q = RN(x y) (within an
// ulp of x / s), r = x - s q is exact in an FMA and RN(q + r y) = RN(x / s), barring overflow and
// underflow. __fdiv_rn spends ~10 instructions, a branch and a reciprocal of s on every element,
// which left the prefill quantizers issue-bound; this is 3 FMA-pipe instructions and a select.
// Scales outside [2^-90, 2^90] keep __fdiv_rn (then nothing underflows where an E4M3 code could
// change: a quotient of 2^-10 or more needs x >= 2^-100); an overflowing product stays infinite
// (the quotient's E4M3 code saturates to 448 all the same); a zero keeps its sign (E4M3 has -0).
struct ScaleDiv {
  float s, y;
  bool exact;
  __device__ __forceinline__ explicit ScaleDiv(float scale) {
    s = scale;
    y = __frcp_rn(scale);
    exact = scale >= 0x1p-90f && scale <= 0x1p90f;
  }
  __device__ __forceinline__ float operator()(float x) const {
    if (!exact) return __fdiv_rn(x, s);
    const float q = __fmul_rn(x, y);
    const float q1 = __fmaf_rn(__fmaf_rn(-s, q, x), y, q);
    return isinf(q) || q == 0.0f ? q : q1;  // q keeps a zero's sign (-0 + 0 would give +0)
  }
};

// Two floats -> two E4M3 codes (low 16 bits): fp8(x / s), the quotient ScaleDiv gives (saturating).
// The decode GEMVs keep __fdiv_rn here: ScaleDiv in their in-kernel quantization made batch-1 decode
// ~1 % slower (it costs the 80-register variants spills; docs/PERF_fp8_gpu.md, session 12).
__device__ __forceinline__ uint32_t fp8x2(float a, float b, float s) {
  return __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(a, s), __fdiv_rn(b, s)), __NV_SATFINITE, __NV_E4M3);
}

// 8 bf16 -> 8 E4M3 codes, the same.
__device__ __forceinline__ uint2 quantize8(const uint4 u, float s) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&u);
  uint32_t o[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float2 f0 = __bfloat1622float2(p[2 * i]), f1 = __bfloat1622float2(p[2 * i + 1]);
    o[i] = fp8x2(f0.x, f0.y, s) | (fp8x2(f1.x, f1.y, s) << 16);
  }
  return make_uint2(o[0], o[1]);
}

// max(a, |v|) over the 8 bf16 of u (a dynamic activation scale's amax, 16 bytes at a time).
__device__ __forceinline__ float amax8(const uint4 u, float a) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 f = __bfloat1622float2(h[e]);
    a = fmaxf(a, fmaxf(fabsf(f.x), fabsf(f.y)));
  }
  return a;
}

// As model/fp8.h fp8_scale_for_amax: 1 for zero or non-finite.
__device__ __forceinline__ float scale_for_amax(float amax) {
  return (amax > 0.0f && amax < 3.0e38f) ? amax / 448.0f : 1.0f;
}

}  // namespace kiln::cuda
