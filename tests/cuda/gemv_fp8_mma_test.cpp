// The tensor-core FP8 decode GEMV (gemv_fp8.cu: activations quantized to E4M3 in the kernel,
// mma.sync.m16n8k32.e4m3) against a float64 reference over the same quantized activations and
// weights (model/fp8.h, the CPU emulation's arithmetic), through the three public entry points of
// kernels.h. Without a GPU every test skips with the reason.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <cstring>

#include "backend/cuda/gemv_fp8.h"
#include "backend/cuda/kernels.h"
#include "cuda_test_util.h"
#include "model/fp8.h"

using namespace kiln;
using namespace kiln::cuda_test;

namespace {

// cudaMalloc'd bytes, freed on scope exit.
struct DevBuf {
  void* p = nullptr;
  explicit DevBuf(size_t bytes) { EXPECT_EQ(cudaMalloc(&p, bytes < 16 ? 16 : bytes), cudaSuccess); }
  template <class T>
  explicit DevBuf(const std::vector<T>& v) : DevBuf(v.size() * sizeof(T)) {
    cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

std::vector<float> bf16_from_device(const void* d, size_t n) {
  std::vector<uint16_t> b(n);
  cudaMemcpy(b.data(), d, n * 2, cudaMemcpyDeviceToHost);
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = bf16_to_f32(b[i]);
  return f;
}

std::vector<float> f32_from_device(const void* d, size_t n) {
  std::vector<float> f(n);
  cudaMemcpy(f.data(), d, n * 4, cudaMemcpyDeviceToHost);
  return f;
}

ActQuant act_quant(cuda::GemvAct a) {
  switch (a) {
    case cuda::GemvAct::kNone: return ActQuant::kNone;
    case cuda::GemvAct::kStatic: return ActQuant::kStaticTensor;
    case cuda::GemvAct::kDynamicTensor: return ActQuant::kDynamicTensor;
    case cuda::GemvAct::kDynamicToken: return ActQuant::kDynamicToken;
  }
  return ActQuant::kNone;
}

const char* act_name(cuda::GemvAct a) {
  switch (a) {
    case cuda::GemvAct::kNone: return "none";
    case cuda::GemvAct::kStatic: return "static";
    case cuda::GemvAct::kDynamicTensor: return "dyn-tensor";
    case cuda::GemvAct::kDynamicToken: return "dyn-token";
  }
  return "?";
}

// A GEMV shape: N output rows of K.
struct Shape {
  int N, K;
};

// A deterministic small integer in [-2, 2] from a position (a hash: no k pattern a wrong
// permutation of the mma's k order could still match).
int small_int(uint32_t a, uint32_t b, uint32_t salt) {
  uint32_t h = a * 2654435761u ^ (b + salt) * 40503u;
  h ^= h >> 15;
  h *= 0x2c1b3c6du;
  h ^= h >> 12;
  return int(h % 5u) - 2;
}

}  // namespace

// Integer-valued weights and activations (|x|, |w| <= 2, unit scales): every partial sum is an
// integer under 2^13, exact in any f32 accumulation order, so the output must equal the reference
// exactly. Fails if the lanes' k order in A and B differs (the fragment permutation), if a chunk,
// a warp's K range or the partial last chunk is dropped or counted twice, or if a column of B
// leaks into another (n = 1..8).
TEST(GemvFp8Mma, IntegerInputsAreExact) {
  REQUIRE_GPU();
  cudaStream_t s;
  cudaStreamCreate(&s);
  const int N = 40, K = 1104;  // 3 row tiles (the last partial), 17.25 chunks of 64: partial chunk, idle warps
  std::vector<uint8_t> wq(size_t(N) * K);
  for (int r = 0; r < N; ++r)
    for (int k = 0; k < K; ++k) wq[size_t(r) * K + k] = f32_to_fp8e4m3(float(small_int(uint32_t(r), uint32_t(k), 1)));
  DevBuf dw(wq);
  DevBuf dscale(std::vector<float>{1.0f});
  for (int n = 1; n <= 8; ++n) {
    const int ldx = K + 8;
    std::vector<uint16_t> xb(size_t(n) * ldx, f32_to_bf16(1000.0f));  // padding past K would show
    for (int m = 0; m < n; ++m)
      for (int k = 0; k < K; ++k) xb[size_t(m) * ldx + k] = f32_to_bf16(float(small_int(uint32_t(m), uint32_t(k), 7)));
    DevBuf dx(xb);
    DevBuf dy(size_t(n) * N * 4);
    cudaMemset(dy.p, 0xff, size_t(n) * N * 4);
    cuda::GemvW w;
    w.data = dw.p;
    w.fp8 = true;
    w.act = cuda::GemvAct::kStatic;
    w.input_scale = dscale.as<float>();
    ASSERT_TRUE(cuda::launch_gemv(dx.as<cuda::bf16_t>(), ldx, n, w, N, K, dy.p, N, true, s)) << "n " << n;
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    const std::vector<float> got = f32_from_device(dy.p, size_t(n) * N);
    int bad = 0;
    for (int m = 0; m < n; ++m)
      for (int r = 0; r < N; ++r) {
        int64_t want = 0;
        for (int k = 0; k < K; ++k)
          want += int64_t(small_int(uint32_t(r), uint32_t(k), 1)) * small_int(uint32_t(m), uint32_t(k), 7);
        if (got[size_t(m) * N + r] != float(want) && bad++ < 5)
          ADD_FAILURE() << "n " << n << " y[" << m << ", " << r << "] = " << got[size_t(m) * N + r] << ", want " << want;
      }
    EXPECT_EQ(bad, 0) << "n " << n;
  }
  cudaStreamDestroy(s);
}

// All three entry points (plain with bf16 and f32 output, silu pair, add_rms_norm fold), n = 1..4
// (and 8 for plain), static / dynamic-per-tensor / dynamic-per-token activation scales, per-tensor
// and per-row weight scales, K not a multiple of the 64-wide chunk nor of a warp's range, N not a
// multiple of the 16-row tile. Weights span the whole E4M3 range; the static input scale is set so
// that the largest activations saturate at 448. Reference: float64 over the same FP8 codes; the
// GPU's products are exact and its sums f32 (tensor-core accumulation), so the f32 output is held
// to 2e-3 relative L2 (seen on H100: see the printed figures) and bf16 outputs to bf16 rounding.
TEST(GemvFp8Mma, MatchesReference) {
  REQUIRE_GPU();
  std::mt19937 rng(2026);
  cudaStream_t s;
  cudaStreamCreate(&s);
  DevBuf counter(4);
  cudaMemset(counter.p, 0, 4);
  enum Kind { kPlain, kSilu, kFold };
  const float* lut = fp8_decode_table();
  int checked = 0;
  double worst_f32 = 0, worst_bf16 = 0;
  // 13000 x 272 and the 6000-row silu pair have more tiles than the chip holds blocks at once.
  for (Shape sh : {Shape{20, 16}, Shape{36, 272}, Shape{300, 528}, Shape{1000, 2064}, Shape{4096, 1040},
                   Shape{1024, 4096}, Shape{200, 14336}, Shape{13000, 272}, Shape{6000, 528}}) {
    const int N = sh.N, K = sh.K, ldx = K + 16;
    std::vector<uint8_t> wq(size_t(2) * N * K);  // the silu pair's 2 N rows; plain and fold use N
    {
      std::normal_distribution<float> d(0.0f, 16.0f);
      for (auto& q : wq) {
        q = f32_to_fp8e4m3(d(rng));
        if ((q & 0x7f) == 0x7f) q ^= 1;  // no NaN codes
      }
    }
    DevBuf dw(wq);
    std::vector<float> wdeq(wq.size());
    for (size_t i = 0; i < wq.size(); ++i) wdeq[i] = lut[wq[i]];
    std::vector<float> tensor_scales(size_t(2) * N, 1.0f / 300.0f), row_scales(size_t(2) * N);
    std::uniform_real_distribution<float> us(0.5f / 256.0f, 2.0f / 256.0f);
    for (auto& v : row_scales) v = us(rng);
    DevBuf drs(row_scales);
    for (int n : {1, 2, 3, 4, 8}) {
      for (cuda::GemvAct act : {cuda::GemvAct::kStatic, cuda::GemvAct::kDynamicTensor, cuda::GemvAct::kDynamicToken}) {
        // Activations ~N(0, 1), bf16; one row of much larger ones so that per-token and per-tensor
        // scales differ.
        std::vector<float> x(size_t(n) * ldx, 0.0f), xk(size_t(n) * K);
        std::normal_distribution<float> nd(0.0f, 1.0f);
        for (int m = 0; m < n; ++m)
          for (int k = 0; k < K; ++k) {
            const float v = bf16_round(nd(rng) * (m == n - 1 && n > 1 ? 8.0f : 1.0f));
            x[size_t(m) * ldx + k] = v;
            xk[size_t(m) * K + k] = v;
          }
        const float input_scale = fp8_amax(xk.data(), int64_t(n) * K) / 560.0f;  // top ~20 % of the range saturates
        std::vector<float> sx(static_cast<size_t>(n));
        fp8_activation_scales(xk.data(), n, K, act_quant(act), input_scale, sx.data());
        // dot[m, r] over the quantized activations, for all 2 N rows.
        std::vector<double> dot(size_t(n) * 2 * N);
        {
          std::vector<uint8_t> xq(static_cast<size_t>(K));
          std::vector<double> xd(static_cast<size_t>(K));
          for (int m = 0; m < n; ++m) {
            fp8_quantize(xk.data() + size_t(m) * K, K, sx[size_t(m)], xq.data());
            for (int k = 0; k < K; ++k) xd[size_t(k)] = lut[xq[size_t(k)]];
            for (int r = 0; r < 2 * N; ++r) {
              const float* wr = wdeq.data() + size_t(r) * K;
              double a = 0;
              for (int k = 0; k < K; ++k) a += xd[size_t(k)] * wr[k];
              dot[(size_t(m) * 2 * N) + r] = a * sx[size_t(m)];
            }
          }
        }
        std::vector<uint16_t> xb(x.size());
        for (size_t i = 0; i < x.size(); ++i) xb[i] = f32_to_bf16(x[i]);
        DevBuf dx(xb);
        DevBuf dis(std::vector<float>{input_scale});
        DevBuf dy(size_t(n) * N * 4);
        for (Kind kind : {kPlain, kSilu, kFold}) {
          if (n > 4 && kind != kPlain) continue;
          if (kind == kFold && N > 4096) continue;  // the fold takes N <= 4096
          for (bool per_row : {false, true}) {
            const std::vector<float>& sw = per_row ? row_scales : tensor_scales;
            cuda::GemvW w;
            w.data = dw.p;
            w.fp8 = true;
            w.act = act;
            w.input_scale = dis.as<float>();
            if (per_row) w.row_scales = drs.as<float>();
            else w.scale = tensor_scales[0];
            std::vector<float> ref(size_t(n) * N);
            for (int m = 0; m < n; ++m)
              for (int r = 0; r < N; ++r) {
                double a = dot[size_t(m) * 2 * N + r] * sw[size_t(r)];
                if (kind == kSilu) a = a / (1.0 + std::exp(-a)) * (dot[size_t(m) * 2 * N + N + r] * sw[size_t(N + r)]);
                ref[size_t(m) * N + r] = float(a);
              }
            const std::string what = "N " + std::to_string(N) + " K " + std::to_string(K) + " n " + std::to_string(n) +
                                     " kind " + std::to_string(int(kind)) + " " + act_name(act) +
                                     (per_row ? " per-row" : " per-tensor");
            const auto* xd = dx.as<cuda::bf16_t>();
            for (bool f32 : {false, true}) {
              if (kind != kPlain && f32) continue;
              cudaMemset(dy.p, 0xff, size_t(n) * N * 4);  // NaN poison: every output must be written
              std::vector<float> res0, normw;
              std::unique_ptr<DevBuf> dres, dnw, dout;
              bool ok = false;
              if (kind == kPlain) {
                ok = cuda::launch_gemv(xd, ldx, n, w, N, K, dy.p, N, f32, s);
              } else if (kind == kSilu) {
                ok = cuda::launch_gemv_silu(xd, ldx, n, w, N, K, dy.as<cuda::bf16_t>(), N, s);
              } else {
                res0 = random_vec(size_t(n) * N, rng, 1.0f, false);
                normw = random_vec(size_t(N), rng, 1.0f, false);
                dres = std::make_unique<DevBuf>(res0);
                dnw = std::make_unique<DevBuf>(normw);
                dout = std::make_unique<DevBuf>(size_t(n) * N * 2);
                cudaMemset(dout->p, 0xff, size_t(n) * N * 2);
                ok = cuda::launch_gemv_add_rms_norm(xd, ldx, n, w, N, K, dy.as<cuda::bf16_t>(), N, dres->as<float>(),
                                                    dnw->as<float>(), 1e-5f, dout->as<cuda::bf16_t>(), N,
                                                    counter.as<unsigned int>(), s);
              }
              ASSERT_TRUE(ok) << what;
              ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess) << what;
              const std::vector<float> got = f32 ? f32_from_device(dy.p, ref.size()) : bf16_from_device(dy.p, ref.size());
              const Err e = compare(got, ref);
              const double tol = f32 ? 2e-3 : 6e-3;
              EXPECT_LE(e.rel, tol) << what << " f32 " << f32 << ": worst at " << e.worst << " got " << got[e.worst]
                                    << " ref " << ref[e.worst];
              (f32 ? worst_f32 : worst_bf16) = std::max(f32 ? worst_f32 : worst_bf16, e.rel);
              ++checked;
              if (kind == kFold) {
                // residual += bf16(y) with the GPU's own y (the unfused path stores y as bf16 first);
                // out = rms_norm(residual) * w from that residual.
                std::vector<float> res_ref(res0.size()), out_ref(res0.size());
                for (int m = 0; m < n; ++m) {
                  double ss = 0;
                  for (int r = 0; r < N; ++r) {
                    const size_t j = size_t(m) * N + r;
                    res_ref[j] = res0[j] + got[j];
                    ss += double(res_ref[j]) * res_ref[j];
                  }
                  const double inv = 1.0 / std::sqrt(ss / N + 1e-5);
                  for (int r = 0; r < N; ++r) {
                    const size_t j = size_t(m) * N + r;
                    out_ref[j] = float(res_ref[j] * inv * normw[size_t(r)]);
                  }
                }
                const std::vector<float> rg = f32_from_device(dres->p, res0.size());
                const std::vector<float> og = bf16_from_device(dout->p, res0.size());
                const Err er = compare(rg, res_ref), eo = compare(og, out_ref);
                EXPECT_LE(er.rel, 1e-6) << what << " residual, worst at " << er.worst;
                EXPECT_LE(eo.rel, 6e-3) << what << " normed output, worst at " << eo.worst;
                unsigned int c = 1;
                cudaMemcpy(&c, counter.p, 4, cudaMemcpyDeviceToHost);
                EXPECT_EQ(c, 0u) << what << ": the fold leaves its counter at 0";
              }
            }
          }
        }
      }
    }
  }
  std::printf("[gemv-fp8-mma] %d cases against float64: worst rel L2 %.2e (f32 out), %.2e (bf16 out)\n", checked,
              worst_f32, worst_bf16);
}

// The tiled copy (launch_tile_fp8): byte for byte the documented layout, and the GEMVs that read it
// (plain, fold, the 8 + 8 silu pair at n <= 2) give bit-identical outputs to the matrix as stored
// (same chunks, same warps, same order). At n = 4 the silu pair takes the 8 + 8 tile only with the
// copy (the 16 + 16 tiles without): held to the float64 test's bf16 bound there. Shapes: one tile,
// the 8B's o_proj, 14,336-wide down rows, more tiles than the chip holds at once. Shapes the copy
// does not take are refused.
TEST(GemvFp8Mma, TiledCopyReadsTheSameBytes) {
  REQUIRE_GPU();
  std::mt19937 rng(17);
  cudaStream_t s;
  cudaStreamCreate(&s);
  DevBuf counter(4);
  cudaMemset(counter.p, 0, 4);
  int compared = 0;
  for (Shape sh : {Shape{16, 64}, Shape{4096, 4096}, Shape{1024, 14336}, Shape{6144, 1024}}) {
    const int N = sh.N, K = sh.K;
    std::vector<uint8_t> wq(size_t(2) * N * K);
    std::normal_distribution<float> d(0.0f, 16.0f);
    for (auto& q : wq) {
      q = f32_to_fp8e4m3(d(rng));
      if ((q & 0x7f) == 0x7f) q ^= 1;
    }
    DevBuf dw(wq), dt(wq.size()), dtp(wq.size());
    ASSERT_TRUE(cuda::launch_tile_fp8(dw.p, N, K, false, dt.p, s));
    ASSERT_TRUE(cuda::launch_tile_fp8(dw.p, N, K, true, dtp.p, s));
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    std::vector<uint8_t> t(size_t(N) * K), tp(wq.size());
    cudaMemcpy(t.data(), dt.p, t.size(), cudaMemcpyDeviceToHost);
    cudaMemcpy(tp.data(), dtp.p, tp.size(), cudaMemcpyDeviceToHost);
    int64_t bad = 0;
    const int chunks = K / 64;
    for (int b = 0; b < N / 16; ++b)
      for (int c = 0; c < chunks; ++c)
        for (int r = 0; r < 16; ++r)
          for (int k = 0; k < 64; ++k) {
            const size_t at = ((size_t(b) * chunks + c) * 16 + r) * 64 + k;
            bad += t[at] != wq[size_t(16 * b + r) * K + 64 * c + k];
          }
    for (int b = 0; b < N / 8; ++b)
      for (int c = 0; c < chunks; ++c)
        for (int r = 0; r < 16; ++r)
          for (int k = 0; k < 64; ++k) {
            const size_t at = ((size_t(b) * chunks + c) * 16 + r) * 64 + k;
            const size_t row = r < 8 ? size_t(8 * b + r) : size_t(N + 8 * b + r - 8);
            bad += tp[at] != wq[row * K + 64 * c + k];
          }
    EXPECT_EQ(bad, 0) << "N " << N << " K " << K << ": bytes of the tiled copies out of place";
    DevBuf dis(std::vector<float>{0.02f});
    for (int n : {1, 2, 4}) {
      std::vector<uint16_t> xb(size_t(n) * K);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      for (auto& v : xb) v = f32_to_bf16(nd(rng));
      DevBuf dx(xb);
      const auto* x = dx.as<cuda::bf16_t>();
      cuda::GemvW w;
      w.data = dw.p;
      w.fp8 = true;
      w.act = cuda::GemvAct::kStatic;
      w.input_scale = dis.as<float>();
      w.scale = 1.0f / 256.0f;
      cuda::GemvW wt = w, wtp = w;
      wt.tiled = dt.p;
      wtp.tiled = dtp.p;
      const std::string what = "N " + std::to_string(N) + " K " + std::to_string(K) + " n " + std::to_string(n);
      auto out = [&](int kind, const cuda::GemvW& ww, std::vector<float>* res) {
        DevBuf dy(size_t(n) * N * 4);
        cudaMemset(dy.p, 0xff, size_t(n) * N * 4);
        if (kind == 0) {
          EXPECT_TRUE(cuda::launch_gemv(x, K, n, ww, N, K, dy.p, N, true, s)) << what;
        } else if (kind == 1) {
          EXPECT_TRUE(cuda::launch_gemv_silu(x, K, n, ww, N, K, dy.as<cuda::bf16_t>(), N, s)) << what;
        } else {
          std::vector<float> res0(size_t(n) * N, 0.25f), normw(size_t(N), 1.5f);
          DevBuf dres(res0), dnw(normw), dout(size_t(n) * N * 2);
          EXPECT_TRUE(cuda::launch_gemv_add_rms_norm(x, K, n, ww, N, K, dy.as<cuda::bf16_t>(), N, dres.as<float>(),
                                                     dnw.as<float>(), 1e-5f, dout.as<cuda::bf16_t>(), N,
                                                     counter.as<unsigned int>(), s))
              << what;
          EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
          *res = f32_from_device(dres.p, size_t(n) * N);
          const std::vector<float> o = bf16_from_device(dout.p, size_t(n) * N);
          res->insert(res->end(), o.begin(), o.end());
        }
        EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
        return kind == 0 ? f32_from_device(dy.p, size_t(n) * N) : bf16_from_device(dy.p, size_t(n) * N);
      };
      for (int kind : {0, 1, 2}) {
        if (kind == 2 && N > 4096) continue;  // the fold takes N <= 4096
        std::vector<float> ra, rb;
        const std::vector<float> a = out(kind, w, &ra), b = out(kind, kind == 1 ? wtp : wt, &rb);
        if (kind == 1 && n > 2) {
          const Err e = compare(b, a);
          EXPECT_LE(e.rel, 6e-3) << what << " silu, 8 + 8 tile (copy) vs 16 + 16 (as stored)";
        } else {
          EXPECT_EQ(a, b) << what << " kind " << kind;
        }
        EXPECT_EQ(ra, rb) << what << " kind " << kind << ": residual and normed output";
        ++compared;
      }
    }
  }
  EXPECT_FALSE(cuda::launch_tile_fp8(nullptr, 24, 64, false, nullptr, s)) << "N % 16";
  EXPECT_FALSE(cuda::launch_tile_fp8(nullptr, 16, 96, false, nullptr, s)) << "K % 64";
  EXPECT_FALSE(cuda::launch_tile_fp8(nullptr, 12, 64, true, nullptr, s)) << "pair: N % 8";
  std::printf("[gemv-fp8-mma] tiled copies: %d outputs bit-identical to the matrix as stored\n", compared);
  cudaStreamDestroy(s);
}

// What the tensor-core GEMV does not take: launch_gemv_fp8_mma says false (nothing launched), and
// the public entry point either falls back to the CUDA-core FP8 kernel (weight-only GemvW) or
// refuses the shape (K % 16 != 0, n > 8).
TEST(GemvFp8Mma, DeclinesWhatItDoesNotTake) {
  REQUIRE_GPU();
  cudaStream_t s;
  cudaStreamCreate(&s);
  DevBuf dw(size_t(64) * 1024), dx(size_t(16) * 1024 * 2), dy(size_t(16) * 64 * 4), dscale(std::vector<float>{1.0f});
  cudaMemset(dw.p, 0x30, size_t(64) * 1024);
  cudaMemset(dx.p, 0, size_t(16) * 1024 * 2);
  cuda::GemvW w;
  w.data = dw.p;
  w.fp8 = true;
  w.act = cuda::GemvAct::kStatic;
  w.input_scale = dscale.as<float>();
  const auto* x = dx.as<cuda::bf16_t>();
  EXPECT_TRUE(cuda::launch_gemv_fp8_mma(x, 64, 1, w, 64, 64, 0, false, dy.p, 64, true, nullptr, s));
  EXPECT_FALSE(cuda::launch_gemv_fp8_mma(x, 24, 1, w, 64, 24, 0, false, dy.p, 64, true, nullptr, s)) << "K % 16";
  EXPECT_FALSE(cuda::launch_gemv_fp8_mma(x, 64, 9, w, 64, 64, 0, false, dy.p, 64, true, nullptr, s)) << "n > 8";
  EXPECT_FALSE(cuda::launch_gemv_fp8_mma(x + 1, 64, 1, w, 64, 64, 0, false, dy.p, 64, true, nullptr, s)) << "x align";
  EXPECT_FALSE(cuda::launch_gemv(x, 24, 1, w, 64, 24, dy.p, 64, true, s)) << "K % 16: no FP8 kernel takes it";
  EXPECT_FALSE(cuda::launch_gemv(x, 64, 9, w, 64, 64, dy.p, 64, true, s)) << "n > 8: no GEMV takes it";
  cuda::GemvW no_scale = w;
  no_scale.input_scale = nullptr;
  EXPECT_FALSE(cuda::launch_gemv_fp8_mma(x, 64, 1, no_scale, 64, 64, 0, false, dy.p, 64, true, nullptr, s));
  cuda::GemvW weight_only = w;
  weight_only.act = cuda::GemvAct::kNone;
  EXPECT_FALSE(cuda::launch_gemv_fp8_mma(x, 64, 1, weight_only, 64, 64, 0, false, dy.p, 64, true, nullptr, s));
  EXPECT_TRUE(cuda::launch_gemv(x, 64, 1, weight_only, 64, 64, dy.p, 64, true, s)) << "the CUDA-core kernel takes it";
  EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  cudaStreamDestroy(s);
}

// The fold at n = 8 rows of K = 14336: x_q fills 115 KB of shared memory (past the 48 KB default,
// one block per SM, 256 tiles in two waves). Residual, normalized output and the counter as in
// MatchesReference.
TEST(GemvFp8Mma, FoldEightRowsOfLongK) {
  REQUIRE_GPU();
  std::mt19937 rng(7);
  cudaStream_t s;
  cudaStreamCreate(&s);
  const int N = 4096, K = 14336, n = 8;
  const float* lut = fp8_decode_table();
  std::vector<uint8_t> wq(size_t(N) * K);
  std::normal_distribution<float> d(0.0f, 16.0f), nd(0.0f, 1.0f);
  for (auto& q : wq) {
    q = f32_to_fp8e4m3(d(rng));
    if ((q & 0x7f) == 0x7f) q ^= 1;
  }
  std::vector<float> xk(size_t(n) * K);
  for (auto& v : xk) v = bf16_round(nd(rng));
  const float input_scale = fp8_amax(xk.data(), int64_t(n) * K) / 448.0f;
  std::vector<float> row_scales(static_cast<size_t>(N));
  std::uniform_real_distribution<float> us(0.5f / 256.0f, 2.0f / 256.0f);
  for (auto& v : row_scales) v = us(rng);
  std::vector<float> ref(size_t(n) * N);
  {
    std::vector<uint8_t> xq(static_cast<size_t>(K));
    for (int m = 0; m < n; ++m) {
      fp8_quantize(xk.data() + size_t(m) * K, K, input_scale, xq.data());
      for (int r = 0; r < N; ++r) {
        double a = 0;
        const uint8_t* wr = wq.data() + size_t(r) * K;
        for (int k = 0; k < K; ++k) a += double(lut[xq[size_t(k)]]) * lut[wr[k]];
        ref[size_t(m) * N + r] = float(a * input_scale * row_scales[size_t(r)]);
      }
    }
  }
  std::vector<uint16_t> xb(xk.size());
  for (size_t i = 0; i < xk.size(); ++i) xb[i] = f32_to_bf16(xk[i]);
  const std::vector<float> res0 = random_vec(size_t(n) * N, rng, 1.0f, false), normw = random_vec(size_t(N), rng, 1.0f, false);
  DevBuf dw(wq), dx(xb), drs(row_scales), dis(std::vector<float>{input_scale}), dres(res0), dnw(normw);
  DevBuf dy(size_t(n) * N * 2), dout(size_t(n) * N * 2), counter(4);
  cudaMemset(counter.p, 0, 4);
  cudaMemset(dy.p, 0xff, size_t(n) * N * 2);
  cudaMemset(dout.p, 0xff, size_t(n) * N * 2);
  cuda::GemvW w;
  w.data = dw.p;
  w.fp8 = true;
  w.act = cuda::GemvAct::kStatic;
  w.input_scale = dis.as<float>();
  w.row_scales = drs.as<float>();
  ASSERT_TRUE(cuda::launch_gemv_add_rms_norm(dx.as<cuda::bf16_t>(), K, n, w, N, K, dy.as<cuda::bf16_t>(), N,
                                             dres.as<float>(), dnw.as<float>(), 1e-5f, dout.as<cuda::bf16_t>(), N,
                                             counter.as<unsigned int>(), s));
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  const std::vector<float> got = bf16_from_device(dy.p, ref.size());
  EXPECT_CLOSE(got, ref, 6e-3, "y (bf16)");
  std::vector<float> res_ref(res0.size()), out_ref(res0.size());
  for (int m = 0; m < n; ++m) {
    double ss = 0;
    for (int r = 0; r < N; ++r) {
      const size_t j = size_t(m) * N + r;
      res_ref[j] = res0[j] + got[j];
      ss += double(res_ref[j]) * res_ref[j];
    }
    const double inv = 1.0 / std::sqrt(ss / N + 1e-5);
    for (int r = 0; r < N; ++r) out_ref[size_t(m) * N + r] = float(res_ref[size_t(m) * N + r] * inv * normw[size_t(r)]);
  }
  const std::vector<float> res_got = f32_from_device(dres.p, res0.size());
  const std::vector<float> out_got = bf16_from_device(dout.p, res0.size());
  EXPECT_CLOSE(res_got, res_ref, 1e-6, "residual");
  EXPECT_CLOSE(out_got, out_ref, 6e-3, "normed output");
  unsigned int c = 1;
  cudaMemcpy(&c, counter.p, 4, cudaMemcpyDeviceToHost);
  EXPECT_EQ(c, 0u) << "the fold leaves its counter at 0";
  cudaStreamDestroy(s);
}
