// Kernel launches with programmatic dependent launch (PDL, sm_90+). A decode step is ~350 small
// dependent kernels; without PDL each boundary costs the next kernel's launch plus its ramp (the
// first weight bytes arrive ~1 us after its blocks start). With PDL the next kernel's blocks are
// scheduled while the previous kernel's last wave drains, load what does not depend on it (weights),
// and only then wait for it. Rules every kernel launched this way follows:
//  - pdl_trigger() at the top (lets the next kernel be scheduled once all our blocks are resident),
//    or after the first dependent loads where the next kernel's early weight loads would queue ahead
//    of them (decode attention v2, the one-row FP8 GEMV: session 15);
//  - pdl_wait() before the first read of anything an earlier kernel wrote, and before any write.
// On older GPUs (or KILN_PDL=0) the attribute is left off and both calls compile to nothing or no-ops.
#pragma once
#include <cuda_runtime.h>

#include <utility>

namespace kiln::cuda {

// Whether launches carry the PDL attribute (set once per process from the device and KILN_PDL).
bool pdl_enabled();

// The current device's compute capability as major * 10 + minor (90: H100), read once per process.
inline int device_cc() {
  static const int cc = [] {
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    return major * 10 + minor;
  }();
  return cc;
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// "Last block" arrivals (the decode fold's tail, the split merge): after a block barrier, thread 0
// counts the block with one acquire-release atomic, as CUTLASS's GenericBarrier::arrive_inc does.
// bar.sync orders every thread's earlier writes before thread 0's release (which is cumulative), and
// the last block's acquire, followed by a barrier, orders all its threads' later loads after every
// block's writes. (Before session 15: __threadfence() in every thread, then a relaxed atomicAdd, one
// memory round trip more on the critical path: batch-1 FP8 decode -0.7 % with the fold's.)
__device__ __forceinline__ unsigned int atomic_add_acq_rel_gpu(unsigned int* p, unsigned int v) {
  unsigned int old;
  asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
__device__ __forceinline__ int atomic_add_acq_rel_gpu(int* p, int v) {
  int old;
  asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

template <typename... KArgs, typename... Args>
inline void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace kiln::cuda
