// Decode attention alone, timed: the fused decode op (rope + new token's KV write + attention + split
// merge, one kernel) at the shapes of the throughput benchmarks (Llama-3.1-8B attention: 32 heads, 8 KV
// heads, head_dim 128, 16-token blocks, scattered block tables), in CUDA events, against a streaming
// read of the same bytes in the same process. A measuring aid for device runs: skipped unless
// KILN_DECODE_BENCH=1; KILN_DECODE_ATTN picks the kernel (v2old, v3, ...). Correctness is
// decode_attn_test.cpp's; here the output is only checked to be finite.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include <cuda_runtime_api.h>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernels.h"
#include "core/dtype.h"
#include "cuda_test_util.h"

using namespace kiln;
using namespace kiln::cuda_test;

namespace {

struct TimingShape {
  int batch, ctx;
  bool fp8;
};

float median_ms(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

TEST(CudaDecodeTiming, Bandwidth) {
  REQUIRE_GPU();
  const char* on = std::getenv("KILN_DECODE_BENCH");
  if (!on || std::string(on) != "1") GTEST_SKIP() << "KILN_DECODE_BENCH=1 times decode attention";
  const char* variant = std::getenv("KILN_DECODE_ATTN");
  const ModelConfig c = attn_config(32, 8, 128, /*layers=*/1, /*max_pos=*/4096);
  const int bs = 16, reps = 20;
  for (const TimingShape s : {TimingShape{256, 1000, true}, TimingShape{256, 1000, false}, TimingShape{256, 2000, true},
                              TimingShape{64, 2000, true}, TimingShape{64, 2000, false}, TimingShape{1, 128, true},
                              TimingShape{1, 2048, true}, TimingShape{512, 1500, true}, TimingShape{1024, 192, true}}) {
    std::mt19937 rng(99 + s.batch + s.ctx);
    const int max_blocks = (s.ctx + bs - 1) / bs, num_blocks = s.batch * max_blocks;
    cuda::Gemm gemm;
    ASSERT_TRUE(gemm.init().is_ok());
    cudaStream_t stream = nullptr;
    cudaStreamCreate(&stream);
    {
      cuda::CudaOps gpu(c, &gemm, stream);
      ASSERT_TRUE(gpu.reserve(cuda::StepCaps{s.batch, s.batch, s.batch, s.batch * max_blocks}).is_ok());
      cuda::DeviceKv dkv;
      dkv.num_blocks = num_blocks;
      dkv.block_size = bs;
      dkv.fp8 = s.fp8;
      if (s.fp8) {
        dkv.k_scale = {0.019f};
        dkv.v_scale = {0.027f};
      }
      const size_t cache_bytes = size_t(num_blocks) * bs * c.kv_dim() * dkv.elem_bytes();
      // random cache codes (finite: N(0, 1) through the cache's dtype), a 4 MB pattern tiled over it
      const size_t seed_bytes = std::min<size_t>(cache_bytes, 4u << 20);
      std::vector<uint8_t> seed(seed_bytes);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      if (s.fp8) {
        for (auto& b : seed) b = f32_to_fp8e4m3(nd(rng) / 0.019f);
      } else {
        for (size_t i = 0; i + 1 < seed.size(); i += 2) {
          const uint16_t h = f32_to_bf16(nd(rng));
          seed[i] = uint8_t(h & 0xff);
          seed[i + 1] = uint8_t(h >> 8);
        }
      }
      void *k = nullptr, *v = nullptr, *scratch = nullptr;
      ASSERT_EQ(cudaMalloc(&k, cache_bytes), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&v, cache_bytes), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&scratch, seed_bytes), cudaSuccess);
      cudaMemcpy(scratch, seed.data(), seed_bytes, cudaMemcpyHostToDevice);
      for (size_t off = 0; off < cache_bytes; off += seed_bytes) {
        const size_t n = std::min(seed_bytes, cache_bytes - off);
        cudaMemcpy(static_cast<char*>(k) + off, scratch, n, cudaMemcpyDeviceToDevice);
        cudaMemcpy(static_cast<char*>(v) + off, scratch, n, cudaMemcpyDeviceToDevice);
      }
      dkv.k.push_back(k);
      dkv.v.push_back(v);
      gpu.set_kv(&dkv);

      std::vector<int32_t> perm(static_cast<size_t>(num_blocks));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      StepBatch b;
      b.clear();
      b.max_blocks_per_seq = max_blocks;
      for (int q = 0; q < s.batch; ++q) {
        b.token_ids.push_back(int32_t(rng() % 300));
        b.positions.push_back(s.ctx - 1);
        b.query_start.push_back(b.query_start.back() + 1);
        b.context_lens.push_back(s.ctx);
        for (int j = 0; j < max_blocks; ++j) b.block_tables.push_back(perm[size_t(q * max_blocks + j)]);
        b.logits_rows.push_back(q);
      }
      gpu.begin_step(b);
      const int64_t T = s.batch, Q = c.q_dim(), KV = c.kv_dim();
      gpu.write_buffer(Buf::kQ, random_vec(size_t(T * Q), rng).data(), T, Q);
      gpu.write_buffer(Buf::kK, random_vec(size_t(T * KV), rng).data(), T, KV);
      gpu.write_buffer(Buf::kV, random_vec(size_t(T * KV), rng).data(), T, KV);
      auto run = [&] {
        gpu.rope_attention(0, gpu.buffer(Buf::kQ), gpu.buffer(Buf::kK), gpu.buffer(Buf::kV), c, gpu.buffer(Buf::kAttn));
      };
      const std::vector<float> ms = event_times_ms(stream, 3, reps, run);
      ASSERT_EQ(cudaGetLastError(), cudaSuccess);
      const auto out = gpu.read_buffer(Buf::kAttn, T, Q);
      for (float x : out) ASSERT_TRUE(std::isfinite(x));

      // the ceiling: a streaming read of the K and V caches, the same bytes
      float* sink = nullptr;
      ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&sink), 16), cudaSuccess);
      const std::vector<float> rd = event_times_ms(stream, 2, 5, [&] {
        cuda::launch_read_bandwidth(k, int64_t(cache_bytes), sink, stream);
        cuda::launch_read_bandwidth(v, int64_t(cache_bytes), sink, stream);
      });
      const double kv_bytes = double(s.batch) * s.ctx * double(KV) * 2 * dkv.elem_bytes();
      const double us = 1e3 * median_ms(ms), gbs = kv_bytes / (us * 1e-6) / 1e9;
      const double read_gbs = 2.0 * double(cache_bytes) / (double(median_ms(rd)) * 1e-3) / 1e9;
      std::printf("[decode timing] %-6s batch %3d ctx %4d %s: %8.1f us, KV %7.1f MB -> %5.0f GB/s = %5.1f%% of a "
                  "streaming read (%4.0f GB/s)\n",
                  variant ? variant : "auto", s.batch, s.ctx, s.fp8 ? "fp8 " : "bf16", us, kv_bytes / 1e6, gbs,
                  100.0 * gbs / read_gbs, read_gbs);
      cudaFree(sink);
      cudaFree(scratch);
      gpu.set_kv(nullptr);
      cudaFree(k);
      cudaFree(v);
    }
    cudaStreamDestroy(stream);
  }
}

}  // namespace
