// Device pieces of the FP8 tensor-core GEMVs (gemv_fp8.cu, fused_decode.cu): the e4m3 mma and the
// dynamic activation scale, so both quantize and multiply alike.
#pragma once
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

// As model/fp8.h fp8_scale_for_amax: 1 for zero or non-finite.
__device__ __forceinline__ float scale_for_amax(float amax) {
  return (amax > 0.0f && amax < 3.0e38f) ? amax / 448.0f : 1.0f;
}

}  // namespace kiln::cuda
