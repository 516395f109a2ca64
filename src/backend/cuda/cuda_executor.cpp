#include "backend/cuda/cuda_executor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include <cuda_runtime_api.h>

#include "backend/cpu/sampler.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/sampler.h"
#include "backend/cuda/cuda_util.h"
#include "core/dtype.h"
#include "core/log.h"
#include "core/thread_pool.h"

namespace kiln {
namespace cuda {
namespace {

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

Status cuda_status(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return Status::ok();
  return Status::error("CUDA error in " + what + ": " + cudaGetErrorString(e));
}

// Decode batch sizes that get a graph; a batch runs in the smallest bucket that holds it.
constexpr int32_t kBuckets[] = {1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256};

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
  clear_graphs();
  ops_.reset();
  gemm_.reset();
  for (void* p : allocations_) cudaFree(p);
  cudaFree(kv_base_);
  cudaFree(d_ids_);
  if (h_ids_) cudaFreeHost(h_ids_);
  if (h_logits_) cudaFreeHost(h_logits_);
  if (stream_) cudaStreamDestroy(as_stream(stream_));
}

void CudaExecutor::clear_graphs() {
  for (auto& [b, g] : graphs_) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(g));
  graphs_.clear();
}

size_t CudaExecutor::kv_bytes_per_token() const { return size_t(2) * config_.num_layers * config_.kv_dim() * 2; }

Status CudaExecutor::init_common(const LoadOptions& opts) {
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

// Fills dw_ with device weights: from `host` when given, else random on the device.
static Status build_weights(const ModelConfig& c, const ModelWeights* host, uint64_t seed, ModelWeights* dw,
                            std::vector<void*>* allocs, cudaStream_t s) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, Q = c.q_dim(), KV = c.kv_dim();
  uint64_t tensor = 0;
  auto alloc = [&](size_t bytes, const std::string& what, void** p) -> Status {
    KILN_RETURN_IF_ERROR(device_alloc(p, bytes, "weights (" + what + ")"));
    allocs->push_back(*p);
    return Status::ok();
  };
  // A matrix of rows x cols at dst: uploaded from hw, or uniform with the dummy model's stddev.
  auto fill = [&](const Weight* hw, void* dst, int64_t rows, int64_t cols, float stddev, const std::string& name) -> Status {
    if (hw) {
      if (hw->rows != rows || hw->cols != cols)
        return Status::error("weight " + hw->name + ": shape [" + std::to_string(hw->rows) + ", " +
                             std::to_string(hw->cols) + "], expected [" + std::to_string(rows) + ", " +
                             std::to_string(cols) + "]");
      return upload_matrix(*hw, dst, s);
    }
    launch_fill_uniform_bf16(static_cast<bf16_t*>(dst), rows * cols, seed * 0x9E3779B97F4A7C15ull + (++tensor),
                             stddev * std::sqrt(3.0f), s);
    return cuda_status(cudaGetLastError(), "dummy " + name);
  };
  auto vec = [&](const Weight* hw, int64_t n, float value, const std::string& name, Weight* out) -> Status {
    void* p = nullptr;
    KILN_RETURN_IF_ERROR(alloc(size_t(n) * 4, name, &p));
    if (hw) {
      if (hw->rows * hw->cols != n)
        return Status::error("weight " + hw->name + ": " + std::to_string(hw->rows * hw->cols) + " values, expected " +
                             std::to_string(n));
      KILN_RETURN_IF_ERROR(upload_vector(*hw, p));
    } else {
      launch_fill_f32(static_cast<float*>(p), n, value, s);
    }
    *out = device_vector(p, n, name);
    return Status::ok();
  };
  auto matrix = [&](const Weight* hw, int64_t rows, int64_t cols, float stddev, const std::string& name,
                    Weight* out) -> Status {
    void* p = nullptr;
    KILN_RETURN_IF_ERROR(alloc(size_t(rows * cols) * 2, name, &p));
    KILN_RETURN_IF_ERROR(fill(hw, p, rows, cols, stddev, name));
    *out = device_matrix(p, rows, cols, name);
    return Status::ok();
  };

  KILN_RETURN_IF_ERROR(matrix(host ? &host->embed : nullptr, V, H, 1.0f, "embed", &dw->embed));
  const bool tied = host ? host->lm_head.data == host->embed.data : c.tie_word_embeddings;
  if (tied) dw->lm_head = dw->embed;
  else KILN_RETURN_IF_ERROR(matrix(host ? &host->lm_head : nullptr, V, H, 0.02f, "lm_head", &dw->lm_head));
  KILN_RETURN_IF_ERROR(vec(host ? &host->final_norm : nullptr, H, 1.0f, "norm", &dw->final_norm));
  dw->layers.resize(size_t(c.num_layers));
  for (int32_t i = 0; i < c.num_layers; ++i) {
    const LayerWeights* hl = host ? &host->layers[size_t(i)] : nullptr;
    LayerWeights& l = dw->layers[size_t(i)];
    const std::string pre = "layer " + std::to_string(i) + " ";
    KILN_RETURN_IF_ERROR(vec(hl ? &hl->attn_norm : nullptr, H, 1.0f, pre + "attn_norm", &l.attn_norm));
    KILN_RETURN_IF_ERROR(vec(hl ? &hl->ffn_norm : nullptr, H, 1.0f, pre + "ffn_norm", &l.ffn_norm));
    void* qkv = nullptr;
    KILN_RETURN_IF_ERROR(alloc(size_t((Q + 2 * KV) * H) * 2, pre + "qkv", &qkv));
    uint16_t* qb = static_cast<uint16_t*>(qkv);
    KILN_RETURN_IF_ERROR(fill(hl ? &hl->wq : nullptr, qb, Q, H, 0.02f, pre + "wq"));
    KILN_RETURN_IF_ERROR(fill(hl ? &hl->wk : nullptr, qb + Q * H, KV, H, 0.02f, pre + "wk"));
    KILN_RETURN_IF_ERROR(fill(hl ? &hl->wv : nullptr, qb + (Q + KV) * H, KV, H, 0.02f, pre + "wv"));
    l.wq = device_matrix(qb, Q, H, pre + "wq");
    l.wk = device_matrix(qb + Q * H, KV, H, pre + "wk");
    l.wv = device_matrix(qb + (Q + KV) * H, KV, H, pre + "wv");
    KILN_RETURN_IF_ERROR(matrix(hl ? &hl->wo : nullptr, H, Q, 0.02f, pre + "wo", &l.wo));
    void* gu = nullptr;
    KILN_RETURN_IF_ERROR(alloc(size_t(2 * I * H) * 2, pre + "gate_up", &gu));
    uint16_t* gb = static_cast<uint16_t*>(gu);
    KILN_RETURN_IF_ERROR(fill(hl ? &hl->w_gate : nullptr, gb, I, H, 0.02f, pre + "w_gate"));
    KILN_RETURN_IF_ERROR(fill(hl ? &hl->w_up : nullptr, gb + I * H, I, H, 0.02f, pre + "w_up"));
    l.w_gate = device_matrix(gb, I, H, pre + "w_gate");
    l.w_up = device_matrix(gb + I * H, I, H, pre + "w_up");
    KILN_RETURN_IF_ERROR(matrix(hl ? &hl->w_down : nullptr, H, I, 0.02f, pre + "w_down", &l.w_down));
    if (hl && !hl->bq.empty()) {
      KILN_RETURN_IF_ERROR(vec(&hl->bq, Q, 0.0f, pre + "bq", &l.bq));
      KILN_RETURN_IF_ERROR(vec(&hl->bk, KV, 0.0f, pre + "bk", &l.bk));
      KILN_RETURN_IF_ERROR(vec(&hl->bv, KV, 0.0f, pre + "bv", &l.bv));
    }
    if (c.qk_norm) {
      KILN_RETURN_IF_ERROR(vec(hl ? &hl->q_norm : nullptr, c.head_dim, 1.0f, pre + "q_norm", &l.q_norm));
      KILN_RETURN_IF_ERROR(vec(hl ? &hl->k_norm : nullptr, c.head_dim, 1.0f, pre + "k_norm", &l.k_norm));
    }
  }
  return cuda_status(cudaStreamSynchronize(s), "weight upload");
}

Status CudaExecutor::finish_init(const LoadOptions& opts) {
  const ModelConfig& c = config_;
  cudaStream_t s = as_stream(stream_);
  ops_ = std::make_unique<CudaOps>(config_, gemm_.get(), s);
  for (const LayerWeights& l : dw_.layers) {
    ops_->register_fused(l.wq.data, c.q_dim() + 2 * c.kv_dim(), Buf::kQ, {{l.wk.data, Buf::kK}, {l.wv.data, Buf::kV}});
    ops_->register_fused(l.w_gate.data, 2 * int64_t(c.intermediate_size), Buf::kGate, {{l.w_up.data, Buf::kUp}});
  }
  weight_bytes_per_token_ = size_t(c.vocab_size) * c.hidden_size * 2;  // lm_head
  for (const LayerWeights& l : dw_.layers)
    for (const Weight* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) weight_bytes_per_token_ += w->nbytes();

  const int32_t max_seq = opts.max_seq_len > 0 ? opts.max_seq_len : c.max_position_embeddings;
  const int32_t bs = opts.block_size;
  if (bs <= 0 || bs > 1024) return Status::error("block_size " + std::to_string(bs) + " is out of range");
  const int32_t max_blocks_per_seq = (max_seq + bs - 1) / bs;
  // Activations for steps of up to 8192 tokens (grown on demand), 256 graph-bucket sequences.
  StepCaps caps;
  caps.tokens = 8192;
  caps.seqs = 512;
  caps.logit_rows = 512;
  caps.table_ints = std::min<int32_t>(caps.seqs * max_blocks_per_seq, 4 << 20);
  KILN_RETURN_IF_ERROR(ops_->reserve(caps));
  KILN_RETURN_IF_ERROR(device_alloc(reinterpret_cast<void**>(&d_ids_), size_t(caps.logit_rows) * 4, "sampled ids"));
  KILN_RETURN_IF_ERROR(cuda_status(cudaMallocHost(reinterpret_cast<void**>(&h_ids_), size_t(caps.logit_rows) * 4),
                                   "pinned ids"));

  // KV cache: a block count, or a fraction of what is free now.
  const size_t per_block = size_t(2) * c.num_layers * bs * c.kv_dim() * 2;
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
  const size_t per_layer = size_t(blocks) * bs * c.kv_dim();  // elements
  for (int32_t l = 0; l < c.num_layers; ++l) {
    kv_->k.push_back(static_cast<bf16_t*>(kv_base_) + size_t(2 * l) * per_layer);
    kv_->v.push_back(static_cast<bf16_t*>(kv_base_) + size_t(2 * l + 1) * per_layer);
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
           std::to_string(blocks) + " blocks (" + mib(size_t(blocks) * per_block) + "), activations " +
           mib(ops_->reserved_bytes()) + ", " + gemm_->library());
  return Status::ok();
}

Result<std::unique_ptr<CudaExecutor>> CudaExecutor::create(std::shared_ptr<const Model> host_model,
                                                           const LoadOptions& opts) {
  std::unique_ptr<CudaExecutor> ex(new CudaExecutor());
  ex->config_ = host_model->config;
  KILN_RETURN_IF_ERROR(ex->init_common(opts));
  KILN_RETURN_IF_ERROR(build_weights(ex->config_, &host_model->weights, 0, &ex->dw_, &ex->allocations_,
                                     as_stream(ex->stream_)));
  KILN_RETURN_IF_ERROR(ex->finish_init(opts));
  return ex;
}

Result<std::unique_ptr<CudaExecutor>> CudaExecutor::create_dummy(const ModelConfig& c, const LoadOptions& opts,
                                                                 uint64_t seed) {
  std::unique_ptr<CudaExecutor> ex(new CudaExecutor());
  ex->config_ = c;
  KILN_RETURN_IF_ERROR(ex->init_common(opts));
  KILN_RETURN_IF_ERROR(build_weights(ex->config_, nullptr, seed, &ex->dw_, &ex->allocations_, as_stream(ex->stream_)));
  KILN_RETURN_IF_ERROR(ex->finish_init(opts));
  return ex;
}

// One forward pass over b: replayed from a graph for decode batches, else eager.
Status CudaExecutor::run_forward(const StepBatch& b, bool* graphed) {
  cudaStream_t s = as_stream(stream_);
  const int32_t T = b.num_tokens(), S = b.num_seqs(), L = int32_t(b.logits_rows.size());
  bool decode = use_graphs_ && T == S && L == S && S <= max_graph_batch_;
  for (int32_t i = 0; decode && i < S; ++i)
    decode = b.query_start[size_t(i) + 1] - b.query_start[size_t(i)] == 1 && b.logits_rows[size_t(i)] == i;
  *graphed = false;
  const void* before = ops_->buffer(Buf::kResidual);
  if (!decode) {
    StepCaps want{T, S, L, int32_t(b.block_tables.size())};
    KILN_RETURN_IF_ERROR(ops_->reserve(want));
    if (ops_->buffer(Buf::kResidual) != before) clear_graphs();
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
  if (ops_->buffer(Buf::kResidual) != before) clear_graphs();
  auto it = graphs_.find(B);
  if (it != graphs_.end()) {
    ops_->pack_step(pad_);
    ops_->upload_step();
    *graphed = true;
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
  return Status::ok();
}

Status CudaExecutor::execute(const StepBatch& batch, const std::vector<SeqSampling>& sampling,
                             std::vector<SampledToken>* out) {
  cudaSetDevice(device_);  // the engine thread is not the loading thread
  const int32_t T = batch.num_tokens(), S = batch.num_seqs(), L = int32_t(batch.logits_rows.size());
  if (sampling.size() != size_t(L))
    return Status::error("internal: " + std::to_string(sampling.size()) + " sampling entries for " +
                         std::to_string(L) + " logits rows");
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

  bool graphed = false;
  KILN_RETURN_IF_ERROR(run_forward(batch, &graphed));
  cudaStream_t s = as_stream(stream_);
  last_rows_ = L;
  const int32_t V = config_.vocab_size;
  launch_argmax(ops_->logits(), L, V, d_ids_, s);
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
  KILN_RETURN_IF_ERROR(cuda_status(cudaStreamSynchronize(s), "step"));
  KILN_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "step kernels"));
  out->resize(size_t(L));
  k = 0;
  for (int32_t i = 0; i < L; ++i) {
    if (needs_host_sampling(sampling[size_t(i)])) (*out)[size_t(i)] = sample_token(h_logits_ + (k++) * size_t(V), V, sampling[size_t(i)]);
    else (*out)[size_t(i)] = SampledToken{h_ids_[i], std::nullopt};
  }
  return Status::ok();
}

Status CudaExecutor::last_logits(std::vector<float>* out) {
  out->resize(size_t(last_rows_) * size_t(config_.vocab_size));
  return cuda_status(cudaMemcpy(out->data(), ops_->logits(), out->size() * 4, cudaMemcpyDeviceToHost), "last_logits");
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

Result<double> CudaExecutor::bench_gemm_seconds(int64_t M, int64_t N, int64_t K, int reps, bool cublas_only) {
  cudaSetDevice(device_);
  cudaStream_t s = as_stream(stream_);
  // Several weight copies rotate so a weight never sits in L2 from the previous rep.
  const int copies = std::max<int>(2, int(std::min<int64_t>(8, (int64_t(200) << 20) / std::max<int64_t>(1, N * K * 2) + 1)));
  void *x = nullptr, *y = nullptr, *w = nullptr;
  KILN_RETURN_IF_ERROR(device_alloc(&x, size_t(M * K) * 2, "gemm bench x"));
  KILN_RETURN_IF_ERROR(device_alloc(&y, size_t(M * N) * 2, "gemm bench y"));
  KILN_RETURN_IF_ERROR(device_alloc(&w, size_t(copies) * size_t(N * K) * 2, "gemm bench w"));
  launch_fill_uniform_bf16(static_cast<bf16_t*>(x), M * K, 11, 1.0f, s);
  launch_fill_uniform_bf16(static_cast<bf16_t*>(w), copies * N * K, 12, 0.05f, s);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<double> times;
  const int gemv_m = gemm_->gemv_max_m();
  if (cublas_only) gemm_->set_gemv_max_m(0);
  for (int r = 0; r < reps + 3; ++r) {
    const void* wr = static_cast<const uint16_t*>(w) + size_t(r % copies) * size_t(N * K);
    cudaEventRecord(e0, s);
    gemm_->linear(x, M, K, wr, N, K, y, N, false, s);
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
  cudaFree(x);
  cudaFree(y);
  cudaFree(w);
  KILN_RETURN_IF_ERROR(st);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

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
