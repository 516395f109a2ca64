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

// OK when `device` is "cpu", "cuda" or "cuda:N" and this build can run it; the error names the
// accepted values or says the CUDA backend is not built in.
[[nodiscard]] Status check_device(const std::string& device);

// path: an HF directory, kiln dir or .gguf file; opts.device picks the backend.
Result<std::unique_ptr<ModelExecutor>> load_executor(const std::string& path, const LoadOptions& opts);
// The same with a model already on the host (verb run loads it first for its config).
Result<std::unique_ptr<ModelExecutor>> make_executor(std::shared_ptr<const Model> model, const LoadOptions& opts);

}  // namespace kiln::cli
