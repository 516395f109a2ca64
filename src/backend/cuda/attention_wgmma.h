// Prefill attention on Hopper's warpgroup MMA (attention_wgmma.cu), used by attention.cu's prefill
// launcher where it applies.
#pragma once
#include <cuda_runtime.h>

#include "backend/cuda/kernels.h"

namespace kiln::cuda {

// Launches the wgmma prefill kernel for p (bf16 K/V: the step's rows or a bf16 cache; head_dim
// 128; G query heads a KV head, 2, 4 or 8) and returns true; returns false, launching nothing,
// where it does not apply (another head dim or G, an FP8 cache, a GPU other than sm_90, a build
// without the sm_90a target) or does not pay: prefill sequences of a mean context under
// KILN_PREFILL_WGMMA_MIN_CTX tokens (its blocks hold a whole SM for one or two K/V tiles).
bool launch_prefill_wgmma(const AttnParams& p, int G, cudaStream_t s);

}  // namespace kiln::cuda
