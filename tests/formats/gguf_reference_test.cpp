// Tests against files made elsewhere: gguf-py's quantization fixture (written by
// tests/py/test_formats_gguf_quants.py) and the default model GGUF.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "formats/gguf.h"

using namespace kiln;

// Every tensor "q.<TYPE>.<kind>" must dequantize to "ref.<TYPE>.<kind>" (gguf-py's result on the same
// bytes) exactly: both compute in f32 with the same operation order (ggml's).
TEST(GgufQuantFixture, MatchesReference) {
  const char* path = std::getenv("KILN_GGUF_QUANT_FIXTURE");
  if (!path) GTEST_SKIP() << "KILN_GGUF_QUANT_FIXTURE not set (tests/py/test_formats_gguf_quants.py sets it)";
  auto f = GgufFile::open(path);
  ASSERT_TRUE(f.is_ok()) << f.message();
  int compared = 0;
  for (const auto& q : f->tensors()) {
    if (q.name.rfind("q.", 0) != 0) continue;
    const GgufFile::Tensor* ref = f->find("ref." + q.name.substr(2));
    ASSERT_NE(ref, nullptr) << q.name;
    ASSERT_EQ(ref->type, GgmlType::kF32);
    ASSERT_EQ(ref->numel(), q.numel()) << q.name;
    std::vector<float> got(size_t(q.numel())), want(size_t(q.numel()));
    ASSERT_TRUE(f->dequantize(q, got.data()).is_ok());
    ASSERT_TRUE(f->dequantize(*ref, want.data()).is_ok());
    double max_diff = 0, max_ref = 0;
    size_t worst = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double d = std::fabs(double(got[i]) - double(want[i]));
      if (d > max_diff || std::isnan(d)) {
        max_diff = std::isnan(d) ? INFINITY : d;
        worst = i;
      }
      max_ref = std::max(max_ref, std::fabs(double(want[i])));
    }
    std::printf("compared %s (%s, %lld values) max_abs_diff=%.3g max_abs_ref=%.3g\n", q.name.c_str(),
                std::string(ggml_type_name(q.type)).c_str(), static_cast<long long>(q.numel()), max_diff, max_ref);
    EXPECT_EQ(max_diff, 0.0) << q.name << " at " << worst << ": kiln " << got[worst] << " vs gguf-py " << want[worst];
    ++compared;
  }
  EXPECT_GT(compared, 0);
}

// The default model (SmolLM2-135M-Instruct, Q4_1): every tensor parses and dequantizes to finite
// values, and the tokenizer arrays and chat template are there.
TEST(GgufDefaultModel, EveryTensorDequantizes) {
  const char* path = std::getenv("KILN_DEFAULT_MODEL");
  if (!path) GTEST_SKIP() << "KILN_DEFAULT_MODEL not set (make test sets it to the SmolLM2 GGUF)";
  auto t0 = std::chrono::steady_clock::now();
  auto f = GgufFile::open(path);
  const double open_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(f.is_ok()) << f.message();
  std::printf("opened %s: GGUF v%u, %zu metadata keys, %zu tensors in %.1f ms\n", path, f->version(),
              f->metadata().size(), f->tensors().size(), open_ms);
  EXPECT_GE(f->version(), 2u);
  const auto* tokens = f->get("tokenizer.ggml.tokens");
  ASSERT_NE(tokens, nullptr);
  ASSERT_NE(tokens->as_string_array(), nullptr);
  EXPECT_GT(tokens->size(), 1000u);
  EXPECT_TRUE(f->get_string("tokenizer.chat_template").has_value());
  EXPECT_TRUE(f->get_string("tokenizer.ggml.model").has_value());
  const auto* embd = f->find("token_embd.weight");
  ASSERT_NE(embd, nullptr);
  EXPECT_EQ(embd->ne.size(), 2u);
  EXPECT_EQ(uint64_t(embd->ne[1]), tokens->size());
  std::map<std::string, int> by_type;
  std::vector<float> buf;
  for (const auto& t : f->tensors()) {
    ASSERT_TRUE(ggml_type_dequantizable(t.type)) << t.name << " " << ggml_type_name(t.type);
    buf.resize(size_t(t.numel()));
    ASSERT_TRUE(f->dequantize(t, buf.data()).is_ok()) << t.name;
    double sum_sq = 0;
    for (float v : buf) {
      ASSERT_TRUE(std::isfinite(v)) << t.name;
      sum_sq += double(v) * v;
    }
    EXPECT_GT(sum_sq, 0.0) << t.name << " is all zeros";
    by_type[std::string(ggml_type_name(t.type))]++;
  }
  for (const auto& [name, n] : by_type) std::printf("  %s: %d tensors\n", name.c_str(), n);
}
