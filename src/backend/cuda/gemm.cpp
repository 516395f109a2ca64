#include "backend/cuda/gemm.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cublasLt.h>

#include "backend/cuda/fp8.h"
#include "backend/cuda/kernels.h"

namespace kiln::cuda {
namespace {

// The few entry points kiln uses, resolved once per process.
struct LtApi {
  decltype(&cublasLtCreate) create = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
  std::string path, error;
};

const LtApi& lt_api() {
  static LtApi api = [] {
    LtApi a;
    std::vector<std::string> candidates = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
    // Where the device images and pip wheels keep it, besides the loader's own search path.
    const char* dirs[] = {"/usr/local/cuda/lib64/", "/usr/local/cuda/targets/x86_64-linux/lib/",
                          "/usr/lib/x86_64-linux-gnu/",
                          "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib/",
                          "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cublas/lib/",
                          "/usr/local/lib/python3.12/dist-packages/nvidia/cu13/lib/",
                          "/usr/local/lib/python3.12/dist-packages/nvidia/cublas/lib/"};
    void* lib = nullptr;
    if (const char* env = std::getenv("KILN_CUBLASLT")) {
      lib = dlopen(env, RTLD_NOW | RTLD_LOCAL);
      if (lib) a.path = env;
    }
    for (const auto& name : candidates) {
      if (lib) break;
      if ((lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL))) a.path = name;
      for (const char* d : dirs) {
        if (lib) break;
        std::string full = std::string(d) + name;
        if ((lib = dlopen(full.c_str(), RTLD_NOW | RTLD_LOCAL))) a.path = full;
      }
    }
    if (!lib) {
      a.error = "cannot load libcublasLt (tried libcublasLt.so.13/.so.12/.so on the loader path and the CUDA and "
                "pip locations; set LD_LIBRARY_PATH or KILN_CUBLASLT=/path/to/libcublasLt.so.13)";
      return a;
    }
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (!fn && a.error.empty()) a.error = a.path + ": missing symbol " + name;
    };
    sym(a.create, "cublasLtCreate");
    sym(a.desc_create, "cublasLtMatmulDescCreate");
    sym(a.desc_set, "cublasLtMatmulDescSetAttribute");
    sym(a.layout_create, "cublasLtMatrixLayoutCreate");
    sym(a.pref_create, "cublasLtMatmulPreferenceCreate");
    sym(a.pref_set, "cublasLtMatmulPreferenceSetAttribute");
    sym(a.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    sym(a.matmul, "cublasLtMatmul");
    return a;
  }();
  return api;
}

}  // namespace

struct Gemm::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool found = true;
};

Gemm::~Gemm() {
  // Descriptors and the handle live as long as the process's executors; the driver frees them at
  // exit. (Destroy entry points are not resolved to keep the table small.)
  if (workspace_) cudaFree(workspace_);
  if (d_one_) cudaFree(d_one_);
  for (auto& [k, p] : plans_) delete p;
  for (auto& [k, p] : plans_fp8_) delete p;
}

Status Gemm::init(size_t workspace_bytes) {
  const LtApi& api = lt_api();
  if (!api.error.empty()) return Status::error(api.error);
  lib_path_ = api.path;
  if (const char* g = std::getenv("KILN_GEMV_MAX_M")) gemv_max_m_ = std::atoi(g);
  // Hopper's FP8 tensor cores accumulate in reduced precision unless cuBLASLt promotes partial
  // sums; fast accumulation (no promotion) is what TensorRT-LLM's FP8 GEMMs use. KILN_FP8_FAST_ACCUM=0
  // asks for the promoted, slower form.
  if (const char* g = std::getenv("KILN_FP8_FAST_ACCUM")) fast_accum_ = std::string(g) != "0";
  cublasLtHandle_t h = nullptr;
  if (api.create(&h) != CUBLAS_STATUS_SUCCESS) return Status::error("cublasLtCreate failed (" + api.path + ")");
  handle_ = h;
  workspace_bytes_ = workspace_bytes;
  if (cudaMalloc(&workspace_, workspace_bytes) != cudaSuccess)
    return Status::error("CUDA out of memory: cuBLASLt workspace of " + std::to_string(workspace_bytes >> 20) + " MiB");
  return Status::ok();
}

const Gemm::Plan& Gemm::plan_for(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool y_f32) {
  auto key = std::make_tuple(n, ldx, N, K, ldy, y_f32);
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  const LtApi& api = lt_api();
  auto* p = new Plan;
  // Column-major view: Y^T[N, n] = W[K, N]^T (op T) * X^T[K, n].
  KILN_CHECK(api.desc_create(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
  KILN_CHECK(api.layout_create(&p->a, CUDA_R_16BF, uint64_t(K), uint64_t(N), K) == CUBLAS_STATUS_SUCCESS);
  KILN_CHECK(api.layout_create(&p->b, CUDA_R_16BF, uint64_t(K), uint64_t(n), ldx) == CUBLAS_STATUS_SUCCESS);
  KILN_CHECK(api.layout_create(&p->c, y_f32 ? CUDA_R_32F : CUDA_R_16BF, uint64_t(N), uint64_t(n), ldy) ==
             CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulPreference_t pref = nullptr;
  api.pref_create(&pref);
  uint64_t ws = workspace_bytes_;
  api.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const cublasStatus_t st = api.heuristic(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b, p->c, p->c,
                                          pref, 1, &res, &found);
  KILN_CHECK_MSG(st == CUBLAS_STATUS_SUCCESS && found > 0,
                 "cuBLASLt has no BF16 algorithm for n=" + std::to_string(n) + " N=" + std::to_string(N) +
                     " K=" + std::to_string(K));
  p->algo = res.algo;
  plans_[key] = p;
  return *p;
}

Gemm::Plan* Gemm::plan_fp8(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool outer_vec) {
  auto key = std::make_tuple(n, ldx, N, K, ldy, outer_vec);
  auto it = plans_fp8_.find(key);
  if (it != plans_fp8_.end()) return it->second;
  const LtApi& api = lt_api();
  auto* p = new Plan;
  // Same column-major view as the BF16 plan (TN: the only layout Hopper's FP8 GEMMs take).
  KILN_CHECK(api.desc_create(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
  const int8_t fast = fast_accum_ ? 1 : 0;
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast));
  if (outer_vec) {
    // A = W: one scale per row of op(A) (output channel); B = x: one per column of B (token).
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode));
    api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode));
  }
  // Scale pointers are set per call (each weight has its own); heuristics need them set once.
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &d_one_, sizeof(d_one_));
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &d_one_, sizeof(d_one_));
  KILN_CHECK(api.layout_create(&p->a, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(N), K) == CUBLAS_STATUS_SUCCESS);
  KILN_CHECK(api.layout_create(&p->b, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(n), ldx) == CUBLAS_STATUS_SUCCESS);
  KILN_CHECK(api.layout_create(&p->c, CUDA_R_16BF, uint64_t(N), uint64_t(n), ldy) == CUBLAS_STATUS_SUCCESS);
  cublasLtMatmulPreference_t pref = nullptr;
  api.pref_create(&pref);
  uint64_t ws = workspace_bytes_;
  api.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const cublasStatus_t st = api.heuristic(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b, p->c, p->c,
                                          pref, 1, &res, &found);
  p->found = st == CUBLAS_STATUS_SUCCESS && found > 0;
  p->algo = res.algo;
  plans_fp8_[key] = p;
  return p;
}

void Gemm::linear_fp8(const void* xq, int64_t n, int64_t ldx, const float* x_scales, bool x_per_row, const void* wq,
                      int64_t N, int64_t K, const float* w_scales, bool w_per_row, void* y, int64_t ldy,
                      cudaStream_t stream) {
  if (n == 0) return;
  if (!d_one_) {
    const float one = 1.0f;
    KILN_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_one_), sizeof(float)) == cudaSuccess);
    KILN_CHECK(cudaMemcpy(d_one_, &one, sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  const LtApi& api = lt_api();
  const bool vec = x_per_row || w_per_row;
  Plan* p = plan_fp8(n, ldx, N, K, ldy, vec);
  bool epilogue = false;
  if (vec && !p->found) {
    // No outer-vector algorithm here: unit scales in the GEMM, both scales in the epilogue.
    p = plan_fp8(n, ldx, N, K, ldy, false);
    epilogue = true;
  }
  KILN_CHECK_MSG(p->found, "cuBLASLt has no FP8 E4M3 algorithm for n=" + std::to_string(n) + " N=" +
                               std::to_string(N) + " K=" + std::to_string(K) + " (needs sm_89 or newer)");
  // Outer-vector mode reads [N] and [n] vectors; a per-tensor side is broadcast by the caller's
  // scale pointer being read as a vector, so it needs the vector form too: use the epilogue then.
  if (vec && !epilogue && !(x_per_row && w_per_row)) {
    p = plan_fp8(n, ldx, N, K, ldy, false);
    epilogue = true;
  }
  const float* a_scale = epilogue ? d_one_ : w_scales;
  const float* b_scale = epilogue ? d_one_ : x_scales;
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale));
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale));
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t st = api.matmul(static_cast<cublasLtHandle_t>(handle_), p->desc, &alpha, wq, p->a, xq, p->b,
                                       &beta, y, p->c, y, p->c, &p->algo, workspace_, workspace_bytes_, stream);
  KILN_CHECK_MSG(st == CUBLAS_STATUS_SUCCESS, "cublasLtMatmul (FP8) failed: status " + std::to_string(int(st)));
  if (epilogue)
    launch_scale_outer(static_cast<bf16_t*>(y), ldy, int32_t(n), int32_t(N), x_scales, x_per_row, w_scales, w_per_row,
                       stream);
}

void Gemm::linear(const void* x, int64_t n, int64_t ldx, const void* w, int64_t N, int64_t K, void* y, int64_t ldy,
                  bool y_f32, cudaStream_t stream) {
  if (n == 0) return;
  if (n <= gemv_max_m_ && launch_gemv(static_cast<const bf16_t*>(x), ldx, int32_t(n), static_cast<const bf16_t*>(w),
                                      int32_t(N), int32_t(K), y, ldy, y_f32, stream))
    return;
  const Plan& p = plan_for(n, ldx, N, K, ldy, y_f32);
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t st =
      lt_api().matmul(static_cast<cublasLtHandle_t>(handle_), p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c,
                      &p.algo, workspace_, workspace_bytes_, stream);
  KILN_CHECK_MSG(st == CUBLAS_STATUS_SUCCESS, "cublasLtMatmul failed: status " + std::to_string(int(st)));
}

}  // namespace kiln::cuda
