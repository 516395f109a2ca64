#include "backend/cpu/cpu_bandwidth.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "core/thread_pool.h"

namespace kiln {

double cpu_stream_read_gbps(size_t bytes, int repeats) {
  const size_t n = bytes / sizeof(float);
  std::vector<float> buf(n);
  parallel_for(int64_t(n), [&](int64_t b, int64_t e) {  // first touch on the threads that read
    for (int64_t i = b; i < e; ++i) buf[size_t(i)] = float(i & 1023);
  });
  std::atomic<uint32_t> sink{0};
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    parallel_for(int64_t(n), [&](int64_t b, int64_t e) {
#if defined(__AVX2__)
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t i = b;
      for (; i + 32 <= e; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(&buf[size_t(i)]));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(&buf[size_t(i) + 8]));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(&buf[size_t(i) + 16]));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(&buf[size_t(i) + 24]));
      }
      float tmp[8];
      _mm256_storeu_ps(tmp, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      float s = tmp[0] + tmp[1] + tmp[2] + tmp[3] + tmp[4] + tmp[5] + tmp[6] + tmp[7];
      for (; i < e; ++i) s += buf[size_t(i)];
#else
      float s = 0.0f;
      for (int64_t i = b; i < e; ++i) s += buf[size_t(i)];
#endif
      sink.fetch_add(uint32_t(s), std::memory_order_relaxed);  // keep the loads alive
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(n * sizeof(float)) / s / 1e9);
  }
  return best;
}

}  // namespace kiln
