#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"
#include "core/thread_pool.h"

using namespace kiln;

TEST(DType, Bf16RoundTripAndRounding) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-3.5f)), -3.5f);
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(DType, F16AllValuesRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_f16(f), h) << "f16 bits " << h;
  }
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // rounds to inf
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
}

TEST(DType, Fp8E4M3AllValuesRoundTrip) {
  for (uint32_t v = 0; v < 256; ++v) {
    float f = fp8e4m3_to_f32(uint8_t(v));
    if (std::isnan(f)) continue;
    if (v == 0x80) continue;  // -0 maps to -0 (0x80) too, but signbit check below
    ASSERT_EQ(f32_to_fp8e4m3(f), v) << "fp8 bits " << v << " value " << f;
  }
  EXPECT_EQ(fp8e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(f32_to_fp8e4m3(1000.0f), 0x7e);
  EXPECT_EQ(fp8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
}

TEST(ThreadPool, CoversRangeExactlyOnce) {
  ThreadPool pool(3);
  for (int64_t n : {1, 2, 3, 7, 100, 1001}) {
    std::vector<std::atomic<int>> hits(n);
    pool.parallel_for(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1);
  }
}

static Result<int> parse_positive(int x) {
  if (x <= 0) return Status::error("x must be positive, got " + std::to_string(x));
  return x;
}
static Status use_it(int x, int* out) {
  KILN_ASSIGN_OR_RETURN(*out, parse_positive(x));
  return Status::ok();
}

TEST(Status, PropagatesMessages) {
  int v = 0;
  EXPECT_TRUE(use_it(3, &v).is_ok());
  EXPECT_EQ(v, 3);
  Status s = use_it(-2, &v);
  EXPECT_FALSE(s.is_ok());
  EXPECT_EQ(s.message(), "x must be positive, got -2");
  EXPECT_EQ(s.with_context("f.json").message(), "f.json: x must be positive, got -2");
}
