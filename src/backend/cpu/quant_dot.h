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

}  // namespace kiln
