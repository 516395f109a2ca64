#include "backend/cuda/gemm.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include <cublasLt.h>

#include "backend/cuda/fp8.h"
#include "backend/cuda/kernels.h"
#include "core/log.h"

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
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
  decltype(&cublasLtMatmulAlgoCheck) algo_check = nullptr;
  decltype(&cublasLtGetVersion) get_version = nullptr;
  // Algorithm search beyond the heuristic (the GEMM planner's split-K variants and enumeration).
  decltype(&cublasLtMatmulAlgoGetIds) algo_get_ids = nullptr;
  decltype(&cublasLtMatmulAlgoInit) algo_init = nullptr;
  decltype(&cublasLtMatmulAlgoCapGetAttribute) cap_get = nullptr;
  decltype(&cublasLtMatmulAlgoConfigSetAttribute) config_set = nullptr;
  decltype(&cublasLtMatmulAlgoConfigGetAttribute) config_get = nullptr;
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
    sym(a.pref_destroy, "cublasLtMatmulPreferenceDestroy");
    sym(a.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    sym(a.matmul, "cublasLtMatmul");
    sym(a.algo_check, "cublasLtMatmulAlgoCheck");
    sym(a.get_version, "cublasLtGetVersion");
    sym(a.algo_get_ids, "cublasLtMatmulAlgoGetIds");
    sym(a.algo_init, "cublasLtMatmulAlgoInit");
    sym(a.cap_get, "cublasLtMatmulAlgoCapGetAttribute");
    sym(a.config_set, "cublasLtMatmulAlgoConfigSetAttribute");
    sym(a.config_get, "cublasLtMatmulAlgoConfigGetAttribute");
    return a;
  }();
  return api;
}

// cuBLASLt's first `count` candidates for these descriptors within `ws` bytes of workspace; the
// preference object lives only for the query.
cublasStatus_t lt_heuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                            cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, uint64_t ws, int count,
                            cublasLtMatmulHeuristicResult_t* res, int* found) {
  const LtApi& api = lt_api();
  cublasLtMatmulPreference_t pref = nullptr;
  api.pref_create(&pref);
  api.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  const cublasStatus_t st = api.heuristic(h, desc, a, b, c, c, pref, count, res, found);
  api.pref_destroy(pref);
  return st;
}

}  // namespace

static_assert(sizeof(cublasLtMatmulAlgo_t) == sizeof(GemmAlgo), "cublasLtMatmulAlgo_t is 64 bytes");

std::string_view gemm_kind_name(GemmKind k) {
  switch (k) {
    case GemmKind::kBf16: return "bf16";
    case GemmKind::kBf16F32Out: return "bf16_f32out";
    case GemmKind::kFp8: return "fp8";
    case GemmKind::kFp8Acc: return "fp8_acc";
  }
  return "?";
}

std::optional<GemmKind> gemm_kind_from_name(std::string_view s) {
  for (GemmKind k : {GemmKind::kBf16, GemmKind::kBf16F32Out, GemmKind::kFp8, GemmKind::kFp8Acc})
    if (gemm_kind_name(k) == s) return k;
  return std::nullopt;
}

std::string gemm_key_string(const GemmKey& k) {
  return std::string(gemm_kind_name(k.kind)) + " n=" + std::to_string(k.n) + " N=" + std::to_string(k.N) +
         " K=" + std::to_string(k.K) + (k.outer_vec ? " outer_vec" : "");
}

std::string gemm_algo_hex(const GemmAlgo& a) {
  static const char* kDigits = "0123456789abcdef";
  const auto* b = reinterpret_cast<const uint8_t*>(a.data.data());
  std::string s(128, '0');
  for (size_t i = 0; i < 64; ++i) {
    s[2 * i] = kDigits[b[i] >> 4];
    s[2 * i + 1] = kDigits[b[i] & 15];
  }
  return s;
}

Result<GemmAlgo> gemm_algo_from_hex(std::string_view hex) {
  if (hex.size() != 128)
    return Status::error("algorithm must be 128 hex digits (cublasLtMatmulAlgo_t's 64 bytes), got " +
                         std::to_string(hex.size()) + " characters");
  GemmAlgo a;
  auto* b = reinterpret_cast<uint8_t*>(a.data.data());
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < 64; ++i) {
    const int hi = digit(hex[2 * i]), lo = digit(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return Status::error("algorithm: '" + std::string(hex.substr(2 * i, 2)) + "' is not hex");
    b[i] = uint8_t(hi * 16 + lo);
  }
  return a;
}

GemmAlgoConfig gemm_algo_config(const GemmAlgo& algo) {
  GemmAlgoConfig c;
  const LtApi& api = lt_api();
  if (!api.error.empty()) return c;
  cublasLtMatmulAlgo_t a;
  std::memcpy(&a, algo.data.data(), sizeof(a));
  size_t w = 0;
  api.config_get(&a, CUBLASLT_ALGO_CONFIG_ID, &c.id, sizeof(c.id), &w);
  api.config_get(&a, CUBLASLT_ALGO_CONFIG_TILE_ID, &c.tile, sizeof(c.tile), &w);
  api.config_get(&a, CUBLASLT_ALGO_CONFIG_STAGES_ID, &c.stages, sizeof(c.stages), &w);
  api.config_get(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &c.split_k, sizeof(c.split_k), &w);
  api.config_get(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &c.reduction, sizeof(c.reduction), &w);
  api.config_get(&a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &c.swizzle, sizeof(c.swizzle), &w);
  api.config_get(&a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &c.custom, sizeof(c.custom), &w);
  api.config_get(&a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &c.cluster, sizeof(c.cluster), &w);
  return c;
}

std::string gemm_algo_config_string(const GemmAlgoConfig& c) {
  return "id " + std::to_string(c.id) + " tile " + std::to_string(c.tile) + " stages " + std::to_string(c.stages) +
         " splitK " + std::to_string(c.split_k) + "/" + std::to_string(c.reduction) + " swizzle " +
         std::to_string(c.swizzle) + " custom " + std::to_string(c.custom) + " cluster " + std::to_string(c.cluster);
}

Result<GemmAlgoTable> gemm_table_from_json(const nlohmann::json& j) {
  const std::string where = "plan.json: gemm_algorithms";
  if (!j.is_object()) return Status::error(where + " must be an object");
  GemmAlgoTable t;
  if (j.empty()) return t;
  auto v = j.find("cublaslt_version");
  if (v == j.end() || !v->is_number_integer() || v->get<int64_t>() < 0)
    return Status::error(where + ": cublaslt_version must be a non-negative integer");
  t.cublaslt_version = size_t(v->get<int64_t>());
  auto d = j.find("device_name");
  if (d == j.end() || !d->is_string()) return Status::error(where + ": device_name must be a string");
  t.device_name = d->get<std::string>();
  auto es = j.find("entries");
  if (es == j.end() || !es->is_array()) return Status::error(where + ": entries must be a list");
  for (size_t i = 0; i < es->size(); ++i) {
    const nlohmann::json& e = (*es)[i];
    const std::string at = where + ".entries[" + std::to_string(i) + "]";
    if (!e.is_object()) return Status::error(at + " must be an object");
    GemmKey key;
    auto kind = e.find("kind");
    if (kind == e.end() || !kind->is_string()) return Status::error(at + ": kind must be a string");
    auto k = gemm_kind_from_name(kind->get<std::string>());
    if (!k) return Status::error(at + ": kind '" + kind->get<std::string>() + "' is not bf16, bf16_f32out, fp8 or fp8_acc");
    key.kind = *k;
    for (auto [name, dst] : {std::pair<const char*, int64_t*>{"M", &key.n}, {"N", &key.N}, {"K", &key.K}}) {
      auto f = e.find(name);
      if (f == e.end() || !f->is_number_integer() || f->get<int64_t>() < 1)
        return Status::error(at + ": " + name + " must be a positive integer");
      *dst = f->get<int64_t>();
    }
    if (auto ov = e.find("outer_vec"); ov != e.end()) {
      if (!ov->is_boolean()) return Status::error(at + ": outer_vec must be true or false");
      key.outer_vec = ov->get<bool>();
    }
    auto algo = e.find("algo");
    if (algo == e.end() || !algo->is_string()) return Status::error(at + ": algo must be a hex string");
    auto a = gemm_algo_from_hex(algo->get<std::string>());
    if (!a) return Status::error(at + ": " + a.message());
    t.algos[key] = *a;
  }
  return t;
}

std::string gemm_table_mismatch(const GemmAlgoTable& t, size_t version, const std::string& device_name) {
  if (t.cublaslt_version != version)
    return "GEMM algorithms were chosen with cuBLASLt " + std::to_string(t.cublaslt_version) + ", this is " +
           std::to_string(version);
  if (t.device_name != device_name)
    return "GEMM algorithms were chosen on '" + t.device_name + "', this GPU is '" + device_name + "'";
  return "";
}

size_t cublaslt_version() {
  const LtApi& api = lt_api();
  return api.error.empty() ? api.get_version() : 0;
}

namespace {
std::mutex g_table_mu;
std::shared_ptr<const GemmAlgoTable> g_table;
}  // namespace

void set_process_gemm_table(std::shared_ptr<const GemmAlgoTable> table) {
  std::lock_guard<std::mutex> lock(g_table_mu);
  g_table = std::move(table);
}

std::shared_ptr<const GemmAlgoTable> process_gemm_table() {
  std::lock_guard<std::mutex> lock(g_table_mu);
  return g_table;
}

struct Gemm::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool found = true;
};

Gemm::~Gemm() {
  // Descriptors and the handle live as long as the process's executors; the driver frees them at
  // exit. (Their destroy entry points are not resolved to keep the table small; the preference's is,
  // since lt_heuristic makes one per query.)
  if (workspace_) cudaFree(workspace_);
  if (d_one_) cudaFree(d_one_);
  for (auto& [k, p] : plans_) delete p;
  for (auto& [k, p] : plans_fp8_) delete p;
  for (auto& [k, p] : plans_fp8_acc_) delete p;
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
  if (!table_) table_ = process_gemm_table();
  return Status::ok();
}

void Gemm::ensure_one() {
  if (d_one_) return;
  const float one = 1.0f;
  KILN_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_one_), sizeof(float)) == cudaSuccess);
  KILN_CHECK(cudaMemcpy(d_one_, &one, sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
}

// Descriptors and layouts of one GEMM; the algorithm is chosen by choose().
Gemm::Plan* Gemm::make_plan(const GemmKey& key, int64_t ldx, int64_t ldy) {
  const LtApi& api = lt_api();
  auto* p = new Plan;
  const bool fp8 = gemm_kind_fp8(key.kind);
  // Column-major view: Y^T[N, n] = W[K, N]^T (op T) * X^T[K, n] (TN: the only layout Hopper's FP8
  // GEMMs take).
  KILN_CHECK(api.desc_create(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
  if (fp8) {
    ensure_one();
    const int8_t fast = fast_accum_ ? 1 : 0;
    api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast));
    if (key.outer_vec) {
      // A = W: one scale per row of op(A) (output channel); B = x: one per column of B (token).
      const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
      api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode));
      api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode));
    }
    // Scale pointers are set per call (each weight has its own); heuristics need them set once.
    api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &d_one_, sizeof(d_one_));
    api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &d_one_, sizeof(d_one_));
  }
  const cudaDataType_t in = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  const cudaDataType_t out = gemm_kind_f32_out(key.kind) ? CUDA_R_32F : CUDA_R_16BF;
  KILN_CHECK(api.layout_create(&p->a, in, uint64_t(key.K), uint64_t(key.N), key.K) == CUBLAS_STATUS_SUCCESS);
  KILN_CHECK(api.layout_create(&p->b, in, uint64_t(key.K), uint64_t(key.n), ldx) == CUBLAS_STATUS_SUCCESS);
  KILN_CHECK(api.layout_create(&p->c, out, uint64_t(key.N), uint64_t(key.n), ldy) == CUBLAS_STATUS_SUCCESS);
  return p;
}

bool Gemm::check(Plan* p, const GemmAlgo& algo) {
  cublasLtMatmulAlgo_t a;
  std::memcpy(&a, algo.data.data(), sizeof(a));
  cublasLtMatmulHeuristicResult_t res{};
  const cublasStatus_t st = lt_api().algo_check(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b, p->c,
                                                p->c, &a, &res);
  return st == CUBLAS_STATUS_SUCCESS && res.workspaceSize <= workspace_bytes_;
}

void Gemm::choose(Plan* p, const GemmKey& key) {
  if (table_ && !table_->algos.empty()) {
    auto exact = table_->algos.find(key);
    if (exact != table_->algos.end()) {
      if (check(p, exact->second)) {
        std::memcpy(&p->algo, exact->second.data.data(), sizeof(p->algo));
        p->found = true;
        ++stats_.table;
        return;
      }
      ++stats_.rejected;
      log_warn("gemm: cublasLtMatmulAlgoCheck rejects the planned algorithm for " + gemm_key_string(key) +
               "; using the heuristic's");
    } else {
      // Between planned buckets: the nearest planned M (by ratio) of the same weight shape, if the
      // library accepts its algorithm for this M.
      const GemmAlgo* best = nullptr;
      double best_d = 0;
      for (const auto& [k, a] : table_->algos) {
        if (k.kind != key.kind || k.N != key.N || k.K != key.K || k.outer_vec != key.outer_vec) continue;
        const double d = std::fabs(std::log(double(k.n) / double(key.n)));
        if (!best || d < best_d) best = &a, best_d = d;
      }
      if (best && check(p, *best)) {
        std::memcpy(&p->algo, best->data.data(), sizeof(p->algo));
        p->found = true;
        ++stats_.nearest;
        return;
      }
      if (best) log_debug("gemm: the nearest planned algorithm does not fit " + gemm_key_string(key));
    }
  }
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const auto t0 = std::chrono::steady_clock::now();
  const cublasStatus_t st = lt_heuristic(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b, p->c,
                                         workspace_bytes_, 1, &res, &found);
  stats_.heuristic_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  p->found = st == CUBLAS_STATUS_SUCCESS && found > 0;
  p->algo = res.algo;
  ++stats_.heuristic;
}

const Gemm::Plan& Gemm::plan_for(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool y_f32) {
  auto key = std::make_tuple(n, ldx, N, K, ldy, y_f32);
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  const GemmKey gk{y_f32 ? GemmKind::kBf16F32Out : GemmKind::kBf16, n, N, K, false};
  Plan* p = make_plan(gk, ldx, ldy);
  choose(p, gk);
  KILN_CHECK_MSG(p->found, "cuBLASLt has no BF16 algorithm for n=" + std::to_string(n) + " N=" + std::to_string(N) +
                               " K=" + std::to_string(K));
  plans_[key] = p;
  return *p;
}

Gemm::Plan* Gemm::plan_fp8(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool outer_vec,
                           bool f32_acc) {
  auto& plans = f32_acc ? plans_fp8_acc_ : plans_fp8_;
  auto key = std::make_tuple(n, ldx, N, K, ldy, outer_vec);
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  const GemmKey gk{f32_acc ? GemmKind::kFp8Acc : GemmKind::kFp8, n, N, K, outer_vec};
  Plan* p = make_plan(gk, ldx, ldy);
  choose(p, gk);
  plans[key] = p;
  return p;
}

bool Gemm::fp8_accumulate_ok(int64_t n, int64_t ldx, int64_t N, int64_t K, int64_t ldy, bool x_per_row,
                             bool w_per_row) {
  return n > 0 && x_per_row == w_per_row && plan_fp8(n, ldx, N, K, ldy, x_per_row, true)->found;
}

void Gemm::linear_fp8_accumulate(const void* xq, int64_t n, int64_t ldx, const float* x_scales, bool x_per_row,
                                 const void* wq, int64_t N, int64_t K, const float* w_scales, bool w_per_row,
                                 float* y, int64_t ldy, cudaStream_t stream) {
  Plan* p = n > 0 && x_per_row == w_per_row ? plan_fp8(n, ldx, N, K, ldy, x_per_row, true) : nullptr;
  KILN_CHECK_MSG(p && p->found, "linear_fp8_accumulate: no cuBLASLt algorithm (call fp8_accumulate_ok first)");
  run_fp8(p, w_scales, x_scales, 1.0f, wq, xq, y, stream, "FP8, f32 accumulate");
}

void Gemm::run_fp8(Plan* p, const float* a_scale, const float* b_scale, float beta, const void* wq, const void* xq,
                   void* y, cudaStream_t stream, const char* what) {
  const LtApi& api = lt_api();
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale));
  api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale));
  const float alpha = 1.0f;
  const cublasStatus_t st = api.matmul(static_cast<cublasLtHandle_t>(handle_), p->desc, &alpha, wq, p->a, xq, p->b,
                                       &beta, y, p->c, y, p->c, &p->algo, workspace_, workspace_bytes_, stream);
  KILN_CHECK_MSG(st == CUBLAS_STATUS_SUCCESS,
                 std::string("cublasLtMatmul (") + what + ") failed: status " + std::to_string(int(st)));
}

std::vector<GemmAlgo> Gemm::heuristic_algorithms(const GemmKey& key, int max_count) {
  std::vector<GemmAlgo> out;
  if (max_count < 1) return out;
  std::unique_ptr<Plan> p(make_plan(key, key.K, key.N));
  std::vector<cublasLtMatmulHeuristicResult_t> res(static_cast<size_t>(max_count));
  int found = 0;
  const cublasStatus_t st = lt_heuristic(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b, p->c,
                                         workspace_bytes_, max_count, res.data(), &found);
  if (st != CUBLAS_STATUS_SUCCESS) return out;
  for (int i = 0; i < found; ++i) {
    if (res[size_t(i)].state != CUBLAS_STATUS_SUCCESS) continue;
    GemmAlgo a;
    std::memcpy(a.data.data(), &res[size_t(i)].algo, sizeof(a));
    out.push_back(a);
  }
  return out;
}

bool Gemm::algorithm_ok(const GemmKey& key, const GemmAlgo& algo) {
  std::unique_ptr<Plan> p(make_plan(key, key.K, key.N));
  return check(p.get(), algo);
}

std::vector<GemmAlgo> Gemm::split_k_variants(const GemmKey& key, const GemmAlgo& algo, const std::vector<int>& splits,
                                             std::string* why) {
  std::vector<GemmAlgo> out;
  auto say = [&](const std::string& m) {
    if (why) *why = m;
    return out;
  };
  const LtApi& api = lt_api();
  cublasLtMatmulAlgo_t base;
  std::memcpy(&base, algo.data.data(), sizeof(base));
  int32_t support = 0;
  uint32_t mask = 0;
  size_t w = 0;
  if (api.cap_get(&base, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &support, sizeof(support), &w) != CUBLAS_STATUS_SUCCESS)
    return say("CUBLASLT_ALGO_CAP_SPLITK_SUPPORT unreadable");
  if (!support) return say("no split-K support (CUBLASLT_ALGO_CAP_SPLITK_SUPPORT 0)");
  if (api.cap_get(&base, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &mask, sizeof(mask), &w) != CUBLAS_STATUS_SUCCESS)
    return say("CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK unreadable");
  // Partial sums in f32: the result then differs from the unsplit GEMM by f32 order only. The
  // in-place and output-type schemes add partial sums in the output type (bf16: one extra rounding
  // per split), taken only where the output is f32 anyway.
  uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
  if (mask & CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE) scheme = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  else if (gemm_kind_f32_out(key.kind) && (mask & CUBLASLT_REDUCTION_SCHEME_INPLACE))
    scheme = CUBLASLT_REDUCTION_SCHEME_INPLACE;
  if (scheme == CUBLASLT_REDUCTION_SCHEME_NONE)
    return say("reduction schemes 0x" + std::to_string(mask) + " offer no f32 partial sums");
  std::unique_ptr<Plan> p(make_plan(key, key.K, key.N));
  std::string refused;
  for (int s : splits) {
    if (s < 2 || key.K / s < 64) continue;
    cublasLtMatmulAlgo_t a = base;
    const int32_t sk = s;
    if (api.config_set(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &sk, sizeof(sk)) != CUBLAS_STATUS_SUCCESS) continue;
    if (api.config_set(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme)) != CUBLAS_STATUS_SUCCESS)
      continue;
    cublasLtMatmulHeuristicResult_t res{};
    const cublasStatus_t st = lt_api().algo_check(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b, p->c,
                                                  p->c, &a, &res);
    if (st != CUBLAS_STATUS_SUCCESS || res.workspaceSize > workspace_bytes_) {
      refused += " " + std::to_string(s) + ":" +
                 (st != CUBLAS_STATUS_SUCCESS ? "status " + std::to_string(int(st))
                                              : std::to_string(res.workspaceSize >> 20) + "MiB");
      continue;
    }
    GemmAlgo g;
    std::memcpy(g.data.data(), &a, sizeof(g));
    out.push_back(g);
  }
  if (out.empty()) return say("cublasLtMatmulAlgoCheck refuses every split (split:reason)" + refused);
  return out;
}

std::vector<GemmAlgo> Gemm::enumerated_algorithms(const GemmKey& key, int max_count, std::string* why) {
  std::vector<GemmAlgo> out;
  const LtApi& api = lt_api();
  auto h = static_cast<cublasLtHandle_t>(handle_);
  const cudaDataType_t in = gemm_kind_fp8(key.kind) ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  const cudaDataType_t o = gemm_kind_f32_out(key.kind) ? CUDA_R_32F : CUDA_R_16BF;
  std::vector<int> ids(512);
  int n_ids = 0, n_init = 0, n_checked = 0;
  std::map<int, int> refusals;  // cublasStatus_t -> count
  auto report = [&] {
    if (!why) return;
    *why = std::to_string(n_ids) + " ids, " + std::to_string(n_init) + " initialised, " + std::to_string(n_checked) +
           " configs checked, " + std::to_string(out.size()) + " accepted; refused (status:count)";
    for (auto [st, n] : refusals) *why += " " + std::to_string(st) + ":" + std::to_string(n);
  };
  if (api.algo_get_ids(h, CUBLAS_COMPUTE_32F, CUDA_R_32F, in, in, o, o, int(ids.size()), ids.data(), &n_ids) !=
      CUBLAS_STATUS_SUCCESS) {
    report();
    return out;
  }
  const std::vector<GemmAlgo> heur = heuristic_algorithms(key, 1);
  int32_t heur_id = -1;
  if (!heur.empty()) heur_id = gemm_algo_config(heur[0]).id;
  std::unique_ptr<Plan> p(make_plan(key, key.K, key.N));
  auto cap_list = [&](const cublasLtMatmulAlgo_t& a, cublasLtMatmulAlgoCapAttributes_t attr) {
    size_t bytes = 0;
    std::vector<uint32_t> v;
    if (api.cap_get(&a, attr, nullptr, 0, &bytes) == CUBLAS_STATUS_SUCCESS && bytes >= sizeof(uint32_t)) {
      v.resize(bytes / sizeof(uint32_t));
      size_t w = 0;
      if (api.cap_get(&a, attr, v.data(), v.size() * sizeof(uint32_t), &w) != CUBLAS_STATUS_SUCCESS) v.clear();
    }
    if (v.empty()) v.push_back(0);  // UNDEFINED: the algorithm picks
    return v;
  };
  for (int i = 0; i < n_ids; ++i) {
    cublasLtMatmulAlgo_t base;
    if (ids[size_t(i)] == heur_id) {
      std::memcpy(&base, heur[0].data.data(), sizeof(base));
    } else if (api.algo_init(h, CUBLAS_COMPUTE_32F, CUDA_R_32F, in, in, o, o, ids[size_t(i)], &base) !=
               CUBLAS_STATUS_SUCCESS) {
      continue;
    }
    ++n_init;
    uint16_t base_cluster = 0;
    size_t w = 0;
    api.config_get(&base, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &base_cluster, sizeof(base_cluster), &w);
    // Cluster shapes: the base's, 1x1x1, 2x1x1, 1x2x1 (cuBLASLt lists no cluster capability).
    std::vector<uint16_t> clusters = {base_cluster};
    for (uint16_t c : {uint16_t(CUBLASLT_CLUSTER_SHAPE_1x1x1), uint16_t(CUBLASLT_CLUSTER_SHAPE_2x1x1),
                       uint16_t(CUBLASLT_CLUSTER_SHAPE_1x2x1)})
      if (c != base_cluster) clusters.push_back(c);
    const int32_t one = 1;
    const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
    for (uint32_t tile : cap_list(base, CUBLASLT_ALGO_CAP_TILE_IDS)) {
      for (uint32_t stages : cap_list(base, CUBLASLT_ALGO_CAP_STAGES_IDS)) {
        for (uint16_t cluster : clusters) {
          cublasLtMatmulAlgo_t a = base;
          api.config_set(&a, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile));
          api.config_set(&a, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof(stages));
          api.config_set(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &one, sizeof(one));
          api.config_set(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &none, sizeof(none));
          if (api.config_set(&a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof(cluster)) !=
              CUBLAS_STATUS_SUCCESS)
            continue;
          ++n_checked;
          cublasLtMatmulHeuristicResult_t res{};
          const cublasStatus_t st = api.algo_check(h, p->desc, p->a, p->b, p->c, p->c, &a, &res);
          if (st != CUBLAS_STATUS_SUCCESS || res.workspaceSize > workspace_bytes_) {
            ++refusals[st != CUBLAS_STATUS_SUCCESS ? int(st) : -1];
            continue;
          }
          GemmAlgo g;
          std::memcpy(g.data.data(), &a, sizeof(g));
          if (std::find(out.begin(), out.end(), g) != out.end()) continue;
          out.push_back(g);
          if (int(out.size()) >= max_count) {
            report();
            return out;
          }
        }
      }
    }
  }
  report();
  return out;
}

std::vector<GemmAlgo> Gemm::accepted_algorithms(const GemmKey& key, const std::vector<GemmAlgo>& algos) {
  std::vector<GemmAlgo> out;
  std::unique_ptr<Plan> p(make_plan(key, key.K, key.N));
  for (const GemmAlgo& a : algos)
    if (check(p.get(), a)) out.push_back(a);
  return out;
}

Gemm::Plan* Gemm::plan_of(const GemmKey& key) {
  if (gemm_kind_fp8(key.kind))
    return plan_fp8(key.n, key.K, key.N, key.K, key.N, key.outer_vec, key.kind == GemmKind::kFp8Acc);
  return const_cast<Plan*>(&plan_for(key.n, key.K, key.N, key.K, key.N, key.kind == GemmKind::kBf16F32Out));
}

Status Gemm::run_algorithm(const GemmKey& key, const GemmAlgo& algo, const void* x, const float* x_scales,
                           const void* w, const float* w_scales, void* y, cudaStream_t stream) {
  // Cached per key: the planner runs each candidate a dozen times.
  Plan* p = plan_of(key);
  const LtApi& api = lt_api();
  if (gemm_kind_fp8(key.kind)) {
    api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scales, sizeof(w_scales));
    api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scales, sizeof(x_scales));
  }
  cublasLtMatmulAlgo_t a;
  std::memcpy(&a, algo.data.data(), sizeof(a));
  const float alpha = 1.0f, beta = key.kind == GemmKind::kFp8Acc ? 1.0f : 0.0f;
  const cublasStatus_t st = api.matmul(static_cast<cublasLtHandle_t>(handle_), p->desc, &alpha, w, p->a, x, p->b,
                                       &beta, y, p->c, y, p->c, &a, workspace_, workspace_bytes_, stream);
  if (st != CUBLAS_STATUS_SUCCESS)
    return Status::error("cublasLtMatmul failed for " + gemm_key_string(key) + ": status " + std::to_string(int(st)));
  return Status::ok();
}

GemmAlgo Gemm::chosen_algorithm(const GemmKey& key) {
  const Plan* p = plan_of(key);
  GemmAlgo a;
  std::memcpy(a.data.data(), &p->algo, sizeof(a));
  return a;
}

void Gemm::linear_fp8(const void* xq, int64_t n, int64_t ldx, const float* x_scales, bool x_per_row, const void* wq,
                      int64_t N, int64_t K, const float* w_scales, bool w_per_row, void* y, int64_t ldy,
                      cudaStream_t stream) {
  if (n == 0) return;
  ensure_one();
  // cuBLASLt's outer-vector mode takes a vector on both sides ([N] weight, [n] token scales). A
  // per-tensor side next to a vector one, or no outer-vector algorithm for this shape: unit scales
  // in the GEMM and both scales in the epilogue.
  const bool vec = x_per_row && w_per_row;
  Plan* p = plan_fp8(n, ldx, N, K, ldy, vec);
  const bool epilogue = x_per_row != w_per_row || (vec && !p->found);
  if (epilogue && vec) p = plan_fp8(n, ldx, N, K, ldy, false);
  KILN_CHECK_MSG(p->found, "cuBLASLt has no FP8 E4M3 algorithm for n=" + std::to_string(n) + " N=" +
                               std::to_string(N) + " K=" + std::to_string(K) + " (needs sm_89 or newer)");
  run_fp8(p, epilogue ? d_one_ : w_scales, epilogue ? d_one_ : x_scales, 0.0f, wq, xq, y, stream, "FP8");
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
