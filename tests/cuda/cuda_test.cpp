// CUDA backend against the CPU reference: every op over a grid of shapes, the executor against the
// CPU executor on the same weights, and the transformers golden fixtures. Without a GPU (CI) every
// test skips with the reason.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>

#include <cuda_runtime_api.h>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_executor.h"
#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/sampler.h"
#include "backend/cuda/cuda_executor.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/sampler.h"
#include "core/dtype.h"
#include "core/file.h"
#include "cuda_test_util.h"

using namespace kiln;
using namespace kiln::cuda_test;

namespace {

// Host bf16 weight with random values, and its device copy.
struct TestWeight {
  Weight host, dev;
  std::shared_ptr<std::vector<uint16_t>> hbuf;
  void* dptr = nullptr;
  TestWeight(int64_t rows, int64_t cols, std::mt19937& rng, float scale) {
    hbuf = std::make_shared<std::vector<uint16_t>>(size_t(rows * cols));
    std::normal_distribution<float> d(0.0f, scale);
    for (auto& x : *hbuf) x = f32_to_bf16(d(rng));
    host.format = WeightFormat::kBF16;
    host.rows = rows;
    host.cols = cols;
    host.row_bytes = size_t(cols) * 2;
    host.data = hbuf->data();
    host.owner = hbuf;
    cudaMalloc(&dptr, hbuf->size() * 2);
    cudaMemcpy(dptr, hbuf->data(), hbuf->size() * 2, cudaMemcpyHostToDevice);
    dev = host;
    dev.data = dptr;
  }
  ~TestWeight() { cudaFree(dptr); }
};

// f32 vector weight (norms), host and device.
struct TestVec {
  Weight host, dev;
  std::shared_ptr<std::vector<float>> hbuf;
  void* dptr = nullptr;
  TestVec(int64_t n, std::mt19937& rng) {
    hbuf = std::make_shared<std::vector<float>>(random_vec(size_t(n), rng, 0.5f, false));
    for (auto& x : *hbuf) x += 1.0f;
    host.format = WeightFormat::kF32;
    host.rows = 1;
    host.cols = n;
    host.row_bytes = size_t(n) * 4;
    host.data = hbuf->data();
    cudaMalloc(&dptr, size_t(n) * 4);
    cudaMemcpy(dptr, hbuf->data(), size_t(n) * 4, cudaMemcpyHostToDevice);
    dev = host;
    dev.data = dptr;
  }
  ~TestVec() { cudaFree(dptr); }
};

std::vector<float> cpu_buf(CpuOps& ops, Buf b, size_t n) {
  const float* p = static_cast<const float*>(ops.buffer(b));
  return std::vector<float>(p, p + n);
}
void set_cpu_buf(CpuOps& ops, Buf b, const std::vector<float>& v) {
  std::memcpy(ops.buffer(b), v.data(), v.size() * 4);
}

// A step over several sequences: (q_len, context before) for each, blocks scattered.
StepBatch make_step(const std::vector<std::pair<int, int>>& seqs, int bs, int max_blocks, std::mt19937& rng,
                    const std::vector<std::vector<int32_t>>& tables) {
  StepBatch b;
  b.clear();
  b.max_blocks_per_seq = max_blocks;
  for (size_t s = 0; s < seqs.size(); ++s) {
    auto [qlen, before] = seqs[s];
    for (int i = 0; i < qlen; ++i) {
      b.token_ids.push_back(int32_t(rng() % 300));
      b.positions.push_back(before + i);
    }
    b.query_start.push_back(b.query_start.back() + qlen);
    b.context_lens.push_back(before + qlen);
    for (int j = 0; j < max_blocks; ++j) b.block_tables.push_back(tables[s][size_t(j)]);
    b.logits_rows.push_back(b.query_start.back() - 1);
  }
  (void)bs;
  return b;
}

struct OpsCase {
  int heads, kv, hd, hidden, inter, block_size;
};

class CudaOpsGrid : public ::testing::TestWithParam<OpsCase> {};

TEST_P(CudaOpsGrid, MatchesCpu) {
  REQUIRE_GPU();
  const OpsCase pc = GetParam();
  ModelConfig c = small_config(pc.heads, pc.kv, pc.hd, pc.hidden, pc.inter);
  std::printf("[ops] heads %d kv %d head_dim %d hidden %d inter %d block %d\n", pc.heads, pc.kv, pc.hd, pc.hidden,
              pc.inter, pc.block_size);
  std::mt19937 rng(1234 + pc.hd);
  const int bs = pc.block_size, max_blocks = (300 + bs - 1) / bs, nseq = 4;
  const int num_blocks = nseq * max_blocks + 3;
  CpuKvCache ckv;
  ckv.init(c, num_blocks, bs);
  CpuOps cpu(c, &ckv);
  cuda::Gemm gemm;
  ASSERT_TRUE(gemm.init().is_ok());
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  cuda::CudaOps gpu(c, &gemm, stream);
  ASSERT_TRUE(gpu.reserve(cuda::StepCaps{512, 16, 64, 16 * max_blocks}).is_ok());
  cuda::DeviceKv dkv;
  dkv.num_blocks = num_blocks;
  dkv.block_size = bs;
  std::vector<void*> kvmem;
  for (int l = 0; l < c.num_layers; ++l) {
    void *k = nullptr, *v = nullptr;
    const size_t bytes = size_t(num_blocks) * bs * c.kv_dim() * 2;
    cudaMalloc(&k, bytes);
    cudaMalloc(&v, bytes);
    kvmem.push_back(k);
    kvmem.push_back(v);
    dkv.k.push_back(static_cast<cuda::bf16_t*>(k));
    dkv.v.push_back(static_cast<cuda::bf16_t*>(v));
  }
  gpu.set_kv(&dkv);
  // Scattered block tables.
  std::vector<int32_t> perm(static_cast<size_t>(num_blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<std::vector<int32_t>> tables(nseq);
  for (int s = 0; s < nseq; ++s)
    for (int j = 0; j < max_blocks; ++j) tables[size_t(s)].push_back(perm[size_t(s * max_blocks + j)]);

  const int64_t H = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate_size;
  TestVec norm(H, rng), hnorm(c.head_dim, rng);
  TestWeight wq(Q, H, rng, 0.05f), emb(c.vocab_size, H, rng, 1.0f), head(c.vocab_size, H, rng, 0.05f);

  // Steps: a prefill of several tiles + short prompts, then a mixed step, then pure decode.
  const std::vector<std::vector<std::pair<int, int>>> steps = {
      {{150, 0}, {5, 0}, {1, 0}, {64, 0}}, {{1, 150}, {3, 5}, {1, 1}, {20, 64}}, {{1, 151}, {1, 8}, {1, 2}, {1, 84}}};
  for (size_t si = 0; si < steps.size(); ++si) {
    StepBatch b = make_step(steps[si], bs, max_blocks, rng, tables);
    const int64_t T = b.num_tokens(), L = int64_t(b.logits_rows.size());
    cpu.begin_step(b);
    gpu.begin_step(b);
    std::printf(" step %zu: %lld tokens, %d seqs\n", si, (long long)T, b.num_seqs());
    const std::string tag = "step " + std::to_string(si) + " ";

    // embed
    cpu.embed(emb.host, cpu.buffer(Buf::kResidual));
    gpu.embed(emb.dev, gpu.buffer(Buf::kResidual));
    EXPECT_CLOSE(gpu.read_buffer(Buf::kResidual, T, H), cpu_buf(cpu, Buf::kResidual, size_t(T * H)), 1e-6, tag + "embed");
    // residual stream: random f32
    auto res = random_vec(size_t(T * H), rng, 1.0f, false);
    set_cpu_buf(cpu, Buf::kResidual, res);
    gpu.write_buffer(Buf::kResidual, res.data(), T, H);
    cpu.rms_norm(cpu.buffer(Buf::kResidual), norm.host, T, H, 1e-5f, cpu.buffer(Buf::kNormed));
    gpu.rms_norm(gpu.buffer(Buf::kResidual), norm.dev, T, H, 1e-5f, gpu.buffer(Buf::kNormed));
    EXPECT_CLOSE(gpu.read_buffer(Buf::kNormed, T, H), cpu_buf(cpu, Buf::kNormed, size_t(T * H)), 8e-3, tag + "rms_norm");
    // add_rms_norm with a bf16 delta
    auto delta = random_vec(size_t(T * H), rng);
    set_cpu_buf(cpu, Buf::kProj, delta);
    gpu.write_buffer(Buf::kProj, delta.data(), T, H);
    cpu.add_rms_norm(cpu.buffer(Buf::kResidual), cpu.buffer(Buf::kProj), norm.host, T, H, 1e-5f, cpu.buffer(Buf::kNormed));
    gpu.add_rms_norm(gpu.buffer(Buf::kResidual), gpu.buffer(Buf::kProj), norm.dev, T, H, 1e-5f, gpu.buffer(Buf::kNormed));
    EXPECT_CLOSE(gpu.read_buffer(Buf::kResidual, T, H), cpu_buf(cpu, Buf::kResidual, size_t(T * H)), 1e-6,
                 tag + "add_rms_norm residual");
    EXPECT_CLOSE(gpu.read_buffer(Buf::kNormed, T, H), cpu_buf(cpu, Buf::kNormed, size_t(T * H)), 8e-3,
                 tag + "add_rms_norm out");
    // linear into the strided q slice (normed input rounded to bf16 on both sides)
    auto normed = gpu.read_buffer(Buf::kNormed, T, H);
    set_cpu_buf(cpu, Buf::kNormed, normed);
    cpu.linear(cpu.buffer(Buf::kNormed), T, wq.host, nullptr, cpu.buffer(Buf::kQ));
    gpu.linear(gpu.buffer(Buf::kNormed), T, wq.dev, nullptr, gpu.buffer(Buf::kQ));
    EXPECT_CLOSE(gpu.read_buffer(Buf::kQ, T, Q), cpu_buf(cpu, Buf::kQ, size_t(T * Q)), 8e-3, tag + "linear (q slice)");
    // head_rms_norm on the q slice
    auto qv = gpu.read_buffer(Buf::kQ, T, Q);
    set_cpu_buf(cpu, Buf::kQ, qv);
    cpu.head_rms_norm(cpu.buffer(Buf::kQ), T, c.num_heads, c.head_dim, hnorm.host, 1e-6f);
    gpu.head_rms_norm(gpu.buffer(Buf::kQ), T, c.num_heads, c.head_dim, hnorm.dev, 1e-6f);
    EXPECT_CLOSE(gpu.read_buffer(Buf::kQ, T, Q), cpu_buf(cpu, Buf::kQ, size_t(T * Q)), 8e-3, tag + "head_rms_norm");

    // rope + attention on random bf16 q, k, v
    auto q = random_vec(size_t(T * Q), rng), k = random_vec(size_t(T * KV), rng), v = random_vec(size_t(T * KV), rng);
    {  // interleaved pairs (the GGUF llama layout) on the same inputs; the default style follows
      ModelConfig ci = c;
      ci.rope_style = RopeStyle::kInterleaved;
      set_cpu_buf(cpu, Buf::kQ, q);
      set_cpu_buf(cpu, Buf::kK, k);
      gpu.write_buffer(Buf::kQ, q.data(), T, Q);
      gpu.write_buffer(Buf::kK, k.data(), T, KV);
      cpu.rope(cpu.buffer(Buf::kQ), cpu.buffer(Buf::kK), ci);
      gpu.rope(gpu.buffer(Buf::kQ), gpu.buffer(Buf::kK), ci);
      EXPECT_CLOSE(gpu.read_buffer(Buf::kQ, T, Q), cpu_buf(cpu, Buf::kQ, size_t(T * Q)), 8e-3, tag + "rope q interleaved");
      EXPECT_CLOSE(gpu.read_buffer(Buf::kK, T, KV), cpu_buf(cpu, Buf::kK, size_t(T * KV)), 8e-3, tag + "rope k interleaved");
    }
    set_cpu_buf(cpu, Buf::kQ, q);
    set_cpu_buf(cpu, Buf::kK, k);
    set_cpu_buf(cpu, Buf::kV, v);
    gpu.write_buffer(Buf::kQ, q.data(), T, Q);
    gpu.write_buffer(Buf::kK, k.data(), T, KV);
    gpu.write_buffer(Buf::kV, v.data(), T, KV);
    cpu.rope(cpu.buffer(Buf::kQ), cpu.buffer(Buf::kK), c);
    gpu.rope(gpu.buffer(Buf::kQ), gpu.buffer(Buf::kK), c);
    EXPECT_CLOSE(gpu.read_buffer(Buf::kQ, T, Q), cpu_buf(cpu, Buf::kQ, size_t(T * Q)), 8e-3, tag + "rope q");
    EXPECT_CLOSE(gpu.read_buffer(Buf::kK, T, KV), cpu_buf(cpu, Buf::kK, size_t(T * KV)), 8e-3, tag + "rope k");
    // the CPU continues from the GPU's rounded q/k so attention is compared on equal inputs
    set_cpu_buf(cpu, Buf::kQ, gpu.read_buffer(Buf::kQ, T, Q));
    set_cpu_buf(cpu, Buf::kK, gpu.read_buffer(Buf::kK, T, KV));
    for (int layer = 0; layer < c.num_layers; ++layer) {
      cpu.attention(layer, cpu.buffer(Buf::kQ), cpu.buffer(Buf::kK), cpu.buffer(Buf::kV), c, cpu.buffer(Buf::kAttn));
      gpu.attention(layer, gpu.buffer(Buf::kQ), gpu.buffer(Buf::kK), gpu.buffer(Buf::kV), c, gpu.buffer(Buf::kAttn));
      EXPECT_CLOSE(gpu.read_buffer(Buf::kAttn, T, Q), cpu_buf(cpu, Buf::kAttn, size_t(T * Q)), 1.5e-2,
                   tag + "attention layer " + std::to_string(layer));
    }
    // rope + attention through rope_attention from the raw q, k, v (a pure decode step runs the fused
    // kernel: rope in registers, KV write, split merge), against the CPU's last-layer result above
    gpu.write_buffer(Buf::kQ, q.data(), T, Q);
    gpu.write_buffer(Buf::kK, k.data(), T, KV);
    gpu.write_buffer(Buf::kV, v.data(), T, KV);
    gpu.rope_attention(c.num_layers - 1, gpu.buffer(Buf::kQ), gpu.buffer(Buf::kK), gpu.buffer(Buf::kV), c,
                       gpu.buffer(Buf::kAttn));
    EXPECT_CLOSE(gpu.read_buffer(Buf::kAttn, T, Q), cpu_buf(cpu, Buf::kAttn, size_t(T * Q)), 1.5e-2,
                 tag + "rope_attention");
    // silu_mul in place on the gate slice
    auto g = random_vec(size_t(T * I), rng, 2.0f), u = random_vec(size_t(T * I), rng);
    set_cpu_buf(cpu, Buf::kGate, g);
    set_cpu_buf(cpu, Buf::kUp, u);
    gpu.write_buffer(Buf::kGate, g.data(), T, I);
    gpu.write_buffer(Buf::kUp, u.data(), T, I);
    cpu.silu_mul(cpu.buffer(Buf::kGate), cpu.buffer(Buf::kUp), T, I, cpu.buffer(Buf::kGate));
    gpu.silu_mul(gpu.buffer(Buf::kGate), gpu.buffer(Buf::kUp), T, I, gpu.buffer(Buf::kGate));
    EXPECT_CLOSE(gpu.read_buffer(Buf::kGate, T, I), cpu_buf(cpu, Buf::kGate, size_t(T * I)), 8e-3, tag + "silu_mul");
    // gate/up GEMMs + silu fused (decode steps take the one-GEMV path); [gate; up] stored as one matrix
    {
      TestWeight gu(2 * I, H, rng, 0.05f);
      LayerWeights lh, ld;
      lh.w_gate = gu.host.row_slice(0, I);
      lh.w_up = gu.host.row_slice(I, I);
      ld.w_gate = gu.dev.row_slice(0, I);
      ld.w_up = gu.dev.row_slice(I, I);
      gpu.register_fused(ld.w_gate.data, 2 * I, Buf::kGate, {{ld.w_up.data, Buf::kUp}});
      auto xn = random_vec(size_t(T * H), rng);
      set_cpu_buf(cpu, Buf::kNormed, xn);
      gpu.write_buffer(Buf::kNormed, xn.data(), T, H);
      cpu.linear_gate_up_silu(cpu.buffer(Buf::kNormed), T, lh, cpu.buffer(Buf::kGate), cpu.buffer(Buf::kUp));
      gpu.linear_gate_up_silu(gpu.buffer(Buf::kNormed), T, ld, gpu.buffer(Buf::kGate), gpu.buffer(Buf::kUp));
      EXPECT_CLOSE(gpu.read_buffer(Buf::kGate, T, I), cpu_buf(cpu, Buf::kGate, size_t(T * I)), 1e-2,
                   tag + "linear_gate_up_silu");
    }
    // gather + lm_head into f32 logits
    cpu.gather_logit_rows(cpu.buffer(Buf::kNormed), H, cpu.buffer(Buf::kLogitsIn));
    gpu.gather_logit_rows(gpu.buffer(Buf::kNormed), H, gpu.buffer(Buf::kLogitsIn));
    EXPECT_CLOSE(gpu.read_buffer(Buf::kLogitsIn, L, H), cpu_buf(cpu, Buf::kLogitsIn, size_t(L * H)), 1e-6,
                 tag + "gather_logit_rows");
    cpu.linear(cpu.buffer(Buf::kLogitsIn), L, head.host, nullptr, cpu.buffer(Buf::kLogits));
    gpu.linear(gpu.buffer(Buf::kLogitsIn), L, head.dev, nullptr, gpu.buffer(Buf::kLogits));
    EXPECT_CLOSE(gpu.read_buffer(Buf::kLogits, L, c.vocab_size), cpu_buf(cpu, Buf::kLogits, size_t(L * c.vocab_size)),
                 5e-3, tag + "lm_head (f32 logits)");
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  }
  for (void* p : kvmem) cudaFree(p);
  cudaStreamDestroy(stream);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaOpsGrid,
                         ::testing::Values(OpsCase{4, 2, 16, 64, 160, 16}, OpsCase{4, 4, 32, 64, 96, 8},
                                           OpsCase{16, 8, 32, 256, 512, 16}, OpsCase{8, 2, 64, 512, 256, 16},
                                           OpsCase{8, 2, 128, 1024, 512, 16}, OpsCase{32, 8, 128, 4096, 256, 32}));

// The decode GEMV over every variant it picks (rows split over 1, 2 or 4 warps, K remainders, n up to
// 4 with a strided x, bf16 and f32 outputs, the silu pair mode) against a float64 reference.
TEST(CudaKernels, GemvMatchesReference) {
  REQUIRE_GPU();
  std::mt19937 rng(77);
  cudaStream_t s;
  cudaStreamCreate(&s);
  struct Shape {
    int N, K;
  };
  for (Shape sh : {Shape{1, 8}, Shape{7, 64}, Shape{300, 4096}, Shape{300, 2056}, Shape{4096, 1032}, Shape{6144, 4096},
                   Shape{13000, 264}}) {
    for (int n : {1, 2, 3, 4}) {
      for (bool silu : {false, true}) {
        const int N = sh.N, K = sh.K, ldx = K + 8, rows = silu ? 2 * N : N;
        auto x = random_vec(size_t(n) * ldx, rng);
        auto w = random_vec(size_t(rows) * K, rng, 0.05f);
        std::vector<double> ref(size_t(n) * N);
        for (int m = 0; m < n; ++m)
          for (int r = 0; r < N; ++r) {
            double a = 0, b = 0;
            for (int k = 0; k < K; ++k) a += double(x[size_t(m) * ldx + k]) * w[size_t(r) * K + k];
            if (silu) {
              for (int k = 0; k < K; ++k) b += double(x[size_t(m) * ldx + k]) * w[size_t(N + r) * K + k];
              a = a / (1.0 + std::exp(-a)) * b;
            }
            ref[size_t(m) * N + r] = a;
          }
        std::vector<uint16_t> xb(x.size()), wb(w.size());
        for (size_t i = 0; i < x.size(); ++i) xb[i] = f32_to_bf16(x[i]);
        for (size_t i = 0; i < w.size(); ++i) wb[i] = f32_to_bf16(w[i]);
        void *dx = nullptr, *dw = nullptr, *dy = nullptr;
        cudaMalloc(&dx, xb.size() * 2);
        cudaMalloc(&dw, wb.size() * 2);
        cudaMalloc(&dy, size_t(n) * N * 4);
        cudaMemcpy(dx, xb.data(), xb.size() * 2, cudaMemcpyHostToDevice);
        cudaMemcpy(dw, wb.data(), wb.size() * 2, cudaMemcpyHostToDevice);
        for (bool f32 : {false, true}) {
          if (silu && f32) continue;
          cudaMemset(dy, 0xff, size_t(n) * N * 4);  // NaN poison: every output must be written
          bool ok = silu ? cuda::launch_gemv_silu(static_cast<cuda::bf16_t*>(dx), ldx, n,
                                                  static_cast<cuda::bf16_t*>(dw), N, K, static_cast<cuda::bf16_t*>(dy),
                                                  N, s)
                         : cuda::launch_gemv(static_cast<cuda::bf16_t*>(dx), ldx, n, static_cast<cuda::bf16_t*>(dw), N,
                                             K, dy, N, f32, s);
          ASSERT_TRUE(ok);
          ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
          std::vector<float> got(size_t(n) * N), rf(ref.begin(), ref.end());
          if (f32) {
            cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost);
          } else {
            std::vector<uint16_t> gb(got.size());
            cudaMemcpy(gb.data(), dy, gb.size() * 2, cudaMemcpyDeviceToHost);
            for (size_t i = 0; i < gb.size(); ++i) got[i] = bf16_to_f32(gb[i]);
          }
          Err e = compare(got, rf);
          EXPECT_LE(e.rel, f32 ? 1e-5 : 6e-3) << "N " << N << " K " << K << " n " << n << " silu " << silu
                                              << " f32 " << f32 << " worst at " << e.worst;
        }
        cudaFree(dx);
        cudaFree(dw);
        cudaFree(dy);
      }
    }
  }
  cudaStreamDestroy(s);
}

TEST(CudaKernels, ArgmaxMatchesHostWithTies) {
  REQUIRE_GPU();
  std::mt19937 rng(5);
  const int L = 7, V = 128256;
  auto logits = random_vec(size_t(L) * V, rng, 3.0f, false);
  logits[size_t(1) * V + 500] = logits[size_t(1) * V + 90000] = 100.0f;  // tie: lowest id wins
  logits[size_t(2) * V + V - 1] = 100.0f;
  // Row 3: the maximum is -0.0 tied with +0.0 later (the first wins); row 4: NaN everywhere but one
  // -1 (NaN never wins); row 5: -inf and NaN only (id 0); row 6: +inf wins.
  for (int i = 0; i < V; ++i) logits[size_t(3) * V + i] = -1.0f - float(i % 7);
  logits[size_t(3) * V + 7000] = -0.0f;
  logits[size_t(3) * V + 9000] = 0.0f;
  for (int i = 0; i < V; ++i) logits[size_t(4) * V + i] = std::nanf("");
  logits[size_t(4) * V + 12345] = -1.0f;
  for (int i = 0; i < V; ++i) logits[size_t(5) * V + i] = i % 2 ? -INFINITY : std::nanf("");
  logits[size_t(6) * V + 77] = INFINITY;
  const int32_t expect[L] = {-1, 500, V - 1, 7000, 12345, 0, 77};  // -1: std::max_element's answer
  float* d = nullptr;
  int32_t* ids = nullptr;
  void* scratch = nullptr;
  cudaMalloc(reinterpret_cast<void**>(&d), logits.size() * 4);
  cudaMalloc(reinterpret_cast<void**>(&ids), L * 4);
  cudaMalloc(&scratch, cuda::argmax_scratch_bytes(L));
  cudaMemset(scratch, 0, cuda::argmax_scratch_bytes(L));
  cudaMemcpy(d, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice);
  for (int launch = 0; launch < 2; ++launch) {  // the scratch is left ready for the next launch
    cudaMemset(ids, 0xff, L * 4);
    cuda::launch_argmax(d, L, V, ids, scratch, nullptr);
    std::vector<int32_t> got(L);
    ASSERT_EQ(cudaMemcpy(got.data(), ids, L * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int r = 0; r < L; ++r) {
      const float* row = logits.data() + size_t(r) * V;
      const int32_t want = expect[r] >= 0 ? expect[r] : int32_t(std::max_element(row, row + V) - row);
      EXPECT_EQ(got[size_t(r)], want) << "row " << r << " launch " << launch;
    }
  }
  cudaFree(d);
  cudaFree(ids);
  cudaFree(scratch);
}

TEST(CudaExecutor, MatchesCpuExecutorOnDummyModel) {
  REQUIRE_GPU();
  for (int hd : {32, 128}) {
    ModelConfig c = small_config(8, 2, hd, 256, 512);
    c.vocab_size = 512;
    auto model = make_dummy_model(c, WeightFormat::kBF16, 42);
    LoadOptions opts;
    opts.device = "cuda";
    opts.kv_cache_blocks = 64;
    opts.max_seq_len = 256;
    auto cpu = make_cpu_executor(model, opts);
    auto gx = cuda::CudaExecutor::create(model, opts);
    ASSERT_TRUE(gx.is_ok()) << gx.message();
    cuda::CudaExecutor& gpu = **gx;
    std::mt19937 rng(9);
    std::vector<std::vector<int32_t>> prompts;
    for (int len : {40, 7, 19}) {
      std::vector<int32_t> p;
      for (int i = 0; i < len; ++i) p.push_back(int32_t(rng() % 512));
      prompts.push_back(p);
    }
    const int steps = 12;
    std::vector<std::vector<int32_t>> forced(3);
    for (auto& f : forced)
      for (int i = 0; i < steps; ++i) f.push_back(int32_t(rng() % 512));
    auto cpu_logits = [&](std::vector<float>* v) {
      const size_t n = size_t(c.vocab_size) * 3;
      v->assign(cpu->last_logits(), cpu->last_logits() + n);
      return Status::ok();
    };
    auto ref = run_batch(*cpu, cpu_logits, prompts, forced, steps, 16);
    for (bool graphs : {false, true}) {
      gpu.set_use_graphs(graphs);
      auto got = run_batch(gpu, [&](std::vector<float>* v) { return gpu.last_logits(v); }, prompts, forced, steps, 16);
      int agree = 0, total = 0, decided = 0;
      double worst = 0;
      for (size_t s = 0; s < 3; ++s)
        for (int st = 0; st <= steps; ++st) {
          Err e = compare(got[s].logits[size_t(st)], ref[s].logits[size_t(st)]);
          worst = std::max(worst, e.rel);
          // argmax agreement where the CPU's top-2 gap is clear of bf16 noise
          std::vector<float> r = ref[s].logits[size_t(st)];
          std::partial_sort(r.begin(), r.begin() + 2, r.end(), std::greater<float>());
          ++total;
          if (got[s].argmax[size_t(st)] == ref[s].argmax[size_t(st)]) ++agree;
          if (r[0] - r[1] > 0.05f) {
            ++decided;
            EXPECT_EQ(got[s].argmax[size_t(st)], ref[s].argmax[size_t(st)]) << "seq " << s << " step " << st;
          }
        }
      std::printf("[executor] head_dim %d graphs %d: logits worst rel %.3e, argmax agree %d/%d (%d with gap > 0.05), "
                  "graphs captured %d\n",
                  hd, int(graphs), worst, agree, total, decided, gpu.num_graphs());
      EXPECT_LE(worst, 3e-2);
    }
    EXPECT_GT(gpu.num_graphs(), 0);
  }
}

// Decode batches past the first reservation (512 rows) and past the last graph bucket (1024), on
// one executor: the sampled-id buffers grow with the step (they did not: a 1024-sequence step
// failed with "invalid argument"), growing the step buffers drops the graphs captured over the old
// ones (a bucket-8 graph replayed after a 600-sequence step is checked), and graph-replayed and
// eager steps agree with the CPU executor.
TEST(CudaExecutor, LargeDecodeBatchesMatchCpu) {
  REQUIRE_GPU();
  ModelConfig c = small_config(4, 2, 32, 128, 256);
  auto model = make_dummy_model(c, WeightFormat::kBF16, 11);
  LoadOptions opts;
  opts.device = "cuda";
  opts.kv_cache_blocks = 1100;
  opts.max_seq_len = 16;
  auto cpu = make_cpu_executor(model, opts);
  auto gx = cuda::CudaExecutor::create(model, opts);
  ASSERT_TRUE(gx.is_ok()) << gx.message();
  std::mt19937 rng{7};
  for (int n : {8, 600, 8, 1100}) {
    std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(n)), forced(static_cast<size_t>(n));
    for (int s = 0; s < n; ++s)
      for (int i = 0; i < 3; ++i) {
        prompts[size_t(s)].push_back(int32_t(rng() % uint32_t(c.vocab_size)));
        forced[size_t(s)].push_back(int32_t(rng() % uint32_t(c.vocab_size)));
      }
    auto ref = run_batch(*cpu, [&](std::vector<float>* v) {
      v->assign(cpu->last_logits(), cpu->last_logits() + size_t(c.vocab_size) * size_t(n));
      return Status::ok();
    }, prompts, forced, 3, 1);
    auto got = run_batch(**gx, [&](std::vector<float>* v) { return (*gx)->last_logits(v); }, prompts, forced, 3, 1);
    ASSERT_EQ(got.size(), ref.size());
    double worst = 0;
    int decided = 0;
    for (size_t s = 0; s < size_t(n); ++s) {
      ASSERT_EQ(got[s].logits.size(), 4u) << "seq " << s;
      for (size_t st = 0; st < 4; ++st) {
        worst = std::max(worst, compare(got[s].logits[st], ref[s].logits[st]).rel);
        const std::vector<float>& g = got[s].logits[st];
        // The sampled id is the argmax of the logits the step left behind (lowest id on ties).
        EXPECT_EQ(got[s].argmax[st], int32_t(std::max_element(g.begin(), g.end()) - g.begin())) << s << "/" << st;
        std::vector<float> r = ref[s].logits[st];
        std::partial_sort(r.begin(), r.begin() + 2, r.end(), std::greater<float>());
        if (r[0] - r[1] > 0.05f) {
          ++decided;
          EXPECT_EQ(got[s].argmax[st], ref[s].argmax[st]) << "seq " << s << " step " << st;
        }
      }
    }
    std::printf("[executor] %d sequences: logits worst rel %.3e, %d decided argmax rows, graphs %d\n", n, worst,
                decided, (*gx)->num_graphs());
    EXPECT_LE(worst, 3e-2);
    EXPECT_GT(decided, n);
    EXPECT_GE((*gx)->num_graphs(), n <= 1024 ? 1 : 0);  // 600 -> bucket 640; 1100 runs eagerly
  }
}

TEST(CudaExecutor, HostSamplingMatchesCpuSamplerOnSameLogits) {
  REQUIRE_GPU();
  ModelConfig c = small_config(4, 2, 32, 128, 256);
  c.vocab_size = 1000;
  auto model = make_dummy_model(c, WeightFormat::kBF16, 7);
  LoadOptions opts;
  opts.device = "cuda";
  opts.kv_cache_blocks = 8;
  auto gx = cuda::CudaExecutor::create(model, opts);
  ASSERT_TRUE(gx.is_ok()) << gx.message();
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_p = 0.8f;
  p.top_k = 50;
  p.seed = 1234;
  p.repetition_penalty = 1.1f;
  std::vector<int32_t> prompt = {5, 6, 7, 8, 9}, outputs = {11, 5, 900, 11};
  for (int trial = 0; trial < 5; ++trial) {
    StepBatch b;
    b.clear();
    for (int i = 0; i < 5; ++i) {
      b.token_ids.push_back(prompt[size_t(i)]);
      b.positions.push_back(i);
    }
    b.query_start.push_back(5);
    b.context_lens.push_back(5);
    b.max_blocks_per_seq = 1;
    b.block_tables.push_back(0);
    b.logits_rows.push_back(4);
    SeqSampling s;
    s.params = &p;
    s.prompt_ids = prompt.data();
    s.num_prompt = 5;
    s.output_ids = outputs.data();
    s.num_output = trial;
    std::vector<SampledToken> out;
    ASSERT_TRUE((*gx)->execute(b, {s}, &out).is_ok());
    std::vector<float> lg;
    ASSERT_TRUE((*gx)->last_logits(&lg).is_ok());
    EXPECT_EQ(out[0].id, sample_token(lg.data(), c.vocab_size, s).id);
  }
}

// transformers fixtures (tests/golden/<family>): float32 reference with bf16 weights; the CUDA
// backend computes in bf16, so logits agree to bf16 accuracy and greedy tokens where the
// reference's top-2 gap is clear of that noise (teacher-forced with the reference's tokens).
class CudaGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaGolden, MatchesTransformers) {
  REQUIRE_GPU();
  const std::string dir = std::string(KILN_SOURCE_DIR) + "/tests/golden/" + GetParam();
  if (!file_exists(dir + "/golden.json")) GTEST_SKIP() << "fixture not present: " << dir;
  auto text = read_file(dir + "/golden.json");
  ASSERT_TRUE(text.is_ok());
  auto g = nlohmann::json::parse(*text);
  auto prompt = g["prompt_ids"].get<std::vector<int32_t>>();
  auto expect = g["greedy_ids"].get<std::vector<int32_t>>();
  auto gaps = g["top2_gap"].get<std::vector<float>>();
  auto bytes = read_file(dir + "/logits.bin");
  ASSERT_TRUE(bytes.is_ok());
  std::vector<float> ref(bytes->size() / 4);
  std::memcpy(ref.data(), bytes->data(), ref.size() * 4);
  auto model = load_model(dir);
  ASSERT_TRUE(model.is_ok()) << model.message();
  LoadOptions opts;
  opts.device = "cuda";
  opts.kv_cache_blocks = int32_t((prompt.size() + expect.size() + 15) / 16);
  auto gx = cuda::CudaExecutor::create(*model, opts);
  ASSERT_TRUE(gx.is_ok()) << gx.message();
  std::vector<float> first;
  auto runs = run_batch(**gx, [&](std::vector<float>* v) { return (*gx)->last_logits(v); }, {prompt}, {expect},
                        int(expect.size()) - 1, opts.kv_cache_blocks, &first);
  ASSERT_EQ(first.size(), ref.size());
  Err e = compare(first, ref);
  // A greedy choice is decided when the reference's top-2 gap exceeds twice the bf16 logit noise
  // measured on the prompt (max |diff|).
  const double decided_gap = std::max(0.1, 2.0 * e.max_abs);
  int agree = 0, decided = 0, decided_agree = 0;
  for (size_t i = 0; i < expect.size(); ++i) {
    const bool ok = runs[0].argmax[i] == expect[i];
    agree += ok;
    if (gaps[i] > decided_gap) {
      ++decided;
      decided_agree += ok;
      EXPECT_EQ(runs[0].argmax[i], expect[i]) << GetParam() << " step " << i << " gap " << gaps[i];
    }
  }
  std::printf("[golden-cuda] %-12s prompt logits rel %.2e max|d| %.3g (ref max %.3g); greedy agree %d/%zu, "
              "%d/%d where gap > %.2f\n",
              GetParam().c_str(), e.rel, e.max_abs, e.ref_max, agree, expect.size(), decided_agree, decided, decided_gap);
  EXPECT_LE(e.rel, 2e-2);
  EXPECT_LE(e.max_abs, 0.1 * std::max(1.0, e.ref_max));
}

INSTANTIATE_TEST_SUITE_P(Families, CudaGolden,
                         ::testing::Values("llama31", "qwen2", "mistral", "qwen3", "llama_linear"));

TEST(CudaExecutor, OutOfMemoryIsAClearError) {
  REQUIRE_GPU();
  ModelConfig c = small_config(4, 2, 32, 128, 256);
  LoadOptions opts;
  opts.device = "cuda";
  opts.kv_cache_blocks = 2000000000 / 16;  // ~ far beyond any GPU
  auto gx = cuda::CudaExecutor::create_dummy(c, opts, 1);
  ASSERT_FALSE(gx.is_ok());
  std::printf("  message: %s\n", gx.message().c_str());
  EXPECT_NE(gx.message().find("out of memory"), std::string::npos);
  EXPECT_NE(gx.message().find("free of"), std::string::npos);
}

}  // namespace

// The device sampler against the host sampler on the same logits (uploaded, so the sampler alone is
// compared): penalties, bias, banned ids, temperature, top-k, top-p, min-p, several seeds and steps,
// ties in the logits, and a 128k vocabulary. Every token must match.
TEST(CudaSampler, MatchesHostSamplerOnSameLogits) {
  REQUIRE_GPU();
  std::mt19937 rng(99);
  struct Case {
    float temperature, top_p, min_p, rep, presence, frequency;
    int32_t top_k;
    bool bias, banned;
  };
  const Case cases[] = {
      {1.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, false, false},    // plain softmax over the whole row
      {0.7f, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f, 0, false, false},    // top-p
      {1.3f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 40, false, false},   // top-k
      {0.8f, 0.95f, 0.05f, 1.0f, 0.0f, 0.0f, 100, false, false},
      {1.0f, 1.0f, 0.1f, 1.0f, 0.0f, 0.0f, 0, false, false},    // min-p
      {0.9f, 0.8f, 0.0f, 1.2f, 0.5f, 0.3f, 0, true, true},      // penalties, bias, banned
      {0.0f, 1.0f, 0.0f, 1.3f, 0.0f, 0.7f, 0, true, true},      // greedy after penalties
      {2.0f, 0.5f, 0.0f, 0.9f, -0.4f, 0.0f, 5, true, false},
  };
  for (int32_t V : {1000, 32000, 128256}) {
    int32_t mismatches = 0, total = 0;
    const int32_t n_rows = 16;
    cuda::DeviceSampler sampler;
    float* d_logits = nullptr;
    int32_t* d_ids = nullptr;
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_logits), size_t(n_rows) * V * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_ids), size_t(n_rows) * 4), cudaSuccess);
    for (int trial = 0; trial < 4; ++trial) {
      // Logits as a model gives them (a few strong candidates over a long tail), with exact ties.
      std::vector<float> lg = random_vec(size_t(n_rows) * V, rng, 2.0f, trial % 2 == 0);
      for (int32_t r = 0; r < n_rows; ++r) {
        for (int k = 0; k < 8; ++k) lg[size_t(r) * V + rng() % uint32_t(V)] += 8.0f;
        lg[size_t(r) * V + 3] = lg[size_t(r) * V + 7] = lg[size_t(r) * V + rng() % uint32_t(V)];
      }
      ASSERT_EQ(cudaMemcpy(d_logits, lg.data(), lg.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
      std::vector<SamplingParams> params(static_cast<size_t>(n_rows));
      std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(n_rows)), outs(static_cast<size_t>(n_rows));
      std::vector<int32_t> banned = {int32_t(rng() % uint32_t(V)), 1};
      std::vector<SeqSampling> ss(static_cast<size_t>(n_rows));
      std::vector<int32_t> rows;
      std::vector<const SeqSampling*> seqs;
      for (int32_t r = 0; r < n_rows; ++r) {
        const Case& c = cases[size_t(r) % std::size(cases)];
        SamplingParams& p = params[size_t(r)];
        p.temperature = c.temperature;
        p.top_p = c.top_p;
        p.min_p = c.min_p;
        p.top_k = c.top_k;
        p.repetition_penalty = c.rep;
        p.presence_penalty = c.presence;
        p.frequency_penalty = c.frequency;
        p.seed = rng();
        if (c.bias) p.logit_bias = {{int32_t(rng() % uint32_t(V)), 5.0f}, {2, -3.5f}, {2, 1.25f}};
        for (int i = 0; i < 20; ++i) prompts[size_t(r)].push_back(int32_t(rng() % uint32_t(V)));
        for (int i = 0; i < int(rng() % 30); ++i) outs[size_t(r)].push_back(int32_t(rng() % 64));
        SeqSampling& s = ss[size_t(r)];
        s.params = &p;
        s.prompt_ids = prompts[size_t(r)].data();
        s.num_prompt = int32_t(prompts[size_t(r)].size());
        s.output_ids = outs[size_t(r)].data();
        s.num_output = int32_t(outs[size_t(r)].size());
        if (c.banned) s.banned_ids = &banned;
        if (r % 5 != 4) {  // some rows skipped: ids land at their own row index
          rows.push_back(r);
          seqs.push_back(&s);
        }
      }
      ASSERT_EQ(cudaMemset(d_ids, 0xff, size_t(n_rows) * 4), cudaSuccess);
      Status st = sampler.sample(d_logits, V, rows, seqs, d_ids, nullptr);
      ASSERT_TRUE(st.is_ok()) << st.message();
      std::vector<int32_t> got(static_cast<size_t>(n_rows));
      ASSERT_EQ(cudaMemcpy(got.data(), d_ids, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      for (int32_t r = 0; r < n_rows; ++r) {
        if (r % 5 == 4) {
          EXPECT_EQ(got[size_t(r)], -1) << "row " << r << " was not to be sampled";
          continue;
        }
        const int32_t want = sample_token(lg.data() + size_t(r) * V, V, ss[size_t(r)]).id;
        ++total;
        if (got[size_t(r)] != want) {
          ++mismatches;
          ADD_FAILURE() << "V " << V << " trial " << trial << " row " << r << ": device " << got[size_t(r)]
                        << ", host " << want;
        }
      }
    }
    std::printf("[device-sampler] V %d: %d/%d rows identical to the host sampler\n", V, total - mismatches, total);
    cudaFree(d_logits);
    cudaFree(d_ids);
  }
}

// The decode GEMV with FP8 E4M3 weights (weight-only: bf16 activations, f32 dot, one scale per row
// or per tensor) in all three entry points, n = 1, 2, 4, K remainders (K not a multiple of 512),
// against a float64 reference over the dequantized weights. The fold variant also checks the
// residual update and the normalized output.
TEST(CudaKernels, GemvFp8MatchesReference) {
  REQUIRE_GPU();
  std::mt19937 rng(91);
  cudaStream_t s;
  cudaStreamCreate(&s);
  unsigned int* counter = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&counter), 4), cudaSuccess);
  cudaMemset(counter, 0, 4);
  struct Shape {
    int N, K;
  };
  enum Kind { kPlain, kSilu, kFold };
  int checked = 0;
  for (Shape sh : {Shape{8, 16}, Shape{36, 528}, Shape{300, 2064}, Shape{4096, 1040}, Shape{1024, 4096},
                   Shape{6144, 4096}, Shape{13000, 272}}) {
    // FP8 codes of weights ~N(0, 16) (the full e4m3 range incl. subnormals), generated once per shape
    // for the silu pair's 2 N rows (plain and fold use the first N), dequantized by a scale per row
    // (or one per tensor) as a real checkpoint would be.
    std::vector<uint8_t> wq_all(size_t(2) * sh.N * sh.K);
    {
      std::normal_distribution<float> d(0.0f, 16.0f);
      for (auto& q : wq_all) q = f32_to_fp8e4m3(d(rng));
    }
    for (int n : {1, 2, 4}) {
      for (Kind kind : {kPlain, kSilu, kFold}) {
        if (kind == kFold && sh.N > 4096) continue;  // the fold takes N <= 4096
        for (bool per_row : {false, true}) {
          const int N = sh.N, K = sh.K, ldx = K + 16, rows = kind == kSilu ? 2 * N : N;
          auto x = random_vec(size_t(n) * ldx, rng);
          const std::vector<uint8_t> wq(wq_all.begin(), wq_all.begin() + ptrdiff_t(rows) * K);
          std::vector<float> scales(static_cast<size_t>(rows));
          std::uniform_real_distribution<float> us(0.5f / 256.0f, 2.0f / 256.0f);
          const float tensor_scale = 1.0f / 300.0f;
          for (auto& v : scales) v = per_row ? us(rng) : tensor_scale;
          auto wdeq = [&](int r, int k) { return double(fp8e4m3_to_f32(wq[size_t(r) * K + k])) * scales[size_t(r)]; };
          std::vector<double> ref(size_t(n) * N);
          for (int m = 0; m < n; ++m)
            for (int r = 0; r < N; ++r) {
              double a = 0, b = 0;
              for (int k = 0; k < K; ++k) a += double(x[size_t(m) * ldx + k]) * wdeq(r, k);
              if (kind == kSilu) {
                for (int k = 0; k < K; ++k) b += double(x[size_t(m) * ldx + k]) * wdeq(N + r, k);
                a = a / (1.0 + std::exp(-a)) * b;
              }
              ref[size_t(m) * N + r] = a;
            }
          std::vector<uint16_t> xb(x.size());
          for (size_t i = 0; i < x.size(); ++i) xb[i] = f32_to_bf16(x[i]);
          void *dx = nullptr, *dw = nullptr, *dy = nullptr, *dsc = nullptr;
          cudaMalloc(&dx, xb.size() * 2);
          cudaMalloc(&dw, wq.size());
          cudaMalloc(&dy, size_t(n) * N * 4);
          cudaMalloc(&dsc, scales.size() * 4);
          cudaMemcpy(dx, xb.data(), xb.size() * 2, cudaMemcpyHostToDevice);
          cudaMemcpy(dw, wq.data(), wq.size(), cudaMemcpyHostToDevice);
          cudaMemcpy(dsc, scales.data(), scales.size() * 4, cudaMemcpyHostToDevice);
          cuda::GemvW w;
          w.data = dw;
          w.fp8 = true;
          if (per_row) w.row_scales = static_cast<const float*>(dsc);
          else w.scale = tensor_scale;
          const auto* xd = static_cast<const cuda::bf16_t*>(dx);
          const std::string what = "N " + std::to_string(N) + " K " + std::to_string(K) + " n " + std::to_string(n) +
                                   " kind " + std::to_string(int(kind)) + " per_row " + std::to_string(per_row);
          for (bool f32 : {false, true}) {
            if (kind != kPlain && f32) continue;
            cudaMemset(dy, 0xff, size_t(n) * N * 4);  // NaN poison: every output must be written
            std::vector<float> res0, normw, res_ref, out_ref;
            void *dres = nullptr, *dnw = nullptr, *dout = nullptr;
            bool ok = false;
            if (kind == kPlain) {
              ok = cuda::launch_gemv(xd, ldx, n, w, N, K, dy, N, f32, s);
            } else if (kind == kSilu) {
              ok = cuda::launch_gemv_silu(xd, ldx, n, w, N, K, static_cast<cuda::bf16_t*>(dy), N, s);
            } else {
              res0 = random_vec(size_t(n) * N, rng, 1.0f, false);
              normw = random_vec(size_t(N), rng, 1.0f, false);
              cudaMalloc(&dres, res0.size() * 4);
              cudaMalloc(&dnw, normw.size() * 4);
              cudaMalloc(&dout, size_t(n) * N * 2);
              cudaMemcpy(dres, res0.data(), res0.size() * 4, cudaMemcpyHostToDevice);
              cudaMemcpy(dnw, normw.data(), normw.size() * 4, cudaMemcpyHostToDevice);
              cudaMemset(dout, 0xff, size_t(n) * N * 2);
              ok = cuda::launch_gemv_add_rms_norm(xd, ldx, n, w, N, K, static_cast<cuda::bf16_t*>(dy), N,
                                                  static_cast<float*>(dres), static_cast<const float*>(dnw), 1e-5f,
                                                  static_cast<cuda::bf16_t*>(dout), N, counter, s);
              res_ref.resize(res0.size());
              out_ref.resize(res0.size());
              for (int m = 0; m < n; ++m) {
                double ss = 0;
                for (int r = 0; r < N; ++r) {
                  const size_t j = size_t(m) * N + r;
                  res_ref[j] = float(double(res0[j]) + ref[j]);
                  ss += double(res_ref[j]) * res_ref[j];
                }
                const double inv = 1.0 / std::sqrt(ss / N + 1e-5);
                for (int r = 0; r < N; ++r) {
                  const size_t j = size_t(m) * N + r;
                  out_ref[j] = float(res_ref[j] * inv * normw[size_t(r)]);
                }
              }
            }
            ASSERT_TRUE(ok) << what;
            ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess) << what;
            std::vector<float> got(size_t(n) * N), rf(ref.begin(), ref.end());
            if (f32) {
              cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost);
            } else {
              std::vector<uint16_t> gb(got.size());
              cudaMemcpy(gb.data(), dy, gb.size() * 2, cudaMemcpyDeviceToHost);
              for (size_t i = 0; i < gb.size(); ++i) got[i] = bf16_to_f32(gb[i]);
            }
            Err e = compare(got, rf);
            EXPECT_LE(e.rel, f32 ? 1e-5 : 6e-3) << what << " f32 " << f32 << " worst at " << e.worst << " got "
                                                << got[e.worst] << " ref " << rf[e.worst];
            ++checked;
            if (kind == kFold) {
              std::vector<float> rg(res0.size()), og(res0.size());
              std::vector<uint16_t> ob(res0.size());
              cudaMemcpy(rg.data(), dres, rg.size() * 4, cudaMemcpyDeviceToHost);
              cudaMemcpy(ob.data(), dout, ob.size() * 2, cudaMemcpyDeviceToHost);
              for (size_t i = 0; i < ob.size(); ++i) og[i] = bf16_to_f32(ob[i]);
              Err er = compare(rg, res_ref), eo = compare(og, out_ref);
              EXPECT_LE(er.rel, 6e-3) << what << " residual, worst at " << er.worst;
              EXPECT_LE(eo.rel, 8e-3) << what << " normed output, worst at " << eo.worst;
              unsigned int c = 1;
              cudaMemcpy(&c, counter, 4, cudaMemcpyDeviceToHost);
              EXPECT_EQ(c, 0u) << what << ": the fold leaves its counter at 0";
              cudaFree(dres);
              cudaFree(dnw);
              cudaFree(dout);
            }
          }
          cudaFree(dx);
          cudaFree(dw);
          cudaFree(dy);
          cudaFree(dsc);
        }
      }
    }
  }
  std::printf("[gemv-fp8] %d variant/shape cases checked against float64\n", checked);
  // Shapes the FP8 path does not take are refused, not launched: K % 16 != 0.
  cuda::GemvW w;
  w.fp8 = true;
  void* dw = nullptr;
  cudaMalloc(&dw, 4096);
  w.data = dw;
  EXPECT_FALSE(cuda::launch_gemv(static_cast<const cuda::bf16_t*>(dw), 24, 1, w, 8, 24, dw, 8, true, s));
  cudaFree(dw);
  cudaFree(counter);
  cudaStreamDestroy(s);
}

// Decode GEMV timing on Llama-3.1-8B's shapes, bf16 and FP8 weights (batch 1; FP8 through the
// CUDA-core kernel with bf16 activations, "cvt", and through the tensor-core one with a static input
// scale, "mma", gemv_fp8.cu): each launch reads a
// different weight copy (rotating over >= 256 MB, so L2 holds none of them), launches back to back
// on one stream (PDL as in the decode graph), events around 30 launches. Prints us and GB/s (weight
// bytes / time); fails only if a launch is refused or an output is not finite.
TEST(CudaKernels, GemvTiming8B) {
  REQUIRE_GPU();
  cudaStream_t s;
  cudaStreamCreate(&s);
  struct Shape {
    const char* name;
    int N, K;
    bool silu, fold;
  };
  const Shape shapes[] = {{"qkv", 6144, 4096, false, false},     {"o (+norm)", 4096, 4096, false, true},
                          {"gate_up+silu", 14336, 4096, true, false}, {"down (+norm)", 4096, 14336, false, true},
                          {"lm_head", 128256, 4096, false, false}};
  void *dx = nullptr, *dy = nullptr, *dres = nullptr, *dnw = nullptr, *dout = nullptr;
  unsigned int* counter = nullptr;
  ASSERT_EQ(cudaMalloc(&dx, 14336 * 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dy, 128256 * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dres, 4096 * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dnw, 4096 * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dout, 4096 * 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&counter), 4), cudaSuccess);
  cudaMemset(counter, 0, 4);
  cuda::launch_fill_uniform_bf16(static_cast<cuda::bf16_t*>(dx), 14336, 1, 1.0f, s);
  cuda::launch_fill_f32(static_cast<float*>(dres), 4096, 0.5f, s);
  cuda::launch_fill_f32(static_cast<float*>(dnw), 4096, 1.0f, s);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  float* d_input_scale = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_input_scale), 4), cudaSuccess);
  cuda::launch_fill_f32(d_input_scale, 1, 0.01f, s);
  std::printf("[gemv-timing] %-14s %9s %9s %9s %9s %9s %9s\n", "shape", "bf16 us", "GB/s", "cvt us", "GB/s", "mma us",
              "GB/s");
  for (const Shape& sh : shapes) {
    double us[3] = {0, 0, 0}, gbs[3] = {0, 0, 0};
    for (int variant = 0; variant < 3; ++variant) {
      const int fp8 = variant > 0 ? 1 : 0;
      const int rows = sh.silu ? 2 * sh.N : sh.N;
      const size_t bytes = size_t(rows) * sh.K * (fp8 ? 1 : 2);
      const int copies = int(std::max<size_t>(2, (size_t(256) << 20) / bytes + 1));
      void* dw = nullptr;
      ASSERT_EQ(cudaMalloc(&dw, bytes * copies), cudaSuccess);
      if (fp8) {
        // Pseudo-random FP8 codes without the NaN pair (0x7f, 0xff), copied in 16 MB pieces.
        std::vector<uint8_t> pat(size_t(16) << 20);
        uint32_t st = 12345;
        for (auto& b : pat) {
          st = st * 1664525u + 1013904223u;
          b = uint8_t(st >> 24);
          if ((b & 0x7f) == 0x7f) b ^= 1;
        }
        for (size_t off = 0; off < bytes * copies; off += pat.size())
          cudaMemcpy(static_cast<char*>(dw) + off, pat.data(), std::min(pat.size(), bytes * copies - off),
                     cudaMemcpyHostToDevice);
      } else {
        cuda::launch_fill_uniform_bf16(static_cast<cuda::bf16_t*>(dw), int64_t(bytes * copies / 2), 7, 0.05f, s);
      }
      cuda::GemvW w;
      w.fp8 = fp8 != 0;
      w.scale = 0.01f;
      if (variant == 2) {
        w.act = cuda::GemvAct::kStatic;
        w.input_scale = d_input_scale;
      }
      auto launch = [&](int c) {
        w.data = static_cast<const char*>(dw) + size_t(c % copies) * bytes;
        const auto* x = static_cast<const cuda::bf16_t*>(dx);
        if (sh.silu) return cuda::launch_gemv_silu(x, sh.K, 1, w, sh.N, sh.K, static_cast<cuda::bf16_t*>(dy), sh.N, s);
        if (sh.fold)
          return cuda::launch_gemv_add_rms_norm(x, sh.K, 1, w, sh.N, sh.K, static_cast<cuda::bf16_t*>(dy), sh.N,
                                                static_cast<float*>(dres), static_cast<const float*>(dnw), 1e-5f,
                                                static_cast<cuda::bf16_t*>(dout), sh.N, counter, s);
        return cuda::launch_gemv(x, sh.K, 1, w, sh.N, sh.K, dy, sh.N, sh.name[0] == 'l', s);
      };
      for (int i = 0; i < 3; ++i) ASSERT_TRUE(launch(i)) << sh.name;
      constexpr int kIters = 30;
      cudaEventRecord(e0, s);
      for (int i = 0; i < kIters; ++i) launch(i);
      cudaEventRecord(e1, s);
      ASSERT_EQ(cudaEventSynchronize(e1), cudaSuccess) << sh.name;
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      us[variant] = 1e3 * ms / kIters;
      gbs[variant] = double(bytes) / (us[variant] * 1e-6) / 1e9;
      float y0 = 0;
      if (sh.name[0] == 'l') cudaMemcpy(&y0, dy, 4, cudaMemcpyDeviceToHost);
      EXPECT_TRUE(std::isfinite(y0)) << sh.name << " variant " << variant;
      cudaFree(dw);
    }
    std::printf("[gemv-timing] %-14s %9.1f %9.0f %9.1f %9.0f %9.1f %9.0f\n", sh.name, us[0], gbs[0], us[1], gbs[1],
                us[2], gbs[2]);
  }
  cudaFree(d_input_scale);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  for (void* p : {dx, dy, dres, dnw, dout, static_cast<void*>(counter)}) cudaFree(p);
  cudaStreamDestroy(s);
}

// A vocabulary-sized GEMV (lm_head: N >= 65536, K = 4096, f32 output) takes the 8-loads-per-lane
// path by default (kernels.cu, gemv_loads); against a float64 reference on a sample of rows.
TEST(CudaKernels, GemvVocabSizedMatchesReference) {
  REQUIRE_GPU();
  const int N = 65536 + 40, K = 4096;
  std::vector<uint16_t> wb(size_t(N) * K), xb(K);
  uint32_t st = 99;
  auto next = [&st] {
    st = st * 1664525u + 1013904223u;
    return float(int32_t(st >> 8) - (1 << 23)) / float(1 << 23);  // [-1, 1)
  };
  for (auto& v : wb) v = f32_to_bf16(0.05f * next());
  for (auto& v : xb) v = f32_to_bf16(next());
  void *dx = nullptr, *dw = nullptr, *dy = nullptr;
  ASSERT_EQ(cudaMalloc(&dx, xb.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dw, wb.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dy, size_t(N) * 4), cudaSuccess);
  cudaMemcpy(dx, xb.data(), xb.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dw, wb.data(), wb.size() * 2, cudaMemcpyHostToDevice);
  cudaMemset(dy, 0xff, size_t(N) * 4);  // NaN poison
  cudaStream_t s;
  cudaStreamCreate(&s);
  ASSERT_TRUE(cuda::launch_gemv(static_cast<const cuda::bf16_t*>(dx), K, 1, static_cast<const cuda::bf16_t*>(dw), N, K,
                                dy, N, true, s));
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  cudaStreamDestroy(s);
  std::vector<float> got(static_cast<size_t>(N));
  cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost);
  std::vector<float> g, r;
  for (int row = 0; row < N; row += (row < N - 64 ? 97 : 1)) {  // a stride through, then every last row
    double a = 0;
    for (int k = 0; k < K; ++k) a += double(bf16_to_f32(xb[size_t(k)])) * bf16_to_f32(wb[size_t(row) * K + k]);
    g.push_back(got[size_t(row)]);
    r.push_back(float(a));
  }
  EXPECT_CLOSE(g, r, 1e-5, "vocab-sized gemv (" + std::to_string(g.size()) + " rows)");
  cudaFree(dx);
  cudaFree(dw);
  cudaFree(dy);
}
