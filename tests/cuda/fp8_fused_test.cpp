// silu_mul fused with the FP8 quantization of down_proj's input (fp8.h launch_silu_mul_quantize_fp8)
// against the two kernels it replaces (launch_silu_mul, then launch_quantize_fp8 kStatic): the
// codes, the scales and the optional bf16 product must be byte-identical, so prefill computes the
// same function fused or not. Then CudaOps's deferral: silu_mul + linear(w_down FP8 static) gives
// the same projection as the separate kernels + the FP8 GEMM, and the skipped bf16 product is
// computed when something reads it. Without a GPU every test skips with the reason.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <cstring>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/fp8.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"
#include "cuda_test_util.h"
#include "model/fp8.h"

using namespace kiln;
using namespace kiln::cuda_test;
using kiln::cuda::bf16_t;

namespace {

template <class T>
T* dev_alloc(size_t n) {
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(1, n) * sizeof(T)), cudaSuccess);
  cudaMemset(p, 0, std::max<size_t>(1, n) * sizeof(T));
  return static_cast<T*>(p);
}

template <class T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

// First differing index of two byte ranges, or -1.
int64_t first_diff(const void* a, const void* b, size_t n) {
  const auto* x = static_cast<const uint8_t*>(a);
  const auto* y = static_cast<const uint8_t*>(b);
  for (size_t i = 0; i < n; ++i)
    if (x[i] != y[i]) return int64_t(i);
  return -1;
}

// n random E4M3 codes, no NaN (0x7f / 0xff replaced).
std::vector<uint8_t> random_codes(std::mt19937& rng, int64_t n) {
  std::vector<uint8_t> q(static_cast<size_t>(n));
  for (auto& b : q) {
    b = uint8_t(rng() % 256);
    if ((b & 0x7f) == 0x7f) b = 0x10;
  }
  return q;
}

// A prefill step of one T-token prompt over `blocks` KV blocks (logits for its last token).
StepBatch one_prompt(int64_t T, int blocks) {
  StepBatch b;
  b.clear();
  b.max_blocks_per_seq = blocks;
  for (int i = 0; i < T; ++i) {
    b.token_ids.push_back(i);
    b.positions.push_back(i);
  }
  b.query_start.push_back(int32_t(T));
  b.context_lens.push_back(int32_t(T));
  for (int j = 0; j < blocks; ++j) b.block_tables.push_back(j);
  b.logits_rows.push_back(int32_t(T - 1));
  return b;
}

struct SiluCase {
  int n, dim;
  float scale;  // static activation scale; small ones saturate (|silu(g) u| / s > 448)
};

}  // namespace

// gate | up live in one [n, 2 dp] buffer (dp = dim rounded up to 8, the reference kernel's
// granularity), as CudaOps's gate_up_ does; dim not a multiple of 8 takes the scalar path.
TEST(CudaFp8Fused, SiluQuantMatchesSeparateKernels) {
  REQUIRE_GPU();
  std::mt19937 rng(11);
  cudaStream_t s = nullptr;
  const SiluCase cases[] = {{1, 14336, 0.05f},  {7, 14336, 0.02f},  {333, 14336, 0.003f}, {1031, 14336, 0.05f},
                            {37, 256, 1.0f},     {5, 1000, 0.004f},  {3, 13, 0.01f},      {129, 77, 0.05f},
                            {64, 4104, 0.002f},  {2, 1, 0.1f},       {300, 5, 0.001f}};
  for (const SiluCase& tc : cases)
    for (bool per_row : {false, true})
      for (bool keep_bf16 : {false, true}) {
        const int dp = (tc.dim + 7) / 8 * 8, ld = 2 * dp;
        const size_t rows = size_t(tc.n);
        std::vector<float> gu = random_vec(rows * ld, rng, 2.0f);
        gu[0] = 30.0f;  // a large product: saturates even at scale 0.1
        gu[size_t(dp)] = -25.0f;
        std::vector<bf16_t> gub(gu.size());
        for (size_t i = 0; i < gu.size(); ++i) gub[i] = f32_to_bf16(gu[i]);
        auto* d_gu = dev_alloc<bf16_t>(gub.size());
        cudaMemcpy(d_gu, gub.data(), gub.size() * 2, cudaMemcpyHostToDevice);
        auto* d_scale = dev_alloc<float>(1);
        cudaMemcpy(d_scale, &tc.scale, 4, cudaMemcpyHostToDevice);
        // Reference: the two kernels of the unfused path.
        auto* d_prod = dev_alloc<bf16_t>(rows * dp);
        auto* d_q_ref = dev_alloc<uint8_t>(rows * tc.dim);
        auto* d_s_ref = dev_alloc<float>(rows);
        cuda::launch_silu_mul(d_gu, ld, d_gu + dp, ld, d_prod, dp, tc.n, dp, s);
        cuda::launch_quantize_fp8(d_prod, dp, tc.n, tc.dim, cuda::Fp8Act::kStatic, d_scale, d_q_ref, d_s_ref, per_row,
                                  nullptr, s);
        // Fused.
        auto* d_q = dev_alloc<uint8_t>(rows * tc.dim);
        auto* d_s = dev_alloc<float>(rows);
        auto* d_out = keep_bf16 ? dev_alloc<bf16_t>(rows * dp) : nullptr;
        cuda::launch_silu_mul_quantize_fp8(d_gu, ld, d_gu + dp, ld, tc.n, tc.dim, d_scale, d_q, d_s, per_row, d_out, dp,
                                           s);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const auto q_ref = to_host(d_q_ref, rows * tc.dim), q = to_host(d_q, rows * tc.dim);
        const auto s_ref = to_host(d_s_ref, per_row ? rows : 1), sc = to_host(d_s, per_row ? rows : 1);
        int sat = 0;
        for (uint8_t b : q) sat += (b & 0x7f) == 0x7e;  // +-448
        const int64_t dq = first_diff(q.data(), q_ref.data(), q.size());
        EXPECT_EQ(dq, -1) << "n " << tc.n << " dim " << tc.dim << " scale " << tc.scale << ": code " << dq << " (row "
                          << dq / tc.dim << ") fused " << int(dq >= 0 ? q[size_t(dq)] : 0) << " vs "
                          << int(dq >= 0 ? q_ref[size_t(dq)] : 0);
        EXPECT_EQ(first_diff(sc.data(), s_ref.data(), sc.size() * 4), -1) << "scales, n " << tc.n << " dim " << tc.dim;
        if (keep_bf16) {
          std::vector<bf16_t> p_ref = to_host(d_prod, rows * dp), p = to_host(d_out, rows * dp);
          for (size_t r = 0; r < rows; ++r)
            ASSERT_EQ(first_diff(p.data() + r * dp, p_ref.data() + r * dp, size_t(tc.dim) * 2), -1)
                << "bf16 product, n " << tc.n << " dim " << tc.dim << " row " << r;
        }
        if (!per_row && !keep_bf16)
          std::printf("[silu+quant] n %5d dim %5d scale %.3g: %zu codes identical (%d saturated)\n", tc.n, tc.dim,
                      double(tc.scale), q.size(), sat);
        for (void* p : {static_cast<void*>(d_gu), static_cast<void*>(d_scale), static_cast<void*>(d_prod),
                        static_cast<void*>(d_q_ref), static_cast<void*>(d_s_ref), static_cast<void*>(d_q),
                        static_cast<void*>(d_s), static_cast<void*>(d_out)})
          cudaFree(p);
      }
}

// CudaOps at prefill: silu_mul(gate, up, T, I, gate) then linear(gate, w_down FP8 static) through
// the deferral equals the separate kernels + the FP8 GEMM bit for bit, and reading the gate buffer
// afterwards yields the bf16 product (computed then under the default KILN_FP8_FUSE_QUANT=1).
TEST(CudaFp8Fused, OpsSiluThenDownProjMatchesSeparate) {
  REQUIRE_GPU();
  const ModelConfig c = small_config(8, 2, 64, 256, 512);
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  OpsRig rig;
  ASSERT_TRUE(rig.init(c, cuda::StepCaps{64, 4, 4, 16}));
  cuda::CudaOps& ops = *rig.gpu;
  cuda::Gemm& gemm = rig.gemm;
  const cudaStream_t stream = rig.stream;
  std::mt19937 rng(21);
  for (bool per_channel : {false, true}) {
    // FP8 w_down [H, I]: random codes (no NaN: 0x7f / 0xff excluded), scales per tensor or row.
    const std::vector<uint8_t> wq = random_codes(rng, H * I);
    std::vector<float> row_scales(static_cast<size_t>(H));
    for (auto& r : row_scales) r = per_channel ? 0.001f * float(1 + rng() % 4) : 0.002f;
    const float input_scale = 0.03f;
    auto* d_w = dev_alloc<uint8_t>(wq.size());
    cudaMemcpy(d_w, wq.data(), wq.size(), cudaMemcpyHostToDevice);
    auto* d_rs = dev_alloc<float>(size_t(H));
    cudaMemcpy(d_rs, row_scales.data(), size_t(H) * 4, cudaMemcpyHostToDevice);
    auto* d_is = dev_alloc<float>(1);
    cudaMemcpy(d_is, &input_scale, 4, cudaMemcpyHostToDevice);
    cuda::Fp8Weight f;
    f.scale = row_scales[0];
    f.d_scale = d_rs;
    f.d_row_scales = d_rs;
    f.per_channel = per_channel;
    f.act = cuda::Fp8Act::kStatic;
    f.d_input_scale = d_is;
    ops.register_fp8(d_w, f);
    Weight w_down;
    w_down.format = WeightFormat::kF8E4M3;
    w_down.rows = H;
    w_down.cols = I;
    w_down.row_bytes = size_t(I);
    w_down.data = d_w;

    const int64_t T = 37;
    ops.begin_step(one_prompt(T, 4));
    std::vector<float> g = random_vec(size_t(T * I), rng, 2.0f), u = random_vec(size_t(T * I), rng, 2.0f);
    ops.write_buffer(Buf::kGate, g.data(), T, I);
    ops.write_buffer(Buf::kUp, u.data(), T, I);

    // Reference on the same device data: separate kernels, then the FP8 GEMM.
    const int64_t ld = 2 * I;
    const auto* gate = static_cast<const bf16_t*>(ops.buffer(Buf::kGate));
    const auto* up = static_cast<const bf16_t*>(ops.buffer(Buf::kUp));
    auto* d_prod = dev_alloc<bf16_t>(size_t(T * I));
    auto* d_xq = dev_alloc<uint8_t>(size_t(T * I));
    auto* d_xs = dev_alloc<float>(size_t(T));
    auto* d_y = dev_alloc<bf16_t>(size_t(T * H));
    cuda::launch_silu_mul(gate, ld, up, ld, d_prod, I, int32_t(T), int32_t(I), stream);
    cuda::launch_quantize_fp8(d_prod, I, int32_t(T), int32_t(I), cuda::Fp8Act::kStatic, d_is, d_xq, d_xs, per_channel,
                              nullptr, stream);
    gemm.linear_fp8(d_xq, T, I, d_xs, per_channel, d_w, H, I, d_rs, per_channel, d_y, H, stream);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const std::vector<bf16_t> y_ref = to_host(d_y, size_t(T * H)), prod_ref = to_host(d_prod, size_t(T * I));

    // The engine's calls (forward.cpp), then the projection and the gate buffer read back.
    ops.silu_mul(ops.buffer(Buf::kGate), ops.buffer(Buf::kUp), T, I, ops.buffer(Buf::kGate));
    ops.linear(ops.buffer(Buf::kGate), T, w_down, nullptr, ops.buffer(Buf::kProj));
    const std::vector<float> y = ops.read_buffer(Buf::kProj, T, H);
    const std::vector<float> prod = ops.read_buffer(Buf::kGate, T, I);
    int bad_y = 0, bad_p = 0;
    for (size_t i = 0; i < y.size(); ++i) bad_y += y[i] != bf16_to_f32(y_ref[i]);
    for (size_t i = 0; i < prod.size(); ++i) bad_p += prod[i] != bf16_to_f32(prod_ref[i]);
    EXPECT_EQ(bad_y, 0) << "per_channel " << per_channel << ": down_proj outputs differ from the separate path";
    EXPECT_EQ(bad_p, 0) << "per_channel " << per_channel << ": the bf16 silu product read back differs";
    double amax = 0;
    for (float v : y) amax = std::max(amax, double(std::fabs(v)));
    EXPECT_GT(amax, 0.0);
    std::printf("[ops silu+down fp8] per_channel %d: %lld x %lld outputs identical (max |y| %.3g), product identical\n",
                int(per_channel), (long long)T, (long long)H, amax);
    for (void* p : {static_cast<void*>(d_w), static_cast<void*>(d_rs), static_cast<void*>(d_is),
                    static_cast<void*>(d_prod), static_cast<void*>(d_xq), static_cast<void*>(d_xs),
                    static_cast<void*>(d_y)})
      cudaFree(p);
  }
}

// add_rms_norm fused with the quantization of its output against launch_add_rms_norm followed by
// launch_quantize_fp8: residual, bf16 output, codes and scales byte-identical; dims covering the
// three block sizes (128, 256, 1024 threads) and odd ones.
TEST(CudaFp8Fused, AddRmsNormQuantMatchesSeparateKernels) {
  REQUIRE_GPU();
  std::mt19937 rng(12);
  cudaStream_t s = nullptr;
  const SiluCase cases[] = {{1, 4096, 0.02f}, {37, 4096, 0.005f}, {1031, 4096, 0.03f}, {5, 5120, 0.01f},
                            {3, 77, 0.02f},   {129, 200, 0.004f}, {17, 300, 0.05f},   {2, 1, 0.1f}};
  for (const SiluCase& tc : cases)
    for (bool per_row : {false, true}) {
      const size_t rows = size_t(tc.n), dim = size_t(tc.dim), ldd = dim + 3, ldo = dim + 5;
      std::vector<float> res = random_vec(rows * dim, rng, 3.0f, false), wv = random_vec(dim, rng, 1.0f, false);
      std::vector<float> dl = random_vec(rows * ldd, rng, 1.0f);
      std::vector<bf16_t> dlb(dl.size());
      for (size_t i = 0; i < dl.size(); ++i) dlb[i] = f32_to_bf16(dl[i]);
      auto* d_res_ref = dev_alloc<float>(res.size());
      auto* d_res = dev_alloc<float>(res.size());
      cudaMemcpy(d_res_ref, res.data(), res.size() * 4, cudaMemcpyHostToDevice);
      cudaMemcpy(d_res, res.data(), res.size() * 4, cudaMemcpyHostToDevice);
      auto* d_w = dev_alloc<float>(dim);
      cudaMemcpy(d_w, wv.data(), dim * 4, cudaMemcpyHostToDevice);
      auto* d_dl = dev_alloc<bf16_t>(dlb.size());
      cudaMemcpy(d_dl, dlb.data(), dlb.size() * 2, cudaMemcpyHostToDevice);
      auto* d_scale = dev_alloc<float>(1);
      cudaMemcpy(d_scale, &tc.scale, 4, cudaMemcpyHostToDevice);
      auto* d_out_ref = dev_alloc<bf16_t>(rows * ldo);
      auto* d_out = dev_alloc<bf16_t>(rows * ldo);
      auto* d_q_ref = dev_alloc<uint8_t>(rows * dim);
      auto* d_q = dev_alloc<uint8_t>(rows * dim);
      auto* d_s_ref = dev_alloc<float>(rows);
      auto* d_s = dev_alloc<float>(rows);
      cuda::launch_add_rms_norm(d_res_ref, d_dl, int64_t(ldd), d_w, tc.n, tc.dim, 1e-5f, d_out_ref, int64_t(ldo), s);
      cuda::launch_quantize_fp8(d_out_ref, int64_t(ldo), tc.n, tc.dim, cuda::Fp8Act::kStatic, d_scale, d_q_ref, d_s_ref,
                                per_row, nullptr, s);
      cuda::launch_add_rms_norm_quantize_fp8(d_res, d_dl, int64_t(ldd), d_w, tc.n, tc.dim, 1e-5f, d_out, int64_t(ldo),
                                             d_scale, d_q, d_s, per_row, s);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::string what = "n " + std::to_string(tc.n) + " dim " + std::to_string(tc.dim);
      auto same = [&](const void* a, const void* b, size_t bytes, const char* name) {
        std::vector<uint8_t> x(bytes), y(bytes);
        cudaMemcpy(x.data(), a, bytes, cudaMemcpyDeviceToHost);
        cudaMemcpy(y.data(), b, bytes, cudaMemcpyDeviceToHost);
        const int64_t d = first_diff(x.data(), y.data(), bytes);
        EXPECT_EQ(d, -1) << name << " differs at byte " << d << ", " << what;
      };
      same(d_res, d_res_ref, rows * dim * 4, "residual");
      same(d_q, d_q_ref, rows * dim, "codes");
      same(d_s, d_s_ref, (per_row ? rows : 1) * 4, "scales");
      std::vector<bf16_t> o = to_host(d_out, rows * ldo), o_ref = to_host(d_out_ref, rows * ldo);
      for (size_t r = 0; r < rows; ++r)
        ASSERT_EQ(first_diff(o.data() + r * ldo, o_ref.data() + r * ldo, dim * 2), -1) << "bf16 out row " << r << ", " << what;
      if (!per_row) {
        const auto q = to_host(d_q, rows * dim);
        int sat = 0;
        for (uint8_t b : q) sat += (b & 0x7f) == 0x7e;
        std::printf("[add_rms_norm+quant] %s scale %.3g: residual, bf16, %zu codes identical (%d saturated)\n",
                    what.c_str(), double(tc.scale), q.size(), sat);
      }
      for (void* p : {static_cast<void*>(d_res_ref), static_cast<void*>(d_res), static_cast<void*>(d_w),
                      static_cast<void*>(d_dl), static_cast<void*>(d_scale), static_cast<void*>(d_out_ref),
                      static_cast<void*>(d_out), static_cast<void*>(d_q_ref), static_cast<void*>(d_q),
                      static_cast<void*>(d_s_ref), static_cast<void*>(d_s)})
        cudaFree(p);
    }
}

// CudaOps at prefill over one MLP: add_rms_norm -> linear_gate_up_silu -> linear(w_down), every
// weight FP8 with a static input scale (gate and up unfused, so the norm's fused quantization
// feeds w_gate and w_up quantizes the bf16 output it also wrote), against the separate kernels
// and GEMMs: residual, normed output and projection bit for bit.
TEST(CudaFp8Fused, OpsNormMlpMatchesSeparate) {
  REQUIRE_GPU();
  const ModelConfig c = small_config(8, 2, 64, 256, 512);
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  OpsRig rig;
  ASSERT_TRUE(rig.init(c, cuda::StepCaps{512, 4, 4, 64}));
  cuda::CudaOps& ops = *rig.gpu;
  cuda::Gemm& gemm = rig.gemm;
  const cudaStream_t stream = rig.stream;
  std::mt19937 rng(31);
  std::vector<void*> mem;
  auto dev = [&](const void* host, size_t bytes) {
    void* p = dev_alloc<uint8_t>(bytes);
    cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice);
    mem.push_back(p);
    return p;
  };
  struct W {
    Weight w;
    const float* is;
    const float* rs;
  };
  auto make_w = [&](int64_t rows, int64_t cols, float in_scale, bool per_channel) {
    const std::vector<uint8_t> q = random_codes(rng, rows * cols);
    std::vector<float> rs(static_cast<size_t>(rows));
    for (auto& r : rs) r = per_channel ? 0.001f * float(1 + rng() % 4) : 0.002f;
    W w;
    w.w.format = WeightFormat::kF8E4M3;
    w.w.rows = rows;
    w.w.cols = cols;
    w.w.row_bytes = size_t(cols);
    w.w.data = dev(q.data(), q.size());
    w.rs = static_cast<const float*>(dev(rs.data(), rs.size() * 4));
    w.is = static_cast<const float*>(dev(&in_scale, 4));
    cuda::Fp8Weight f;
    f.scale = rs[0];
    f.d_scale = w.rs;
    f.d_row_scales = w.rs;
    f.per_channel = per_channel;
    f.act = cuda::Fp8Act::kStatic;
    f.d_input_scale = w.is;
    ops.register_fp8(w.w.data, f);
    return w;
  };
  for (bool per_channel : {false, true})
    for (int64_t T : {37, 300}) {
      const W wg = make_w(I, H, 0.02f, per_channel), wu = make_w(I, H, 0.015f, per_channel),
              wd = make_w(H, I, 0.03f, per_channel);
      std::vector<float> normw = random_vec(size_t(H), rng, 1.0f, false);
      const auto* d_normw = static_cast<const float*>(dev(normw.data(), normw.size() * 4));
      Weight norm;
      norm.rows = 1;
      norm.cols = H;
      norm.data = d_normw;
      LayerWeights l;
      l.w_gate = wg.w;
      l.w_up = wu.w;
      ops.begin_step(one_prompt(T, 32));
      std::vector<float> res = random_vec(size_t(T * H), rng, 3.0f, false), delta = random_vec(size_t(T * H), rng);
      ops.write_buffer(Buf::kResidual, res.data(), T, H);
      ops.write_buffer(Buf::kProj, delta.data(), T, H);

      // Reference: separate kernels and GEMMs on copies.
      auto* r_res = static_cast<float*>(dev(res.data(), res.size() * 4));
      const auto* proj = static_cast<const bf16_t*>(ops.buffer(Buf::kProj));
      auto* h = dev_alloc<bf16_t>(size_t(T * H));
      auto* g = dev_alloc<bf16_t>(size_t(T * 2 * I));  // [T, 2 I] as the engine's gate | up
      bf16_t* u = g + I;
      auto* y = dev_alloc<bf16_t>(size_t(T * H));
      auto* xq = dev_alloc<uint8_t>(size_t(T * I));
      auto* xs = dev_alloc<float>(size_t(T));
      for (void* p : {static_cast<void*>(h), static_cast<void*>(g), static_cast<void*>(y),
                      static_cast<void*>(xq), static_cast<void*>(xs)})
        mem.push_back(p);
      auto fp8_linear = [&](const bf16_t* x, int64_t ldx, int64_t K, const W& w, bf16_t* out, int64_t ldy) {
        cuda::launch_quantize_fp8(x, ldx, int32_t(T), int32_t(K), cuda::Fp8Act::kStatic, w.is, xq, xs, per_channel,
                                  nullptr, stream);
        gemm.linear_fp8(xq, T, K, xs, per_channel, w.w.data, w.w.rows, K, w.rs, per_channel, out, ldy, stream);
      };
      cuda::launch_add_rms_norm(r_res, proj, H, d_normw, int32_t(T), int32_t(H), 1e-5f, h, H, stream);
      fp8_linear(h, H, H, wg, g, 2 * I);
      fp8_linear(h, H, H, wu, u, 2 * I);
      cuda::launch_silu_mul(g, 2 * I, u, 2 * I, g, 2 * I, int32_t(T), int32_t(I), stream);
      fp8_linear(g, 2 * I, I, wd, y, H);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);

      // The engine's calls (forward.cpp's MLP).
      ops.add_rms_norm(ops.buffer(Buf::kResidual), ops.buffer(Buf::kProj), norm, T, H, 1e-5f, ops.buffer(Buf::kNormed));
      ops.linear_gate_up_silu(ops.buffer(Buf::kNormed), T, l, ops.buffer(Buf::kGate), ops.buffer(Buf::kUp));
      ops.linear(ops.buffer(Buf::kGate), T, wd.w, nullptr, ops.buffer(Buf::kProj));
      auto bad = [](const std::vector<float>& got, const std::vector<float>& ref) {
        int64_t n = 0;
        for (size_t i = 0; i < got.size(); ++i) n += !(got[i] == ref[i]);
        return n;
      };
      auto bf = [](const std::vector<bf16_t>& v) {
        std::vector<float> f(v.size());
        for (size_t i = 0; i < v.size(); ++i) f[i] = bf16_to_f32(v[i]);
        return f;
      };
      const std::string what = "per_channel " + std::to_string(per_channel) + " T " + std::to_string(T);
      EXPECT_EQ(bad(ops.read_buffer(Buf::kResidual, T, H), to_host(r_res, size_t(T * H))), 0) << "residual, " << what;
      EXPECT_EQ(bad(ops.read_buffer(Buf::kNormed, T, H), bf(to_host(h, size_t(T * H)))), 0) << "normed, " << what;
      const std::vector<float> yo = ops.read_buffer(Buf::kProj, T, H), yr = bf(to_host(y, size_t(T * H)));
      EXPECT_EQ(bad(yo, yr), 0) << "down_proj output, " << what;
      double amax = 0;
      for (float v : yo) amax = std::max(amax, double(std::fabs(v)));
      EXPECT_GT(amax, 0.0);
      std::printf("[ops norm+mlp fp8] %s: residual, normed and %lld x %lld outputs identical (max |y| %.3g)\n",
                  what.c_str(), (long long)T, (long long)H, amax);
    }
  for (void* p : mem) cudaFree(p);
}

// CudaOps at prefill: linear(attn, w_o FP8 static -> kProj) then add_rms_norm(residual, kProj) puts
// the projection into the f32 residual in the GEMM's epilogue (no bf16 projection, no add pass;
// KILN_FP8_FUSE_RESIDUAL). Residual against a float64 host reference over the same FP8 codes (the
// products are exact, the sum f32: 1e-5 relative); the normed output's codes, through the next FP8
// linear, byte-identical to add_rms_norm (no delta) + quantize + the FP8 GEMM on the residual the
// ops produced. Per-tensor and per-channel weight scales (the latter may take the unfused path).
TEST(CudaFp8Fused, OpsProjectionIntoResidual) {
  REQUIRE_GPU();
  const ModelConfig c = small_config(8, 2, 64, 256, 512);
  const int64_t H = c.hidden_size, Q = c.q_dim(), I = c.intermediate_size;
  OpsRig rig;
  ASSERT_TRUE(rig.init(c, cuda::StepCaps{512, 4, 4, 64}));
  cuda::CudaOps& ops = *rig.gpu;
  cuda::Gemm& gemm = rig.gemm;
  const cudaStream_t stream = rig.stream;
  std::mt19937 rng(41);
  const float* lut = fp8_decode_table();
  std::vector<void*> mem;
  auto dev = [&](const void* host, size_t bytes) {
    void* p = dev_alloc<uint8_t>(bytes);
    cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice);
    mem.push_back(p);
    return p;
  };
  for (bool per_channel : {false, true})
    for (int64_t T : {37, 300}) {
      // w_o [H, Q] and the next linear's w2 [I, H]: random codes (no NaN), scales per tensor or row.
      const std::vector<uint8_t> wo_q = random_codes(rng, H * Q), w2_q = random_codes(rng, I * H);
      std::vector<float> wo_rs(static_cast<size_t>(H)), w2_rs(static_cast<size_t>(I));
      for (auto& r : wo_rs) r = per_channel ? 0.001f * float(1 + rng() % 4) : 0.002f;
      for (auto& r : w2_rs) r = per_channel ? 0.001f * float(1 + rng() % 4) : 0.003f;
      const float wo_is = 0.02f, w2_is = 0.01f;
      auto reg = [&](const std::vector<uint8_t>& q, const std::vector<float>& rs, float is, int64_t rows,
                     int64_t cols) {
        Weight w;
        w.format = WeightFormat::kF8E4M3;
        w.rows = rows;
        w.cols = cols;
        w.row_bytes = size_t(cols);
        w.data = dev(q.data(), q.size());
        cuda::Fp8Weight f;
        f.scale = rs[0];
        f.d_row_scales = static_cast<const float*>(dev(rs.data(), rs.size() * 4));
        f.d_scale = f.d_row_scales;
        f.per_channel = per_channel;
        f.act = cuda::Fp8Act::kStatic;
        f.d_input_scale = static_cast<const float*>(dev(&is, 4));
        ops.register_fp8(w.data, f);
        return std::make_pair(w, f);
      };
      const auto [wo, fo] = reg(wo_q, wo_rs, wo_is, H, Q);
      const auto [w2, f2] = reg(w2_q, w2_rs, w2_is, I, H);
      const std::vector<float> normw = random_vec(size_t(H), rng, 1.0f, false);
      Weight norm;
      norm.rows = 1;
      norm.cols = H;
      norm.data = dev(normw.data(), normw.size() * 4);

      ops.begin_step(one_prompt(T, 32));
      const std::vector<float> res = random_vec(size_t(T * H), rng, 3.0f, false), attn = random_vec(size_t(T * Q), rng);
      ops.write_buffer(Buf::kResidual, res.data(), T, H);
      ops.write_buffer(Buf::kAttn, attn.data(), T, Q);

      // The engine's calls (forward.cpp: o_proj, add_rms_norm, the next projection).
      ops.linear(ops.buffer(Buf::kAttn), T, wo, nullptr, ops.buffer(Buf::kProj));
      ops.add_rms_norm(ops.buffer(Buf::kResidual), ops.buffer(Buf::kProj), norm, T, H, 1e-5f, ops.buffer(Buf::kNormed));
      ops.linear(ops.buffer(Buf::kNormed), T, w2, nullptr, ops.buffer(Buf::kGate));
      const std::vector<float> got_res = ops.read_buffer(Buf::kResidual, T, H);
      const std::vector<float> got_y2 = ops.read_buffer(Buf::kGate, T, I);

      // Residual: float64 over the codes the quantizer makes of the bf16 attention rows.
      const std::string what = "per_channel " + std::to_string(per_channel) + " T " + std::to_string(T);
      std::vector<float> xk(static_cast<size_t>(Q));
      std::vector<uint8_t> xq(static_cast<size_t>(Q));
      // What the ops added to the residual against the float64 projection: relative L2 within the
      // FP8 GEMM test's bound (fp8_test.cpp: fast accumulation, 1e-2); a residual dropped or added
      // twice is off by |res| ~ 3, a wrong scale by a factor.
      double num = 0, den = 0;
      for (int64_t m = 0; m < T; ++m) {
        for (int64_t k = 0; k < Q; ++k) xk[size_t(k)] = bf16_round(attn[size_t(m * Q + k)]);
        fp8_quantize(xk.data(), Q, wo_is, xq.data());
        for (int64_t r = 0; r < H; ++r) {
          double a = 0;
          for (int64_t k = 0; k < Q; ++k) a += double(lut[xq[size_t(k)]]) * lut[wo_q[size_t(r * Q + k)]];
          const double y = a * wo_is * wo_rs[size_t(r)];
          const double added = double(got_res[size_t(m * H + r)]) - double(res[size_t(m * H + r)]);
          num += (added - y) * (added - y);
          den += y * y;
        }
      }
      const double worst = std::sqrt(num / std::max(den, 1e-30));
      // Where cuBLASLt has no f32-accumulating algorithm (outer-vector scales may lack one) the ops
      // take the separate path: the projection is rounded to bf16 before the add.
      const bool fused = gemm.fp8_accumulate_ok(T, Q, H, Q, H, per_channel, per_channel);
      EXPECT_LT(worst, 1e-2) << "residual, " << what << (fused ? " (fused)" : " (separate)");

      // The next projection from that residual through the separate kernels.
      auto* d_res = static_cast<float*>(dev(got_res.data(), got_res.size() * 4));
      auto* h = dev_alloc<bf16_t>(size_t(T * H));
      auto* q2 = dev_alloc<uint8_t>(size_t(T * H));
      auto* s2 = dev_alloc<float>(size_t(T));
      auto* y2 = dev_alloc<bf16_t>(size_t(T * I));
      for (void* p : {static_cast<void*>(h), static_cast<void*>(q2), static_cast<void*>(s2), static_cast<void*>(y2)})
        mem.push_back(p);
      cuda::launch_add_rms_norm(d_res, nullptr, 0, static_cast<const float*>(norm.data), int32_t(T), int32_t(H), 1e-5f,
                                h, H, stream);
      cuda::launch_quantize_fp8(h, H, int32_t(T), int32_t(H), cuda::Fp8Act::kStatic, f2.d_input_scale, q2, s2,
                                per_channel, nullptr, stream);
      gemm.linear_fp8(q2, T, H, s2, per_channel, w2.data, I, H, f2.d_row_scales, per_channel, y2, I, stream);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      const std::vector<bf16_t> y2_ref = to_host(y2, size_t(T * I));
      int64_t bad = 0;
      for (size_t i = 0; i < got_y2.size(); ++i) bad += got_y2[i] != bf16_to_f32(y2_ref[i]);
      EXPECT_EQ(bad, 0) << "next projection, " << what;
      std::printf("[ops o_proj into residual] %s (%s): residual's projection rel L2 err %.2e, next projection %s\n",
                  what.c_str(), fused ? "in the GEMM" : "separate add", worst, bad ? "DIFFERS" : "identical");
    }
  for (void* p : mem) cudaFree(p);
}
