// Dot products of f32 activations with ggml block-quantized weight rows, without materializing
// the dequantized row: the CPU decode step reads ~4.5 bits per weight instead of writing and
// re-reading 32. Each value is one fixed-order reduction per (activation row, weight row), so the
// result does not depend on the batch (see cpu_ops.h).
#pragma once
#include <cstdint>

#include "formats/gguf.h"

namespace kiln {

bool quant_dot_supported(GgmlType t);
// Per-block sums of x (n / 32 values): Q4_0 and Q4_1 fold their offsets through them.
void quant_block_sums(const float* x, int64_t n, float* sums);
// sum_i w[i] * x[i] over one row of n weights (n a multiple of 32).
float quant_dot(GgmlType t, const uint8_t* row, const float* x, const float* xsums, int64_t n);

// Multi-token steps unpack a row once (quants as floats: n values; per-block scale and offset:
// n / 32 each) and then run quant_dot's exact operation sequence per token, so the result is
// bit-identical to quant_dot while the nibble unpacking is paid once per row, not per token.
void quant_unpack_row(GgmlType t, const uint8_t* row, int64_t n, float* q, float* d, float* off);
float quant_dot_unpacked(GgmlType t, const float* q, const float* d, const float* off, const float* x,
                         const float* xsums, int64_t n);
// Four results per call, each with exactly the single-result operation order (so still
// bit-identical), interleaved so the FMA chains overlap: one unpacked row against four x
// (prefill of the default model 88 -> 116 tok/s).
void quant_dot4_tokens(GgmlType t, const float* q, const float* d, const float* off, const float* const x[4],
                       const float* const xsums[4], int64_t n, float out[4]);

}  // namespace kiln
