// The decode fold's tail, shared by the BF16 GEMV (kernels.cu) and the FP8 tensor-core GEMV
// (gemv_fp8.cu) so both normalize with the same arithmetic in the same order: every block counts its
// arrival once its residual writes are visible; the last one to arrive reads the whole residual back
// from L2 and writes out = rms_norm(residual) * w, then puts the counter back to 0 (graph replays
// find it there). Fold: any struct with residual (f32 [n, dim] dense), w (f32 [dim]), out (bf16
// storage [n, ldo]), ldo, eps, counter. 256-thread blocks, dim <= 4096 and a multiple of 4.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/launch.cuh"
#include "backend/cuda/norm.cuh"

namespace kiln::cuda {

template <class Fold>
__device__ __forceinline__ void fold_norm_tail(const Fold& ne, int n, int dim) {
  __shared__ unsigned int last;
  __shared__ float red[32];
  constexpr int kV = 4;  // float4 per thread: dim <= 4096 at 256 threads (checked at dispatch)
  const int nv = dim / 4;
  const float4* wv = reinterpret_cast<const float4*>(ne.w);
  // Every block loads the norm weight before it arrives (L2 hits, off the critical path), so the
  // last block's tail waits on one round trip (the residual), not two: batch-1 FP8 decode -2.4..-2.6 %
  // (H100, s17 runs 1-2: 3.481 / 3.489 -> 3.395 / 3.409 ms, 3.509 / 3.518 -> 3.418 / 3.424).
  float4 gw[kV];
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    const int idx = threadIdx.x + j * blockDim.x;
    gw[j] = idx < nv ? __ldg(wv + idx) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  __syncthreads();  // the block's residual writes, then its arrival (launch.cuh, atomic_add_acq_rel_gpu)
  if (threadIdx.x == 0) last = atomic_add_acq_rel_gpu(ne.counter, 1u) == gridDim.x - 1 ? 1u : 0u;
  __syncthreads();
  if (!last) return;
  // The tail is on the critical path: 16-byte L2 loads, all issued before the first use and kept in
  // registers for the second pass (a scalar loop of 16 dependent-latency loads per thread cost ~8 us
  // per fold, more than the kernel boundary it saves).
  for (int m = 0; m < n; ++m) {
    const float4* r = reinterpret_cast<const float4*>(ne.residual + int64_t(m) * dim);
    float4 v[kV];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      const int idx = threadIdx.x + j * blockDim.x;
      v[j] = idx < nv ? __ldcg(r + idx) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int j = 0; j < kV; ++j) ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    ss = block_sum(ss, red);
    const float inv = rsqrtf(ss / float(dim) + ne.eps);
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(ne.out + int64_t(m) * ne.ldo);
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      const int idx = threadIdx.x + j * blockDim.x;
      if (idx < nv) {
        const float4 g = gw[j];
        o[2 * idx] = __floats2bfloat162_rn(g.x * (v[j].x * inv), g.y * (v[j].y * inv));
        o[2 * idx + 1] = __floats2bfloat162_rn(g.z * (v[j].z * inv), g.w * (v[j].w * inv));
      }
    }
  }
  if (threadIdx.x == 0) *ne.counter = 0u;
}

}  // namespace kiln::cuda
