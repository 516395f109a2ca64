// Prefill attention (on sm_90 at head_dim 128 with bf16 K/V and GQA 2-8: the wgmma kernel; else the
// v2 tensor-core kernel: blocks of 128 / G query rows x the G heads of a GQA group, or 64 rows of one
// head, 32/64-token K/V tiles double-buffered, causal early exit) at long prompts, against the CPU
// (KILN_PREFILL_ATTN=v2 / m1 / v1 run the same cases on the other kernels).
// The op grids (cuda_test.cpp, kv_fp8_test.cpp) cover prompts up to 152 tokens; here prompts reach
// 1500 tokens in one step, or arrive in chunks (chunked prefill: a step's query rows start at
// ctx_len - q_len, and a sequence with one token left is a decode row of a mixed step), block
// tables are scattered, GQA groups are 1, 4, 8 and 7 (one block per query head), head dims 16-128,
// block sizes 8/16/32, bf16 and FP8 caches. Part of test_cuda; skips without a GPU.
//
// Each step: the same roped bf16 q/k and v on both sides, KV written by both (the FP8 codes are
// equal), the output poisoned with NaN before the GPU runs. A fresh prompt (its whole context in the
// step: the first chunk too) attends to its own k, v rows on both sides, later chunks to the cache
// (FP8 caches: two launches in one step). Tolerance: the grids' 1.5e-2 relative L2 (bf16 P and
// output rounding).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>

#include <cuda_runtime_api.h>

#include "backend/cpu/cpu_ops.h"
#include "backend/cuda/cuda_executor.h"
#include "backend/cuda/cuda_ops.h"
#include "core/dtype.h"
#include "cuda_test_util.h"

using namespace kiln;
using namespace kiln::cuda_test;

namespace {

double rel_l2(const std::vector<float>& got, const std::vector<float>& ref, double* max_abs, size_t* first_bad) {
  double num = 0, den = 0, mx = 0;
  *first_bad = ref.size();
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = double(got[i]) - ref[i];
    if (std::isnan(d)) {
      if (*first_bad == ref.size()) *first_bad = i;
      num = INFINITY;
      mx = INFINITY;
      continue;
    }
    if (std::fabs(d) > 0.1 + 0.1 * std::fabs(ref[i]) && *first_bad == ref.size()) *first_bad = i;
    num += d * d;
    den += double(ref[i]) * ref[i];
    mx = std::max(mx, std::fabs(d));
  }
  *max_abs = mx;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

struct PrefillCase {
  int heads, kv, hd, block_size;
  bool fp8;
  std::vector<int> prompt;  // tokens per sequence
  int chunk;                // tokens per sequence per step; 0 = the whole prompt in one step
  bool stagger = false;     // sequence s joins at step s: a step holds fresh prompts after later chunks
};

void PrintTo(const PrefillCase& c, std::ostream* os) {
  *os << c.heads << "h/" << c.kv << "kv/d" << c.hd << "/bs" << c.block_size << (c.fp8 ? "/fp8/" : "/bf16/")
      << c.prompt.size() << "seqs/chunk" << c.chunk << (c.stagger ? "/staggered" : "");
}

class CudaPrefillLong : public ::testing::TestWithParam<PrefillCase> {};

TEST_P(CudaPrefillLong, MatchesCpu) {
  REQUIRE_GPU();
  const PrefillCase pc = GetParam();
  const ModelConfig c = attn_config(pc.heads, pc.kv, pc.hd, /*layers=*/1, /*max_pos=*/4096);
  const int nseq = int(pc.prompt.size()), bs = pc.block_size;
  const int max_len = *std::max_element(pc.prompt.begin(), pc.prompt.end());
  const int max_blocks = (max_len + bs - 1) / bs, num_blocks = nseq * max_blocks + 5;
  int total = 0;
  for (int x : pc.prompt) total += x;
  std::printf("[prefill long] heads %d kv %d head_dim %d block %d %s, %d seqs, prompts up to %d (%d tokens), chunk %d%s\n",
              pc.heads, pc.kv, pc.hd, bs, pc.fp8 ? "fp8" : "bf16", nseq, max_len, total, pc.chunk,
              pc.stagger ? ", staggered" : "");
  std::mt19937 rng(977 + pc.hd + nseq + pc.chunk);
  const float k_scale = 0.019f, v_scale = 0.027f;  // N(0, 1) values use most of E4M3's range

  cuda_test::AttnRig rig;
  ASSERT_TRUE(rig.init(c, num_blocks, bs, pc.fp8, k_scale, v_scale, cuda::StepCaps{total + nseq, nseq, nseq, nseq * max_blocks}, rng));
  CpuOps& cpu = *rig.cpu;
  cuda::CudaOps& gpu = *rig.gpu;
  const std::vector<int32_t>& perm = rig.perm;

  const int64_t Q = c.q_dim(), KV = c.kv_dim();
  std::vector<int> done(static_cast<size_t>(nseq), 0);
  for (int step = 0;; ++step) {
    StepBatch b;
    b.clear();
    b.max_blocks_per_seq = max_blocks;
    for (int s = 0; s < nseq; ++s) {
      const int left = pc.prompt[size_t(s)] - done[size_t(s)];
      if (left == 0 || (pc.stagger && step < s)) continue;  // finished (or not yet arrived) sequences
      const int qlen = pc.chunk > 0 ? std::min(pc.chunk, left) : left;
      for (int i = 0; i < qlen; ++i) {
        b.token_ids.push_back(int32_t(rng() % 300));
        b.positions.push_back(done[size_t(s)] + i);
      }
      b.query_start.push_back(b.query_start.back() + qlen);
      b.context_lens.push_back(done[size_t(s)] + qlen);
      for (int j = 0; j < max_blocks; ++j) b.block_tables.push_back(perm[size_t(s * max_blocks + j)]);
      b.logits_rows.push_back(b.query_start.back() - 1);
      done[size_t(s)] += qlen;
    }
    const int64_t T = b.num_tokens();
    if (T == 0 && step >= nseq) break;
    if (T == 0) continue;
    cpu.begin_step(b);
    gpu.begin_step(b);
    auto q = random_vec(size_t(T * Q), rng, 1.0f), k = random_vec(size_t(T * KV), rng, 1.0f),
         v = random_vec(size_t(T * KV), rng, 1.0f);
    gpu.write_buffer(Buf::kQ, q.data(), T, Q);
    gpu.write_buffer(Buf::kK, k.data(), T, KV);
    gpu.write_buffer(Buf::kV, v.data(), T, KV);
    gpu.rope(gpu.buffer(Buf::kQ), gpu.buffer(Buf::kK), c);
    const auto q_roped = gpu.read_buffer(Buf::kQ, T, Q), k_roped = gpu.read_buffer(Buf::kK, T, KV);
    std::memcpy(cpu.buffer(Buf::kQ), q_roped.data(), q_roped.size() * 4);
    std::memcpy(cpu.buffer(Buf::kK), k_roped.data(), k_roped.size() * 4);
    std::memcpy(cpu.buffer(Buf::kV), v.data(), v.size() * 4);
    cpu.attention(0, cpu.buffer(Buf::kQ), cpu.buffer(Buf::kK), cpu.buffer(Buf::kV), c, cpu.buffer(Buf::kAttn));
    const float* co = static_cast<const float*>(cpu.buffer(Buf::kAttn));
    const std::vector<float> cpu_out(co, co + T * Q);
    gpu.write_buffer(Buf::kAttn, std::vector<float>(size_t(T * Q), NAN).data(), T, Q);
    gpu.attention(0, gpu.buffer(Buf::kQ), gpu.buffer(Buf::kK), gpu.buffer(Buf::kV), c, gpu.buffer(Buf::kAttn));
    const auto got = gpu.read_buffer(Buf::kAttn, T, Q);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    double max_abs = 0;
    size_t bad = 0;
    const double rel = rel_l2(got, cpu_out, &max_abs, &bad);
    std::printf("  step %d: %lld tokens, rel %.2e max|d| %.3g\n", step, static_cast<long long>(T), rel, max_abs);
    EXPECT_LE(rel, 1.5e-2) << "step " << step;
    if (bad < cpu_out.size())
      std::printf("  first mismatch: token %lld col %lld gpu %g cpu %g\n", static_cast<long long>(bad / size_t(Q)),
                  static_cast<long long>(bad % size_t(Q)), got[bad], cpu_out[bad]);
    if (HasFailure()) break;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaPrefillLong,
    ::testing::Values(
        // Llama-3-8B's attention shape: one long prompt and short ones in one step, then in chunks
        PrefillCase{32, 8, 128, 16, false, {1100, 3, 77, 300}, 0},
        PrefillCase{32, 8, 128, 16, true, {1100, 3, 77, 300}, 0},
        PrefillCase{32, 8, 128, 16, false, {1100, 130, 2}, 256}, PrefillCase{32, 8, 128, 16, true, {1100, 130, 2}, 256},
        // head_dim 128 at GQA 8 and 2 (on sm_90: the wgmma kernel's 16- and 64-position blocks), bf16
        // cache in chunks (its paged path), FP8 fresh then cached
        PrefillCase{16, 2, 128, 16, false, {700, 95}, 0}, PrefillCase{16, 2, 128, 16, true, {700, 95}, 130},
        PrefillCase{8, 4, 128, 8, false, {900, 33, 1}, 200}, PrefillCase{8, 4, 128, 8, false, {513, 260}, 0},
        // GQA 8 (8 query rows a block), odd chunks (a sequence ends on a decode row: mixed steps)
        PrefillCase{16, 2, 64, 8, false, {1500, 95}, 0}, PrefillCase{16, 2, 64, 8, true, {1500, 95}, 0},
        PrefillCase{16, 2, 64, 8, true, {700, 95}, 97},
        // staggered arrivals: fresh prompts after other sequences' later chunks in one step (FP8: the
        // fresh tiles' launch and the cached tiles' launch each take their own range), decode rows too
        PrefillCase{32, 8, 128, 16, true, {1100, 600, 257, 129}, 256, true},
        PrefillCase{16, 2, 64, 8, true, {700, 300, 95}, 97, true},
        PrefillCase{32, 8, 128, 16, false, {900, 400, 130}, 200, true},
        // GQA 1 (64 rows a block), block size 32
        PrefillCase{8, 8, 64, 32, false, {1000, 65, 64, 63}, 0}, PrefillCase{8, 8, 64, 32, true, {600, 200}, 129},
        // 7 query heads a KV head: one block per query head
        PrefillCase{28, 4, 128, 32, true, {700, 2, 129}, 0}, PrefillCase{28, 4, 128, 32, false, {700, 129}, 100},
        // small head dims
        PrefillCase{8, 2, 32, 16, true, {999, 3}, 0}, PrefillCase{8, 2, 32, 16, false, {999, 40}, 333},
        PrefillCase{4, 2, 16, 16, false, {640, 31}, 0}, PrefillCase{4, 2, 16, 16, true, {640, 31}, 64}));

// The timing tests' GPU side: Llama-3-8B attention (32 heads, 8 KV heads, head_dim 128, one layer),
// a cache of num_blocks 16-token blocks, and attention() on a step timed with events.
struct TimingRig : KvOpsRig {
  static constexpr int kBlock = 16;
  ModelConfig c;

  ::testing::AssertionResult init(bool fp8, int num_blocks, const cuda::StepCaps& caps) {
    c = small_config(32, 8, 128, 4096, 64);
    c.num_layers = 1;
    c.max_position_embeddings = 8192;
    // 0x38: E4M3 1.0 (bf16: a small finite value)
    return KvOpsRig::init(c, num_blocks, kBlock, fp8, 0.02f, 0.02f, caps, 0x38);
  }
  ~TimingRig() { gpu.reset(); }  // before c goes

  // Random roped q, k, v for step b, then attention() (KV write + kernels): median and minimum (ms)
  // of 20 timed calls after 3 untimed ones.
  std::pair<double, double> time_attention(const StepBatch& b) {
    const int64_t T = b.num_tokens();
    gpu->begin_step(b);
    std::mt19937 rng(5);
    gpu->write_buffer(Buf::kQ, random_vec(size_t(T * c.q_dim()), rng, 1.0f).data(), T, c.q_dim());
    gpu->write_buffer(Buf::kK, random_vec(size_t(T * c.kv_dim()), rng, 1.0f).data(), T, c.kv_dim());
    gpu->write_buffer(Buf::kV, random_vec(size_t(T * c.kv_dim()), rng, 1.0f).data(), T, c.kv_dim());
    std::vector<float> ms = event_times_ms(stream, 3, 20, [&] {
      gpu->attention(0, gpu->buffer(Buf::kQ), gpu->buffer(Buf::kK), gpu->buffer(Buf::kV), c, gpu->buffer(Buf::kAttn));
    });
    std::sort(ms.begin(), ms.end());
    return {ms[ms.size() / 2], ms[0]};
  }
};

// A step of sequences with (tokens this step, context after it): sequence s owns blocks
// s * max_blocks onward.
struct SeqShape {
  int q_len, ctx;
};
StepBatch timing_step(const std::vector<SeqShape>& seqs, int max_blocks) {
  StepBatch b;
  b.clear();
  b.max_blocks_per_seq = max_blocks;
  for (size_t s = 0; s < seqs.size(); ++s) {
    for (int i = seqs[s].ctx - seqs[s].q_len; i < seqs[s].ctx; ++i) {
      b.token_ids.push_back(1);
      b.positions.push_back(i);
    }
    b.query_start.push_back(b.query_start.back() + seqs[s].q_len);
    b.context_lens.push_back(seqs[s].ctx);
    for (int j = 0; j < max_blocks; ++j) b.block_tables.push_back(int32_t(s) * max_blocks + j);
    b.logits_rows.push_back(b.query_start.back() - 1);
  }
  return b;
}

// The Llama-3-8B prefill shapes of issue #6 timed alone (attention() = KV write + prefill kernel):
// median of 20 launches with events. Runs with KILN_PREFILL_BENCH=1 (KILN_PREFILL_ATTN=v1 times the
// old kernel); prints us and the causal attention TFLOP/s.
TEST(CudaPrefillTiming, LlamaShapes) {
  REQUIRE_GPU();
  if (!std::getenv("KILN_PREFILL_BENCH")) GTEST_SKIP() << "set KILN_PREFILL_BENCH=1 to time";
  for (const bool fp8 : {true, false})
    for (const auto& [nseq, len] :
         {std::pair{4, 2048}, std::pair{8, 1024}, std::pair{16, 512}, std::pair{32, 256}, std::pair{64, 128}}) {
      const int max_blocks = len / TimingRig::kBlock;
      TimingRig rig;
      ASSERT_TRUE(rig.init(fp8, nseq * max_blocks, cuda::StepCaps{nseq * len, nseq, nseq, nseq * max_blocks}));
      const auto [med, best] = rig.time_attention(timing_step(std::vector<SeqShape>(size_t(nseq), {len, len}), max_blocks));
      ASSERT_EQ(cudaGetLastError(), cudaSuccess);
      const double flop = double(nseq) * rig.c.num_heads * double(len) * (len + 1) / 2 * rig.c.head_dim * 4;
      std::printf("[prefill timing] %s KV, %d x %d tokens: attention (KV write + kernel) %.1f us median (min %.1f) = %.0f TFLOP/s\n",
                  fp8 ? "fp8" : "bf16", nseq, len, 1e3 * med, 1e3 * best, flop / (1e-3 * med) / 1e12);
    }
}

// A mixed step of TensorRT-LLM's 2048/128 workload at max batch 512 (8,192-token budget, FP8 cache)
// timed alone: 480 decode rows at 2,049-2,176 tokens of context beside 7,854 prefill rows (3 fresh
// 2,048-token prompts, a fresh first chunk of 1,162, a later chunk of 548 ending at 2,048). Prints
// attention() (KV write + prefill + decode attention) for the whole step, then for its decode rows
// alone and its prefill rows alone, and the decode kernel's read rate. With KILN_PREFILL_BENCH=1;
// KILN_ATTN_OVERLAP=0 runs the two attentions one after the other.
TEST(CudaPrefillTiming, MixedStep) {
  REQUIRE_GPU();
  if (!std::getenv("KILN_PREFILL_BENCH")) GTEST_SKIP() << "set KILN_PREFILL_BENCH=1 to time";
  const int max_blocks = 2176 / TimingRig::kBlock;
  const std::vector<SeqShape> prefill = {{2048, 2048}, {2048, 2048}, {2048, 2048}, {1162, 1162}, {548, 2048}};
  std::vector<SeqShape> decode, both = prefill;
  for (int i = 0; i < 480; ++i) decode.push_back({1, 2049 + (i * 37) % 128});
  both.insert(both.end(), decode.begin(), decode.end());  // prefill first, as the scheduler orders a step
  TimingRig rig;
  ASSERT_TRUE(rig.init(true, int(both.size()) * max_blocks, cuda::StepCaps{8448, 512, 512, 512 * max_blocks}));
  const auto mixed = rig.time_attention(timing_step(both, max_blocks));
  const auto dec_only = rig.time_attention(timing_step(decode, max_blocks));
  const auto pre_only = rig.time_attention(timing_step(prefill, max_blocks));
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  double read = 0;
  for (const SeqShape& q : decode) read += double(q.ctx) * rig.c.kv_dim() * 2;  // FP8 K and V bytes
  std::printf("[mixed timing] 480 decode rows + 7,854 prefill rows, FP8 KV: step %.1f us median (min %.1f); "
              "decode alone %.1f us (%.0f GB/s), prefill alone %.1f us, sum %.1f us\n",
              1e3 * mixed.first, 1e3 * mixed.second, 1e3 * dec_only.first, read / (1e-3 * dec_only.first) / 1e9,
              1e3 * pre_only.first, 1e3 * (dec_only.first + pre_only.first));
}

}  // namespace
