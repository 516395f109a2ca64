// FP8 E4M3 KV cache on CUDA against the CPU emulation (CpuKvCache::set_fp8): the stored codes bit for
// bit, prefill / mixed / decode attention (unfused, and the fused rope + KV write + attention decode
// kernel) over GQA shapes, head dims and block sizes with per-layer scales != 1; then the executor
// on the golden models, CUDA's FP8 cache against the CPU's f32 reference, as close as the CPU's FP8
// emulation is. Part of test_cuda (same binary as
// cuda_test.cpp); without a GPU every test skips with the reason.
//
// Tolerances: both sides quantize the same bf16 k/v values with the same arithmetic (x / scale in
// IEEE f32, round to nearest even, saturate at 448), so the caches are compared exactly. Attention
// over identical caches then differs only as the bf16 cache does (P rounded to bf16 for the PV
// product, bf16 output, f32 summation order): the bf16 grid's 1.5e-2 relative L2 applies unchanged.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>

#include <cuda_runtime_api.h>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_executor.h"
#include "backend/cpu/cpu_ops.h"
#include "backend/cuda/cuda_executor.h"
#include "backend/cuda/cuda_ops.h"
#include "common/greedy_run.h"
#include "core/dtype.h"
#include "core/file.h"
#include "model/fp8.h"
#include "model/ops.h"
#include "cuda_test_util.h"

using namespace kiln;
using namespace kiln::cuda_test;

namespace {

struct AttnCase {
  int heads, kv, hd, block_size;
};

class CudaKvFp8Grid : public ::testing::TestWithParam<AttnCase> {};

TEST_P(CudaKvFp8Grid, AttentionMatchesCpuEmulation) {
  REQUIRE_GPU();
  const AttnCase pc = GetParam();
  const ModelConfig c = attn_config(pc.heads, pc.kv, pc.hd);
  std::printf("[kv fp8] heads %d kv %d head_dim %d block %d\n", pc.heads, pc.kv, pc.hd, pc.block_size);
  std::mt19937 rng(77 + pc.hd + pc.block_size);
  const int bs = pc.block_size, max_blocks = (300 + bs - 1) / bs, nseq = 4;
  const int num_blocks = nseq * max_blocks + 3;
  // Per-layer scales != 1, the second layer's coarse enough that N(0, 1) values reach subnormals.
  const std::vector<float> ks = {0.011f, 0.75f}, vs = {0.023f, 1.5f};
  CpuKvCache ckv;
  ckv.init(c, num_blocks, bs);
  ckv.set_fp8(ks, vs);
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
  dkv.fp8 = true;
  dkv.k_scale = ks;
  dkv.v_scale = vs;
  const size_t cache_bytes = size_t(num_blocks) * bs * c.kv_dim();  // 1 byte an element
  for (int l = 0; l < c.num_layers; ++l) {
    void *k = nullptr, *v = nullptr;
    ASSERT_EQ(cudaMalloc(&k, cache_bytes), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&v, cache_bytes), cudaSuccess);
    cudaMemset(k, 0, cache_bytes);  // code 0 = 0.0, as the CPU's zeroed cache
    cudaMemset(v, 0, cache_bytes);
    dkv.k.push_back(k);
    dkv.v.push_back(v);
  }
  gpu.set_kv(&dkv);
  std::vector<int32_t> perm(static_cast<size_t>(num_blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<std::vector<int32_t>> tables(nseq);
  for (int s = 0; s < nseq; ++s)
    for (int j = 0; j < max_blocks; ++j) tables[size_t(s)].push_back(perm[size_t(s * max_blocks + j)]);

  // GPU cache [num_blocks, n_kv, bs, hd] codes -> real values, in the CPU's [num_blocks, bs, n_kv, hd].
  auto gpu_cache = [&](void* p, float scale) {
    std::vector<uint8_t> codes(cache_bytes);
    cudaMemcpy(codes.data(), p, cache_bytes, cudaMemcpyDeviceToHost);
    std::vector<float> out(cache_bytes);
    const int hd = c.head_dim, nkv = c.num_kv_heads;
    for (int b = 0; b < num_blocks; ++b)
      for (int h = 0; h < nkv; ++h)
        for (int o = 0; o < bs; ++o)
          for (int d = 0; d < hd; ++d)
            out[((size_t(b) * bs + o) * nkv + h) * hd + d] =
                fp8e4m3_to_f32(codes[((size_t(b) * nkv + h) * bs + o) * hd + d]) * scale;
    return out;
  };

  const int64_t Q = c.q_dim(), KV = c.kv_dim();
  const std::vector<std::vector<std::pair<int, int>>> steps = {
      {{150, 0}, {5, 0}, {1, 0}, {64, 0}}, {{1, 150}, {3, 5}, {1, 1}, {20, 64}}, {{1, 151}, {1, 8}, {1, 2}, {1, 84}}};
  for (size_t si = 0; si < steps.size(); ++si) {
    StepBatch b;
    b.clear();
    b.max_blocks_per_seq = max_blocks;
    for (size_t s = 0; s < steps[si].size(); ++s) {
      auto [qlen, before] = steps[si][s];
      for (int i = 0; i < qlen; ++i) {
        b.token_ids.push_back(int32_t(rng() % 300));
        b.positions.push_back(before + i);
      }
      b.query_start.push_back(b.query_start.back() + qlen);
      b.context_lens.push_back(before + qlen);
      for (int j = 0; j < max_blocks; ++j) b.block_tables.push_back(tables[s][size_t(j)]);
      b.logits_rows.push_back(b.query_start.back() - 1);
    }
    const int64_t T = b.num_tokens();
    cpu.begin_step(b);
    gpu.begin_step(b);
    const std::string tag = "step " + std::to_string(si) + " (" + std::to_string(T) + " tokens) ";
    auto q = random_vec(size_t(T * Q), rng, 1.0f), k = random_vec(size_t(T * KV), rng, 1.0f),
         v = random_vec(size_t(T * KV), rng, 1.0f);
    gpu.write_buffer(Buf::kQ, q.data(), T, Q);
    gpu.write_buffer(Buf::kK, k.data(), T, KV);
    gpu.write_buffer(Buf::kV, v.data(), T, KV);
    gpu.rope(gpu.buffer(Buf::kQ), gpu.buffer(Buf::kK), c);
    // The CPU attends over the GPU's roped (bf16) q and k, so both quantize identical values.
    const auto q_roped = gpu.read_buffer(Buf::kQ, T, Q), k_roped = gpu.read_buffer(Buf::kK, T, KV);
    std::vector<float> cpu_last;
    for (int layer = 0; layer < c.num_layers; ++layer) {
      std::memcpy(cpu.buffer(Buf::kQ), q_roped.data(), q_roped.size() * 4);
      std::memcpy(cpu.buffer(Buf::kK), k_roped.data(), k_roped.size() * 4);
      std::memcpy(cpu.buffer(Buf::kV), v.data(), v.size() * 4);
      cpu.attention(layer, cpu.buffer(Buf::kQ), cpu.buffer(Buf::kK), cpu.buffer(Buf::kV), c, cpu.buffer(Buf::kAttn));
      gpu.attention(layer, gpu.buffer(Buf::kQ), gpu.buffer(Buf::kK), gpu.buffer(Buf::kV), c, gpu.buffer(Buf::kAttn));
      const float* co = static_cast<const float*>(cpu.buffer(Buf::kAttn));
      cpu_last.assign(co, co + T * Q);
      double max_abs = 0;
      const double rel = rel_l2(gpu.read_buffer(Buf::kAttn, T, Q), cpu_last, &max_abs);
      std::printf("  %s layer %d attention rel %.2e max|d| %.3g\n", tag.c_str(), layer, rel, max_abs);
      EXPECT_LE(rel, 1.5e-2) << tag << "layer " << layer;
      // The whole cache, every step so far: the same codes (the CPU's values are code * scale).
      for (int kv_i = 0; kv_i < 2; ++kv_i) {
        const auto got = gpu_cache(kv_i ? dkv.v[size_t(layer)] : dkv.k[size_t(layer)],
                                   kv_i ? vs[size_t(layer)] : ks[size_t(layer)]);
        const auto& ref = kv_i ? ckv.v[size_t(layer)] : ckv.k[size_t(layer)];
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < ref.size(); ++i)
          if (got[i] != ref[i] && bad++ == 0) first = i;
        EXPECT_EQ(bad, 0u) << tag << "layer " << layer << (kv_i ? " v" : " k") << " cache: first mismatch at " << first
                           << " got " << got[first] << " ref " << ref[first];
      }
    }
    // rope_attention from the raw q, k, v (pure decode: the fused kernel ropes in registers and
    // writes the fp8 k, v itself) against the CPU's last layer.
    gpu.write_buffer(Buf::kQ, q.data(), T, Q);
    gpu.write_buffer(Buf::kK, k.data(), T, KV);
    gpu.write_buffer(Buf::kV, v.data(), T, KV);
    gpu.rope_attention(c.num_layers - 1, gpu.buffer(Buf::kQ), gpu.buffer(Buf::kK), gpu.buffer(Buf::kV), c,
                       gpu.buffer(Buf::kAttn));
    double max_abs = 0;
    const double rel = rel_l2(gpu.read_buffer(Buf::kAttn, T, Q), cpu_last, &max_abs);
    std::printf("  %s rope_attention rel %.2e max|d| %.3g\n", tag.c_str(), rel, max_abs);
    EXPECT_LE(rel, 1.5e-2) << tag << "rope_attention";
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  }
  for (int l = 0; l < c.num_layers; ++l) {
    cudaFree(dkv.k[size_t(l)]);
    cudaFree(dkv.v[size_t(l)]);
  }
  cudaStreamDestroy(stream);
}

// GQA groups 2, 4, 1 and 8 (decode's heads-per-block 2, 4, 1, 8), head dims 16..128, blocks 8..32.
INSTANTIATE_TEST_SUITE_P(Shapes, CudaKvFp8Grid,
                         ::testing::Values(AttnCase{4, 2, 16, 16}, AttnCase{8, 2, 64, 16}, AttnCase{8, 8, 32, 8},
                                           AttnCase{32, 8, 128, 32}, AttnCase{16, 2, 128, 16}));

// One sequence, teacher-forced: the prompt in one step, then one forced token per step; the last
// row's logits of every step.
std::vector<std::vector<float>> forced_logits(ModelExecutor& ex,
                                              const std::function<Status(std::vector<float>*)>& get_logits,
                                              const std::vector<int32_t>& prompt, const std::vector<int32_t>& forced,
                                              int32_t blocks) {
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  std::vector<int32_t> all = prompt;
  int32_t computed = 0;
  std::vector<std::vector<float>> out;
  for (size_t step = 0; step <= forced.size(); ++step) {
    StepBatch b;
    b.clear();
    const int32_t n = int32_t(all.size()) - computed;
    for (int32_t i = 0; i < n; ++i) {
      b.token_ids.push_back(all[size_t(computed + i)]);
      b.positions.push_back(computed + i);
    }
    b.query_start.push_back(n);
    b.context_lens.push_back(int32_t(all.size()));
    b.max_blocks_per_seq = blocks;
    for (int32_t i = 0; i < blocks; ++i) b.block_tables.push_back(i);
    b.logits_rows.push_back(n - 1);
    SeqSampling s;
    s.params = &greedy;
    std::vector<SampledToken> tok;
    Status st = ex.execute(b, {s}, &tok);
    EXPECT_TRUE(st.is_ok()) << st.message();
    if (!st) return out;
    std::vector<float> lg;
    EXPECT_TRUE(get_logits(&lg).is_ok());
    out.push_back(lg);
    computed = int32_t(all.size());
    if (step < forced.size()) all.push_back(forced[step]);
  }
  return out;
}

// The executor on the transformers golden models with an FP8 cache, CUDA against the CPU's f32
// reference, teacher-forced on the f32 cache's greedy path (golden.json's greedy ids).
//
// Why not "CUDA fp8 == CPU fp8 within 5e-2" (this test until 2026-11-22, failing on the H100 at
// 0.05-0.29): the CPU runs f32 activations and CUDA bf16, so k/v differ by bf16 rounding before they
// are quantized, and about 1 value in 60 lands on the other side of an E4M3 rounding boundary (one
// E4M3 step is 6-12 %). These random-weight fixtures (initializer_range 0.25, head_dim 16, sharp
// attention) amplify such flips: measured on the CPU alone (no CUDA involved), the FP8 cache moves
// the teacher-forced logits from the f32 cache's by 11-15 % relative over all rows and up to 25-40 %
// at the worst step (qwen3, whose k is RMS-normed: 6 % / 13 %), at every scale tried (0.05/0.08,
// 1.0, calibrated amax/448); |k|, |v| stay under 10, far from saturation (448 x 0.05 = 22.4). Two FP8
// runs whose inputs differ by bf16 noise therefore differ by the size of the FP8 effect itself.
// The bound that can be checked without circularity: the CUDA FP8 cache must be about as close to
// the f32 reference as the CPU's bit-exact FP8 emulation is (<= 1.5 x its distance, plus the CUDA
// bf16 cache's own distance to the reference). A broken FP8 path (a lost scale, a wrong slot, a
// stale token) is O(1) away. The op-level grid above checks the codes bit for bit.
double rel_rows(const std::vector<std::vector<float>>& got, const std::vector<std::vector<float>>& ref, size_t r0 = 0,
                size_t r1 = SIZE_MAX) {
  double num = 0, den = 0;
  for (size_t i = r0; i < ref.size() && i < r1; ++i)
    for (size_t j = 0; j < ref[i].size(); ++j) {
      const double d = double(got[i][j]) - ref[i][j];
      num += d * d;
      den += double(ref[i][j]) * ref[i][j];
    }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

int argmax_row(const std::vector<float>& r) { return int(std::max_element(r.begin(), r.end()) - r.begin()); }

class CudaKvFp8Golden : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaKvFp8Golden, AsCloseToF32AsCpuFp8Emulation) {
  REQUIRE_GPU();
  const std::string dir = std::string(KILN_SOURCE_DIR) + "/tests/golden/" + GetParam();
  if (!file_exists(dir + "/golden.json")) GTEST_SKIP() << "fixture not present: " << dir;
  auto text = read_file(dir + "/golden.json");
  ASSERT_TRUE(text.is_ok());
  const auto g = nlohmann::json::parse(*text);
  const auto prompt = g["prompt_ids"].get<std::vector<int32_t>>();
  const auto greedy_ids = g["greedy_ids"].get<std::vector<int32_t>>();
  const int n_new = int(greedy_ids.size());
  const std::vector<int32_t> forced(greedy_ids.begin(), greedy_ids.end() - 1);
  auto loaded = load_model(dir);
  ASSERT_TRUE(loaded.is_ok()) << loaded.message();
  std::shared_ptr<const Model> base = *loaded;
  const int32_t V = base->config.vocab_size, L = base->config.num_layers;
  LoadOptions opts;
  opts.kv_cache_blocks = int32_t((prompt.size() + size_t(n_new) + 15) / 16);

  auto cpu_run = [&](std::shared_ptr<const Model> m) {
    auto cpu = make_cpu_executor(m, opts);
    return forced_logits(*cpu, [&](std::vector<float>* v) {
      v->assign(cpu->last_logits(), cpu->last_logits() + V);
      return Status::ok();
    }, prompt, forced, opts.kv_cache_blocks);
  };
  auto cuda_run = [&](std::shared_ptr<const Model> m) {
    LoadOptions o = opts;
    o.device = "cuda";
    auto gx = cuda::CudaExecutor::create(m, o);
    EXPECT_TRUE(gx.is_ok()) << gx.message();
    if (!gx.is_ok()) return std::vector<std::vector<float>>{};
    return forced_logits(**gx, [&](std::vector<float>* v) { return (*gx)->last_logits(v); }, prompt, forced,
                         opts.kv_cache_blocks);
  };
  const auto ref = cpu_run(base);       // CPU, f32 cache: the reference
  const auto gpu_bf16 = cuda_run(base);  // CUDA, bf16 cache
  ASSERT_EQ(gpu_bf16.size(), ref.size());
  const double e_bf = rel_rows(gpu_bf16, ref);

  // k/v magnitudes over the whole forced sequence (f32 cache), for the saturation question, and
  // ModelOpt-style calibrated scales (amax / 448) from them.
  std::vector<int32_t> seq = prompt;
  seq.insert(seq.end(), forced.begin(), forced.end());
  std::vector<float> k_cal, v_cal, k_amax, v_amax;
  {
    const int32_t blocks = int32_t(seq.size() + 15) / 16;
    CpuKvCache kv;
    kv.init(base->config, blocks, 16);
    CpuOps ops(base->config, &kv);
    StepBatch b;
    b.clear();
    for (size_t i = 0; i < seq.size(); ++i) {
      b.token_ids.push_back(seq[i]);
      b.positions.push_back(int32_t(i));
    }
    b.query_start.push_back(int32_t(seq.size()));
    b.context_lens.push_back(int32_t(seq.size()));
    b.max_blocks_per_seq = blocks;
    for (int32_t i = 0; i < blocks; ++i) b.block_tables.push_back(i);
    b.logits_rows.push_back(int32_t(seq.size()) - 1);
    forward(base->config, base->weights, ops, b);
    const int64_t n = int64_t(seq.size()) * base->config.kv_dim();
    for (int32_t l = 0; l < L; ++l) {
      k_amax.push_back(fp8_amax(kv.k[size_t(l)].data(), n));
      v_amax.push_back(fp8_amax(kv.v[size_t(l)].data(), n));
      k_cal.push_back(fp8_scale_for_amax(k_amax.back()));
      v_cal.push_back(fp8_scale_for_amax(v_amax.back()));
    }
  }
  std::printf("[kv fp8 golden-cuda] %-12s |k| max", GetParam().c_str());
  for (int32_t l = 0; l < L; ++l) std::printf(" %.3g", k_amax[size_t(l)]);
  std::printf(", |v| max");
  for (int32_t l = 0; l < L; ++l) std::printf(" %.3g", v_amax[size_t(l)]);
  std::printf(" (E4M3 range: 448 x scale); CUDA bf16 cache vs CPU f32: %.3f\n", e_bf);

  struct Scales {
    const char* name;
    std::vector<float> k, v;
  };
  const std::vector<Scales> settings = {{"0.05/0.08", std::vector<float>(size_t(L), 0.05f), std::vector<float>(size_t(L), 0.08f)},
                                        {"1.0", std::vector<float>(size_t(L), 1.0f), std::vector<float>(size_t(L), 1.0f)},
                                        {"amax/448", k_cal, v_cal}};
  for (const Scales& sc : settings) {
    auto m = std::make_shared<Model>(*base);
    m->weights.fp8_kv_cache = true;
    for (int32_t l = 0; l < L; ++l) {
      m->weights.layers[size_t(l)].k_scale = sc.k[size_t(l)];
      m->weights.layers[size_t(l)].v_scale = sc.v[size_t(l)];
    }
    const auto cpu_fp8 = cpu_run(m);
    const auto gpu_fp8 = cuda_run(m);
    ASSERT_EQ(gpu_fp8.size(), ref.size());
    const double e_cpu = rel_rows(cpu_fp8, ref), e_gpu = rel_rows(gpu_fp8, ref), e_cross = rel_rows(gpu_fp8, cpu_fp8);
    int agree_cpu = 0, agree_gpu = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      agree_cpu += argmax_row(cpu_fp8[i]) == argmax_row(ref[i]);
      agree_gpu += argmax_row(gpu_fp8[i]) == argmax_row(ref[i]);
    }
    std::printf("  scales %-9s vs CPU f32: CPU fp8 %.3f, CUDA fp8 %.3f (bound %.3f); CUDA fp8 vs CPU fp8 %.3f; top-1 "
                "CPU fp8 %d/%zu, CUDA fp8 %d/%zu\n    per step (CUDA fp8 vs CPU fp8 | CPU fp8 vs f32):",
                sc.name, e_cpu, e_gpu, 1.5 * e_cpu + e_bf, e_cross, agree_cpu, ref.size(), agree_gpu, ref.size());
    for (size_t i = 0; i < ref.size(); ++i)
      std::printf(" %.2f|%.2f", rel_rows(gpu_fp8, cpu_fp8, i, i + 1), rel_rows(cpu_fp8, ref, i, i + 1));
    std::printf("\n");
    EXPECT_LE(e_gpu, 1.5 * e_cpu + e_bf) << "scales " << sc.name;
    EXPECT_GT(e_cpu, 1e-3) << "scales " << sc.name << ": the FP8 cache changed nothing on the CPU";
    EXPECT_GT(rel_rows(gpu_fp8, gpu_bf16), 1e-3) << "scales " << sc.name << ": the FP8 cache changed nothing on CUDA";
    EXPECT_GE(agree_gpu + 4, agree_cpu) << "scales " << sc.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Families, CudaKvFp8Golden,
                         ::testing::Values("llama31", "qwen2", "mistral", "qwen3", "llama_linear"));

// kv_cache_dtype on the executor: fp8 halves the KV bytes (and doubles the blocks a budget buys),
// bf16 overrides a checkpoint's FP8 request, unknown values and unusable scales are clear errors.
TEST(CudaKvFp8, ExecutorOptions) {
  REQUIRE_GPU();
  ModelConfig c = attn_config(8, 2, 64);
  c.hidden_size = 256;
  c.intermediate_size = 512;
  LoadOptions opts;
  opts.device = "cuda";
  opts.kv_cache_blocks = 16;
  opts.kv_cache_dtype = "bf16";
  auto bf = cuda::CudaExecutor::create_dummy(c, opts, 3);
  ASSERT_TRUE(bf.is_ok()) << bf.message();
  opts.kv_cache_dtype = "fp8";
  auto f8 = cuda::CudaExecutor::create_dummy(c, opts, 3);
  ASSERT_TRUE(f8.is_ok()) << f8.message();
  EXPECT_EQ((*bf)->kv_bytes_per_token(), 2 * (*f8)->kv_bytes_per_token());
  opts.kv_cache_dtype = "int8";
  auto bad = cuda::CudaExecutor::create_dummy(c, opts, 3);
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.message().find("expected auto, fp8 or bf16"), std::string::npos) << bad.message();

  auto model = std::shared_ptr<Model>(make_dummy_model(c, WeightFormat::kBF16, 4));
  model->weights.fp8_kv_cache = true;
  model->weights.layers[1].v_scale = 0.0f;
  opts.kv_cache_dtype = "auto";
  auto zero = cuda::CudaExecutor::create(model, opts);
  ASSERT_FALSE(zero.is_ok());
  EXPECT_NE(zero.message().find("layer 1: FP8 KV-cache scale"), std::string::npos) << zero.message();
  opts.kv_cache_dtype = "bf16";  // the scales are not used then
  auto plain = cuda::CudaExecutor::create(model, opts);
  ASSERT_TRUE(plain.is_ok()) << plain.message();
  EXPECT_EQ((*plain)->kv_bytes_per_token(), (*bf)->kv_bytes_per_token());
}

}  // namespace
