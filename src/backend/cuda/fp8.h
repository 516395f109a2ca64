// FP8 E4M3 helpers of the CUDA backend: activation quantization in front of cuBLASLt's FP8 GEMM,
// the scale epilogue where cuBLASLt cannot apply vector scales itself, and dummy FP8 weights.
// Scales follow ModelOpt's convention (real = fp8 * scale). Launchers enqueue only (graph-safe).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "backend/cuda/kernels.h"

namespace kiln::cuda {

// How one FP8 linear's input is quantized (model/weights.h ActQuant, minus kNone).
enum class Fp8Act : uint8_t { kStatic, kDynamicTensor, kDynamicToken };

// xq[n, K] (dense) = fp8(x / s) with s = *static_scale (kStatic), amax(x) / 448 over the whole
// [n, K] (kDynamicTensor) or per row (kDynamicToken); the scales used go to scales_out: [n] for
// kDynamicToken or when scales_per_row (the tensor scale repeated, for cuBLASLt's vector mode), else [1].
// `amax_scratch` is one device float (dynamic per tensor only; reset inside).
void launch_quantize_fp8(const bf16_t* x, int64_t ldx, int32_t n, int32_t K, Fp8Act mode, const float* static_scale,
                         uint8_t* xq, float* scales_out, bool scales_per_row, unsigned int* amax_scratch,
                         cudaStream_t s);
// xq[n, dim] (dense) = fp8(bf16(silu(gate) * up) / *static_scale): launch_silu_mul followed by
// launch_quantize_fp8(kStatic) in one pass, with byte-identical codes (the product is rounded to
// bf16 first, then quantized with the same saturating conversion). scales_out gets the scale as
// launch_quantize_fp8 writes it ([n] when scales_per_row, else [1]). `out` (bf16 [n, dim], row
// stride ldo; may be null) also receives the bf16 product. Saves re-reading the product: at 8192 x
// 14336 (8B down_proj input) the separate kernels move 235 MB more.
void launch_silu_mul_quantize_fp8(const bf16_t* gate, int64_t ldg, const bf16_t* up, int64_t ldu, int32_t n,
                                  int32_t dim, const float* static_scale, uint8_t* xq, float* scales_out,
                                  bool scales_per_row, bf16_t* out, int64_t ldo, cudaStream_t s);
// residual[n, dim] (dense f32) += delta; out = bf16(w * residual / rms); xq[n, dim] (dense) =
// fp8(out / *static_scale): launch_add_rms_norm followed by launch_quantize_fp8(kStatic) in one
// pass, every output byte-identical (the same loops, block size and reduction order as
// kernels.cu's add_rms_norm_kernel). scales_out as launch_quantize_fp8 writes it. out null: the
// bf16 output is not written (the codes are the same).
void launch_add_rms_norm_quantize_fp8(float* residual, const bf16_t* delta, int64_t ld_delta, const float* w,
                                      int32_t n, int32_t dim, float eps, bf16_t* out, int64_t ldo,
                                      const float* static_scale, uint8_t* xq, float* scales_out, bool scales_per_row,
                                      cudaStream_t s);
// y[m, j] *= a[a_per_row ? m : 0] * b[b_per_col ? j : 0] (bf16 y [n, N], row stride ldy)
void launch_scale_outer(bf16_t* y, int64_t ldy, int32_t n, int32_t N, const float* a, bool a_per_row, const float* b,
                        bool b_per_col, cudaStream_t s);
// Dummy FP8 weights: uniform in [-a, a] stored as fp8(v / scale), scale = a / 448 chosen by the caller.
void launch_fill_uniform_fp8(uint8_t* p, int64_t n, uint64_t seed, float a, float scale, cudaStream_t s);
// out[i] = bf16(fp8(in[i]) * scale) (tests and the sm_80 fallback)
void launch_fp8_to_bf16(const uint8_t* in, bf16_t* out, int64_t n, float scale, cudaStream_t s);
// For tests: every quotient x[i] / scales[j] the quantizers compute (fp8_mma.cuh's ScaleDiv) against
// the IEEE division: the same E4M3 code always, the same quotient bit for bit where
// 2^-10 <= |x / s| <= 2^100 (NaN against NaN counts as equal). Adds the mismatches to *mismatches;
// the first one found leaves (x, scale, got, want) in first[0..3].
void launch_scale_div_check(const float* x, int64_t n, const float* scales, int32_t n_scales,
                            unsigned long long* mismatches, float* first, cudaStream_t s);

}  // namespace kiln::cuda
