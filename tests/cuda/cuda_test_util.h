// Helpers shared by the CUDA test files: the GPU skip, error measures against a reference, a small
// Llama3-shaped config, and a teacher-forced batch runner for executor-vs-executor comparisons.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "backend/cpu/cpu_ops.h"
#include "backend/cuda/cuda_executor.h"
#include "backend/cuda/cuda_ops.h"
#include "core/dtype.h"
#include "model/config.h"
#include "model/executor.h"
#include "model/fp8.h"
#include "model/weights.h"

#define REQUIRE_GPU()                                                   \
  do {                                                                  \
    std::string why_;                                                   \
    if (!cuda::device_available(&why_)) GTEST_SKIP() << "no CUDA device: " << why_; \
  } while (0)

namespace kiln::cuda_test {

using namespace kiln;

inline float bf16_round(float x) { return bf16_to_f32(f32_to_bf16(x)); }

inline std::vector<float> random_vec(size_t n, std::mt19937& rng, float scale = 1.0f, bool round_bf16 = true) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = round_bf16 ? bf16_round(d(rng)) : d(rng);
  return v;
}

struct Err {
  double rel = 0, max_abs = 0, ref_max = 0;
  size_t worst = 0;
};

inline Err compare(const std::vector<float>& got, const std::vector<float>& ref) {
  Err e;
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = double(got[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * ref[i];
    if (!(std::fabs(d) <= e.max_abs)) {
      e.max_abs = std::isnan(d) ? INFINITY : std::fabs(d);
      e.worst = i;
    }
    e.ref_max = std::max(e.ref_max, std::fabs(double(ref[i])));
  }
  e.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return e;
}

inline double rel_l2(const std::vector<float>& got, const std::vector<float>& ref, double* max_abs) {
  const Err e = compare(got, ref);
  if (max_abs) *max_abs = e.max_abs;
  return e.rel;
}

#define EXPECT_CLOSE(got, ref, tol, what)                                                                       \
  do {                                                                                                          \
    Err e_ = compare(got, ref);                                                                                 \
    std::printf("  %-34s rel %.2e  max|d| %.3g (ref max %.3g)\n", std::string(what).c_str(), e_.rel, e_.max_abs, \
                e_.ref_max);                                                                                    \
    EXPECT_LE(e_.rel, tol) << what << ": first worst at " << e_.worst << " got " << (got)[e_.worst] << " ref "  \
                           << (ref)[e_.worst];                                                                  \
  } while (0)

// A one-block attention model: `heads` query heads over `kv` KV heads of head_dim `hd`, plain rope.
inline ModelConfig attn_config(int heads, int kv, int hd, int layers = 2, int max_pos = 1024) {
  ModelConfig c;
  c.vocab_size = 300;
  c.hidden_size = heads * hd;
  c.intermediate_size = 64;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv;
  c.head_dim = hd;
  c.rope_theta = 10000.0f;
  c.max_position_embeddings = max_pos;
  c.eos_token_ids = {2};
  return c;
}

// Relative L2 error of got against ref (NaN anywhere makes it NaN) and, optionally, the max |d|.
inline double rel_l2(const std::vector<float>& got, const std::vector<float>& ref, double* max_abs = nullptr);

inline ModelConfig small_config(int heads, int kv, int hd, int hidden, int inter) {
  ModelConfig c;
  c.vocab_size = 300;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_layers = 2;
  c.num_heads = heads;
  c.num_kv_heads = kv;
  c.head_dim = hd;
  c.rope_theta = 500000.0f;
  c.rope_scaling = RopeScaling::kLlama3;
  c.rope_factor = 8.0f;
  c.rope_low_freq_factor = 1.0f;
  c.rope_high_freq_factor = 4.0f;
  c.rope_original_max_pos = 64;
  c.max_position_embeddings = 1024;
  c.eos_token_ids = {2};
  return c;
}

// One sequence per entry: prompt in one step, then decode steps fed with `forced` tokens (teacher
// forcing), so CPU and GPU see the same inputs even when a near-tie flips one greedy choice.
struct SeqRun {
  std::vector<std::vector<float>> logits;  // per step, [vocab] of the sequence's last row
  std::vector<int32_t> argmax;
};

inline std::vector<SeqRun> run_batch(ModelExecutor& ex, const std::function<Status(std::vector<float>*)>& get_logits,
                              const std::vector<std::vector<int32_t>>& prompts,
                              const std::vector<std::vector<int32_t>>& forced, int steps, int max_blocks,
                              std::vector<float>* first_all_rows = nullptr) {
  const size_t n = prompts.size();
  std::vector<SeqRun> runs(n);
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  std::vector<std::vector<int32_t>> all = prompts;
  std::vector<int32_t> computed(n, 0);
  for (int step = 0; step <= steps; ++step) {
    StepBatch b;
    b.clear();
    b.max_blocks_per_seq = max_blocks;
    std::vector<SeqSampling> ss;
    for (size_t s = 0; s < n; ++s) {
      const int32_t q = int32_t(all[s].size()) - computed[s];
      for (int32_t i = 0; i < q; ++i) {
        b.token_ids.push_back(all[s][size_t(computed[s] + i)]);
        b.positions.push_back(computed[s] + i);
      }
      const int32_t start = b.query_start.back();
      b.query_start.push_back(start + q);
      b.context_lens.push_back(int32_t(all[s].size()));
      for (int j = 0; j < max_blocks; ++j) b.block_tables.push_back(int32_t(s) * max_blocks + j);
      if (step == 0 && first_all_rows && n == 1)
        for (int32_t i = 0; i < q - 1; ++i) {
          b.logits_rows.push_back(start + i);
          SeqSampling x;
          x.params = &greedy;
          ss.push_back(x);
        }
      b.logits_rows.push_back(start + q - 1);
      SeqSampling x;
      x.params = &greedy;
      ss.push_back(x);
    }
    std::vector<SampledToken> out;
    Status st = ex.execute(b, ss, &out);
    EXPECT_TRUE(st.is_ok()) << st.message();
    if (!st) return runs;
    std::vector<float> lg;
    EXPECT_TRUE(get_logits(&lg).is_ok());
    const size_t V = lg.size() / ss.size();
    if (step == 0 && first_all_rows) *first_all_rows = lg;
    for (size_t s = 0; s < n; ++s) {
      const size_t row = ss.size() - n + s;
      runs[s].logits.emplace_back(lg.begin() + long(row * V), lg.begin() + long((row + 1) * V));
      runs[s].argmax.push_back(out[row].id);
      computed[s] = int32_t(all[s].size());
      if (step < steps) all[s].push_back(forced[s][size_t(step)]);
    }
  }
  return runs;
}


// The model with every decoder linear quantized to FP8 (embedding and lm_head stay BF16, as
// kiln convert --use_fp8 leaves them), activations in `act`.
inline std::shared_ptr<Model> quantize_model(const Model& src, ActQuant act, bool per_channel) {
  auto m = std::make_shared<Model>(src);
  auto quantize = [&](Weight& w) {
    auto buf = std::make_shared<std::vector<uint8_t>>(size_t(w.rows * w.cols));
    std::vector<float> f(static_cast<size_t>(w.rows * w.cols));
    for (int64_t r = 0; r < w.rows; ++r) weight_row_to_f32(w, r, f.data() + r * w.cols);
    std::shared_ptr<float[]> rs;
    if (per_channel) rs.reset(new float[size_t(w.rows)]);
    const float t = fp8_scale_for_amax(fp8_amax(f.data(), w.rows * w.cols));
    for (int64_t r = 0; r < w.rows; ++r) {
      const float s = per_channel ? fp8_scale_for_amax(fp8_amax(f.data() + r * w.cols, w.cols)) : t;
      if (per_channel) rs[size_t(r)] = s;
      fp8_quantize(f.data() + r * w.cols, w.cols, s, buf->data() + r * w.cols);
    }
    w.format = WeightFormat::kF8E4M3;
    w.row_bytes = size_t(w.cols);
    w.data = buf->data();
    w.owner = buf;
    w.scale = t;
    w.row_scales = per_channel ? std::shared_ptr<const float>(rs, rs.get()) : nullptr;
    w.act_quant = act;
    w.input_scale = 0.05f;
  };
  for (LayerWeights& l : m->weights.layers)
    for (Weight* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) quantize(*w);
  return m;
}

// cuBLASLt, a stream and CudaOps over c with buffers reserved for caps (c must outlive the rig).
struct OpsRig {
  cuda::Gemm gemm;
  cudaStream_t stream = nullptr;
  std::unique_ptr<cuda::CudaOps> gpu;

  ::testing::AssertionResult init(const ModelConfig& c, const cuda::StepCaps& caps) {
    if (!gemm.init().is_ok()) return ::testing::AssertionFailure() << "cuBLASLt init";
    cudaStreamCreate(&stream);
    gpu = std::make_unique<cuda::CudaOps>(c, &gemm, stream);
    if (!gpu->reserve(caps).is_ok()) return ::testing::AssertionFailure() << "reserve";
    return ::testing::AssertionSuccess();
  }
  ~OpsRig() {
    gpu.reset();
    if (stream) cudaStreamDestroy(stream);
  }
};

// OpsRig over a one-layer paged KV cache of num_blocks blocks of bs tokens (bf16, or FP8 with the
// given scales), every byte `fill` to start.
struct KvOpsRig : OpsRig {
  cuda::DeviceKv dkv;

  ::testing::AssertionResult init(const ModelConfig& c, int num_blocks, int bs, bool fp8, float k_scale, float v_scale,
                                  const cuda::StepCaps& caps, unsigned char fill) {
    if (auto r = OpsRig::init(c, caps); !r) return r;
    dkv.num_blocks = num_blocks;
    dkv.block_size = bs;
    dkv.fp8 = fp8;
    if (fp8) {
      dkv.k_scale = {k_scale};
      dkv.v_scale = {v_scale};
    }
    const size_t cache_bytes = size_t(num_blocks) * bs * c.kv_dim() * dkv.elem_bytes();
    void *k = nullptr, *v = nullptr;
    if (cudaMalloc(&k, cache_bytes) != cudaSuccess || cudaMalloc(&v, cache_bytes) != cudaSuccess)
      return ::testing::AssertionFailure() << "cudaMalloc of the KV cache";
    cudaMemset(k, fill, cache_bytes);
    cudaMemset(v, fill, cache_bytes);
    dkv.k.push_back(k);
    dkv.v.push_back(v);
    gpu->set_kv(&dkv);
    return ::testing::AssertionSuccess();
  }
  ~KvOpsRig() {
    gpu.reset();
    for (void* p : dkv.k) cudaFree(p);
    for (void* p : dkv.v) cudaFree(p);
  }
};

// The CPU reference ops and their CUDA twin over a one-layer paged KV cache (bf16 or FP8 with the
// given scales), for the attention tests. The device cache starts as NaN-ish garbage (0x7f bytes):
// a kernel that reads a slot nothing wrote shows it. `perm` is a shuffled block order, so block
// tables are scattered.
struct AttnRig : KvOpsRig {
  CpuKvCache ckv;
  std::unique_ptr<CpuOps> cpu;
  std::vector<int32_t> perm;

  ::testing::AssertionResult init(const ModelConfig& c, int num_blocks, int bs, bool fp8, float k_scale, float v_scale,
                                  const cuda::StepCaps& caps, std::mt19937& rng) {
    ckv.init(c, num_blocks, bs);
    if (fp8) ckv.set_fp8({k_scale}, {v_scale});
    cpu = std::make_unique<CpuOps>(c, &ckv);
    if (auto r = KvOpsRig::init(c, num_blocks, bs, fp8, k_scale, v_scale, caps, 0x7f); !r) return r;
    perm.resize(static_cast<size_t>(num_blocks));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    return ::testing::AssertionSuccess();
  }
};

// Times of reps calls of fn on stream (ms each, CUDA events), after `warmup` untimed calls.
template <typename F>
std::vector<float> event_times_ms(cudaStream_t stream, int warmup, int reps, F fn) {
  for (int i = 0; i < warmup; ++i) fn();
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(e0, stream);
    fn();
    cudaEventRecord(e1, stream);
    cudaEventSynchronize(e1);
    float t = 0;
    cudaEventElapsedTime(&t, e0, e1);
    ms.push_back(t);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return ms;
}

}  // namespace kiln::cuda_test
