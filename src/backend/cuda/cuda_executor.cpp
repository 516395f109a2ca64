#include "backend/cuda/cuda_executor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <cuda_runtime_api.h>

#include "backend/cpu/sampler.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/sampler.h"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/fp8.h"
#include "backend/cuda/gemv_fp8.h"
#include "core/dtype.h"
#include "core/log.h"
#include "core/thread_pool.h"

namespace kiln {
namespace cuda {
namespace {

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Decode batch sizes that get a graph; a batch runs in the smallest bucket that holds it.
// Past 256 the steps are long (>= 7 ms for an 8B model), so coarser buckets waste little.
constexpr int32_t kBuckets[] = {1,   2,   4,   8,   12,  16,  24,  32,  48,  64,  80,  96,  128, 160,
                                192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024};

int32_t bucket_for(int32_t n) {
  for (int32_t b : kBuckets)
    if (b >= n) return b;
  return -1;
}

// Rows plain argmax cannot serve: the device sampler takes them, or the host one (logprobs, or
// KILN_DEVICE_SAMPLING=0).
bool needs_sampler(const SeqSampling& s) {
  const SamplingParams& p = *s.params;
  return !p.greedy() || p.logprobs >= 0 || p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f ||
         p.frequency_penalty != 0.0f || !p.logit_bias.empty() || (s.banned_ids && !s.banned_ids->empty());
}

Status parse_device(const std::string& dev, int* index) {
  if (dev == "cuda") {
    *index = 0;
    return Status::ok();
  }
  if (dev.rfind("cuda:", 0) == 0) {
    char* end = nullptr;
    long v = std::strtol(dev.c_str() + 5, &end, 10);
    if (end && *end == 0 && v >= 0 && v < 64) {
      *index = int(v);
      return Status::ok();
    }
  }
  return Status::error("device '" + dev + "': expected cuda or cuda:N");
}

}  // namespace

bool device_available(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why) *why = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
    cudaGetLastError();
    return false;
  }
  if (n == 0) {
    if (why) *why = "cudaGetDeviceCount returned 0";
    return false;
  }
  return true;
}

CudaExecutor::~CudaExecutor() {
  if (stream_) cudaStreamSynchronize(as_stream(stream_));
  for (int g = 0; g < 3 && step_timing_; ++g) {
    const StepTiming& t = timing_[g];
    if (t.steps == 0) continue;
    const char* kind[] = {"eager", "graph-replayed", "graph-capturing (eager + capture + instantiate)"};  // StepPath
    std::fprintf(stderr,
                 "step timing (KILN_STEP_TIMING=1): %lld %s steps, host enqueue %.3f ms, wall %.3f ms a step "
                 "(enqueue %.1f %% of wall)\n",
                 (long long)t.steps, kind[g], 1e3 * t.enqueue_s / double(t.steps),
                 1e3 * t.wall_s / double(t.steps), 100.0 * t.enqueue_s / std::max(t.wall_s, 1e-12));
  }
  if (step_timing_ && gemm_) {
    const Gemm::Stats& g = gemm_->stats();
    std::fprintf(stderr,
                 "step timing (KILN_STEP_TIMING=1): GEMM shapes planned by the table %lld, nearest table entry %lld, "
                 "heuristic %lld (%.1f ms in cublasLtMatmulAlgoGetHeuristic)\n",
                 (long long)g.table, (long long)g.nearest, (long long)g.heuristic, 1e3 * g.heuristic_s);
  }
  clear_graphs();
  ops_.reset();
  gemm_.reset();
  for (void* p : allocations_) cudaFree(p);
  cudaFree(kv_base_);
  cudaFree(d_ids_);
  cudaFree(d_argmax_);
  if (h_ids_) cudaFreeHost(h_ids_);
  if (h_logits_) cudaFreeHost(h_logits_);
  if (stream_) cudaStreamDestroy(as_stream(stream_));
}

void CudaExecutor::clear_graphs() {
  for (auto& [b, g] : graphs_) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(g));
  graphs_.clear();
}

size_t CudaExecutor::kv_bytes_per_token() const {
  return size_t(2) * config_.num_layers * config_.kv_dim() * (kv_ && kv_->fp8 ? 1 : 2);
}

// The checkpoint's FP8 KV-cache request and per-layer scales travel with the device weights.
static void copy_kv_cache_scales(const ModelWeights& host, ModelWeights* dw) {
  dw->fp8_kv_cache = host.fp8_kv_cache;
  for (size_t i = 0; i < dw->layers.size() && i < host.layers.size(); ++i) {
    dw->layers[i].k_scale = host.layers[i].k_scale;
    dw->layers[i].v_scale = host.layers[i].v_scale;
  }
}

Status CudaExecutor::init_common(const LoadOptions& opts) {
  step_timing_ = env_int("KILN_STEP_TIMING", 0) != 0;
  std::string why;
  if (!device_available(&why)) return Status::error("no CUDA device: " + why);
  KILN_RETURN_IF_ERROR(parse_device(opts.device, &device_));
  int n = 0;
  cudaGetDeviceCount(&n);
  if (device_ >= n)
    return Status::error("device " + opts.device + ": only " + std::to_string(n) + " CUDA device(s) present");
  KILN_RETURN_IF_ERROR(cuda_status(cudaSetDevice(device_), "cudaSetDevice"));
  const ModelConfig& c = config_;
  if (!attention_supports_head_dim(c.head_dim))
    return Status::error("CUDA backend: head_dim " + std::to_string(c.head_dim) + " is not supported (16, 32, 64, 128)");
  if (c.hidden_size % 8 || c.intermediate_size % 8 || c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads)
    return Status::error("CUDA backend: hidden_size and intermediate_size must be multiples of 8 and heads a multiple "
                         "of kv heads");
  cudaStream_t s = nullptr;
  KILN_RETURN_IF_ERROR(cuda_status(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
  stream_ = s;
  gemm_ = std::make_unique<Gemm>();
  KILN_RETURN_IF_ERROR(gemm_->init());
  if (const char* g = std::getenv("KILN_CUDA_GRAPHS")) use_graphs_ = std::string(g) != "0";
  if (const char* g = std::getenv("KILN_DEVICE_SAMPLING")) device_sampling_ = std::string(g) != "0";
  return Status::ok();
}

// Weight allocation in device memory: the fused groups (q|k|v, gate|up) are one allocation each.
namespace {

Weight device_matrix(void* ptr, int64_t rows, int64_t cols, const std::string& name) {
  Weight w;
  w.format = WeightFormat::kBF16;
  w.rows = rows;
  w.cols = cols;
  w.row_bytes = size_t(cols) * 2;
  w.data = ptr;
  w.name = name;
  return w;
}

Weight device_vector(void* ptr, int64_t n, const std::string& name) {
  Weight w;
  w.format = WeightFormat::kF32;
  w.rows = 1;
  w.cols = n;
  w.row_bytes = size_t(n) * 4;
  w.data = ptr;
  w.name = name;
  return w;
}

// Host weight (any format) -> bf16 rows at dst. bf16 sources are copied as they are.
Status upload_matrix(const Weight& hw, void* dst, cudaStream_t s) {
  const int64_t rows = hw.rows, cols = hw.cols;
  if (hw.format == WeightFormat::kBF16 && hw.row_bytes == size_t(cols) * 2)
    return cuda_status(cudaMemcpy(dst, hw.data, size_t(rows * cols) * 2, cudaMemcpyHostToDevice), "upload " + hw.name);
  const int64_t chunk = std::max<int64_t>(1, (int64_t(32) << 20) / std::max<int64_t>(1, cols * 2));
  std::vector<uint16_t> staging;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk);
    staging.resize(size_t((r1 - r0) * cols));
    parallel_for(r1 - r0, [&](int64_t b, int64_t e) {
      std::vector<float> row(static_cast<size_t>(cols));
      for (int64_t r = b; r < e; ++r) {
        weight_row_to_f32(hw, r0 + r, row.data());
        for (int64_t i = 0; i < cols; ++i) staging[size_t(r * cols + i)] = f32_to_bf16(row[size_t(i)]);
      }
    });
    KILN_RETURN_IF_ERROR(cuda_status(cudaMemcpy(static_cast<uint16_t*>(dst) + r0 * cols, staging.data(),
                                                staging.size() * 2, cudaMemcpyHostToDevice),
                                     "upload " + hw.name));
  }
  (void)s;
  return Status::ok();
}

Status upload_vector(const Weight& hw, void* dst) {
  std::vector<float> v(size_t(hw.rows * hw.cols));
  for (int64_t r = 0; r < hw.rows; ++r) weight_row_to_f32(hw, r, v.data() + r * hw.cols);
  return cuda_status(cudaMemcpy(dst, v.data(), v.size() * 4, cudaMemcpyHostToDevice), "upload " + hw.name);
}

}  // namespace

ActQuant dummy_fp8_activations() {
  const char* e = std::getenv("KILN_FP8_ACT");
  const std::string v = e ? e : "static";
  if (v == "dynamic_per_token") return ActQuant::kDynamicToken;
  if (v == "dynamic_per_tensor") return ActQuant::kDynamicTensor;
  return ActQuant::kStaticTensor;
}

namespace {

Fp8Act fp8_act_of(ActQuant a) {
  switch (a) {
    case ActQuant::kStaticTensor: return Fp8Act::kStatic;
    case ActQuant::kDynamicTensor: return Fp8Act::kDynamicTensor;
    case ActQuant::kNone:  // weight-only on the CPU; per token is the closest the FP8 GEMM gets
    case ActQuant::kDynamicToken: return Fp8Act::kDynamicToken;
  }
  return Fp8Act::kDynamicToken;
}

// Uploads (or generates) the model's weights. Fused groups (q|k|v, gate|up) are one allocation so
// one GEMM/GEMV covers them; an FP8 group stays FP8 (1 byte per weight, scales per row when its
// members' scales differ) when the GPU has FP8 tensor cores, else it is dequantized to bf16 here.
class WeightBuilder {
 public:
  WeightBuilder(const ModelConfig& c, const ModelWeights* host, uint64_t seed, bool fp8_ok, bool dummy_fp8,
                std::vector<void*>* allocs, std::vector<std::pair<const void*, Fp8Weight>>* fp8_regs, cudaStream_t s)
      : c_(c), host_(host), seed_(seed), fp8_ok_(fp8_ok), dummy_fp8_(dummy_fp8), allocs_(allocs), regs_(fp8_regs),
        s_(s) {}

  Status build(ModelWeights* dw) {
    const int64_t H = c_.hidden_size, I = c_.intermediate_size, V = c_.vocab_size, Q = c_.q_dim(), KV = c_.kv_dim();
    const ModelWeights* h = host_;
    KILN_RETURN_IF_ERROR(group({{h ? &h->embed : nullptr, V, "embed"}}, H, 1.0f, /*may_fp8=*/false, {&dw->embed}));
    const bool tied = h ? h->lm_head.data == h->embed.data : c_.tie_word_embeddings;
    if (tied) dw->lm_head = dw->embed;
    else KILN_RETURN_IF_ERROR(group({{h ? &h->lm_head : nullptr, V, "lm_head"}}, H, 0.02f, false, {&dw->lm_head}));
    KILN_RETURN_IF_ERROR(vec(h ? &h->final_norm : nullptr, H, 1.0f, "norm", &dw->final_norm));
    dw->layers.resize(size_t(c_.num_layers));
    for (int32_t i = 0; i < c_.num_layers; ++i) {
      const LayerWeights* hl = h ? &h->layers[size_t(i)] : nullptr;
      LayerWeights& l = dw->layers[size_t(i)];
      const std::string pre = "layer " + std::to_string(i) + " ";
      KILN_RETURN_IF_ERROR(vec(hl ? &hl->attn_norm : nullptr, H, 1.0f, pre + "attn_norm", &l.attn_norm));
      KILN_RETURN_IF_ERROR(vec(hl ? &hl->ffn_norm : nullptr, H, 1.0f, pre + "ffn_norm", &l.ffn_norm));
      KILN_RETURN_IF_ERROR(group({{hl ? &hl->wq : nullptr, Q, pre + "wq"},
                                  {hl ? &hl->wk : nullptr, KV, pre + "wk"},
                                  {hl ? &hl->wv : nullptr, KV, pre + "wv"}},
                                 H, 0.02f, true, {&l.wq, &l.wk, &l.wv}));
      KILN_RETURN_IF_ERROR(group({{hl ? &hl->wo : nullptr, H, pre + "wo"}}, Q, 0.02f, true, {&l.wo}));
      KILN_RETURN_IF_ERROR(group({{hl ? &hl->w_gate : nullptr, I, pre + "w_gate"},
                                  {hl ? &hl->w_up : nullptr, I, pre + "w_up"}},
                                 H, 0.02f, true, {&l.w_gate, &l.w_up}));
      KILN_RETURN_IF_ERROR(group({{hl ? &hl->w_down : nullptr, H, pre + "w_down"}}, I, 0.02f, true, {&l.w_down}));
      if (hl && !hl->bq.empty()) {
        KILN_RETURN_IF_ERROR(vec(&hl->bq, Q, 0.0f, pre + "bq", &l.bq));
        KILN_RETURN_IF_ERROR(vec(&hl->bk, KV, 0.0f, pre + "bk", &l.bk));
        KILN_RETURN_IF_ERROR(vec(&hl->bv, KV, 0.0f, pre + "bv", &l.bv));
      }
      if (c_.qk_norm) {
        KILN_RETURN_IF_ERROR(vec(hl ? &hl->q_norm : nullptr, c_.head_dim, 1.0f, pre + "q_norm", &l.q_norm));
        KILN_RETURN_IF_ERROR(vec(hl ? &hl->k_norm : nullptr, c_.head_dim, 1.0f, pre + "k_norm", &l.k_norm));
      }
      if (hl) {
        l.k_scale = hl->k_scale;
        l.v_scale = hl->v_scale;
      }
    }
    if (h) dw->fp8_kv_cache = h->fp8_kv_cache;
    return cuda_status(cudaStreamSynchronize(s_), "weight upload");
  }

 private:
  struct Member {
    const Weight* hw;  // null: dummy
    int64_t rows;
    std::string name;
  };

  Status alloc(size_t bytes, const std::string& what, void** p) {
    KILN_RETURN_IF_ERROR(device_alloc(p, bytes, "weights (" + what + ")"));
    allocs_->push_back(*p);
    return Status::ok();
  }

  Status vec(const Weight* hw, int64_t n, float value, const std::string& name, Weight* out) {
    void* p = nullptr;
    KILN_RETURN_IF_ERROR(alloc(size_t(n) * 4, name, &p));
    if (hw) {
      if (hw->rows * hw->cols != n)
        return Status::error("weight " + hw->name + ": " + std::to_string(hw->rows * hw->cols) + " values, expected " +
                             std::to_string(n));
      KILN_RETURN_IF_ERROR(upload_vector(*hw, p));
    } else {
      launch_fill_f32(static_cast<float*>(p), n, value, s_);
    }
    *out = device_vector(p, n, name);
    return Status::ok();
  }

  Status check_shape(const Member& m, int64_t cols) const {
    if (m.hw && (m.hw->rows != m.rows || m.hw->cols != cols))
      return Status::error("weight " + m.hw->name + ": shape [" + std::to_string(m.hw->rows) + ", " +
                           std::to_string(m.hw->cols) + "], expected [" + std::to_string(m.rows) + ", " +
                           std::to_string(cols) + "]");
    return Status::ok();
  }

  // One allocation holding the members' rows back to back; outs[i] views member i.
  Status group(std::vector<Member> members, int64_t cols, float stddev, bool may_fp8, std::vector<Weight*> outs) {
    int64_t total = 0;
    for (const Member& m : members) {
      KILN_RETURN_IF_ERROR(check_shape(m, cols));
      total += m.rows;
    }
    bool fp8 = may_fp8 && fp8_ok_ && cols % 16 == 0;
    for (const Member& m : members) fp8 = fp8 && (m.hw ? m.hw->format == WeightFormat::kF8E4M3 : dummy_fp8_);
    const size_t esize = fp8 ? 1 : 2;
    const std::string& gname = members.front().name;
    void* base = nullptr;
    KILN_RETURN_IF_ERROR(alloc(size_t(total * cols) * esize, gname, &base));
    std::vector<float> row_scales;  // fp8: every row's dequantization scale
    Fp8Act act = fp8_act_of(dummy_fp8_activations());
    float input_scale = 0.0f;
    int64_t r0 = 0;
    for (size_t i = 0; i < members.size(); ++i) {
      const Member& m = members[i];
      uint8_t* dst = static_cast<uint8_t*>(base) + size_t(r0 * cols) * esize;
      if (!fp8) {
        KILN_RETURN_IF_ERROR(m.hw ? upload_matrix(*m.hw, dst, s_) : fill_dummy_bf16(dst, m.rows * cols, stddev, m.name));
      } else if (m.hw) {
        if (m.hw->row_bytes != size_t(cols))
          return Status::error("weight " + m.hw->name + ": FP8 rows of " + std::to_string(m.hw->row_bytes) +
                               " bytes, expected " + std::to_string(cols));
        KILN_RETURN_IF_ERROR(cuda_status(cudaMemcpy(dst, m.hw->data, size_t(m.rows * cols), cudaMemcpyHostToDevice),
                                         "upload " + m.hw->name));
        for (int64_t r = 0; r < m.rows; ++r) row_scales.push_back(m.hw->row_scale(r));
        if (i == 0) act = fp8_act_of(m.hw->act_quant);
        input_scale = std::max(input_scale, m.hw->input_scale);
      } else {
        // Dummy FP8: uniform with the bf16 dummy's stddev, per-tensor scale = amax / 448.
        const float a = stddev * std::sqrt(3.0f), scale = a / 448.0f;
        launch_fill_uniform_fp8(dst, m.rows * cols, seed_ * 0x9E3779B97F4A7C15ull + (++tensor_), a, scale, s_);
        KILN_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "dummy " + m.name));
        row_scales.insert(row_scales.end(), size_t(m.rows), scale);
        input_scale = 0.05f;  // any positive scale: dummy activations are not calibrated
      }
      Weight& w = *outs[i];
      w = device_matrix(dst, m.rows, cols, m.name);
      if (fp8) {
        w.format = WeightFormat::kF8E4M3;
        w.row_bytes = size_t(cols);
        w.scale = row_scales[size_t(r0)];
      }
      r0 += m.rows;
    }
    if (fp8) KILN_RETURN_IF_ERROR(register_fp8(members, outs, row_scales, act, input_scale));
    return Status::ok();
  }

  // Device scales of an FP8 group; one registration per member (a member's rows are a suffix of
  // the group's, so its d_row_scales point into the group's array).
  Status register_fp8(const std::vector<Member>& members, const std::vector<Weight*>& outs,
                      const std::vector<float>& row_scales,
                      Fp8Act act, float input_scale) {
    const size_t n = row_scales.size();
    bool per_channel = false;
    for (float v : row_scales) per_channel = per_channel || v != row_scales[0];
    if (act == Fp8Act::kStatic && !(input_scale > 0.0f))
      return Status::error("weight " + members.front().name + ": static FP8 activations without a positive input_scale");
    std::vector<float> host(n + 2);
    std::copy(row_scales.begin(), row_scales.end(), host.begin());
    host[n] = row_scales[0];
    host[n + 1] = input_scale > 0.0f ? input_scale : 1.0f;
    void* p = nullptr;
    KILN_RETURN_IF_ERROR(alloc(host.size() * 4, members.front().name + " scales", &p));
    KILN_RETURN_IF_ERROR(
        cuda_status(cudaMemcpy(p, host.data(), host.size() * 4, cudaMemcpyHostToDevice), "upload FP8 scales"));
    const float* d = static_cast<const float*>(p);
    int64_t r0 = 0;
    for (size_t i = 0; i < members.size(); ++i) {
      Fp8Weight f;
      f.scale = row_scales[size_t(r0)];
      f.d_scale = d + n;  // the group's first scale: exact when !per_channel
      f.d_row_scales = d + r0;
      f.per_channel = per_channel;
      f.act = act;
      f.d_input_scale = d + n + 1;
      regs_->emplace_back(outs[i]->data, f);
      r0 += members[i].rows;
    }
    return Status::ok();
  }

  Status fill_dummy_bf16(void* dst, int64_t n, float stddev, const std::string& name) {
    launch_fill_uniform_bf16(static_cast<bf16_t*>(dst), n, seed_ * 0x9E3779B97F4A7C15ull + (++tensor_),
                             stddev * std::sqrt(3.0f), s_);
    return cuda_status(cudaGetLastError(), "dummy " + name);
  }

  const ModelConfig& c_;
  const ModelWeights* host_;
  uint64_t seed_;
  bool fp8_ok_, dummy_fp8_;
  std::vector<void*>* allocs_;
  std::vector<std::pair<const void*, Fp8Weight>>* regs_;
  cudaStream_t s_;
  uint64_t tensor_ = 0;
};

}  // namespace

Status CudaExecutor::build_weights(const ModelWeights* host, uint64_t seed, const LoadOptions& opts) {
  const std::string& q = opts.quantization;
  if (q != "auto" && q != "bf16" && q != "fp8")
    return Status::error("quantization '" + q + "': expected auto, bf16 or fp8");
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_);
  const bool fp8_hw = major * 10 + minor >= 89;
  if (q == "fp8" && !fp8_hw)
    return Status::error("quantization fp8 needs FP8 tensor cores (sm_89 or newer); this GPU is sm_" +
                         std::to_string(major) + std::to_string(minor) + ": use bf16");
  WeightBuilder b(config_, host, seed, fp8_hw && q != "bf16", !host && q == "fp8", &allocations_, &fp8_regs_,
                  as_stream(stream_));
  return b.build(&dw_);
}

Status CudaExecutor::finish_init(const LoadOptions& opts) {
  const ModelConfig& c = config_;
  cudaStream_t s = as_stream(stream_);
  ops_ = std::make_unique<CudaOps>(config_, gemm_.get(), s);
  for (const LayerWeights& l : dw_.layers) {
    ops_->register_fused(l.wq.data, c.q_dim() + 2 * c.kv_dim(), Buf::kQ, {{l.wk.data, Buf::kK}, {l.wv.data, Buf::kV}});
    ops_->register_fused(l.w_gate.data, 2 * int64_t(c.intermediate_size), Buf::kGate, {{l.w_up.data, Buf::kUp}});
  }
  KILN_RETURN_IF_ERROR(make_tiled_copies(opts));
  for (const auto& [data, f] : fp8_regs_) ops_->register_fp8(data, f);
  weight_bytes_per_token_ = size_t(c.vocab_size) * c.hidden_size * 2;  // lm_head
  for (const LayerWeights& l : dw_.layers)
    for (const Weight* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) weight_bytes_per_token_ += w->nbytes();

  const int32_t max_seq = opts.max_seq_len > 0 ? opts.max_seq_len : c.max_position_embeddings;
  const int32_t bs = opts.block_size;
  if (bs <= 0 || bs > 1024) return Status::error("block_size " + std::to_string(bs) + " is out of range");
  const int32_t max_blocks_per_seq = (max_seq + bs - 1) / bs;
  // Activations for steps of up to 8192 tokens and 512 sequences (both grown on demand).
  StepCaps caps;
  caps.tokens = 8192;
  caps.seqs = 512;
  caps.logit_rows = 512;
  caps.table_ints = std::min<int32_t>(caps.seqs * max_blocks_per_seq, 4 << 20);
  KILN_RETURN_IF_ERROR(ops_->reserve(caps));
  KILN_RETURN_IF_ERROR(reserve_ids(caps.logit_rows));

  // KV cache: a block count, or a fraction of what is free now; bf16, or FP8 E4M3 (1 byte an
  // element) when the checkpoint or --kv_cache_dtype / KILN_KV_CACHE_DTYPE asks for it.
  Result<bool> kv_fp8 = resolve_kv_cache_fp8(opts.kv_cache_dtype, dw_.fp8_kv_cache);
  if (!kv_fp8) return kv_fp8.status();
  for (int32_t l = 0; *kv_fp8 && l < c.num_layers; ++l)
    for (float sc : {dw_.layers[size_t(l)].k_scale, dw_.layers[size_t(l)].v_scale})
      if (!(sc > 0.0f && sc < 3.0e38f))
        return Status::error("layer " + std::to_string(l) + ": FP8 KV-cache scale " + std::to_string(sc) +
                             " must be positive and finite (self_attn.k_scale / v_scale)");
  const size_t kv_elem = *kv_fp8 ? 1 : 2;
  const size_t per_block = size_t(2) * c.num_layers * bs * c.kv_dim() * kv_elem;
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  int64_t blocks = opts.kv_cache_blocks;
  if (blocks <= 0) blocks = int64_t(double(free_b) * opts.kv_cache_memory_fraction) / int64_t(per_block);
  if (blocks <= 0)
    return Status::error("CUDA out of memory for the KV cache: one block needs " + mib(per_block) + ", " + mib(free_b) +
                         " free of " + mib(total_b) + " after the weights");
  blocks = std::min<int64_t>(blocks, INT32_MAX / bs - 1);
  KILN_RETURN_IF_ERROR(device_alloc(&kv_base_, size_t(blocks) * per_block,
                                    "the KV cache (" + std::to_string(blocks) + " blocks of " + std::to_string(bs) +
                                        " tokens)"));
  kv_ = std::make_unique<DeviceKv>();
  kv_->num_blocks = int32_t(blocks);
  kv_->block_size = bs;
  kv_->fp8 = *kv_fp8;
  const size_t per_layer = size_t(blocks) * bs * c.kv_dim() * kv_elem;  // bytes
  for (int32_t l = 0; l < c.num_layers; ++l) {
    kv_->k.push_back(static_cast<uint8_t*>(kv_base_) + size_t(2 * l) * per_layer);
    kv_->v.push_back(static_cast<uint8_t*>(kv_base_) + size_t(2 * l + 1) * per_layer);
    kv_->k_scale.push_back(dw_.layers[size_t(l)].k_scale);
    kv_->v_scale.push_back(dw_.layers[size_t(l)].v_scale);
  }
  ops_->set_kv(kv_.get());

  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, device_);
  info_.vocab_size = c.vocab_size;
  info_.block_size = bs;
  info_.num_kv_blocks = int32_t(blocks);
  info_.max_seq_len = max_seq;
  info_.eos_ids = c.eos_token_ids;
  info_.device = "cuda:" + std::to_string(device_) + " (" + prop.name + ")";
  log_info("cuda: " + info_.device + ", weights " + mib(weight_bytes_per_token_) + " streamed per decode step, KV " +
           std::to_string(blocks) + " blocks (" + mib(size_t(blocks) * per_block) + (*kv_fp8 ? ", fp8" : ", bf16") +
           "), activations " +
           mib(ops_->reserved_bytes()) + ", " + gemm_->library());
  return Status::ok();
}

Status CudaExecutor::make_tiled_copies(const LoadOptions& opts) {
  static const bool on = env_int("KILN_FP8_TILED", 1) != 0;
  // Only where every decode step runs on the GEMV (M <= Gemm::gemv_max_m, 4 unless KILN_GEMV_MAX_M):
  // past that the steps of a full batch take cuBLASLt's GEMM and the copies would mostly sit idle.
  if (!on || opts.max_batch_size < 1 || opts.max_batch_size > gemm_->gemv_max_m() || fp8_regs_.empty() ||
      !gemv_fp8_mma_enabled())
    return Status::ok();
  const ModelConfig& c = config_;
  std::map<const void*, Fp8Weight*> regs;
  for (auto& [data, f] : fp8_regs_) regs[data] = &f;
  // The copies to make: q|k|v and gate|up are one matrix each (uploaded back to back:
  // register_fused); the silu pair's copy pairs gate row r with up row I + r.
  struct Copy {
    const Weight* w;
    int64_t rows;
    bool pair;
    Fp8Weight* reg;
    size_t bytes;
  };
  std::vector<Copy> copies;
  size_t bytes = 0;
  for (const LayerWeights& l : dw_.layers)
    for (Copy m : {Copy{&l.wq, c.q_dim() + 2 * c.kv_dim(), false}, Copy{&l.wo, c.hidden_size, false},
                   Copy{&l.w_gate, c.intermediate_size, true}, Copy{&l.w_down, c.hidden_size, false}}) {
      auto it = regs.find(m.w->data);
      if (it == regs.end() || !fp8_tiled_shape_ok(m.rows, m.w->cols, m.pair)) continue;
      m.reg = it->second;
      m.bytes = size_t(m.rows) * size_t(m.w->cols) * (m.pair ? 2 : 1);
      bytes += m.bytes;
      copies.push_back(m);
    }
  // The copies come out of what the KV cache would get: not more than half of what is free now.
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  if (bytes > free_b / 2) {
    log_info("cuda: no tiled FP8 copies for the decode GEMV: they would take " + mib(bytes) + " of " + mib(free_b) +
             " free");
    return Status::ok();
  }
  cudaStream_t s = as_stream(stream_);
  for (const Copy& m : copies) {
    void* p = nullptr;
    KILN_RETURN_IF_ERROR(device_alloc(&p, m.bytes, "the decode GEMV's tiled copy of " + m.w->name +
                                                       " (KILN_FP8_TILED=0 or a max batch size over 4 goes without)"));
    allocations_.push_back(p);
    if (!launch_tile_fp8(m.w->data, m.rows, m.w->cols, m.pair, p, s))
      return Status::error("tiling " + m.w->name + " for the decode GEMV failed");
    m.reg->tiled = p;
  }
  KILN_RETURN_IF_ERROR(cuda_status(cudaStreamSynchronize(s), "tiling the FP8 matrices"));
  tiled_bytes_ = bytes;
  if (bytes) log_info("cuda: FP8 matrices tiled for the decode GEMV (max batch " + std::to_string(opts.max_batch_size) +
                      "): +" + mib(bytes));
  return Status::ok();
}

Result<std::unique_ptr<CudaExecutor>> CudaExecutor::create(std::shared_ptr<const Model> host_model,
                                                           const LoadOptions& opts) {
  std::unique_ptr<CudaExecutor> ex(new CudaExecutor());
  ex->config_ = host_model->config;
  KILN_RETURN_IF_ERROR(ex->init_common(opts));
  KILN_RETURN_IF_ERROR(ex->build_weights(&host_model->weights, 0, opts));
  copy_kv_cache_scales(host_model->weights, &ex->dw_);
  KILN_RETURN_IF_ERROR(ex->finish_init(opts));
  return ex;
}

Result<std::unique_ptr<CudaExecutor>> CudaExecutor::create_dummy(const ModelConfig& c, const LoadOptions& opts,
                                                                 uint64_t seed) {
  std::unique_ptr<CudaExecutor> ex(new CudaExecutor());
  ex->config_ = c;
  KILN_RETURN_IF_ERROR(ex->init_common(opts));
  KILN_RETURN_IF_ERROR(ex->build_weights(nullptr, seed, opts));
  KILN_RETURN_IF_ERROR(ex->finish_init(opts));
  return ex;
}

// The sampled-id buffers (device and pinned host) for at least `rows` rows; grown between steps.
Status CudaExecutor::reserve_ids(int32_t rows) {
  if (rows <= ids_cap_) return Status::ok();
  const int32_t n = std::max(rows, 2 * ids_cap_);
  cudaFree(d_ids_);
  cudaFree(d_argmax_);
  if (h_ids_) cudaFreeHost(h_ids_);
  d_ids_ = h_ids_ = nullptr;
  d_argmax_ = nullptr;
  ids_cap_ = 0;
  KILN_RETURN_IF_ERROR(device_alloc(reinterpret_cast<void**>(&d_ids_), size_t(n) * 4, "sampled ids"));
  KILN_RETURN_IF_ERROR(device_alloc(&d_argmax_, argmax_scratch_bytes(n), "argmax scratch"));
  KILN_RETURN_IF_ERROR(cuda_status(cudaMemset(d_argmax_, 0, argmax_scratch_bytes(n)), "argmax scratch"));
  KILN_RETURN_IF_ERROR(cuda_status(cudaMallocHost(reinterpret_cast<void**>(&h_ids_), size_t(n) * 4), "pinned ids"));
  ids_cap_ = n;
  return Status::ok();
}

// One forward pass over b: replayed from a graph for decode batches, else eager.
Status CudaExecutor::run_forward(const StepBatch& b, StepPath* path) {
  cudaStream_t s = as_stream(stream_);
  const int32_t T = b.num_tokens(), S = b.num_seqs(), L = int32_t(b.logits_rows.size());
  bool decode = use_graphs_ && T == S && L == S && bucket_for(S) > 0;
  for (int32_t i = 0; decode && i < S; ++i)
    decode = b.query_start[size_t(i) + 1] - b.query_start[size_t(i)] == 1 && b.logits_rows[size_t(i)] == i;
  *path = StepPath::kEager;
  const uint64_t before = ops_->generation();
  if (!decode) {
    StepCaps want{T, S, L, int32_t(b.block_tables.size())};
    KILN_RETURN_IF_ERROR(ops_->reserve(want));
    if (ops_->generation() != before) clear_graphs();
    ops_->set_external_upload(false);
    forward(config_, dw_, *ops_, b);
    return Status::ok();
  }
  // Pad to the bucket with empty sequences (context 0: no KV write, zero attention).
  const int32_t B = bucket_for(S);
  pad_ = b;
  for (int32_t i = S; i < B; ++i) {
    pad_.token_ids.push_back(0);
    pad_.positions.push_back(0);
    pad_.query_start.push_back(i + 1);
    pad_.context_lens.push_back(0);
    pad_.logits_rows.push_back(i);
    for (int32_t j = 0; j < b.max_blocks_per_seq; ++j) pad_.block_tables.push_back(0);
  }
  StepCaps want{B, B, B, int32_t(pad_.block_tables.size())};
  KILN_RETURN_IF_ERROR(ops_->reserve(want));
  if (ops_->generation() != before) clear_graphs();
  auto it = graphs_.find(B);
  if (it != graphs_.end()) {
    ops_->pack_step(pad_);
    ops_->upload_step();
    *path = StepPath::kGraphReplay;
    last_bucket_ = B;
    return cuda_status(cudaGraphLaunch(static_cast<cudaGraphExec_t>(it->second), s), "cudaGraphLaunch");
  }
  // First time at this bucket: run eagerly (this step's result, and cuBLASLt plans for the
  // shapes), then capture the same pass for later steps.
  ops_->set_external_upload(false);
  forward(config_, dw_, *ops_, pad_);
  KILN_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "forward"));
  ops_->set_external_upload(true);
  cudaGraph_t graph = nullptr;
  KILN_RETURN_IF_ERROR(cuda_status(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "begin capture"));
  forward(config_, dw_, *ops_, pad_);
  cudaError_t e = cudaStreamEndCapture(s, &graph);
  ops_->set_external_upload(false);
  KILN_RETURN_IF_ERROR(cuda_status(e, "end capture"));
  cudaGraphExec_t exec = nullptr;
  e = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  KILN_RETURN_IF_ERROR(cuda_status(e, "graph instantiate"));
  graphs_[B] = exec;
  *path = StepPath::kGraphCapture;
  return Status::ok();
}

Status CudaExecutor::execute(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                             std::vector<SampledToken>* out) {
  cudaSetDevice(device_);  // the engine thread is not the loading thread
  // L: the rows that sample; prompt logprob rows (execute_with_prompt_logprobs) follow them.
  const int32_t T = batch.num_tokens(), S = batch.num_seqs(), L = batch.num_sampled_rows();
  if (L < 0 || sampling.size() != size_t(L))
    return Status::error("internal: " + std::to_string(sampling.size()) + " sampling entries for " +
                         std::to_string(L) + " sampled logits rows");
  if (T == 0) return Status::error("internal: empty step");
  if (batch.query_start.size() != size_t(S) + 1 || batch.query_start.back() != T ||
      batch.positions.size() != size_t(T) || batch.block_tables.size() != size_t(S) * size_t(batch.max_blocks_per_seq))
    return Status::error("internal: inconsistent step metadata");
  for (int32_t id : batch.token_ids)
    if (id < 0 || id >= info_.vocab_size)
      return Status::error("token id " + std::to_string(id) + " is outside the vocabulary (" +
                           std::to_string(info_.vocab_size) + ")");
  for (int32_t s = 0; s < S; ++s) {
    const int32_t ctx = batch.context_lens[size_t(s)];
    if (int64_t(ctx) > int64_t(batch.max_blocks_per_seq) * info_.block_size || ctx > info_.max_seq_len)
      return Status::error("internal: sequence " + std::to_string(s) + " context " + std::to_string(ctx) +
                           " exceeds its block table");
    // Only the blocks the context covers are read; the runtime pads the rest of a row with -1.
    const int32_t* table = batch.block_table(s);
    for (int32_t j = 0; j < (ctx + info_.block_size - 1) / info_.block_size; ++j)
      if (table[j] < 0 || table[j] >= info_.num_kv_blocks)
        return Status::error("internal: KV block id " + std::to_string(table[j]) + " out of range");
  }
  for (int32_t r : batch.logits_rows)
    if (r < 0 || r >= T) return Status::error("internal: logits row out of range");

  const auto t_in = std::chrono::steady_clock::now();
  KILN_RETURN_IF_ERROR(reserve_ids(L));
  StepPath path = StepPath::kEager;
  KILN_RETURN_IF_ERROR(run_forward(batch, &path));
  cudaStream_t s = as_stream(stream_);
  last_rows_ = int32_t(batch.logits_rows.size());
  const int32_t V = config_.vocab_size;
  launch_argmax(ops_->logits(), L, V, d_ids_, d_argmax_, s);
  if (device_sampling_) {
    std::vector<int32_t> rows;
    std::vector<const SeqSampling*> seqs;
    for (int32_t i = 0; i < L; ++i)
      if (needs_sampler(sampling[size_t(i)]) && DeviceSampler::supports(sampling[size_t(i)])) {
        rows.push_back(i);
        seqs.push_back(&sampling[size_t(i)]);
      }
    if (!rows.empty()) {
      if (!sampler_) sampler_ = std::make_unique<DeviceSampler>();
      if (Status st = sampler_->sample(ops_->logits(), V, rows, seqs, d_ids_, s); !st) {
        // Out of memory for the sort buffers, say: the host sampler gives the same tokens.
        log_warn("cuda: " + st.message() + "; sampling on the host from now on");
        sampler_.reset();
        device_sampling_ = false;
        cudaGetLastError();
      }
    }
  }
  const bool dev = device_sampling_;
  auto needs_host_sampling = [dev](const SeqSampling& ss) {
    return needs_sampler(ss) && (!dev || !DeviceSampler::supports(ss));
  };
  cudaMemcpyAsync(h_ids_, d_ids_, size_t(L) * 4, cudaMemcpyDeviceToHost, s);
  size_t host_rows = 0;
  for (const SeqSampling& ss : sampling) host_rows += needs_host_sampling(ss) ? 1 : 0;
  if (host_rows > h_logits_rows_) {
    if (h_logits_) cudaFreeHost(h_logits_);
    h_logits_ = nullptr;
    h_logits_rows_ = 0;
    KILN_RETURN_IF_ERROR(cuda_status(cudaMallocHost(reinterpret_cast<void**>(&h_logits_), host_rows * size_t(V) * 4),
                                     "pinned logits"));
    h_logits_rows_ = host_rows;
  }
  size_t k = 0;
  for (int32_t i = 0; i < L; ++i)
    if (needs_host_sampling(sampling[size_t(i)]))
      cudaMemcpyAsync(h_logits_ + (k++) * size_t(V), ops_->logits() + size_t(i) * V, size_t(V) * 4,
                      cudaMemcpyDeviceToHost, s);
  const auto t_enqueued = std::chrono::steady_clock::now();
  KILN_RETURN_IF_ERROR(cuda_status(cudaStreamSynchronize(s), "step"));
  KILN_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "step kernels"));
  if (step_timing_) {
    StepTiming& t = timing_[int(path)];
    ++t.steps;
    t.enqueue_s += std::chrono::duration<double>(t_enqueued - t_in).count();
    t.wall_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t_in).count();
  }
  out->resize(size_t(L));
  k = 0;
  for (int32_t i = 0; i < L; ++i) {
    if (needs_host_sampling(sampling[size_t(i)])) (*out)[size_t(i)] = sample_token(h_logits_ + (k++) * size_t(V), V, sampling[size_t(i)]);
    else (*out)[size_t(i)] = SampledToken{h_ids_[i], std::nullopt};
  }
  return Status::ok();
}

// Prompt logprobs: the step's prompt rows ([P, V] f32, after the sampled rows in the logits
// buffer) come to the host and go through the host's token_logprob, the code the CPU backend and
// the host sampler use. Only prefill steps of requests that ask for them pay for the copy.
Status CudaExecutor::execute_with_prompt_logprobs(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                                                  std::vector<SampledToken>* out,
                                                  std::vector<TokenLogprob>* prompt_out) {
  prompt_out->clear();
  KILN_RETURN_IF_ERROR(execute(batch, sampling, out));
  const size_t P = batch.prompt_logprob_rows.size();
  if (P == 0) return Status::ok();
  const size_t V = size_t(config_.vocab_size);
  std::vector<float> rows(P * V);  // [P, V]
  cudaStream_t s = as_stream(stream_);
  KILN_RETURN_IF_ERROR(cuda_status(cudaMemcpyAsync(rows.data(), ops_->logits() + size_t(batch.num_sampled_rows()) * V,
                                                   rows.size() * 4, cudaMemcpyDeviceToHost, s),
                                   "prompt logits"));
  KILN_RETURN_IF_ERROR(cuda_status(cudaStreamSynchronize(s), "prompt logits"));
  prompt_out->reserve(P);
  for (size_t j = 0; j < P; ++j) {
    const StepBatch::PromptLogprobRow& r = batch.prompt_logprob_rows[j];
    prompt_out->push_back(token_logprob(rows.data() + j * V, int32_t(V), r.target_id, r.top_k));
  }
  return Status::ok();
}

Status CudaExecutor::last_logits(std::vector<float>* out) {
  out->resize(size_t(last_rows_) * size_t(config_.vocab_size));
  return cuda_status(cudaMemcpy(out->data(), ops_->logits(), out->size() * 4, cudaMemcpyDeviceToHost), "last_logits");
}

Result<double> CudaExecutor::bench_graph_replay(int reps) {
  cudaSetDevice(device_);
  auto it = graphs_.find(last_bucket_);
  if (it == graphs_.end() || reps < 1) return Status::error("no decode step has replayed a graph yet");
  cudaStream_t s = as_stream(stream_);
  auto g = static_cast<cudaGraphExec_t>(it->second);
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaGraphLaunch(g, s);  // warm
  cudaEventRecord(e0, s);
  for (int i = 0; i < reps; ++i) cudaGraphLaunch(g, s);
  cudaEventRecord(e1, s);
  const cudaError_t e = cudaEventSynchronize(e1);
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  KILN_RETURN_IF_ERROR(cuda_status(e, "graph replay"));
  return double(ms) * 1e-3 / reps;
}

Result<double> CudaExecutor::bench_read_bandwidth(size_t bytes, int reps) {
  cudaSetDevice(device_);
  cudaStream_t s = as_stream(stream_);
  void* buf = nullptr;
  float* sink = nullptr;
  KILN_RETURN_IF_ERROR(device_alloc(&buf, bytes, "bandwidth test buffer"));
  KILN_RETURN_IF_ERROR(device_alloc(reinterpret_cast<void**>(&sink), 16, "bandwidth sink"));
  launch_fill_uniform_bf16(static_cast<bf16_t*>(buf), int64_t(bytes / 2), 7, 1.0f, s);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  double best = 0.0;
  for (int r = 0; r < reps + 2; ++r) {
    cudaEventRecord(e0, s);
    launch_read_bandwidth(buf, int64_t(bytes), sink, s);
    cudaEventRecord(e1, s);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (r >= 2) best = std::max(best, double(bytes) / (double(ms) * 1e-3) / 1e9);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  Status st = cuda_status(cudaGetLastError(), "bandwidth kernel");
  cudaFree(buf);
  cudaFree(sink);
  KILN_RETURN_IF_ERROR(st);
  return best;
}

Result<double> CudaExecutor::bench_gemm_seconds(int64_t M, int64_t N, int64_t K, int reps, bool cublas_only,
                                                bool fp8) {
  cudaSetDevice(device_);
  cudaStream_t s = as_stream(stream_);
  const size_t wsize = fp8 ? 1 : 2;
  // Several weight copies rotate so a weight never sits in L2 from the previous rep.
  const int copies =
      std::max<int>(2, int(std::min<int64_t>(8, (int64_t(200) << 20) / std::max<int64_t>(1, N * K * int64_t(wsize)) + 1)));
  void *x = nullptr, *xq = nullptr, *y = nullptr, *w = nullptr, *one = nullptr;
  KILN_RETURN_IF_ERROR(device_alloc(&x, size_t(M * K) * 2, "gemm bench x"));
  KILN_RETURN_IF_ERROR(device_alloc(&xq, size_t(M * K), "gemm bench xq"));
  KILN_RETURN_IF_ERROR(device_alloc(&y, size_t(M * N) * 2, "gemm bench y"));
  KILN_RETURN_IF_ERROR(device_alloc(&w, size_t(copies) * size_t(N * K) * wsize, "gemm bench w"));
  KILN_RETURN_IF_ERROR(device_alloc(&one, sizeof(float), "gemm bench scale"));
  launch_fill_uniform_bf16(static_cast<bf16_t*>(x), M * K, 11, 1.0f, s);
  launch_fill_f32(static_cast<float*>(one), 1, 1.0f, s);
  if (fp8) {
    launch_fill_uniform_fp8(static_cast<uint8_t*>(w), copies * N * K, 12, 0.05f, 0.05f / 448.0f, s);
    launch_fill_uniform_fp8(static_cast<uint8_t*>(xq), M * K, 13, 1.0f, 1.0f / 448.0f, s);
  } else {
    launch_fill_uniform_bf16(static_cast<bf16_t*>(w), copies * N * K, 12, 0.05f, s);
  }
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<double> times;
  const int gemv_m = gemm_->gemv_max_m();
  if (cublas_only) gemm_->set_gemv_max_m(0);
  for (int r = 0; r < reps + 3; ++r) {
    const void* wr = static_cast<const uint8_t*>(w) + size_t(r % copies) * size_t(N * K) * wsize;
    cudaEventRecord(e0, s);
    if (!fp8) {
      gemm_->linear(x, M, K, wr, N, K, y, N, false, s);
    } else {
      GemvW g;
      g.data = wr;
      g.fp8 = true;
      g.scale = 0.05f / 448.0f;
      // kiln's FP8 path as the model runs it (static activation scale): the GEMV for small M (the
      // tensor-core one unless KILN_FP8_GEMV=cvt), else cuBLASLt on quantized x.
      if (gemv_fp8_mma_enabled()) {
        g.act = GemvAct::kStatic;
        g.input_scale = static_cast<const float*>(one);
      }
      if (!(M <= gemm_->gemv_max_m() && launch_gemv(static_cast<const bf16_t*>(x), K, int32_t(M), g, int32_t(N),
                                                    int32_t(K), y, N, false, s)))
        gemm_->linear_fp8(xq, M, K, static_cast<const float*>(one), false, wr, N, K, static_cast<const float*>(one),
                          false, y, N, s);
    }
    cudaEventRecord(e1, s);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (r >= 3) times.push_back(double(ms) * 1e-3);
  }
  gemm_->set_gemv_max_m(gemv_m);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  Status st = cuda_status(cudaGetLastError(), "gemm bench");
  for (void* p : {x, xq, y, w, one}) cudaFree(p);
  KILN_RETURN_IF_ERROR(st);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

uint64_t CudaExecutor::fused_decode_calls() const { return ops_ ? ops_->fused_decode_calls() : 0; }

bool CudaExecutor::weights_fp8() const { return !fp8_regs_.empty(); }

}  // namespace cuda

Result<std::unique_ptr<ModelExecutor>> load_cuda_executor(const std::string& path, const LoadOptions& opts) {
  KILN_ASSIGN_OR_RETURN(auto model, load_model(path));
  KILN_ASSIGN_OR_RETURN(auto ex, cuda::CudaExecutor::create(std::move(model), opts));
  std::unique_ptr<ModelExecutor> base = std::move(ex);
  return base;
}

Result<std::unique_ptr<ModelExecutor>> make_cuda_executor_dummy(const ModelConfig& c, const LoadOptions& opts,
                                                                 uint64_t seed) {
  KILN_ASSIGN_OR_RETURN(auto ex, cuda::CudaExecutor::create_dummy(c, opts, seed));
  std::unique_ptr<ModelExecutor> base = std::move(ex);
  return base;
}

}  // namespace kiln
