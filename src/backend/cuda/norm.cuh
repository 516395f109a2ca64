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
__device__ __forceinline__ float add_rms_row(float* r, const __nv_bfloat16* d, int32_t dim, float eps, float* red) {
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = r[i] + __bfloat162float(d[i]);
    r[i] = v;
    ss += v * v;
  }
  ss = block_sum(ss, red);
  return rsqrtf(ss / float(dim) + eps);
}

}  // namespace kiln::cuda
