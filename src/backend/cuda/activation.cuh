// The activation every GPU path applies (silu_mul, the fused silu + FP8 quantization, the decode
// GEMVs' gate/up epilogues, the one-kernel decode), one definition so the fused and separate
// kernels agree bit for bit.
#pragma once

namespace kiln::cuda {

// silu(x) = x / (1 + e^-x) with the fast division (reciprocal + multiply, within 2 ulp): the IEEE
// division cost ~10 instructions and a branch an element, which made silu_mul + quantize (117 M
// elements a layer in a 2048/128 step) issue-bound. For x < -87 the denominator passes 2^126 and
// the quotient is 0 instead of ~1e-37.
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

}  // namespace kiln::cuda
