#include "backend/cuda/cuda_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <map>
#include <cstdio>
#include <string>
#include <iterator>

#include "backend/cpu/cpu_ops.h"
#include "backend/cuda/cuda_util.h"
#include "core/dtype.h"

namespace kiln::cuda {

CudaOps::CudaOps(const ModelConfig& c, Gemm* gemm, cudaStream_t stream) : c_(c), gemm_(gemm), stream_(stream) {
  std::vector<float> inv = rope_inv_freq(c);
  KILN_CHECK(cuda_ok(cudaMalloc(reinterpret_cast<void**>(&inv_freq_), inv.size() * 4), "rope table"));
  KILN_CHECK(cuda_ok(cudaMemcpy(inv_freq_, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice), "rope table"));
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  target_blocks_ = 4 * sms;
  fused_decode_on_ = env_int("KILN_FUSED_DECODE", 0) != 0;
  KILN_CHECK(cuda_ok(cudaMalloc(reinterpret_cast<void**>(&norm_counter_), sizeof(unsigned int)), "norm counter"));
  KILN_CHECK(cuda_ok(cudaMemset(norm_counter_, 0, sizeof(unsigned int)), "norm counter"));
}

// A mixed step's decode attention (memory-bound) runs on a side stream, launched after the prefill
// attention (tensor-bound): its blocks take the SMs the prefill kernel's last waves leave free. H100 s9
// run 6, 2048/128: +1.7-2.3 % (decode launched first: +1.1 %; the side stream at high priority: +0.6 %).
// KILN_ATTN_OVERLAP=0: one after the other on the step's stream.
static bool attn_overlap() {
  static const bool on = env_int("KILN_ATTN_OVERLAP", 1) != 0;
  return on;
}

// KILN_FP8_FUSE_RESIDUAL=0: prefill FP8 o_proj / down_proj write their bf16 output and the next
// add_rms_norm adds it (before session 8); default: the GEMM accumulates into the f32 residual.
static bool fuse_residual_enabled() {
  static const bool on = env_int("KILN_FP8_FUSE_RESIDUAL", 1) != 0;
  return on;
}

static bool fused_norm_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_FUSED_NORM");
    return !(e && std::string(e) == "0");
  }();
  return on;
}


// KILN_PROFILE_OPS=1: times every op of eager (not graph-replayed) steps with CUDA events and prints
// the totals per op and step kind at exit. A measuring aid for the device runs (no profiler is
// installed there); PDL overlap makes neighbouring ops share some time. Off by default.
namespace {

class OpProfiler {
 public:
  static OpProfiler* get() {
    static OpProfiler* p = [] {
      const char* e = std::getenv("KILN_PROFILE_OPS");
      return e && std::string(e) == "1" ? new OpProfiler() : nullptr;
    }();
    return p;
  }
  void begin(const std::string& name, cudaStream_t s) {
    cudaEvent_t a = nullptr, b = nullptr;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    cudaEventRecord(a, s);
    open_.push_back({name, a, b});
  }
  void end(cudaStream_t s) {
    cudaEventRecord(open_.back().b, s);
    done_.push_back(open_.back());
    open_.pop_back();
    if (done_.size() > 4096) flush();
  }
  void flush() {
    if (done_.empty()) return;
    cudaEventSynchronize(done_.back().b);
    for (auto& r : done_) {
      float ms = 0;
      cudaEventElapsedTime(&ms, r.a, r.b);
      auto& t = totals_[r.name];
      t.first += 1;
      t.second += ms;
      cudaEventDestroy(r.a);
      cudaEventDestroy(r.b);
    }
    done_.clear();
  }
  ~OpProfiler() = default;
  void print() {
    flush();
    std::fprintf(stderr, "op profile (KILN_PROFILE_OPS=1, eager steps):\n%-44s %8s %10s %9s\n", "op", "calls", "total ms",
                 "us/call");
    for (auto& [n, t] : totals_)
      std::fprintf(stderr, "%-44s %8ld %10.2f %9.1f\n", n.c_str(), long(t.first), t.second, 1e3 * t.second / t.first);
  }

 private:
  OpProfiler() {
    std::atexit([] { get()->print(); });
  }
  struct Rec {
    std::string name;
    cudaEvent_t a, b;
  };
  std::vector<Rec> open_, done_;
  std::map<std::string, std::pair<int64_t, double>> totals_;
};

bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(s, &st);
  return st != cudaStreamCaptureStatusNone;
}

}  // namespace

// One op's time under KILN_PROFILE_OPS (nothing otherwise).
struct CudaOps::ProfScope {
  OpProfiler* p = nullptr;
  cudaStream_t s;
  ProfScope(const CudaOps* ops, const char* op, int64_t a = -1, int64_t b = -1) : s(ops->stream_) {
    OpProfiler* prof = OpProfiler::get();
    if (!prof || capturing(s)) return;
    p = prof;
    std::string name = std::string(ops->step_is_decode() ? "decode  " : "prefill ") + op;
    if (a >= 0) name += " " + std::to_string(a) + "x" + std::to_string(b);
    p->begin(name, s);
  }
  ~ProfScope() {
    if (p) p->end(s);
  }
};

static int fuse_quant_mode() {
  static const int m = env_int("KILN_FP8_FUSE_QUANT", 1);
  return m;
}

void CudaOps::flush_silu() {
  if (!silu_.on) return;
  silu_.on = false;
  ProfScope prof(this, "silu_mul");
  launch_silu_mul(static_cast<const bf16_t*>(silu_.gate), silu_.ldg, static_cast<const bf16_t*>(silu_.up), silu_.ldu,
                  static_cast<bf16_t*>(silu_.out), silu_.ldo, int32_t(silu_.n), int32_t(silu_.dim), stream_);
}

bool CudaOps::take_silu_quant(const View& xv, int64_t n, const Weight& w) {
  if (!silu_.on || xv.ptr != silu_.out || xv.ld != silu_.ldo || n != silu_.n || w.cols != silu_.dim) return false;
  auto f = fp8_.find(w.data);
  // Only where matmul() takes the quantize + GEMM path (never the GEMV, which reads the bf16 x).
  if (f == fp8_.end() || f->second.act != Fp8Act::kStatic || n <= gemm_->gemv_max_m() || n > caps_.tokens ||
      w.cols > fp8_cols_ || fuse_quant_mode() == 0)
    return false;
  const Fp8Weight& q = f->second;
  ProfScope prof(this, "silu_mul+quantize fp8", n, w.cols);
  const bool keep_bf16 = fuse_quant_mode() == 2;
  launch_silu_mul_quantize_fp8(static_cast<const bf16_t*>(silu_.gate), silu_.ldg, static_cast<const bf16_t*>(silu_.up),
                               silu_.ldu, int32_t(n), int32_t(w.cols), q.d_input_scale, xq_, x_scales_, q.per_channel,
                               keep_bf16 ? static_cast<bf16_t*>(silu_.out) : nullptr, silu_.ldo, stream_);
  xq_holds_ = {xv.ptr, xv.ld, n, w.cols, q.d_input_scale, q.per_channel};
  if (!keep_bf16) silu_lazy_ = silu_;
  silu_.on = false;
  return true;
}

void CudaOps::touch(const void* p) {
  if (norm_lazy_.on && p && (p == norm_lazy_.out || p == norm_lazy_.residual)) {
    norm_lazy_.on = false;
    ProfScope prof(this, "rms_norm (deferred bf16)");
    // No delta: the updated residual normalized by add_rms_norm's own loops, the bytes it skipped.
    launch_add_rms_norm(norm_lazy_.residual, nullptr, 0, norm_lazy_.w, int32_t(norm_lazy_.n), int32_t(norm_lazy_.dim),
                        norm_lazy_.eps, static_cast<bf16_t*>(norm_lazy_.out), norm_lazy_.ldo, stream_);
  }
  if (!silu_lazy_.on || !p) return;
  const char* c = static_cast<const char*>(p);
  const char* g0 = static_cast<const char*>(gate_up_);
  const bool in_gate_up = c >= g0 && c < g0 + size_t(caps_.tokens) * 2 * size_t(c_.intermediate_size) * 2;
  if (!in_gate_up && p != silu_lazy_.out) return;
  silu_lazy_.on = false;
  ProfScope prof(this, "silu_mul (deferred bf16)");
  launch_silu_mul(static_cast<const bf16_t*>(silu_lazy_.gate), silu_lazy_.ldg,
                  static_cast<const bf16_t*>(silu_lazy_.up), silu_lazy_.ldu, static_cast<bf16_t*>(silu_lazy_.out),
                  silu_lazy_.ldo, int32_t(silu_lazy_.n), int32_t(silu_lazy_.dim), stream_);
}

// [gate | up] rows 0..n are about to be rewritten as a whole: a skipped product that lived in gate
// is dead (nothing can read it any more), anything else is computed first.
void CudaOps::gate_up_rewritten(const void* gate, int64_t n) {
  if (silu_lazy_.on && gate == bufs_[size_t(Buf::kGate)] && silu_lazy_.out == gate && n >= silu_lazy_.n)
    silu_lazy_.on = false;
  touch(gate);
}

// KILN_FP8_FUSE_NORM: 0 separate kernels, 1 (default) fused without the bf16 output, 2 fused with it.
static int fuse_norm_mode() {
  static const int m = env_int("KILN_FP8_FUSE_NORM", 1);
  return m;
}
static bool fuse_norm_enabled() { return fuse_norm_mode() != 0; }

void CudaOps::flush_norm() {
  if (!norm_.on) return;
  norm_.on = false;
  ProfScope prof(this, "add_rms_norm");
  launch_add_rms_norm(norm_.residual, static_cast<const bf16_t*>(norm_.delta), norm_.ld_delta, norm_.w,
                      int32_t(norm_.n), int32_t(norm_.dim), norm_.eps, static_cast<bf16_t*>(norm_.out), norm_.ldo,
                      stream_);
}

bool CudaOps::take_norm_quant(const View& xv, int64_t n, const Weight& w) {
  if (!norm_.on || xv.ptr != norm_.out || xv.ld != norm_.ldo || n != norm_.n || w.cols != norm_.dim) return false;
  auto f = fp8_.find(w.data);
  // As take_silu_quant: only where matmul() quantizes for the GEMM.
  if (f == fp8_.end() || f->second.act != Fp8Act::kStatic || n <= gemm_->gemv_max_m() || n > caps_.tokens ||
      w.cols > fp8_cols_ || fuse_quant_mode() == 0 || !fuse_norm_enabled())
    return false;
  const Fp8Weight& q = f->second;
  ProfScope prof(this, "add_rms_norm+quantize fp8", n, w.cols);
  const bool keep_bf16 = fuse_norm_mode() == 2;
  launch_add_rms_norm_quantize_fp8(norm_.residual, static_cast<const bf16_t*>(norm_.delta), norm_.ld_delta, norm_.w,
                                   int32_t(n), int32_t(w.cols), norm_.eps,
                                   keep_bf16 ? static_cast<bf16_t*>(norm_.out) : nullptr, norm_.ldo, q.d_input_scale,
                                   xq_, x_scales_, q.per_channel, stream_);
  xq_holds_ = {xv.ptr, xv.ld, n, w.cols, q.d_input_scale, q.per_channel};
  if (!keep_bf16) norm_lazy_ = norm_;
  norm_.on = false;
  return true;
}

void CudaOps::norm_out_rewritten(const void* out, int64_t n) {
  if (norm_lazy_.on && out == norm_lazy_.out && n >= norm_lazy_.n) norm_lazy_.on = false;
  touch(norm_lazy_.residual);  // anything still skipped, before the residual changes
}

void CudaOps::flush_pending() {
  flush_silu();
  flush_norm();
  if (!pending_.on) return;
  pending_.on = false;
  matmul(pending_.x, pending_.ldx, pending_.n, pending_.w, pending_.rows, pending_.cols, pending_.y, pending_.ldy, false);
}

GemvW CudaOps::gemv_weight(const void* w) const {
  GemvW g;
  g.data = w;
  auto f = fp8_.find(w);
  if (f != fp8_.end()) {
    g.fp8 = true;
    g.scale = f->second.scale;
    g.row_scales = f->second.per_channel ? f->second.d_row_scales : nullptr;
    // The tensor-core GEMV quantizes x as the FP8 GEMM path does (launch_quantize_fp8), so decode
    // at n <= 4 and larger steps compute the same function; act kNone keeps the CUDA-core kernel
    // (bf16 activations).
    if (gemv_fp8_mma_enabled()) switch (f->second.act) {
      case Fp8Act::kStatic: g.act = GemvAct::kStatic; break;
      case Fp8Act::kDynamicTensor: g.act = GemvAct::kDynamicTensor; break;
      case Fp8Act::kDynamicToken: g.act = GemvAct::kDynamicToken; break;
    }
    g.input_scale = f->second.d_input_scale;
    g.tiled = f->second.tiled;
  }
  return g;
}

void CudaOps::matmul(const void* x, int64_t ldx, int64_t n, const void* w, int64_t rows, int64_t cols, void* y,
                     int64_t ldy, bool y_f32) {
  auto f = fp8_.find(w);
  if (f == fp8_.end()) {
    gemm_->linear(x, n, ldx, w, rows, cols, y, ldy, y_f32, stream_);
    return;
  }
  if (n == 0) return;
  const Fp8Weight& q = f->second;
  KILN_CHECK_MSG(!y_f32, "FP8 linears write bf16 activations");
  if (n <= gemm_->gemv_max_m() &&
      launch_gemv(static_cast<const bf16_t*>(x), ldx, int32_t(n), gemv_weight(w), int32_t(rows), int32_t(cols), y, ldy,
                  false, stream_))
    return;
  const bool vec = quantize_input(x, ldx, n, cols, q);
  gemm_->linear_fp8(xq_, n, cols, x_scales_, vec, w, rows, cols, vec ? q.d_row_scales : q.d_scale, vec, y, ldy,
                    stream_);
}

// Vector scales whenever either side has them: per-token activations, or per-channel weights (the
// per-tensor side is then repeated: d_row_scales / the quantizer's per-row output).
static bool vector_scales(const Fp8Weight& q) { return q.per_channel || q.act == Fp8Act::kDynamicToken; }

bool CudaOps::quantize_input(const void* x, int64_t ldx, int64_t n, int64_t cols, const Fp8Weight& q) {
  KILN_CHECK_MSG(n <= caps_.tokens && cols <= fp8_cols_, "FP8 input larger than the reserved quantization buffer");
  const bool vec = vector_scales(q);
  const bool have = xq_holds_.x == x && xq_holds_.ldx == ldx && xq_holds_.n == n && xq_holds_.cols == cols &&
                    q.act == Fp8Act::kStatic && xq_holds_.scale == q.d_input_scale && xq_holds_.per_row == vec;
  xq_holds_ = {};
  if (!have)
    launch_quantize_fp8(static_cast<const bf16_t*>(x), ldx, int32_t(n), int32_t(cols), q.act, q.d_input_scale, xq_,
                        x_scales_, vec, amax_, stream_);
  return vec;
}

bool CudaOps::matmul_into_residual(const Pending& pd, float* residual) {
  auto f = fp8_.find(pd.w);
  if (f == fp8_.end() || pd.n <= gemm_->gemv_max_m() || pd.n > caps_.tokens || pd.cols > fp8_cols_) return false;
  const Fp8Weight& q = f->second;
  const bool vec = vector_scales(q);
  if (!gemm_->fp8_accumulate_ok(pd.n, pd.cols, pd.rows, pd.cols, pd.rows, vec, vec)) return false;
  ProfScope prof(this, "linear fp8 + residual", pd.rows, pd.cols);
  quantize_input(pd.x, pd.ldx, pd.n, pd.cols, q);
  gemm_->linear_fp8_accumulate(xq_, pd.n, pd.cols, x_scales_, vec, pd.w, pd.rows, pd.cols,
                               vec ? q.d_row_scales : q.d_scale, vec, residual, pd.rows, stream_);
  return true;
}

// q/k/v and gate/up are interior pointers of qkv_ and gate_up_: only the owners are freed.
static bool owns(Buf b) { return b != Buf::kQ && b != Buf::kK && b != Buf::kV && b != Buf::kGate && b != Buf::kUp; }

CudaOps::~CudaOps() {
  for (size_t i = 0; i < std::size(bufs_); ++i)
    if (owns(Buf(i))) cudaFree(bufs_[i]);
  cudaFree(qkv_);
  cudaFree(gate_up_);
  cudaFree(inv_freq_);
  cudaFree(norm_counter_);
  if (side_) {
    cudaEventDestroy(fork_);
    cudaEventDestroy(join_);
    cudaStreamDestroy(side_);
  }
  cudaFree(partials_);
  cudaFree(counters_);
  cudaFree(d_meta_);
  if (h_meta_) cudaFreeHost(h_meta_);
  cudaFree(xq_);
  cudaFree(x_scales_);
  cudaFree(amax_);
}

Status CudaOps::reserve(const StepCaps& want) {
  if (want.tokens <= caps_.tokens && want.seqs <= caps_.seqs && want.logit_rows <= caps_.logit_rows &&
      want.table_ints <= caps_.table_ints)
    return Status::ok();
  StepCaps n;
  n.tokens = std::max(want.tokens, caps_.tokens);
  n.seqs = std::max(want.seqs, caps_.seqs);
  n.logit_rows = std::max(want.logit_rows, caps_.logit_rows);
  n.table_ints = std::max(want.table_ints, caps_.table_ints);
  // Free the old set first: growing happens between steps, never inside one. Any buffer may move
  // (the allocator can hand one back at its old address while another moves), hence the generation.
  ++generation_;
  for (size_t i = 0; i < std::size(bufs_); ++i) {
    if (owns(Buf(i))) cudaFree(bufs_[i]);
    bufs_[i] = nullptr;
  }
  cudaFree(qkv_);
  cudaFree(gate_up_);
  cudaFree(partials_);
  cudaFree(counters_);
  cudaFree(d_meta_);
  if (h_meta_) cudaFreeHost(h_meta_);
  cudaFree(xq_);
  cudaFree(x_scales_);
  cudaFree(amax_);
  silu_ = {};  // reserve() runs between steps, after the last op's flush
  norm_ = {};
  silu_lazy_ = {};
  norm_lazy_ = {};
  xq_holds_ = {};
  xq_ = nullptr;
  x_scales_ = nullptr;
  amax_ = nullptr;
  qkv_ = gate_up_ = nullptr;
  partials_ = nullptr;
  counters_ = nullptr;
  d_meta_ = h_meta_ = nullptr;
  reserved_bytes_ = 0;

  const size_t T = size_t(n.tokens), H = size_t(c_.hidden_size), I = size_t(c_.intermediate_size);
  const size_t qkv_cols = size_t(c_.q_dim() + 2 * c_.kv_dim());
  auto alloc = [&](void** p, size_t bytes, const char* what) -> Status {
    KILN_RETURN_IF_ERROR(device_alloc(p, bytes, what));
    reserved_bytes_ += bytes;
    return Status::ok();
  };
  KILN_RETURN_IF_ERROR(alloc(&bufs_[size_t(Buf::kResidual)], T * H * 4, "activations (residual)"));
  KILN_RETURN_IF_ERROR(alloc(&bufs_[size_t(Buf::kNormed)], T * H * 2, "activations (normed)"));
  KILN_RETURN_IF_ERROR(alloc(&qkv_, T * qkv_cols * 2, "activations (qkv)"));
  KILN_RETURN_IF_ERROR(alloc(&bufs_[size_t(Buf::kAttn)], T * size_t(c_.q_dim()) * 2, "activations (attention)"));
  KILN_RETURN_IF_ERROR(alloc(&bufs_[size_t(Buf::kProj)], T * H * 2, "activations (proj)"));
  KILN_RETURN_IF_ERROR(alloc(&gate_up_, T * 2 * I * 2, "activations (gate/up)"));
  KILN_RETURN_IF_ERROR(alloc(&bufs_[size_t(Buf::kLogitsIn)], size_t(n.logit_rows) * H * 2, "activations (logit rows)"));
  KILN_RETURN_IF_ERROR(alloc(&bufs_[size_t(Buf::kLogits)], size_t(n.logit_rows) * size_t(c_.vocab_size) * 4, "logits"));
  // FP8 GEMM inputs: the widest K of any projection (q_dim for o_proj, inter for down_proj).
  fp8_cols_ = std::max<int64_t>({c_.hidden_size, c_.intermediate_size, c_.q_dim()});
  KILN_RETURN_IF_ERROR(alloc(reinterpret_cast<void**>(&xq_), T * size_t(fp8_cols_), "activations (fp8 inputs)"));
  KILN_RETURN_IF_ERROR(alloc(reinterpret_cast<void**>(&x_scales_), T * 4, "activations (fp8 scales)"));
  KILN_RETURN_IF_ERROR(alloc(reinterpret_cast<void**>(&amax_), 4, "fp8 amax"));
  bf16_t* q = static_cast<bf16_t*>(qkv_);
  bufs_[size_t(Buf::kQ)] = q;
  bufs_[size_t(Buf::kK)] = q + c_.q_dim();
  bufs_[size_t(Buf::kV)] = q + c_.q_dim() + c_.kv_dim();
  bf16_t* g = static_cast<bf16_t*>(gate_up_);
  bufs_[size_t(Buf::kGate)] = g;
  bufs_[size_t(Buf::kUp)] = g + I;
  // Decode splits keep (seqs x heads x splits) under 2x the target block count.
  // (work units x splits < 2 target when split; each unit covers G query heads' partials)
  partial_floats_ = size_t(2) * size_t(target_blocks_ + c_.num_heads) *
                    size_t(decode_heads_per_block(c_.num_heads, c_.num_kv_heads)) * size_t(c_.head_dim + 2);
  KILN_RETURN_IF_ERROR(alloc(reinterpret_cast<void**>(&partials_), partial_floats_ * 4, "attention partials"));
  const size_t counter_bytes = size_t(n.seqs) * size_t(c_.num_heads) * 4;
  KILN_RETURN_IF_ERROR(alloc(reinterpret_cast<void**>(&counters_), counter_bytes, "attention split counters"));
  if (!cuda_ok(cudaMemset(counters_, 0, counter_bytes), "counter reset"))
    return Status::error("cudaMemset of the attention split counters failed");
  meta_ints_ = size_t(4) * T + size_t(4) * size_t(n.seqs) + size_t(n.logit_rows) + 2 * (T / 64 + size_t(n.seqs)) +
               size_t(n.table_ints) + 64;
  KILN_RETURN_IF_ERROR(alloc(reinterpret_cast<void**>(&d_meta_), meta_ints_ * 4, "step metadata"));
  if (!cuda_ok(cudaMallocHost(reinterpret_cast<void**>(&h_meta_), meta_ints_ * 4), "pinned step metadata"))
    return Status::error("cudaMallocHost of " + std::to_string(meta_ints_ * 4) + " bytes for step metadata failed");
  caps_ = n;
  return Status::ok();
}

void CudaOps::register_fused(const void* head, int64_t rows, Buf out, std::vector<std::pair<const void*, Buf>> members) {
  fused_[head] = Fused{head, rows, out, true};
  for (auto& [m, b] : members) fused_[m] = Fused{head, rows, b, false};
}

void CudaOps::pack_step(const StepBatch& b) {
  T_ = b.num_tokens();
  S_ = b.num_seqs();
  L_ = int32_t(b.logits_rows.size());
  const int32_t bs = kv_ ? kv_->block_size : 16;
  auto align4 = [](size_t x) { return (x + 3) & ~size_t(3); };
  size_t off = 0;
  TokenMeta* tok = reinterpret_cast<TokenMeta*>(h_meta_ + off);
  const size_t tok_off = off;
  off = align4(off + size_t(4) * size_t(T_));
  SeqMeta* seq = reinterpret_cast<SeqMeta*>(h_meta_ + off);
  const size_t seq_off = off;
  off = align4(off + size_t(4) * size_t(S_));
  const size_t rows_off = off;
  std::memcpy(h_meta_ + off, b.logits_rows.data(), size_t(L_) * 4);
  off = align4(off + size_t(L_));
  const size_t tiles_off = off;
  int32_t* tiles = h_meta_ + off;
  n_prefill_tiles_ = 0;
  n_fresh_tiles_ = 0;
  n_decode_seqs_ = 0;
  int64_t prefill_ctx = 0;
  // Prefill tiles: the fresh prompts' first (ctx_len == q_len), then the other prefill sequences', so
  // each of the two launches of an FP8 cache's mixed prefill (launch_prefill_attention) covers a
  // range of the tiles instead of a grid where the other launch's blocks exit at once.
  for (int pass = 0; pass < 2; ++pass)
    for (int32_t s = 0; s < S_; ++s) {
      const int32_t q0 = b.query_start[size_t(s)], q1 = b.query_start[size_t(s) + 1];
      if (q1 - q0 == 1 || (b.context_lens[size_t(s)] == q1 - q0) != (pass == 0)) continue;
      for (int32_t r = 0; r < q1 - q0; r += 64) {
        tiles[2 * n_prefill_tiles_] = s;
        tiles[2 * n_prefill_tiles_ + 1] = r;
        ++n_prefill_tiles_;
        if (pass == 0) ++n_fresh_tiles_;
      }
    }
  for (int32_t s = 0; s < S_; ++s) {
    const int32_t q0 = b.query_start[size_t(s)], q1 = b.query_start[size_t(s) + 1];
    seq[s] = SeqMeta{q0, q1 - q0, b.context_lens[size_t(s)], b.max_blocks_per_seq};
    if (q1 - q0 == 1)
      ++n_decode_seqs_;
    else
      prefill_ctx += b.context_lens[size_t(s)];
    const int32_t* table = b.block_table(s);
    for (int32_t t = q0; t < q1; ++t) {
      const int32_t pos = b.positions[size_t(t)];
      const int32_t slot = b.context_lens[size_t(s)] == 0 ? -1 : table[pos / bs] * bs + pos % bs;
      tok[t] = TokenMeta{b.token_ids[size_t(t)], pos, slot, s};
    }
  }
  prefill_mean_ctx_ = S_ > n_decode_seqs_ ? int32_t(prefill_ctx / (S_ - n_decode_seqs_)) : 0;
  off = align4(off + size_t(2) * size_t(n_prefill_tiles_));
  const size_t tables_off = off;
  std::memcpy(h_meta_ + off, b.block_tables.data(), b.block_tables.size() * 4);
  off += b.block_tables.size();
  KILN_CHECK_MSG(off <= meta_ints_, "step metadata exceeds the reserved capacity");
  meta_used_ = off;
  d_tokens_ = reinterpret_cast<const TokenMeta*>(d_meta_ + tok_off);
  d_seqs_ = reinterpret_cast<const SeqMeta*>(d_meta_ + seq_off);
  d_rows_ = d_meta_ + rows_off;
  d_tiles_ = d_meta_ + tiles_off;
  d_tables_ = d_meta_ + tables_off;
}

void CudaOps::upload_step() {
  KILN_CHECK(cuda_ok(cudaMemcpyAsync(d_meta_, h_meta_, meta_used_ * 4, cudaMemcpyHostToDevice, stream_), "step upload"));
}

void CudaOps::begin_step(const StepBatch& batch) {
  flush_pending();
  // The last step's activations are dead: a skipped bf16 product is never computed (and so never
  // lands in a decode graph being captured).
  silu_lazy_ = {};
  norm_lazy_ = {};
  last_fused_ = {};
  pack_step(batch);
  if (!external_upload_) upload_step();
}

Act CudaOps::buffer(Buf which) { return bufs_[size_t(which)]; }

CudaOps::View CudaOps::view(Act p, int64_t dense_ld) const {
  const int64_t qkv = c_.q_dim() + 2 * c_.kv_dim(), gu = 2 * int64_t(c_.intermediate_size);
  if (p == bufs_[size_t(Buf::kQ)] || p == bufs_[size_t(Buf::kK)] || p == bufs_[size_t(Buf::kV)]) return {p, qkv, false};
  if (p == bufs_[size_t(Buf::kGate)] || p == bufs_[size_t(Buf::kUp)]) return {p, gu, false};
  if (p == bufs_[size_t(Buf::kResidual)] || p == bufs_[size_t(Buf::kLogits)]) return {p, dense_ld, true};
  return {p, dense_ld, false};
}

Status CudaOps::build_fused_decode(const ModelWeights& w) {
  const ModelConfig& c = c_;
  if (c.qk_norm) return Status::error("q/k norms");
  if (!gemv_fp8_mma_enabled()) return Status::error("the FP8 decode GEMV is off (KILN_FP8_GEMV=cvt) or not on this GPU");
  if (!kv_ || !kv_->fp8) return Status::error("the KV cache is not FP8");
  FusedDecodeShape sh;
  sh.num_layers = c.num_layers;
  sh.H = int32_t(c.hidden_size);
  sh.I = int32_t(c.intermediate_size);
  sh.n_heads = c.num_heads;
  sh.n_kv = c.num_kv_heads;
  sh.head_dim = c.head_dim;
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  auto b = [](const Weight& x) { return static_cast<const uint8_t*>(x.data); };
  std::vector<FusedLayer> layers;
  int dynamic = -1;  // the first projection's activation mode; every other must match
  for (int32_t i = 0; i < c.num_layers; ++i) {
    const LayerWeights& l = w.layers[size_t(i)];
    if (!l.bq.empty() || !l.bk.empty() || !l.bv.empty()) return Status::error("q/k/v biases");
    // q|k|v and gate|up must sit back to back (the executor uploads them so: register_fused)
    if (b(l.wk) != b(l.wq) + c.q_dim() * H || b(l.wv) != b(l.wk) + c.kv_dim() * H || b(l.w_up) != b(l.w_gate) + I * H)
      return Status::error("layer " + std::to_string(i) + ": q|k|v or gate|up not contiguous");
    FusedLayer fl{};
    const Weight* mats[4] = {&l.wq, &l.wo, &l.w_gate, &l.w_down};  // FusedLayer::mat's order
    for (int m = 0; m < 4; ++m) {
      auto it = fp8_.find(mats[m]->data);
      if (it == fp8_.end() || !it->second.d_row_scales || !it->second.d_input_scale)
        return Status::error("layer " + std::to_string(i) + ": a projection is not FP8");
      const Fp8Weight& f = it->second;
      const int dyn = f.act != Fp8Act::kStatic;
      if (dynamic < 0) dynamic = dyn;
      if (dyn != dynamic) return Status::error("static and dynamic activation scales mixed");
      fl.mat[m] = {b(*mats[m]), f.d_row_scales, f.d_input_scale};
    }
    fl.attn_norm = static_cast<const float*>(l.attn_norm.data);
    fl.ffn_norm = static_cast<const float*>(l.ffn_norm.data);
    fl.k_cache = kv_->k[size_t(i)];
    fl.v_cache = kv_->v[size_t(i)];
    fl.k_scale = kv_->k_scale[size_t(i)];
    fl.v_scale = kv_->v_scale[size_t(i)];
    layers.push_back(fl);
  }
  dynamic_act_ = dynamic == 1;
  auto fd = std::make_unique<FusedDecode>();
  KILN_RETURN_IF_ERROR(fd->init(sh, layers));
  fused_decode_ = std::move(fd);
  return Status::ok();
}

bool CudaOps::all_layers(const ModelConfig& c, const ModelWeights& w, Act x, Act h) {
  if (!fused_decode_on_ || T_ != 1 || S_ != 1 || L_ != 1 || n_prefill_tiles_ != 0 || !fused_decode_why_not_.empty()) return false;
  if (!fused_decode_) {
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(stream_, &cs);
    if (cs != cudaStreamCaptureStatusNone) return false;  // built at an eager step
    Status st = build_fused_decode(w);
    if (!st) {
      fused_decode_why_not_ = st.message();
      log_info("cuda: one-token decode steps run op by op (the one-kernel path: " + st.message() + ")");
      return false;
    }
    log_info("cuda: one-token decode steps run every layer in one kernel (KILN_FUSED_DECODE=1)");
  }
  ProfScope prof(this, "all_layers");
  flush_pending();
  norm_out_rewritten(h, 1);  // as rms_norm: the skipped output is dead, then the inputs are computed
  touch(x);
  touch(h);
  last_fused_ = {};
  View xv = view(x, c.hidden_size), hv = view(h, c.hidden_size);
  FusedDecodeStep st;
  st.eps = c.rms_norm_eps;
  st.scale = 1.0f / std::sqrt(float(c.head_dim));
  st.rope = c.rope_style == RopeStyle::kInterleaved ? 2 : 1;
  st.inv_freq = inv_freq_;
  st.dynamic = dynamic_act_;
  st.tokens = d_tokens_;
  st.seqs = d_seqs_;
  st.tables = d_tables_;
  st.block_size = kv_->block_size;
  st.residual = static_cast<float*>(xv.ptr);
  st.final_norm = static_cast<const float*>(w.final_norm.data);
  st.out = static_cast<bf16_t*>(hv.ptr);
  fused_decode_->launch(st, stream_);
  ++fused_decode_calls_;
  return true;
}

void CudaOps::embed(const Weight& table, Act out) {
  ProfScope prof(this, "embed");
  flush_pending();
  touch(out);
  last_fused_ = {};
  View o = view(out, table.cols);
  KILN_CHECK_MSG(o.f32, "embed writes the f32 residual buffer");
  launch_embed(static_cast<const bf16_t*>(table.data), d_tokens_, T_, int32_t(table.cols), static_cast<float*>(o.ptr),
               stream_);
}

void CudaOps::rms_norm(Act x, const Weight& w, int64_t n, int64_t dim, float eps, Act out) {
  ProfScope prof(this, "rms_norm");
  flush_pending();
  norm_out_rewritten(out, n);
  touch(x);
  touch(out);
  last_fused_ = {};
  View xv = view(x, dim), ov = view(out, dim);
  launch_rms_norm(xv.ptr, xv.f32, xv.ld, static_cast<const float*>(w.data), int32_t(n), int32_t(dim), eps,
                  static_cast<bf16_t*>(ov.ptr), ov.ld, stream_);
}

void CudaOps::add_rms_norm(Act residual, Act delta, const Weight& w, int64_t n, int64_t dim, float eps, Act out) {
  ProfScope prof(this, "add_rms_norm (+ folded GEMV)");
  last_fused_ = {};
  norm_out_rewritten(out, n);
  touch(delta);
  touch(out);
  View rv = view(residual, dim), dv = view(delta, dim), ov = view(out, dim);
  KILN_CHECK_MSG(rv.f32 && rv.ld == dim, "add_rms_norm: the residual is the dense f32 buffer");
  // the recorded projection is this add's delta
  const bool folds = pending_.on && pending_.y == dv.ptr && pending_.n == n && pending_.rows == dim && !ov.f32;
  if (folds && n <= gemm_->gemv_max_m() &&
      launch_gemv_add_rms_norm(static_cast<const bf16_t*>(pending_.x), pending_.ldx, int32_t(n),
                               gemv_weight(pending_.w), int32_t(dim), int32_t(pending_.cols),
                               static_cast<bf16_t*>(pending_.y), pending_.ldy, static_cast<float*>(rv.ptr),
                               static_cast<const float*>(w.data), eps, static_cast<bf16_t*>(ov.ptr), ov.ld,
                               norm_counter_, stream_)) {
    pending_.on = false;
    return;
  }
  // Prefill FP8 o_proj / down_proj: the GEMM adds into the residual itself (f32 C = D), so the norm
  // below has no delta to read and no residual to write (the projection's bf16 output is never made).
  const void* dptr = dv.ptr;
  int64_t ld_delta = dv.ld;
  if (folds && matmul_into_residual(pending_, static_cast<float*>(rv.ptr))) {
    pending_.on = false;
    dptr = nullptr;
    ld_delta = 0;
  }
  flush_pending();
  if (n > gemm_->gemv_max_m() && !ov.f32 && !fp8_.empty() && fuse_quant_mode() != 0 && fuse_norm_enabled()) {
    // Recorded: launched by the next op (fused with its FP8 input quantization where it can be).
    norm_ = {true, static_cast<float*>(rv.ptr), dptr, static_cast<const float*>(w.data), ov.ptr, ld_delta, ov.ld, n,
             dim, eps};
    return;
  }
  launch_add_rms_norm(static_cast<float*>(rv.ptr), static_cast<const bf16_t*>(dptr), ld_delta,
                      static_cast<const float*>(w.data), int32_t(n), int32_t(dim), eps, static_cast<bf16_t*>(ov.ptr),
                      ov.ld, stream_);
}

void CudaOps::linear(Act x, int64_t n, const Weight& w, const Weight* bias, Act y) {
  ProfScope prof(this, fp8_.count(w.data) ? "linear fp8" : "linear bf16", w.rows, w.cols);
  View xv = view(x, w.cols), yv = view(y, w.rows);
  // Before flush_pending, which would launch the recorded silu_mul plain; x is then read as xq_ only.
  // A pre-quantized input lives from the take to this call's matmul, never longer.
  xq_holds_ = {};
  const bool prequant = take_silu_quant(xv, n, w) || take_norm_quant(xv, n, w);
  flush_pending();
  auto f = fused_.find(w.data);
  // wk / wv after wq (w_up after w_gate): the head's GEMM computed them, x is not read again.
  const bool computed = f != fused_.end() && !f->second.is_head && y == bufs_[size_t(f->second.out)] && !yv.f32 &&
                        last_fused_.head == f->second.head && last_fused_.x == x && last_fused_.n == n;
  if (!prequant && !computed) touch(x);
  if (y == bufs_[size_t(Buf::kGate)]) gate_up_rewritten(y, n);
  touch(y);
  const bool decode_fold = n >= 1 && n <= 4 && n <= gemm_->gemv_max_m() && fused_norm_enabled();
  const bool residual_fold = n > gemm_->gemv_max_m() && fuse_residual_enabled() && fp8_.count(w.data);
  if (y == bufs_[size_t(Buf::kProj)] && !yv.f32 && (!bias || bias->empty()) && (decode_fold || residual_fold) &&
      fused_.find(w.data) == fused_.end()) {
    last_fused_ = {};
    pending_ = {true, xv.ptr, xv.ld, n, w.data, w.rows, w.cols, yv.ptr, yv.ld};
    return;
  }
  auto add_bias = [&] {
    if (bias && !bias->empty())
      launch_add_bias(yv.ptr, yv.f32, yv.ld, static_cast<const float*>(bias->data), int32_t(n), int32_t(w.rows), stream_);
  };
  if (f != fused_.end() && y == bufs_[size_t(f->second.out)] && !yv.f32) {
    const Fused& fu = f->second;
    if (fu.is_head && yv.ld == fu.rows) {
      matmul(xv.ptr, xv.ld, n, w.data, fu.rows, w.cols, yv.ptr, yv.ld, false);
      last_fused_ = {fu.head, x, n};
      add_bias();
      return;
    }
    if (!fu.is_head && last_fused_.head == fu.head && last_fused_.x == x && last_fused_.n == n) {
      add_bias();  // computed by the head's fused GEMM
      return;
    }
  }
  last_fused_ = {};
  matmul(xv.ptr, xv.ld, n, w.data, w.rows, w.cols, yv.ptr, yv.ld, yv.f32);
  add_bias();
}

void CudaOps::linear_gate_up_silu(Act x, int64_t n, const LayerWeights& l, Act gate, Act up) {
  ProfScope prof(this, "gate_up+silu", l.w_gate.rows, l.w_gate.cols);
  // A recorded prefill add_rms_norm (nothing else is recorded then) stays for linear(x, w_gate)
  // below to fuse with its FP8 quantization.
  if (!norm_.on || n <= gemm_->gemv_max_m()) flush_pending();
  touch(x);
  gate_up_rewritten(gate, n);
  touch(up);
  const int64_t I = l.w_gate.rows;
  auto f = fused_.find(l.w_gate.data);
  // Decode: one GEMV over [gate; up] with silu(gate) * up in its epilogue (no silu_mul kernel).
  if (n <= gemm_->gemv_max_m() && f != fused_.end() && f->second.is_head && f->second.rows == 2 * I &&
      gate == bufs_[size_t(Buf::kGate)]) {
    View xv = view(x, l.w_gate.cols), gv = view(gate, I);
    if (launch_gemv_silu(static_cast<const bf16_t*>(xv.ptr), xv.ld, int32_t(n), gemv_weight(l.w_gate.data),
                         int32_t(I), int32_t(l.w_gate.cols), static_cast<bf16_t*>(gv.ptr), gv.ld, stream_)) {
      last_fused_ = {};
      return;
    }
  }
  Ops::linear_gate_up_silu(x, n, l, gate, up);
}

void CudaOps::head_rms_norm(Act x, int64_t n, int64_t heads, int64_t head_dim, const Weight& w, float eps) {
  ProfScope prof(this, "head_rms_norm");
  flush_pending();
  touch(x);
  last_fused_ = {};
  View xv = view(x, heads * head_dim);
  launch_head_rms_norm(static_cast<bf16_t*>(xv.ptr), xv.ld, int32_t(n), int32_t(heads), int32_t(head_dim),
                       static_cast<const float*>(w.data), eps, stream_);
}

void CudaOps::rope(Act q, Act k, const ModelConfig& c) {
  ProfScope prof(this, "rope");
  flush_pending();
  touch(q);
  touch(k);
  last_fused_ = {};
  View qv = view(q, c.q_dim()), kv = view(k, c.kv_dim());
  launch_rope(static_cast<bf16_t*>(qv.ptr), qv.ld, static_cast<bf16_t*>(kv.ptr), kv.ld, d_tokens_, T_, inv_freq_,
              c.num_heads, c.num_kv_heads, c.head_dim, c.rope_style == RopeStyle::kInterleaved, stream_);
}

AttnParams CudaOps::attn_params(int32_t layer, Act q, Act out, const ModelConfig& c) const {
  View qv = view(q, c.q_dim()), ov = view(out, c.q_dim());
  AttnParams p{};
  p.q = static_cast<const bf16_t*>(qv.ptr);
  p.ldq = qv.ld;
  p.k_cache = kv_->k[size_t(layer)];
  p.v_cache = kv_->v[size_t(layer)];
  p.kv_fp8 = kv_->fp8;
  p.k_scale = kv_->fp8 ? kv_->k_scale[size_t(layer)] : 1.0f;
  p.v_scale = kv_->fp8 ? kv_->v_scale[size_t(layer)] : 1.0f;
  p.out = static_cast<bf16_t*>(ov.ptr);
  p.ldo = ov.ld;
  p.tokens = d_tokens_;
  p.seqs = d_seqs_;
  p.block_tables = d_tables_;
  p.num_seqs = S_;
  p.n_heads = c.num_heads;
  p.n_kv = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.block_size = kv_->block_size;
  p.scale = 1.0f / std::sqrt(float(c.head_dim));
  p.tiles = d_tiles_;
  p.num_tiles = n_prefill_tiles_;
  p.prefill_mean_ctx = prefill_mean_ctx_;
  p.partials = partials_;
  p.counters = counters_;
  const int32_t work = std::max(1, S_ * c.num_heads / decode_heads_per_block(c.num_heads, c.num_kv_heads));
  p.splits = std::clamp((target_blocks_ + work - 1) / work, 1, 32);
  p.target_blocks = target_blocks_;
  return p;
}

void CudaOps::attention(int32_t layer, Act q, Act k, Act v, const ModelConfig& c, Act out) {
  ProfScope prof(this, "attention");
  flush_pending();
  for (Act p : {q, k, v, out}) touch(p);
  last_fused_ = {};
  View kv = view(k, c.kv_dim()), vv = view(v, c.kv_dim());
  if (kv_->fp8)
    launch_kv_write_fp8(static_cast<const bf16_t*>(kv.ptr), kv.ld, static_cast<const bf16_t*>(vv.ptr), vv.ld, d_tokens_,
                        T_, kv_->k[size_t(layer)], kv_->v[size_t(layer)], c.num_kv_heads, c.head_dim, kv_->block_size,
                        kv_->k_scale[size_t(layer)], kv_->v_scale[size_t(layer)], stream_);
  else
    launch_kv_write(static_cast<const bf16_t*>(kv.ptr), kv.ld, static_cast<const bf16_t*>(vv.ptr), vv.ld, d_tokens_, T_,
                    static_cast<bf16_t*>(kv_->k[size_t(layer)]), static_cast<bf16_t*>(kv_->v[size_t(layer)]),
                    c.num_kv_heads, c.head_dim, kv_->block_size, stream_);
  const AttnParams dec = attn_params(layer, q, out, c);
  AttnParams pre = dec;
  pre.num_fresh_tiles = n_fresh_tiles_;  // fresh prompts may attend to their own k, v rows
  pre.k_new = static_cast<const bf16_t*>(kv.ptr);
  pre.ldk = kv.ld;
  pre.v_new = static_cast<const bf16_t*>(vv.ptr);
  pre.ldv = vv.ld;
  if (attn_overlap() && n_decode_seqs_ > 0 && n_prefill_tiles_ > 0) {
    if (!side_) {
      KILN_CHECK(cuda_ok(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking), "side stream"));
      KILN_CHECK(cuda_ok(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming), "side stream"));
      KILN_CHECK(cuda_ok(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming), "side stream"));
    }
    // fork after the KV write, join before the next op (o_proj) reads the output
    KILN_CHECK(cuda_ok(cudaEventRecord(fork_, stream_), "attention fork"));
    KILN_CHECK(cuda_ok(cudaStreamWaitEvent(side_, fork_, 0), "attention fork"));
    launch_prefill_attention(pre, stream_);
    launch_decode_attention(dec, side_);
    KILN_CHECK(cuda_ok(cudaEventRecord(join_, side_), "attention join"));
    KILN_CHECK(cuda_ok(cudaStreamWaitEvent(stream_, join_, 0), "attention join"));
    return;
  }
  if (n_decode_seqs_ > 0) launch_decode_attention(dec, stream_);
  if (n_prefill_tiles_ > 0) launch_prefill_attention(pre, stream_);
}

void CudaOps::rope_attention(int32_t layer, Act q, Act k, Act v, const ModelConfig& c, Act out) {
  ProfScope prof(this, "rope+attention");
  flush_pending();
  for (Act p : {q, k, v, out}) touch(p);
  // KILN_FUSED_DECODE_ATTENTION=0: the separate kernels everywhere (to measure the fusion)
  static const bool fused = [] {
    const char* e = std::getenv("KILN_FUSED_DECODE_ATTENTION");
    return !(e && std::string(e) == "0");
  }();
  if (n_prefill_tiles_ > 0 || !fused) {  // prefill or mixed step: the separate kernels
    Ops::rope_attention(layer, q, k, v, c, out);
    return;
  }
  // Pure decode: rope, KV write, attention and the split merge in one kernel.
  last_fused_ = {};
  View kv = view(k, c.kv_dim()), vv = view(v, c.kv_dim());
  AttnParams p = attn_params(layer, q, out, c);
  p.rope = c.rope_style == RopeStyle::kInterleaved ? 2 : 1;
  p.inv_freq = inv_freq_;
  p.k_new = static_cast<const bf16_t*>(kv.ptr);
  p.ldk = kv.ld;
  p.v_new = static_cast<const bf16_t*>(vv.ptr);
  p.ldv = vv.ld;
  launch_decode_attention(p, stream_);
}

void CudaOps::silu_mul(Act gate, Act up, int64_t n, int64_t dim, Act out) {
  flush_pending();
  last_fused_ = {};
  for (Act p : {gate, up, out}) touch(p);
  View gv = view(gate, dim), uv = view(up, dim), ov = view(out, dim);
  // Recorded: launched by the next op (fused with down_proj's FP8 quantization where it can be).
  silu_ = {true, gv.ptr, uv.ptr, ov.ptr, gv.ld, uv.ld, ov.ld, n, dim};
}

void CudaOps::gather_logit_rows(Act x, int64_t dim, Act out) {
  ProfScope prof(this, "gather_logit_rows");
  flush_pending();
  touch(x);
  last_fused_ = {};
  View xv = view(x, dim);
  launch_gather_rows(static_cast<const bf16_t*>(xv.ptr), xv.ld, d_rows_, L_, int32_t(dim), static_cast<bf16_t*>(out),
                     stream_);
}

void CudaOps::write_buffer(Buf b, const float* host, int64_t rows, int64_t cols) {
  flush_pending();
  touch(bufs_[size_t(b)]);
  View v = view(bufs_[size_t(b)], cols);
  if (v.f32) {
    KILN_CHECK(cuda_ok(cudaMemcpy2D(v.ptr, size_t(v.ld) * 4, host, size_t(cols) * 4, size_t(cols) * 4, size_t(rows),
                                    cudaMemcpyHostToDevice), "write_buffer"));
    return;
  }
  std::vector<uint16_t> tmp(size_t(rows * cols));
  for (size_t i = 0; i < tmp.size(); ++i) tmp[i] = f32_to_bf16(host[i]);
  KILN_CHECK(cuda_ok(cudaMemcpy2D(v.ptr, size_t(v.ld) * 2, tmp.data(), size_t(cols) * 2, size_t(cols) * 2, size_t(rows),
                                  cudaMemcpyHostToDevice), "write_buffer"));
}

std::vector<float> CudaOps::read_buffer(Buf b, int64_t rows, int64_t cols) {
  flush_pending();
  touch(bufs_[size_t(b)]);
  KILN_CHECK(cuda_ok(cudaStreamSynchronize(stream_), "read_buffer"));
  View v = view(bufs_[size_t(b)], cols);
  std::vector<float> out(size_t(rows * cols));
  if (v.f32) {
    KILN_CHECK(cuda_ok(cudaMemcpy2D(out.data(), size_t(cols) * 4, v.ptr, size_t(v.ld) * 4, size_t(cols) * 4, size_t(rows),
                                    cudaMemcpyDeviceToHost), "read_buffer"));
    return out;
  }
  std::vector<uint16_t> tmp(out.size());
  KILN_CHECK(cuda_ok(cudaMemcpy2D(tmp.data(), size_t(cols) * 2, v.ptr, size_t(v.ld) * 2, size_t(cols) * 2, size_t(rows),
                                  cudaMemcpyDeviceToHost), "read_buffer"));
  for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_f32(tmp[i]);
  return out;
}

}  // namespace kiln::cuda
