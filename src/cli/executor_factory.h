// One place that turns --device into an executor, so every verb accepts the same values and says
// the same thing when the CUDA backend is not compiled in.
#pragma once
#include <memory>
#include <string>

#include "backend/cpu/cpu_executor.h"  // LoadOptions
#include "core/status.h"
#include "model/executor.h"
#include "model/weights.h"

namespace kiln::cli {

// OK when `device` is "auto", "cpu", "cuda" or "cuda:N" and this build can run it; the error names
// the accepted values or says the CUDA backend is not built in.
[[nodiscard]] Status check_device(const std::string& device);
// "auto" -> "cuda" when this build has the CUDA backend and a GPU answers, else "cpu"; any other
// value is returned as it is. One binary, same command line on a laptop and on an H100.
std::string resolve_device(const std::string& device);
// "cuda" -> 0, "cuda:N" -> N (after check_device has accepted the form).
int cuda_index(const std::string& device);

// The name plans are made for on `device` ("cpu", or the GPU's name for cuda / cuda:N; "auto":
// the first GPU when this build has CUDA and one is visible, else "cpu"). For a GPU it also
// installs the GEMM planner (set_gemm_planner) that times cuBLASLt algorithms on that GPU.
[[nodiscard]] Result<std::string> plan_device_name(const std::string& device);

// Before `serve|run|bench` load a built engine directory: re-plans it when plan.json was made for
// another device (warning naming both, never refusing) and, on a GPU, hands its GEMM algorithm
// table to the CUDA backend. Anything else at `path` (HF dir, GGUF, a checkpoint) is left alone.
// Plan problems are warnings: the run goes on with the cuBLASLt heuristic.
void use_engine_plan(const std::string& path, const std::string& device);

// path: an HF directory, kiln dir or .gguf file; opts.device picks the backend. Calls
// use_engine_plan first.
Result<std::unique_ptr<ModelExecutor>> load_executor(const std::string& path, const LoadOptions& opts);
// The same with a model already on the host (verb run loads it first for its config).
Result<std::unique_ptr<ModelExecutor>> make_executor(std::shared_ptr<const Model> model, const LoadOptions& opts);

}  // namespace kiln::cli
