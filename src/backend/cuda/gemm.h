// BF16 GEMMs through cuBLASLt, loaded with dlopen at run time so the kiln binary starts (and serves
// on the CPU) on machines without the CUDA libraries; a missing library is a clear error.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <tuple>

#include <cuda_runtime_api.h>

#include "core/status.h"

namespace kiln::cuda {

class Gemm {
 public:
  ~Gemm();
  // Loads libcublasLt and creates the handle and workspace.
  [[nodiscard]] Status init(size_t workspace_bytes = size_t(32) << 20);
  // y[n, N] (row stride ldy, bf16 or f32) = x[n, K] (row stride ldx, bf16) @ W^T, W: [N, K] bf16
  // rows contiguous. f32 accumulate. Enqueues only (graph-capturable once the shape was seen).
  void linear(const void* x, int64_t n, int64_t ldx, const void* w, int64_t N, int64_t K, void* y, int64_t ldy,
              bool y_f32, cudaStream_t stream);
  // FP8 E4M3: y[n, N] bf16 (row stride ldy) = (xq[n, K] . wq[N, K]^T) * x_scale * w_scale, f32
  // accumulate. Scales are device pointers: x_scales [1] or [n] (per token), w_scales [1] or [N]
  // (per channel). Vector scales go to cuBLASLt's outer-vector scale mode where the library takes
  // it, else to a small epilogue kernel. K and the row strides must be multiples of 16.
  void linear_fp8(const void* xq, int64_t n, int64_t ldx, const float* x_scales, bool x_per_row, const void* wq,
                  int64_t N, int64_t K, const float* w_scales, bool w_per_row, void* y, int64_t ldy,
                  cudaStream_t stream);
  // Where the library was found, for logs.
  const std::string& library() const { return lib_path_; }
  // Up to this many rows go to kiln's streaming GEMV instead of cuBLASLt (KILN_GEMV_MAX_M; 0 = never).
  void set_gemv_max_m(int m) { gemv_max_m_ = m; }
  int gemv_max_m() const { return gemv_max_m_; }

 private:
  struct Plan;
  const Plan& plan_for(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool y_f32);
  // FP8 plans by (n, ldx, N, K, ldy, vector scales); null algorithm = the library has none.
  Plan* plan_fp8(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool outer_vec);
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, bool>, Plan*> plans_fp8_;
  float* d_one_ = nullptr;  // device 1.0f: the unit scale of the epilogue fallback
  bool fast_accum_ = true;
  void* handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::string lib_path_;
  int gemv_max_m_ = 4;
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, bool>, Plan*> plans_;
};

}  // namespace kiln::cuda
