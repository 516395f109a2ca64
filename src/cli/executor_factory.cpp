#include "cli/executor_factory.h"

#include <cctype>
#include <cstdlib>

#include "build/build.h"
#include "core/file.h"
#include "core/log.h"

#ifdef KILN_HAVE_CUDA
#include "backend/cuda/cuda_executor.h"
#include "backend/cuda/gemm_plan.h"
#endif

namespace kiln::cli {
namespace {

bool is_cuda(const std::string& d) { return d == "cuda" || d.rfind("cuda:", 0) == 0; }

// "auto": the first GPU when this build has CUDA and one is visible, else the CPU.
std::string plan_device(const std::string& d) {
  if (d != "auto") return d;
#ifdef KILN_HAVE_CUDA
  if (cuda::gpu_count() > 0) return "cuda";
#endif
  return "cpu";
}

}  // namespace

int cuda_index(const std::string& d) { return d.size() > 5 ? std::atoi(d.c_str() + 5) : 0; }

Status check_device(const std::string& device) {
  if (device == "cpu" || device == "auto") return Status::ok();
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
  return Status::error("--device must be auto, cpu, cuda or cuda:N, got '" + device + "'");
}

std::string resolve_device(const std::string& device) {
  if (device != "auto") return device;
#ifdef KILN_HAVE_CUDA
  if (cuda::device_available(nullptr)) return "cuda";
#endif
  return "cpu";
}

Result<std::string> plan_device_name(const std::string& device) {
  const std::string dev = plan_device(device);
  KILN_RETURN_IF_ERROR(check_device(dev));
  if (!is_cuda(dev)) return std::string("cpu");
#ifdef KILN_HAVE_CUDA
  const int idx = cuda_index(dev);
  if (idx >= cuda::gpu_count())
    return Status::error("--device " + dev + ": no such CUDA device (" + std::to_string(cuda::gpu_count()) + " visible)");
  KILN_ASSIGN_OR_RETURN(std::string name, cuda::gpu_name(idx));
  set_gemm_planner([idx](const KilnDirInfo& info, EnginePlan* plan) {
    cuda::GemmPlanOptions o;
    o.device = idx;
    return cuda::plan_gemm_algorithms(info, plan, o);
  });
  return name;
#else
  return Status::error("--device " + dev + ": this kiln was built without the CUDA backend");
#endif
}

void use_engine_plan(const std::string& path, const std::string& given) {
  if (!is_kiln_dir(path) || !file_exists(path + "/plan.json")) return;
  const std::string device = plan_device(given);
  if (!check_device(device)) return;  // the executor reports a bad --device
#ifdef KILN_HAVE_CUDA
  if (is_cuda(device) && cuda::gpu_count() <= cuda_index(device)) return;  // the executor says "no CUDA device"
#endif
  auto name = plan_device_name(device);
  if (!name) {
    log_warn(path + ": cannot plan for " + device + " (" + name.message() + "); GEMMs use the cuBLASLt heuristic");
    return;
  }
  PlanCheck check;
#ifdef KILN_HAVE_CUDA
  const int idx = cuda_index(device);
  if (is_cuda(device))
    check = [idx](const EnginePlan& p) -> std::string {
      auto t = cuda::usable_gemm_table(p.gemm_algorithms, idx);
      return t ? std::string() : t.message();
    };
#endif
  auto plan = engine_plan_for_run(path, *name, check);
  if (!plan) {
    log_warn(path + ": " + plan.message() + "; running without the engine's plan");
    return;
  }
#ifdef KILN_HAVE_CUDA
  if (is_cuda(device) && *plan) {
    auto t = cuda::usable_gemm_table((*plan)->gemm_algorithms, idx);
    if (!t) {
      log_warn(path + ": " + t.message() + "; GEMMs use the cuBLASLt heuristic");
      return;
    }
    log_info(path + ": " + std::to_string((*t)->algos.size()) + " planned GEMM algorithms for " + *name);
    cuda::set_process_gemm_table(*t);
  }
#endif
}

Result<std::unique_ptr<ModelExecutor>> load_executor(const std::string& path, const LoadOptions& opts) {
  KILN_RETURN_IF_ERROR(check_device(opts.device));
  use_engine_plan(path, opts.device);
  KILN_ASSIGN_OR_RETURN(auto model, load_model(path));
  return make_executor(std::move(model), opts);
}

Result<std::unique_ptr<ModelExecutor>> make_executor(std::shared_ptr<const Model> model, const LoadOptions& given) {
  KILN_RETURN_IF_ERROR(check_device(given.device));
  LoadOptions opts = given;
  opts.device = resolve_device(given.device);
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
