#include "cli/executor_factory.h"

#include <cctype>

#ifdef KILN_HAVE_CUDA
#include "backend/cuda/cuda_executor.h"
#endif

namespace kiln::cli {
namespace {

bool is_cuda(const std::string& d) { return d == "cuda" || d.rfind("cuda:", 0) == 0; }

}  // namespace

Status check_device(const std::string& device) {
  if (device == "cpu") return Status::ok();
  if (is_cuda(device)) {
    if (device.size() > 5) {
      const std::string n = device.substr(5);
      if (n.empty() || n.size() > 3)
        return Status::error("--device " + device + ": expected cuda:N with N a device index");
      for (char ch : n)
        if (!std::isdigit(static_cast<unsigned char>(ch)))
          return Status::error("--device " + device + ": expected cuda:N with N a device index");
    }
#ifdef KILN_HAVE_CUDA
    return Status::ok();
#else
    return Status::error("--device " + device + ": this kiln was built without the CUDA backend");
#endif
  }
  return Status::error("--device must be cpu, cuda or cuda:N, got '" + device + "'");
}

Result<std::unique_ptr<ModelExecutor>> load_executor(const std::string& path, const LoadOptions& opts) {
  KILN_RETURN_IF_ERROR(check_device(opts.device));
  KILN_ASSIGN_OR_RETURN(auto model, load_model(path));
  return make_executor(std::move(model), opts);
}

Result<std::unique_ptr<ModelExecutor>> make_executor(std::shared_ptr<const Model> model, const LoadOptions& opts) {
  KILN_RETURN_IF_ERROR(check_device(opts.device));
  if (is_cuda(opts.device)) {
#ifdef KILN_HAVE_CUDA
    KILN_ASSIGN_OR_RETURN(auto ex, cuda::CudaExecutor::create(std::move(model), opts));
    std::unique_ptr<ModelExecutor> base = std::move(ex);
    return base;
#endif
  }
  std::unique_ptr<ModelExecutor> ex = make_cpu_executor(std::move(model), opts);
  return ex;
}

}  // namespace kiln::cli
