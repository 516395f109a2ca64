// Decode GEMV for FP8 E4M3 weights on the tensor cores (gemv_fp8.cu): x (bf16, n <= 8 rows) is
// quantized to E4M3 in the kernel and multiplied against the weight with
// mma.sync.m16n8k32.e4m3 (sm_89+), f32 accumulation. kernels.cu's gemv_dispatch routes FP8 weights
// here first; what this declines goes to the CUDA-core (widening) kernel.
#pragma once
#include <cstdint>

#include "backend/cuda/kernels.h"

namespace kiln::cuda {

// The add_rms_norm fold's epilogue (launch_gemv_add_rms_norm): residual[n, N] (dense) +=
// bf16(y); the last block writes out = rms_norm(residual) * w and puts *counter back to 0.
struct GemvFold {
  float* residual;
  const float* w;  // [N]
  bf16_t* out;     // [n, ldo]
  int64_t ldo;
  float eps;
  unsigned int* counter;
};

// y[m, r] = (x_q[m] . w_q[r]) * s_x(m) * s_w(r) for m < n, r < N; silu: w is [gate; up] with the
// up rows pair_off rows below and y = silu(gate) * up (bf16); fold: as GemvFold (bf16 y, N % 4 == 0,
// N <= 4096). Returns false (nothing launched) when it does not take the call: w not FP8 or
// weight-only (w.act == kNone), a device before sm_89, n outside 1..8,
// K % 16 != 0, ldx % 8 != 0, x or the weight not 16-byte aligned, or a static scale missing.
bool launch_gemv_fp8_mma(const bf16_t* x, int64_t ldx, int32_t n, const GemvW& w, int32_t N, int32_t K, int64_t pair_off,
                         bool silu, void* y, int64_t ldy, bool y_f32, const GemvFold* fold, cudaStream_t s);

}  // namespace kiln::cuda
