// Error checks and allocation with messages a user can act on.
#pragma once
#include <cstdlib>
#include <string>

#include <cuda_runtime_api.h>

#include "core/log.h"
#include "core/status.h"

namespace kiln::cuda {

inline bool cuda_ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  log_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
  return false;
}

inline Status cuda_status(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return Status::ok();
  return Status::error("CUDA error in " + what + ": " + cudaGetErrorString(e));
}

// An integer tuning knob from the environment (unset or empty: dflt). Callers cache it in a static.
inline int env_int(const char* name, int dflt) {
  const char* e = std::getenv(name);
  return e && *e ? std::atoi(e) : dflt;
}

inline std::string mib(size_t bytes) { return std::to_string((bytes + (size_t(1) << 19)) >> 20) + " MiB"; }

// cudaMalloc; out of memory names the request and what was free.
inline Status device_alloc(void** p, size_t bytes, const std::string& what) {
  cudaError_t e = cudaMalloc(p, bytes < 16 ? 16 : bytes);
  if (e == cudaSuccess) return Status::ok();
  cudaGetLastError();  // clear the sticky-free error
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  *p = nullptr;
  return Status::error("CUDA out of memory: asked for " + mib(bytes) + " for " + what + ", " + mib(free_b) +
                       " free of " + mib(total_b) + " (" + cudaGetErrorString(e) + ")");
}

}  // namespace kiln::cuda
