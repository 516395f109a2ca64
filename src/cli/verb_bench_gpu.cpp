// kiln bench latency MODEL     one batch: prefill time and decode step time, and on CUDA the
//                              ceilings measured in the same process (streaming-read bandwidth,
//                              cuBLASLt BF16 GEMM rate at the model's shapes) and the shares of them.
// kiln bench throughput MODEL  trtllm-bench style: N synthetic requests of fixed input/output
//                              lengths through the runtime Engine (continuous batching, ignore_eos),
//                              output tokens/s over the whole run.
// With --dummy_weights MODEL is a config.json (or a directory holding one) and the weights are
// random (generated on the GPU for --device cuda), so 8B-scale speed needs no download.
// `kiln bench serve` lives in verb_bench.cpp; both attach to one `bench` parent.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <random>

#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_bandwidth.h"
#include "backend/cpu/cpu_executor.h"
#include "cli/cli.h"
#include "cli/executor_factory.h"
#include "core/file.h"
#include "runtime/engine.h"
#ifdef KILN_HAVE_CUDA
#include "backend/cuda/cuda_executor.h"
#include "backend/cuda/gemm_plan.h"
#include "build/build.h"
#endif

namespace kiln::cli {
namespace {

using clock_type = std::chrono::steady_clock;

struct BenchArgs {
  std::string model, device = "cuda", output = "text", kv_cache_dtype = "auto", quantization = "auto";
  bool dummy_weights = false, plan_gemms = false;
  int32_t batch_size = 1, input_len = 128, output_len = 128, reps = 5, num_requests = 256;
  int32_t max_batch_size = 256, max_num_tokens = 8192, kv_cache_blocks = 0;
  double kv_cache_memory_fraction = 0.9;
  int64_t seed = 0;
};

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Result<ModelConfig> bench_config(const BenchArgs& a) {
  std::string path = a.model;
  if (!file_exists(path + "/config.json") && !file_exists(path)) return Status::error(path + ": not found");
  if (file_exists(path + "/config.json")) path += "/config.json";
  KILN_ASSIGN_OR_RETURN(ModelConfig c, config_from_hf_file(path));
  KILN_RETURN_IF_ERROR(validate_config(c, path));
  return c;
}

#ifdef KILN_HAVE_CUDA
// --plan_gemms with --dummy_weights: what `kiln build` does for an engine (cuBLASLt's candidates
// timed per weight shape and M bucket on this GPU, gemm_plan.h), for the run's own limits, handed
// to the executor as the process table. Prints the planner's summary and the largest M's choices.
Status plan_dummy_gemms(const BenchArgs& a, const ModelConfig& cfg, int32_t max_batch, int32_t max_tokens) {
  if (auto name = plan_device_name(a.device); !name) return Status::error(name.message());
  const int idx = cuda_index(a.device);
  KilnDirInfo info;
  info.config = cfg;
  info.lm_head = cfg.tie_word_embeddings ? LmHeadMode::kTied : LmHeadMode::kReplicated;
  info.quant.fp8_weights = a.quantization == "fp8";
  info.quant.activations = info.quant.fp8_weights ? cuda::dummy_fp8_activations() : ActQuant::kNone;
  EnginePlan plan;
  plan.limits.max_batch_size = max_batch;
  plan.limits.max_num_tokens = max_tokens;
  plan.cuda_graph_batch_sizes = graph_batch_buckets(max_batch);
  cuda::GemmPlanOptions o;
  o.device = idx;
  KILN_RETURN_IF_ERROR(cuda::plan_gemm_algorithms(info, &plan, o));
  KILN_ASSIGN_OR_RETURN(auto table, cuda::usable_gemm_table(plan.gemm_algorithms, idx));
  int64_t top = 0;
  for (const auto& e : plan.gemm_algorithms["entries"]) top = std::max(top, e["M"].get<int64_t>());
  for (const auto& e : plan.gemm_algorithms["entries"]) {
    if (e["M"].get<int64_t>() != top) continue;
    char heur[32] = "-";
    if (e["heuristic_us"].is_number()) std::snprintf(heur, sizeof(heur), "%.1f", e["heuristic_us"].get<double>());
    std::printf("gemm plan     %-8s M=%lld: %.1f us (heuristic's first %s us, rank %d)\n",
                e["shape"].get<std::string>().c_str(), (long long)top, e["us"].get<double>(), heur,
                e["heuristic_rank"].get<int>());
  }
  cuda::set_process_gemm_table(std::move(table));
  return Status::ok();
}
#endif

// The executor: dummy or loaded, on a.device. `cuda_ex` is set when it is a CUDA executor.
// max_batch / max_tokens: the run's limits, for --plan_gemms.
Result<std::unique_ptr<ModelExecutor>> make_executor(const BenchArgs& a, const LoadOptions& opts, ModelConfig* cfg,
                                                     void** cuda_ex, int32_t max_batch, int32_t max_tokens) {
  *cuda_ex = nullptr;
  KILN_RETURN_IF_ERROR(check_device(a.device));  // same accepted values and messages as run/serve
  const bool cuda = a.device.rfind("cuda", 0) == 0;
  if (a.plan_gemms && (!a.dummy_weights || !cuda))
    return Status::error("--plan_gemms needs --dummy_weights and a cuda device (an engine carries its own plan: "
                         "kiln build)");
  if (a.dummy_weights) {
    KILN_ASSIGN_OR_RETURN(*cfg, bench_config(a));
    if (cuda) {
#ifdef KILN_HAVE_CUDA
      if (a.plan_gemms) KILN_RETURN_IF_ERROR(plan_dummy_gemms(a, *cfg, max_batch, max_tokens));
      KILN_ASSIGN_OR_RETURN(auto ex, cuda::CudaExecutor::create_dummy(*cfg, opts, uint64_t(a.seed)));
      *cuda_ex = ex.get();
      std::unique_ptr<ModelExecutor> base = std::move(ex);
      return base;
#else
      return Status::error("this kiln was built without the CUDA backend");
#endif
    }
    std::unique_ptr<ModelExecutor> ex = make_cpu_executor(make_dummy_model(*cfg, WeightFormat::kBF16, uint64_t(a.seed)), opts);
    return ex;
  }
  use_engine_plan(a.model, a.device);  // a built engine: re-planned for this device, GEMM table handed over
  KILN_ASSIGN_OR_RETURN(auto model, load_model(a.model));
  *cfg = model->config;
  if (cuda) {
#ifdef KILN_HAVE_CUDA
    KILN_ASSIGN_OR_RETURN(auto ex, cuda::CudaExecutor::create(std::move(model), opts));
    *cuda_ex = ex.get();
    std::unique_ptr<ModelExecutor> base = std::move(ex);
    return base;
#else
    return Status::error("this kiln was built without the CUDA backend");
#endif
  }
  return cli::make_executor(std::move(model), opts);
}

// B sequences [first, first + B) of the run, q_len tokens each after `before` cached ones.
StepBatch batch_step(int32_t B, int32_t q_len, int32_t before, int32_t blocks_per_seq, int32_t vocab, std::mt19937& rng,
                     int32_t first = 0) {
  StepBatch b;
  b.clear();
  b.max_blocks_per_seq = blocks_per_seq;
  for (int32_t s = 0; s < B; ++s) {
    for (int32_t i = 0; i < q_len; ++i) {
      b.token_ids.push_back(int32_t(rng() % uint32_t(vocab)));
      b.positions.push_back(before + i);
    }
    b.query_start.push_back(b.query_start.back() + q_len);
    b.context_lens.push_back(before + q_len);
    for (int32_t j = 0; j < blocks_per_seq; ++j) b.block_tables.push_back((first + s) * blocks_per_seq + j);
    b.logits_rows.push_back(b.query_start.back() - 1);
  }
  return b;
}

int latency(const BenchArgs& a) {
  if (a.batch_size < 1 || a.input_len < 1 || a.output_len < 1) return fail("bench latency", "sizes must be >= 1");
  LoadOptions opts;
  opts.device = a.device;
  opts.kv_cache_dtype = a.kv_cache_dtype;
  opts.max_seq_len = a.input_len + a.output_len;
  opts.quantization = a.quantization;
  opts.max_batch_size = a.batch_size;
  const int32_t blocks_per_seq = (opts.max_seq_len + opts.block_size - 1) / opts.block_size;
  opts.kv_cache_blocks = a.kv_cache_blocks > 0 ? a.kv_cache_blocks : a.batch_size * blocks_per_seq + 1;
  ModelConfig c;
  void* cuda_ex = nullptr;
  auto t_load = clock_type::now();
  auto ex = make_executor(a, opts, &c, &cuda_ex, a.batch_size, a.batch_size * a.input_len);
  if (!ex) return fail("bench latency", ex.message());
  const double load_s = seconds_since(t_load);
  nlohmann::json j;
  j["model"] = a.model;
  j["plan_gemms"] = a.plan_gemms;
  j["device"] = (*ex)->info().device;
  j["batch_size"] = a.batch_size;
  j["input_len"] = a.input_len;
  j["output_len"] = a.output_len;
  j["load_s"] = load_s;

  // Ceilings measured in this process.
  double bw_gbs = 0.0, gemm_tflops = 0.0, gemm_big_tflops = 0.0;
  size_t weight_bytes = 0, kv_token_bytes = 0;
#ifdef KILN_HAVE_CUDA
  if (cuda_ex) {
    auto* cx = static_cast<cuda::CudaExecutor*>(cuda_ex);
    weight_bytes = cx->weight_bytes_per_token();
    kv_token_bytes = cx->kv_bytes_per_token();
    auto bw = cx->bench_read_bandwidth(size_t(4) << 30, 10);
    if (!bw) return fail("bench latency", bw.message());
    bw_gbs = *bw;
    // GEMM ceilings in the precision the linears run in (FP8 E4M3 with unit scales when FP8).
    const bool fp8 = cx->weights_fp8();
    j["gemm_dtype"] = fp8 ? "fp8_e4m3" : "bf16";
    // The prefill's GEMMs, as the forward pass issues them (fused qkv and gate_up).
    const int64_t M = int64_t(a.batch_size) * a.input_len, H = c.hidden_size, I = c.intermediate_size;
    const int64_t shapes[4][2] = {{c.q_dim() + 2 * c.kv_dim(), H}, {H, c.q_dim()}, {2 * I, H}, {H, I}};
    double flops = 0, secs = 0;
    for (auto& s : shapes) {
      auto t = cx->bench_gemm_seconds(M, s[0], s[1], 20, false, fp8);
      if (!t) return fail("bench latency", t.message());
      flops += 2.0 * double(M) * double(s[0]) * double(s[1]);
      secs += *t;
      j["gemm_us"][std::to_string(s[0]) + "x" + std::to_string(s[1])] = *t * 1e6;
    }
    gemm_tflops = flops / secs / 1e12;
    // Decode shapes at M = batch: kiln's GEMV (used up to M=4) against cuBLASLt.
    const int64_t dec[5][2] = {{c.q_dim() + 2 * c.kv_dim(), H}, {H, c.q_dim()}, {2 * I, H}, {H, I}, {c.vocab_size, H}};
    std::printf("decode GEMMs   M=%d   N x K          kiln us (GB/s)     cuBLASLt us (GB/s)   %s\n", a.batch_size,
                fp8 ? "FP8 weights (lm_head BF16)" : "BF16");
    for (auto& s : dec) {
      const bool f = fp8 && s[0] != c.vocab_size;  // the lm_head stays BF16
      auto ours = cx->bench_gemm_seconds(a.batch_size, s[0], s[1], 50, false, f);
      auto lt = cx->bench_gemm_seconds(a.batch_size, s[0], s[1], 50, /*cublas_only=*/true, f);
      if (!ours || !lt) return fail("bench latency", !ours ? ours.message() : lt.message());
      const double bytes = double(s[0]) * double(s[1]) * (f ? 1.0 : 2.0);
      std::printf("              %6lld x %-6lld   %8.1f (%6.0f)    %8.1f (%6.0f)\n", (long long)s[0], (long long)s[1],
                  *ours * 1e6, bytes / *ours / 1e9, *lt * 1e6, bytes / *lt / 1e9);
      j["decode_gemm_us"][std::to_string(s[0]) + "x" + std::to_string(s[1])] = {*ours * 1e6, *lt * 1e6};
    }
    auto big = cx->bench_gemm_seconds(8192, 8192, 8192, 10, false, fp8);
    if (!big) return fail("bench latency", big.message());
    gemm_big_tflops = 2.0 * 8192.0 * 8192.0 * 8192.0 / *big / 1e12;
    j["read_bandwidth_gbs"] = bw_gbs;
    j["gemm_tflops_at_prefill_shapes"] = gemm_tflops;
    j["gemm_tflops_8192"] = gemm_big_tflops;
    j["weight_bytes_per_token"] = weight_bytes;
  }
#endif
  if (auto* cpu = dynamic_cast<CpuExecutor*>(ex->get())) {
    // The CPU's ceiling, measured now: weights read per decode token over the streaming-read rate.
    const ModelWeights& w = cpu->model().weights;
    weight_bytes = w.total_bytes() - (w.lm_head.data == w.embed.data ? 0 : w.embed.nbytes()) + w.embed.row_bytes;
    kv_token_bytes = CpuKvCache::bytes_per_block(c, 1);
    bw_gbs = cpu_stream_read_gbps();
    j["read_bandwidth_gbs"] = bw_gbs;
    j["weight_bytes_per_token"] = weight_bytes;
  }

  std::mt19937 rng(uint32_t(a.seed) + 1);
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  std::vector<SeqSampling> ss(size_t(a.batch_size));
  for (auto& s : ss) s.params = &greedy;
  std::vector<SampledToken> out;
  // Prefill: the whole batch's prompts in one step, median of reps (+1 warm-up).
  std::vector<double> prefill;
  // Batches over 8192 prompt tokens go in groups of whole sequences, one step each (the engine's
  // default token budget), as a server would schedule them; the time is the sum.
  const int32_t group = std::max<int32_t>(1, std::min<int32_t>(a.batch_size, 8192 / std::max(1, a.input_len)));
  for (int r = 0; r < a.reps + 1; ++r) {
    double t = 0;
    for (int32_t g0 = 0; g0 < a.batch_size; g0 += group) {
      const int32_t n = std::min(group, a.batch_size - g0);
      StepBatch b = batch_step(n, a.input_len, 0, blocks_per_seq, c.vocab_size, rng, g0);
      std::vector<SeqSampling> gs(ss.begin(), ss.begin() + n);
      auto t0 = clock_type::now();
      if (Status st = (*ex)->execute(b, gs, &out); !st) return fail("bench latency", st.message());
      t += seconds_since(t0);
    }
    if (r > 0) prefill.push_back(t);
  }
  // Decode: output_len steps of one token per sequence; the first two (graph capture) not timed.
  std::vector<double> steps;
  auto t_dec = clock_type::now();
  for (int32_t i = 0; i < a.output_len; ++i) {
    StepBatch b = batch_step(a.batch_size, 1, a.input_len + i, blocks_per_seq, c.vocab_size, rng);
    auto t0 = clock_type::now();
    if (Status st = (*ex)->execute(b, ss, &out); !st) return fail("bench latency", st.message());
    if (i >= 2) steps.push_back(seconds_since(t0));
    if (i == 1) t_dec = clock_type::now();
  }
  const double decode_total = seconds_since(t_dec);
  const double t_prefill = median(prefill), t_step = median(steps);
  const double prefill_tps = double(a.batch_size) * a.input_len / t_prefill;
  const double decode_tps = double(a.batch_size) / t_step;
  // Model FLOPs of the prefill: linears over every token, lm_head over the last, causal attention.
  const double S = a.input_len, tokens = double(a.batch_size) * S;
  const double lin_params = double(c.num_layers) * double(c.hidden_size) *
                            (double(c.q_dim()) + 2.0 * c.kv_dim() + c.q_dim() + 3.0 * c.intermediate_size);
  const double attn_flops = 4.0 * a.batch_size * c.num_layers * c.num_heads * double(c.head_dim) * S * (S + 1) / 2.0;
  const double prefill_flops = 2.0 * tokens * lin_params + 2.0 * a.batch_size * double(c.vocab_size) * c.hidden_size + attn_flops;
  j["prefill_s"] = t_prefill;
  j["prefill_tokens_per_s"] = prefill_tps;
  j["decode_step_s_median"] = t_step;
  j["decode_step_s_mean"] = decode_total / std::max<double>(1, a.output_len - 2);
  j["decode_tokens_per_s"] = decode_tps;
  std::printf("device        %s\n", (*ex)->info().device.c_str());
  std::printf("model         %s  (load %.1f s)\n", a.model.c_str(), load_s);
  std::printf("prefill       batch %d x %d tokens: %.2f ms  -> %.0f tokens/s\n", a.batch_size, a.input_len,
              t_prefill * 1e3, prefill_tps);
  std::printf("decode        batch %d, context %d..%d: median step %.3f ms (mean %.3f) -> %.1f tokens/s\n",
              a.batch_size, a.input_len, a.input_len + a.output_len, t_step * 1e3,
              decode_total / std::max<double>(1, a.output_len - 2) * 1e3, decode_tps);
#ifdef KILN_HAVE_CUDA
  if (cuda_ex) {
    // The last decode graph replayed back to back: the step's GPU time alone; the rest of the
    // measured step is the GPU waiting on the host.
    if (auto r = static_cast<cuda::CudaExecutor*>(cuda_ex)->bench_graph_replay(50)) {
      j["decode_graph_replay_s"] = *r;
      std::printf("decode (GPU)  the last step's graph replayed back to back: %.3f ms a step; the host's share of "
                  "the measured step %.1f us (%.1f%%)\n",
                  *r * 1e3, (t_step - *r) * 1e6, 100.0 * (t_step - *r) / t_step);
    }
  }
#endif
  if (bw_gbs > 0) {
    const double roof = double(weight_bytes) / (bw_gbs * 1e9);
    const double kv_mean = double(a.batch_size) * (a.input_len + a.output_len / 2.0) * double(kv_token_bytes);
    const double roof_kv = (double(weight_bytes) + kv_mean) / (bw_gbs * 1e9);
    const double prefill_rate = prefill_flops / t_prefill / 1e12;
    j["decode_roofline_s"] = roof;
    j["decode_share_of_roofline"] = roof / t_step;
    j["decode_share_of_roofline_with_kv"] = roof_kv / t_step;
    j["prefill_model_tflops"] = prefill_rate;
    if (gemm_tflops > 0) j["prefill_share_of_gemm_rate"] = prefill_rate / gemm_tflops;
    std::printf("bandwidth     streaming read %.0f GB/s (read-only kernel, %s)\n", bw_gbs,
                gemm_tflops > 0 ? "4 GiB" : "512 MiB on all CPU threads");
    std::printf("roofline      %.2f GB weights/step -> %.3f ms; decode at %.1f%% of it (%.1f%% counting the KV "
                "cache read)\n",
                double(weight_bytes) / 1e9, roof * 1e3, 100.0 * roof / t_step, 100.0 * roof_kv / t_step);
    if (gemm_tflops > 0) {
      std::printf("gemm          cuBLASLt %s at the prefill's shapes (M=%lld): %.0f TFLOP/s; 8192^3: %.0f TFLOP/s\n",
                  j.value("gemm_dtype", "BF16") == "fp8_e4m3" ? "FP8" : "BF16",
                  (long long)(int64_t(a.batch_size) * a.input_len), gemm_tflops, gemm_big_tflops);
      std::printf("prefill rate  %.0f TFLOP/s of model math = %.1f%% of the GEMM rate\n", prefill_rate,
                  100.0 * prefill_rate / gemm_tflops);
    }
  }
  if (a.output == "json") std::printf("%s\n", j.dump().c_str());
  return 0;
}

int throughput(const BenchArgs& a) {
  if (a.num_requests < 1 || a.input_len < 1 || a.output_len < 1) return fail("bench throughput", "sizes must be >= 1");
  LoadOptions opts;
  opts.device = a.device;
  opts.kv_cache_dtype = a.kv_cache_dtype;
  opts.max_seq_len = a.input_len + a.output_len;
  opts.quantization = a.quantization;
  opts.kv_cache_blocks = a.kv_cache_blocks;
  opts.kv_cache_memory_fraction = a.kv_cache_memory_fraction;
  opts.max_batch_size = a.max_batch_size;
  ModelConfig c;
  void* cuda_ex = nullptr;
  auto ex = make_executor(a, opts, &c, &cuda_ex, a.max_batch_size, a.max_num_tokens);
  if (!ex) return fail("bench throughput", ex.message());
  const std::string device = (*ex)->info().device;
  const int32_t kv_blocks = (*ex)->info().num_kv_blocks;
  EngineLimits limits;
  limits.max_batch_size = a.max_batch_size;
  limits.max_num_tokens = a.max_num_tokens;
  limits.max_seq_len = opts.max_seq_len;
  limits.max_queue = a.num_requests + 1024;
  limits.enable_prefix_caching = false;  // random prompts share nothing; keep the measurement plain
  auto engine = Engine::create(std::move(*ex), limits);

  std::mutex mu;
  std::condition_variable cv;
  int64_t pending = 0, out_tokens = 0, errors = 0;
  std::string first_error;
  std::mt19937 rng(uint32_t(a.seed) + 7);
  auto run_batch = [&](int32_t n, int32_t in_len, auto out_len_of) -> double {
    {
      std::lock_guard<std::mutex> lk(mu);
      pending = n;
      out_tokens = 0;
    }
    auto t0 = clock_type::now();
    for (int32_t i = 0; i < n; ++i) {
      EngineRequest r;
      for (int32_t k = 0; k < in_len; ++k) r.prompt.push_back(int32_t(rng() % uint32_t(c.vocab_size)));
      r.sampling.temperature = 0.0f;
      r.max_tokens = out_len_of(i);
      r.ignore_eos = true;
      r.on_event = [&](const TokenEvent& e) {
        std::lock_guard<std::mutex> lk(mu);
        out_tokens += int64_t(e.tokens.size());
        if (e.finish != FinishReason::kNone) {
          if (e.finish == FinishReason::kError && errors++ == 0) first_error = e.error;
          if (--pending == 0) cv.notify_all();
        }
      };
      auto id = engine->submit(std::move(r));
      if (!id) {
        std::lock_guard<std::mutex> lk(mu);
        if (errors++ == 0) first_error = id.message();
        if (--pending == 0) cv.notify_all();
      }
    }
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return pending == 0; });
    return seconds_since(t0);
  };
  // Warm-up: output lengths 1..64 so the running batch sweeps every decode-graph bucket.
  const int32_t warm = std::min(a.num_requests, a.max_batch_size);
  run_batch(warm, 16, [&](int32_t i) { return 1 + (i * 64) / std::max(1, warm); });
  if (errors) return fail("bench throughput", "warm-up: " + first_error);
  const EngineStats warm_stats = engine->stats();
  const double secs = run_batch(a.num_requests, a.input_len, [&](int32_t) { return a.output_len; });
  if (errors) return fail("bench throughput", std::to_string(errors) + " requests failed: " + first_error);
  const int64_t expect = int64_t(a.num_requests) * a.output_len;
  EngineStats st = engine->stats();
  engine->shutdown(false);
  const EngineStats& w = warm_stats;
  const double out_tps = double(out_tokens) / secs;
  const double total_tps = double(out_tokens + int64_t(a.num_requests) * a.input_len) / secs;
  std::printf("device        %s (%d KV blocks)\n", device.c_str(), kv_blocks);
  std::printf("workload      %d requests, input %d, output %d (ignore_eos), max_batch_size %d, max_num_tokens %d\n",
              a.num_requests, a.input_len, a.output_len, a.max_batch_size, a.max_num_tokens);
  std::printf("throughput    %.1f output tokens/s, %.1f total tokens/s, %.2f requests/s over %.2f s "
              "(%lld/%lld output tokens, %lld preemptions)\n",
              out_tps, total_tps, a.num_requests / secs, secs, (long long)out_tokens, (long long)expect,
              (long long)st.num_preemptions);
  const int64_t steps = st.steps - w.steps;
  std::printf("engine        %lld steps (%.2f ms each): %.2f s in the executor, %.2f s scheduling and handling "
              "results between steps\n",
              (long long)steps, steps ? 1e3 * secs / double(steps) : 0.0, st.execute_seconds - w.execute_seconds,
              st.host_seconds - w.host_seconds);
  if (a.output == "json") {
    nlohmann::json j = {{"device", device},           {"num_requests", a.num_requests}, {"input_len", a.input_len},
                        {"output_len", a.output_len}, {"seconds", secs},                {"output_tokens_per_s", out_tps},
                        {"total_tokens_per_s", total_tps}, {"output_tokens", out_tokens}, {"preemptions", st.num_preemptions},
                        {"steps", steps}, {"execute_seconds", st.execute_seconds - w.execute_seconds},
                        {"host_seconds", st.host_seconds - w.host_seconds}, {"plan_gemms", a.plan_gemms}};
    std::printf("%s\n", j.dump().c_str());
  }
  return out_tokens == expect ? 0 : fail("bench throughput", "fewer output tokens than asked for");
}

void common_flags(CLI::App* cmd, BenchArgs& a) {
  cmd->add_option("MODEL", a.model, "HF dir / .gguf, or with --dummy_weights a config.json (or its dir)")->required();
  add_switch(*cmd, "dummy_weights", a.dummy_weights, "random weights from MODEL's config (no download)");
  add_switch(*cmd, "plan_gemms", a.plan_gemms,
             "with --dummy_weights on a GPU: time cuBLASLt's GEMM candidates first, as kiln build does for an engine");
  add_flag(*cmd, "device", a.device, "cuda (default), cuda:N or cpu");
  add_flag(*cmd, "input_len", a.input_len, "prompt tokens per request");
  add_flag(*cmd, "output_len", a.output_len, "generated tokens per request");
  add_flag(*cmd, "kv_cache_blocks", a.kv_cache_blocks, "KV cache blocks (default: sized for the run / memory fraction)");
  add_flag(*cmd, "kv_cache_dtype", a.kv_cache_dtype,
           "auto (the checkpoint's choice) | fp8 (E4M3, the checkpoint's k/v scales or 1.0) | bf16")
      ->check(CLI::IsMember({"auto", "fp8", "bf16"}));
  add_flag(*cmd, "seed", a.seed, "seed for dummy weights and prompts");
  add_flag(*cmd, "output", a.output, "text | json (adds one JSON line)");
  add_flag(*cmd, "quantization", a.quantization,
           "GPU weights: auto (FP8 checkpoints stay FP8 on sm_89+), bf16, or fp8 (also FP8 dummy weights)");
}

}  // namespace
}  // namespace kiln::cli

KILN_VERB(bench_gpu) {
  using namespace kiln::cli;
  CLI::App* bench = nullptr;
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; }))
    if (sub->get_name() == "bench") bench = sub;
  if (!bench) {
    bench = app.add_subcommand("bench", "Benchmarks: latency, throughput, serve");
    bench->require_subcommand(1);
  }
  static BenchArgs lat, thr;
  auto* l = bench->add_subcommand("latency", "One batch: prefill and decode speed, with the GPU's measured ceilings");
  common_flags(l, lat);
  add_flag(*l, "batch_size", lat.batch_size, "sequences in the batch (default 1)");
  add_flag(*l, "reps", lat.reps, "timed prefill repetitions (default 5)");
  l->callback([] {
    if (int rc = latency(lat)) throw CLI::RuntimeError(rc);
  });
  auto* t = bench->add_subcommand("throughput", "trtllm-bench style: fixed-length synthetic requests, output tokens/s");
  common_flags(t, thr);
  add_flag(*t, "num_requests", thr.num_requests, "requests (default 256)");
  add_flag(*t, "max_batch_size", thr.max_batch_size, "engine max batch size (default 256)");
  add_flag(*t, "max_num_tokens", thr.max_num_tokens, "engine token budget per step (default 8192)");
  add_flag(*t, "kv_cache_memory_fraction", thr.kv_cache_memory_fraction, "of free GPU memory for the KV cache (0.9)");
  t->callback([] {
    if (int rc = throughput(thr)) throw CLI::RuntimeError(rc);
  });
}
