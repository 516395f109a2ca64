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
  // Where the library was found, for logs.
  const std::string& library() const { return lib_path_; }
  // Up to this many rows go to kiln's streaming GEMV instead of cuBLASLt (KILN_GEMV_MAX_M; 0 = never).
  void set_gemv_max_m(int m) { gemv_max_m_ = m; }
  int gemv_max_m() const { return gemv_max_m_; }

 private:
  struct Plan;
  const Plan& plan_for(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool y_f32);
  void* handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::string lib_path_;
  int gemv_max_m_ = 4;
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, bool>, Plan*> plans_;
};

}  // namespace kiln::cuda
