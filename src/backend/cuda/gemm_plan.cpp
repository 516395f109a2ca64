#include "backend/cuda/gemm_plan.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <set>

#include "backend/cuda/fp8.h"
#include "backend/cuda/kernels.h"
#include "core/dtype.h"
#include "core/log.h"

namespace kiln::cuda {
namespace {

Status cuda_ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::ok();
  return Status::error(std::string(what) + ": " + cudaGetErrorString(e));
}

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

}  // namespace

int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so later calls do not see it
    return 0;
  }
  return n;
}

Result<std::string> gpu_name(int device) {
  cudaDeviceProp prop{};
  KILN_RETURN_IF_ERROR(cuda_ok(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  return std::string(prop.name);
}

bool gpu_has_fp8(int device) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major * 10 + minor >= 89;
}

std::vector<GemmPlanShape> gemm_plan_shapes(const KilnDirInfo& info, bool fp8, const std::vector<int32_t>& graph_sizes,
                                            int32_t max_num_tokens, int gemv_max_m) {
  const ModelConfig& c = info.config;
  const int64_t tp = std::max(1, info.tp_size);
  const int64_t H = c.hidden_size;
  const int64_t q = c.q_dim() / tp;
  const int64_t kv = std::max<int64_t>(c.kv_dim() / tp, c.head_dim);  // kv heads replicate when tp > kv heads
  const int64_t I = c.intermediate_size / tp;
  const int64_t V = info.lm_head == LmHeadMode::kVocabSplit ? (c.vocab_size + tp - 1) / tp : c.vocab_size;
  const bool outer_vec = info.quant.per_channel || info.quant.activations == ActQuant::kDynamicToken;

  std::set<int64_t> decode, all;
  for (int32_t b : graph_sizes)
    if (b > gemv_max_m) decode.insert(b);
  all = decode;
  for (int32_t m : {max_num_tokens, 2048, 512}) {
    const int64_t mm = std::min(m, max_num_tokens);
    if (mm > gemv_max_m) all.insert(mm);
  }
  struct Linear {
    const char* name;
    int64_t N, K;
    bool into_residual;  // FP8: also added into the f32 residual by the GEMM (kind fp8_acc)
  };
  const Linear linears[] = {
      {"qkv", q + 2 * kv, H, false}, {"o", H, q, true}, {"gate_up", 2 * I, H, false}, {"down", H, I, true}};
  std::vector<GemmPlanShape> out;
  for (const Linear& l : linears) {
    // The executor keeps a matrix FP8 only when its columns are a multiple of 16 (cuBLASLt's rule).
    const bool f = fp8 && l.K % 16 == 0;
    for (int64_t m : all)
      out.push_back({l.name, GemmKey{f ? GemmKind::kFp8 : GemmKind::kBf16, m, l.N, l.K, f && outer_vec}});
    // FP8 o_proj / down_proj also add into the f32 residual in the GEMM's epilogue (every step of
    // more than gemv_max_m rows: CudaOps, Gemm::linear_fp8_accumulate).
    if (f && l.into_residual)
      for (int64_t m : all)
        out.push_back({std::string(l.name) + "_acc", GemmKey{GemmKind::kFp8Acc, m, l.N, l.K, outer_vec}});
  }
  for (int64_t m : decode) out.push_back({"lm_head", GemmKey{GemmKind::kBf16F32Out, m, V, H, false}});
  return out;
}

// --- GemmBench ---------------------------------------------------------------------------------

GemmBench::~GemmBench() {
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
  for (void* p : {x_, y_, w_, static_cast<void*>(ones_)})
    if (p) cudaFree(p);
  if (stream_) cudaStreamDestroy(stream_);
}

Status GemmBench::init(int device) {
  KILN_RETURN_IF_ERROR(cuda_ok(cudaSetDevice(device), "cudaSetDevice"));
  KILN_RETURN_IF_ERROR(cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
  int l2 = 0;
  cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device);
  l2_bytes_ = size_t(std::max(l2, 1 << 20));
  KILN_RETURN_IF_ERROR(gemm_.init());
  // Time the library's own candidates: never a table (the process's may be stale: we re-plan).
  gemm_.set_algorithm_table(std::make_shared<GemmAlgoTable>());
  return Status::ok();
}

Status GemmBench::grow(void** p, size_t* have, size_t want, const char* what) {
  if (*have >= want) return Status::ok();
  if (*p) cudaFree(*p);
  *p = nullptr;
  *have = 0;
  if (cudaMalloc(p, want) != cudaSuccess) {
    cudaGetLastError();
    return Status::error("GEMM planner: CUDA out of memory for the " + std::string(what) + " (" +
                         std::to_string(want >> 20) + " MiB)");
  }
  *have = want;
  return Status::ok();
}

Status GemmBench::prepare(const GemmKey& key) {
  const size_t es = gemm_elem_bytes(key.kind);
  const size_t w_stride = round_up(size_t(key.N) * key.K * es, 256);
  // Enough copies that one rotation touches 3x L2: each call then reads its weight from HBM, as a
  // real step does (it reads every layer's weights once).
  const size_t copies = std::clamp<size_t>((3 * l2_bytes_ + w_stride - 1) / w_stride, 1, 8);
  const size_t x_old = x_bytes_, w_old = w_bytes_;
  KILN_RETURN_IF_ERROR(grow(&x_, &x_bytes_, size_t(key.n) * key.K * es, "activations"));
  KILN_RETURN_IF_ERROR(grow(&y_, &y_bytes_, size_t(key.n) * key.N * gemm_out_bytes(key.kind), "output"));
  KILN_RETURN_IF_ERROR(grow(&w_, &w_bytes_, copies * w_stride, "weight copies"));
  const size_t ones_before = ones_bytes_;
  void* ones = ones_;
  KILN_RETURN_IF_ERROR(grow(&ones, &ones_bytes_, sizeof(float) * size_t(std::max(key.n, key.N)), "scales"));
  ones_ = static_cast<float*>(ones);
  if (ones_bytes_ != ones_before) launch_fill_f32(ones_, int64_t(ones_bytes_ / sizeof(float)), 1.0f, stream_);
  // Refill when a buffer was reallocated or the element type changed (FP8 codes read as bf16 and
  // the reverse would hold NaNs).
  const bool kind_changed = gemm_kind_fp8(filled_kind_) != gemm_kind_fp8(key.kind);
  if (kind_changed || x_bytes_ != x_old || x_filled_ == 0) {
    if (gemm_kind_fp8(key.kind)) launch_fill_uniform_fp8(static_cast<uint8_t*>(x_), int64_t(x_bytes_), 11, 1.0f, 1.0f, stream_);
    else launch_fill_uniform_bf16(static_cast<bf16_t*>(x_), int64_t(x_bytes_ / 2), 11, 1.0f, stream_);
    x_filled_ = x_bytes_;
  }
  if (kind_changed || w_bytes_ != w_old || w_filled_ == 0) {
    if (gemm_kind_fp8(key.kind)) launch_fill_uniform_fp8(static_cast<uint8_t*>(w_), int64_t(w_bytes_), 12, 1.0f, 1.0f, stream_);
    else launch_fill_uniform_bf16(static_cast<bf16_t*>(w_), int64_t(w_bytes_ / 2), 12, 1.0f, stream_);
    w_filled_ = w_bytes_;
  }
  filled_kind_ = key.kind;
  return cuda_ok(cudaGetLastError(), "GEMM planner: filling buffers");
}

Result<double> GemmBench::time_us(const GemmKey& key, const GemmAlgo& algo, int warmup, int reps) {
  KILN_RETURN_IF_ERROR(prepare(key));
  reps = std::max(reps, 1);
  while (events_.size() < size_t(reps) + 1) {
    cudaEvent_t e;
    KILN_RETURN_IF_ERROR(cuda_ok(cudaEventCreate(&e), "cudaEventCreate"));
    events_.push_back(e);
  }
  const size_t w_stride = round_up(size_t(key.N) * key.K * gemm_elem_bytes(key.kind), 256);
  const size_t copies = std::clamp<size_t>(w_bytes_ / w_stride, 1, 8);
  auto weight = [&](int i) { return static_cast<const char*>(w_) + (size_t(i) % copies) * w_stride; };
  const float* xs = ones_;
  const float* ws = ones_;
  for (int i = 0; i < warmup; ++i)
    KILN_RETURN_IF_ERROR(gemm_.run_algorithm(key, algo, x_, xs, weight(i), ws, y_, stream_));
  cudaEventRecord(events_[0], stream_);
  for (int r = 0; r < reps; ++r) {
    KILN_RETURN_IF_ERROR(gemm_.run_algorithm(key, algo, x_, xs, weight(warmup + r), ws, y_, stream_));
    cudaEventRecord(events_[size_t(r) + 1], stream_);
  }
  KILN_RETURN_IF_ERROR(cuda_ok(cudaStreamSynchronize(stream_), "GEMM planner: timing run"));
  std::vector<float> ms(size_t(reps), 0.0f);
  for (int r = 0; r < reps; ++r) cudaEventElapsedTime(&ms[size_t(r)], events_[size_t(r)], events_[size_t(r) + 1]);
  std::nth_element(ms.begin(), ms.begin() + reps / 2, ms.end());
  return double(ms[size_t(reps) / 2]) * 1000.0;
}

std::vector<GemmAlgo> GemmBench::listed_algorithms(const GemmKey& key, double* list_seconds) {
  GemmKey shape = key;
  shape.n = 0;
  auto it = listed_.find(shape);
  if (it == listed_.end()) {
    const auto t0 = std::chrono::steady_clock::now();
    it = listed_.emplace(shape, gemm_.enumerated_algorithms(key, 4000)).first;
    if (list_seconds)
      *list_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return gemm_.accepted_algorithms(key, it->second);
}

Status GemmBench::run_to_host(const GemmKey& key, const GemmAlgo& algo, std::vector<float>* y) {
  KILN_RETURN_IF_ERROR(prepare(key));
  cudaMemsetAsync(y_, 0, y_bytes_, stream_);
  KILN_RETURN_IF_ERROR(gemm_.run_algorithm(key, algo, x_, ones_, w_, ones_, y_, stream_));
  const size_t count = size_t(key.n) * key.N;
  y->assign(count, 0.0f);
  if (gemm_kind_f32_out(key.kind)) {
    KILN_RETURN_IF_ERROR(cuda_ok(cudaMemcpyAsync(y->data(), y_, count * 4, cudaMemcpyDeviceToHost, stream_), "copy"));
    return cuda_ok(cudaStreamSynchronize(stream_), "GEMM run");
  }
  std::vector<uint16_t> h(count);
  KILN_RETURN_IF_ERROR(cuda_ok(cudaMemcpyAsync(h.data(), y_, count * 2, cudaMemcpyDeviceToHost, stream_), "copy"));
  KILN_RETURN_IF_ERROR(cuda_ok(cudaStreamSynchronize(stream_), "GEMM run"));
  for (size_t i = 0; i < count; ++i) (*y)[i] = bf16_to_f32(h[i]);
  return Status::ok();
}

// --- planner ------------------------------------------------------------------------------------

Result<GemmPlanResult> plan_gemm(GemmBench& bench, const GemmKey& key, const GemmPlanOptions& o) {
  Gemm& gemm = bench.gemm();
  const std::vector<GemmAlgo> algos = gemm.heuristic_algorithms(key, o.max_algos);
  if (algos.empty()) return Status::error("cuBLASLt offers no algorithm for " + gemm_key_string(key));
  struct Candidate {
    GemmAlgo algo;
    int rank;  // of the heuristic candidate it derives from
  };
  std::vector<Candidate> cands;
  auto seen = [&](const GemmAlgo& a) {
    return std::any_of(cands.begin(), cands.end(), [&](const Candidate& c) { return c.algo == a; });
  };
  for (size_t i = 0; i < algos.size(); ++i)
    if (!seen(algos[i]) && gemm.algorithm_ok(key, algos[i])) cands.push_back({algos[i], int(i)});
  GemmPlanResult r;
  // No split-K for fp8_acc: its partial sums would meet beta = 1 in a reduction scheme the
  // planner's check (outputs from a zeroed y) does not exercise.
  if (!o.split_k.empty() && key.n <= o.split_k_max_m && key.kind != GemmKind::kFp8Acc) {
    const size_t base = cands.size();
    for (size_t i = 0; i < base; ++i) {
      std::string why;
      for (const GemmAlgo& v : gemm.split_k_variants(key, cands[i].algo, o.split_k, &why)) {
        if (seen(v)) continue;
        cands.push_back({v, cands[i].rank});
        ++r.split_k_candidates;
      }
      if (cands[i].rank == 0) r.split_k_why = why;
    }
  }
  if (o.search && key.kind != GemmKind::kBf16F32Out && key.n <= o.split_k_max_m) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::pair<double, GemmAlgo>> quick;
    double best_quick = INFINITY;
    for (const GemmAlgo& a : bench.listed_algorithms(key, &r.list_seconds)) {
      if (seen(a)) continue;
      // One call after one warm-up first: most listed configurations (small tiles, old kernels)
      // are several times slower and need no median.
      auto probe = bench.time_us(key, a, 1, 1);
      if (!probe) continue;
      if (*probe > 1.5 * best_quick) {
        quick.push_back({*probe, a});
        continue;
      }
      auto t = bench.time_us(key, a, 1, o.search_reps);
      if (!t) continue;
      quick.push_back({*t, a});
      best_quick = std::min(best_quick, *t);
    }
    r.search_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.searched = int(quick.size());
    std::sort(quick.begin(), quick.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    for (size_t i = 0; i < quick.size() && int(i) < o.search_finalists; ++i) {
      cands.push_back({quick[i].second, -1});
      for (const GemmAlgo& v : gemm.split_k_variants(key, quick[i].second, o.split_k)) {
        if (seen(v)) continue;
        cands.push_back({v, -1});
        ++r.split_k_candidates;
      }
    }
  }
  r.heuristic = algos[0];
  int best = -1;
  for (size_t i = 0; i < cands.size(); ++i) {
    auto t = bench.time_us(key, cands[i].algo, o.warmup, o.reps);
    if (!t) {
      log_debug("gemm planner: candidate " + std::to_string(i) + " for " + gemm_key_string(key) + ": " + t.message());
      continue;
    }
    ++r.candidates;
    if (cands[i].algo == algos[0]) r.heuristic_us = *t;
    if (best < 0 || *t < r.us) best = int(i), r.us = *t;
  }
  if (best < 0) return Status::error("no candidate ran for " + gemm_key_string(key));
  r.algo = cands[size_t(best)].algo;
  r.heuristic_rank = cands[size_t(best)].rank;
  if (r.heuristic_us > 0 && !(r.algo == algos[0])) {
    // Confirm on fresh, interleaved measurements (best of 3 medians each).
    double tb = INFINITY, th = INFINITY;
    for (int round = 0; round < 3; ++round) {
      auto b = bench.time_us(key, r.algo, o.warmup, o.reps);
      auto h = bench.time_us(key, algos[0], o.warmup, o.reps);
      if (b) tb = std::min(tb, *b);
      if (h) th = std::min(th, *h);
    }
    if (std::isfinite(tb) && std::isfinite(th)) r.us = tb, r.heuristic_us = th;
  }
  if (r.heuristic_us > 0 && r.us > r.heuristic_us * (1.0 - o.min_gain)) {
    r.algo = algos[0];
    r.us = r.heuristic_us;
    r.heuristic_rank = 0;
  }
  r.split_k = std::max(1, gemm_algo_config(r.algo).split_k);
  return r;
}

Status plan_gemm_algorithms(const KilnDirInfo& info, EnginePlan* plan, const GemmPlanOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  GemmBench bench;
  KILN_RETURN_IF_ERROR(bench.init(o.device));
  KILN_ASSIGN_OR_RETURN(std::string name, gpu_name(o.device));
  const bool fp8 = info.quant.fp8_weights && gpu_has_fp8(o.device);
  const auto shapes = gemm_plan_shapes(info, fp8, plan->cuda_graph_batch_sizes, plan->limits.max_num_tokens,
                                       bench.gemm().gemv_max_m());
  // Bring the clocks up before the first measurement (an idle H100 sits at a few hundred MHz).
  if (!shapes.empty()) {
    const auto first = bench.gemm().heuristic_algorithms(shapes[0].key, 1);
    if (!first.empty() && bench.gemm().algorithm_ok(shapes[0].key, first[0]))
      (void)bench.time_us(shapes[0].key, first[0], 50, 100);
  }
  nlohmann::json entries = nlohmann::json::array();
  double log_gain = 0;
  int changed = 0, split = 0, searched = 0;
  double list_seconds = 0, search_seconds = 0;
  for (const GemmPlanShape& s : shapes) {
    auto r = plan_gemm(bench, s.key, o);
    if (!r) {
      log_warn("gemm planner: " + s.name + ": " + r.message() + "; left to the run-time heuristic");
      continue;
    }
    if (r->heuristic_us > 0) log_gain += std::log(r->heuristic_us / r->us);
    changed += !(r->algo == r->heuristic);
    split += r->split_k > 1 && !(r->algo == r->heuristic);
    searched += r->heuristic_rank < 0;
    list_seconds += r->list_seconds;
    search_seconds += r->search_seconds;
    nlohmann::json e = {{"shape", s.name},
                        {"kind", gemm_kind_name(s.key.kind)},
                        {"M", s.key.n},
                        {"N", s.key.N},
                        {"K", s.key.K},
                        {"outer_vec", s.key.outer_vec},
                        {"algo", gemm_algo_hex(r->algo)},
                        {"us", std::round(r->us * 100) / 100},
                        {"heuristic_us",
                         r->heuristic_us > 0 ? nlohmann::json(std::round(r->heuristic_us * 100) / 100) : nlohmann::json()},
                        {"heuristic_rank", r->heuristic_rank},
                        {"split_k", r->split_k},
                        {"candidates", r->candidates},
                        {"split_k_candidates", r->split_k_candidates},
                        {"searched", r->searched}};
    entries.push_back(std::move(e));
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  plan->gemm_algorithms = {{"cublaslt_version", cublaslt_version()},
                           {"device_name", name},
                           {"planner",
                            {{"warmup", o.warmup},
                             {"reps", o.reps},
                             {"max_algos", o.max_algos},
                             {"min_gain", o.min_gain},
                             {"split_k", o.split_k},
                             {"split_k_max_m", o.split_k_max_m},
                             {"search", o.search},
                             {"search_reps", o.search_reps},
                             {"search_finalists", o.search_finalists},
                             {"seconds", std::round(secs * 10) / 10},
                             {"search_seconds", std::round(search_seconds * 10) / 10},
                             {"list_seconds", std::round(list_seconds * 10) / 10}}},
                           {"entries", std::move(entries)}};
  const size_t n = plan->gemm_algorithms["entries"].size();
  char buf[400];
  std::snprintf(buf, sizeof(buf),
                "gemm planner: %zu GEMMs timed on %s in %.1f s; %d use another algorithm than the heuristic's first "
                "(%d of them split-K, %d from the wider search: %.1f s, of which listing %.1f s; geometric mean "
                "gain %.1f%%)",
                n, name.c_str(), secs, changed, split, searched, search_seconds, list_seconds,
                n ? (std::exp(log_gain / double(n)) - 1) * 100 : 0.0);
  log_info(buf);
  return Status::ok();
}

Result<std::shared_ptr<const GemmAlgoTable>> usable_gemm_table(const nlohmann::json& j, int device) {
  KILN_ASSIGN_OR_RETURN(GemmAlgoTable t, gemm_table_from_json(j));
  if (t.cublaslt_version == 0 && t.algos.empty()) return Status::error("plan.json has no GEMM algorithms");
  KILN_ASSIGN_OR_RETURN(std::string name, gpu_name(device));
  const std::string why = gemm_table_mismatch(t, cublaslt_version(), name);
  if (!why.empty()) return Status::error(why);
  return std::shared_ptr<const GemmAlgoTable>(std::make_shared<GemmAlgoTable>(std::move(t)));
}

}  // namespace kiln::cuda
