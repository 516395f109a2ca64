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

// The tiled copy of an FP8 matrix [N, K] for the decode GEMV: each block's 16 rows chunk by chunk,
// [N / 16][K / 64][16][64] bytes, so a block streams one contiguous range (in the layout as stored
// it reads 16 rows in 64-byte pieces, one 512-byte run per row and step). pair: the silu pair's
// gate rows [0, N) and up rows [N, 2 N) as tiles of 8 gate rows and their 8 up rows ([N / 8][K /
// 64][16][64], 2 N K bytes). H100, batch-1 FP8 decode of the 8B: ~4-5 % a step (docs/PERF_fp8_gpu.md,
// session 17). The matrix as stored stays (prefill's cuBLASLt GEMMs read it), so a copy doubles the
// weight's memory: the executor makes them only for small-batch runs (LoadOptions::max_batch_size).
bool fp8_tiled_shape_ok(int64_t N, int64_t K, bool pair);  // N % 16 == 0 (pair: N % 8 == 0), K % 64 == 0
// out: N K bytes (pair: 2 N K), 16-byte aligned. False (nothing launched) when the shape or an
// alignment does not fit.
bool launch_tile_fp8(const void* w, int64_t N, int64_t K, bool pair, void* out, cudaStream_t s);

// y[m, r] = (x_q[m] . w_q[r]) * s_x(m) * s_w(r) for m < n, r < N; silu: w is [gate; up] with the
// up rows pair_off rows below and y = silu(gate) * up (bf16); fold: as GemvFold (bf16 y, N % 4 == 0,
// N <= 4096). Returns false (nothing launched) when it does not take the call: w not FP8 or
// weight-only (w.act == kNone), a device before sm_89, n outside 1..8,
// K % 16 != 0, ldx % 8 != 0, x or the weight not 16-byte aligned, or a static scale missing.
bool launch_gemv_fp8_mma(const bf16_t* x, int64_t ldx, int32_t n, const GemvW& w, int32_t N, int32_t K, int64_t pair_off,
                         bool silu, void* y, int64_t ldy, bool y_f32, const GemvFold* fold, cudaStream_t s);

}  // namespace kiln::cuda
